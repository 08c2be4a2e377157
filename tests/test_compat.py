"""load_original_state_dict on every naming family of the original SpinalNet scripts.

Each family is produced by a re-creation of the original module's structure, written from the
papers' descriptions (layer names as in the original scripts): the head splits the features in
equal segments taken in turn, every hidden layer reads [its segment; the previous layer's
output] and the output layer reads all hidden outputs.  The loaded SpinalHead must compute what
the re-created module computes (float64, fresh random weights and inputs).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import models
from spinalkern import SpinalHead, load_original_state_dict
from spinalkern.compat import convert_original_state_dict, find_original_head

@pytest.fixture(autouse=True)
def _float64():
    """Modules and inputs in float64, so the comparisons are tight."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _randomise(module: nn.Module, seed: int):
    """Fresh random weights everywhere, and non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module.eval()


def _spinal_forward(x, hidden_layers, out_layer, num_splits):
    """The original scripts' forward: segment i mod S, then the previous layer's output."""
    seg = x.shape[1] // num_splits
    outs = []
    for i, layer in enumerate(hidden_layers):
        s = x[:, (i % num_splits) * seg:(i % num_splits + 1) * seg]
        outs.append(layer(s if i == 0 else torch.cat([s, outs[-1]], dim=1)))
    return out_layer(torch.cat(outs, dim=1))


# ---------------------------------------------------------------------------------------------
# Family "mnist": fc1, fc1_1 .. fc1_5, fc2 -- the MNIST script's CNN with a 6 x 8 spinal head
# ---------------------------------------------------------------------------------------------
class OriginalSpinalMnistCNN(nn.Module):
    """PyTorch's MNIST example CNN (two 5x5 convolutions, 320 features) with the SpinalNet
    paper's 6-layer x 8-neuron head on the two halves of the features (Table II: 13.82k
    parameters).  Hidden layers are plain Linears followed by ReLU in forward."""

    def __init__(self, half=160, width=8, classes=10):
        super().__init__()
        self.half = half
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(half, width)
        self.fc1_1 = nn.Linear(half + width, width)
        self.fc1_2 = nn.Linear(half + width, width)
        self.fc1_3 = nn.Linear(half + width, width)
        self.fc1_4 = nn.Linear(half + width, width)
        self.fc1_5 = nn.Linear(half + width, width)
        self.fc2 = nn.Linear(width * 6, classes)

    def features(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        return x.view(-1, 320)

    def head(self, x):
        h = self.half
        x1 = F.relu(self.fc1(x[:, 0:h]))
        x2 = F.relu(self.fc1_1(torch.cat([x[:, h:2 * h], x1], dim=1)))
        x3 = F.relu(self.fc1_2(torch.cat([x[:, 0:h], x2], dim=1)))
        x4 = F.relu(self.fc1_3(torch.cat([x[:, h:2 * h], x3], dim=1)))
        x5 = F.relu(self.fc1_4(torch.cat([x[:, 0:h], x4], dim=1)))
        x6 = F.relu(self.fc1_5(torch.cat([x[:, h:2 * h], x5], dim=1)))
        return self.fc2(torch.cat([x1, x2, x3, x4, x5, x6], dim=1))

    def forward(self, x):
        return F.log_softmax(self.head(self.features(x)), dim=1)


def test_mnist_family_full_model():
    orig = _randomise(OriginalSpinalMnistCNN(), 1)
    assert sum(p.numel() for p in orig.parameters()) == 13_818  # the paper's 13.82k
    sd = orig.state_dict()  # the whole model: conv1.*, conv2.*, fc1.*, fc1_1.* ... fc2.*
    assert find_original_head(sd) == ("", "mnist")
    head = SpinalHead(320, 10, 8, 6, 2, backend="torch").eval()
    load_original_state_dict(head, sd)
    x = torch.randn(37, 320)
    with torch.no_grad():
        assert rel_err(head(x), orig.head(x)) < 1e-12

    # the repository's spinal-cnn-8 preset is this model: backbone + head load, outputs agree
    model = models.build("spinal-cnn-8", 10, backend="torch").double().eval()
    model.backbone.load_state_dict({k: v for k, v in sd.items() if k.startswith("conv")})
    load_original_state_dict(model.head, sd)
    images = torch.randn(9, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(F.log_softmax(model(images), dim=1), orig(images)) < 1e-12


# ---------------------------------------------------------------------------------------------
# Family "resnet": fc1 .. fc4, fc_layer -- the CIFAR ResNet scripts' 4 x 20 spinal head
# ---------------------------------------------------------------------------------------------
class OriginalSpinalCifarResNet(nn.Module):
    """A CIFAR network with 512 features and the SpinalNet paper's ResNet-18 head (Table II:
    4HL, 20 neurons per layer) on the two halves of the features.  ``blocks=True`` makes each
    layer a Sequential (Dropout, Linear, BatchNorm1d, ReLU) as in the VGG-style heads, else a
    plain Linear followed by ReLU in forward."""

    def __init__(self, features=512, width=20, classes=10, blocks=False):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64),
                                   nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                   nn.Linear(256, features))
        half = features // 2

        def hidden(k):
            if blocks:
                return nn.Sequential(nn.Dropout(0.5), nn.Linear(k, width),
                                     nn.BatchNorm1d(width), nn.ReLU(inplace=True))
            return nn.Linear(k, width)
        self.blocks = blocks
        self.fc1 = hidden(half)
        self.fc2 = hidden(half + width)
        self.fc3 = hidden(half + width)
        self.fc4 = hidden(half + width)
        self.fc_layer = (nn.Sequential(nn.Dropout(0.5), nn.Linear(4 * width, classes)) if blocks
                         else nn.Linear(4 * width, classes))

    def head(self, x):
        act = (lambda m: m) if self.blocks else (lambda m: lambda t: F.relu(m(t)))
        return _spinal_forward(x, [act(m) for m in (self.fc1, self.fc2, self.fc3, self.fc4)],
                               self.fc_layer, 2)

    def forward(self, x):
        return self.head(self.trunk(x))


@pytest.mark.parametrize("blocks", [False, True], ids=["linear", "dropout-linear-bn-relu"])
def test_resnet_family_with_a_wrapper_prefix(blocks):
    orig = _randomise(OriginalSpinalCifarResNet(blocks=blocks), 2)
    # saved from nn.DataParallel: every key starts with "module."; the trunk's keys are there too
    sd = {f"module.{k}": v for k, v in orig.state_dict().items()}
    assert find_original_head(sd) == ("module.", "resnet")
    head = SpinalHead(512, 10, 20, 4, 2, dropout=0.5, batch_norm=blocks, backend="torch").eval()
    load_original_state_dict(head, sd)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        feats = orig.trunk(x)
        assert rel_err(head(feats), orig.head(feats)) < 1e-12
        assert rel_err(head(orig.trunk(x)), orig(x)) < 1e-12


# ---------------------------------------------------------------------------------------------
# Family "custom": fc1 .. fcN, fcx -- the customisable SpinalNet (any N, any number of splits)
# ---------------------------------------------------------------------------------------------
class OriginalCustomSpinalNet(nn.Module):
    """SpinalNet as an independent network (the paper's Fig. 1): ``num_layers`` hidden layers
    of ``width`` neurons, the input split into ``num_splits`` segments taken in turn."""

    def __init__(self, inputs, width, num_layers, num_splits, outputs):
        super().__init__()
        seg = inputs // num_splits
        self.num_layers, self.num_splits = num_layers, num_splits
        for i in range(1, num_layers + 1):
            setattr(self, f"fc{i}", nn.Linear(seg + (width if i > 1 else 0), width))
        self.fcx = nn.Linear(width * num_layers, outputs)

    def forward(self, x):
        hidden = [lambda t, m=getattr(self, f"fc{i}"): F.relu(m(t))
                  for i in range(1, self.num_layers + 1)]
        return _spinal_forward(x, hidden, self.fcx, self.num_splits)


@pytest.mark.parametrize("n,splits", [(6, 2), (5, 3), (12, 4)])
def test_custom_family(n, splits):
    orig = _randomise(OriginalCustomSpinalNet(96, 12, n, splits, 7), 3)
    sd = orig.state_dict()
    assert find_original_head(sd) == ("", "custom")
    head = SpinalHead(96, 7, 12, n, splits, backend="torch").eval()
    load_original_state_dict(head, sd)
    x = torch.randn(11, 96)
    with torch.no_grad():
        assert rel_err(head(x), orig(x)) < 1e-12


# ---------------------------------------------------------------------------------------------
# Family "spinalnet" beside a backbone whose squeeze-excitation convolutions are named fc1/fc2
# ---------------------------------------------------------------------------------------------
class OriginalSpinalTransferHead(nn.Module):
    """The transfer-learning scripts' head (fc_spinal_layerK / fc_out Sequentials)."""

    def __init__(self, features, width, classes):
        super().__init__()
        half = features // 2

        def block(k):
            return nn.Sequential(nn.Dropout(0.5), nn.Linear(k, width), nn.BatchNorm1d(width),
                                 nn.ReLU(inplace=True))
        self.fc_spinal_layer1 = block(half)
        self.fc_spinal_layer2 = block(half + width)
        self.fc_spinal_layer3 = block(half + width)
        self.fc_spinal_layer4 = block(half + width)
        self.fc_out = nn.Sequential(nn.Dropout(0.5), nn.Linear(4 * width, classes))

    def forward(self, x):
        return _spinal_forward(x, [self.fc_spinal_layer1, self.fc_spinal_layer2,
                                   self.fc_spinal_layer3, self.fc_spinal_layer4], self.fc_out, 2)


def test_spinalnet_family_beside_squeeze_excitation_layers():
    backbone = torchvision.models.mobilenet_v3_small()  # its SE blocks hold Conv2d fc1 / fc2
    assert any(k.endswith(".fc1.weight") for k in backbone.state_dict())
    orig = _randomise(OriginalSpinalTransferHead(576, 32, 10), 4)
    sd = {**{f"features.{k}": v for k, v in backbone.state_dict().items()},
          **{f"classifier.{k}": v for k, v in orig.state_dict().items()},
          "classifier.fc1.weight": torch.zeros(3, 4)}  # another layer beside the head: ignored
    assert find_original_head(sd) == ("classifier.", "spinalnet")
    head = SpinalHead(576, 10, 32, 4, 2, dropout=0.5, batch_norm=True, backend="torch").eval()
    load_original_state_dict(head, sd)
    x = torch.randn(5, 576)
    with torch.no_grad():
        assert rel_err(head(x), orig(x)) < 1e-12


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    mnist = OriginalSpinalMnistCNN().state_dict()
    custom = OriginalCustomSpinalNet(320, 8, 6, 2, 10).state_dict()
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        load_original_state_dict(SpinalHead(320, 10, 8, 6, 2), list(mnist.items()))
    with pytest.raises(ValueError, match="no original SpinalNet head"):
        load_original_state_dict(SpinalHead(320, 10, 8, 6, 2), {"fc.weight": torch.zeros(3, 4)})
    # two heads: the caller chooses one with prefix=
    both = {**{f"a.{k}": v for k, v in mnist.items()}, **{f"b.{k}": v for k, v in custom.items()}}
    with pytest.raises(ValueError, match="pass prefix="):
        load_original_state_dict(SpinalHead(320, 10, 8, 6, 2), both)
    head = SpinalHead(320, 10, 8, 6, 2).eval()
    load_original_state_dict(head, both, prefix="b")
    assert torch.equal(head.out.weight, custom["fcx.weight"])
    with pytest.raises(ValueError, match=r"expects 4: fc1, fc1_1..fc1_3"):
        load_original_state_dict(SpinalHead(320, 10, 8, 4, 2), mnist)
    with pytest.raises(ValueError, match="shape mismatch for the head's layers.0.weight"):
        load_original_state_dict(SpinalHead(320, 10, 10, 6, 2), mnist)
    bn = {f"x.{k}": v for k, v in OriginalSpinalCifarResNet(blocks=True).state_dict().items()}
    with pytest.raises(ValueError, match="batch_norm=False"):
        load_original_state_dict(SpinalHead(512, 10, 20, 4, 2), bn)
    with pytest.raises(ValueError, match="does not belong to the mnist"):
        convert_original_state_dict({**mnist, "fc3.weight": torch.zeros(2, 2),
                                     "fc3.bias": torch.zeros(2)}, SpinalHead(320, 10, 8, 6, 2))
