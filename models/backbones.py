"""Convolutional feature extractors for 28x28 grayscale images.

Each backbone maps (B, 1, 28, 28) to a flat feature vector (B, ``out_features``):

* ``cnn``      the small MNIST CNN of PyTorch's old MNIST example, used by the SpinalNet paper:
               conv 1->10 k5, max-pool, ReLU, conv 10->20 k5, Dropout2d, max-pool, ReLU
               -> 320 features.
* ``vgg5``     the VGG-5 of the SpinalNet scripts: conv blocks 1->64->64 (pool),
               64->128->128 (pool), 128->256->256->256 (pool), 256->256->256->256 (pool),
               each conv 3x3 pad 1 + BatchNorm + ReLU -> 256 features (1x1 after 4 pools).
* ``resnet18`` torchvision's ResNet-18 with a 1-channel 3x3 stride-1 stem and no max-pool
               (as in the Spinal-ResNet18 paper) -> 512 features.
* ``rescnn``   a residual CNN in the spirit of "Research on Residual Convolutional Neural
               Network for Handwritten Digit Recognition": a 3x3 stem, three residual blocks
               (two 3x3 conv + BatchNorm + ReLU each, 1x1 projection when the shape changes),
               global average pooling and dropout -> 128 features, Xavier-initialised as in
               the paper.  The paper's text gives no layer table (its Figure 4 is not in the
               text), so the widths here are our choice; it has no parameter count to match.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """The SpinalNet paper's MNIST CNN feature extractor (320 features)."""

    out_features = 320

    def __init__(self, conv_dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(conv_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        return torch.flatten(x, 1)


def _conv_bn_relu(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class VGG5(nn.Module):
    """The VGG-5 feature extractor of the SpinalNet scripts (256 features)."""

    out_features = 256
    # Channel chains of the four blocks; every block ends with a 2x2 max-pool.
    BLOCKS = ((1, 64, 64), (64, 128, 128), (128, 256, 256, 256), (256, 256, 256, 256))

    def __init__(self):
        super().__init__()
        layers = []
        for chain in self.BLOCKS:
            for cin, cout in zip(chain[:-1], chain[1:]):
                layers += _conv_bn_relu(cin, cout)
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 for 1-channel 28x28 input: 3x3 stride-1 stem, no max-pool."""

    out_features = 512

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet18  # imported here: only this backbone needs it

        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BatchNorm (+ ReLU) with an identity or 1x1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A small residual CNN for digits (128 features); see the module docstring."""

    out_features = 128

    def __init__(self, dropout: float = 0.25):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(ResidualBlock(32, 32), ResidualBlock(32, 64, stride=2),
                                    ResidualBlock(64, 128, stride=2))
        self.drop = nn.Dropout(dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


BACKBONES = {"cnn": SmallCNN, "vgg5": VGG5, "resnet18": ResNet18, "rescnn": ResidualCNN}


def make_backbone(name: str) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]()
