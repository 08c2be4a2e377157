"""Model names: every head on every backbone, plus the papers' named presets.

A model name is either ``<backbone>-<head>`` (backbone in ``cnn``, ``vgg5``, ``resnet18``,
``rescnn``; head in ``fc``, ``fc<N>``, ``spinal``, ``progressive``), e.g. ``vgg5-spinal``,
or one of the presets below.  Each backbone has its own default for every head kind (the
paper configuration where a paper gives one); ``build`` accepts overrides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbones import BACKBONES, make_backbone
from .heads import HeadConfig, make_head, parse_head_name

# Default head of each kind for each backbone.
DEFAULT_HEADS = {
    # SpinalNet paper, MNIST CNN: 1 hidden layer of 50 (dropout after it, as in the PyTorch
    # example); spinal 6 layers of 8 (or 10) neurons, 2 segments of 160, no dropout/BN.
    "cnn": {
        "fc": HeadConfig("fc"),
        "mlp": HeadConfig("mlp", hidden=50, dropout=0.5, dropout_in=False),
        "spinal": HeadConfig("spinal", hidden=8, layers=6, splits=2),
        "progressive": HeadConfig("progressive", hidden=8, layers=6),
    },
    # SpinalNet scripts, VGG-5: Dropout 0.5, Linear 512, BN, ReLU, Dropout 0.5, Linear;
    # spinal 4 x 128, 2 segments, dropout 0.5 and BN; progressive 4 x 128, dropout 0.2.
    "vgg5": {
        "fc": HeadConfig("fc"),
        "mlp": HeadConfig("mlp", hidden=512, dropout=0.5, batch_norm=True),
        "spinal": HeadConfig("spinal", hidden=128, layers=4, splits=2, dropout=0.5,
                             batch_norm=True),
        "progressive": HeadConfig("progressive", hidden=128, layers=4, dropout=0.2),
    },
    # Spinal-ResNet18 paper: 1 hidden layer of 512 for the baseline; spinal 4 x 128 on two
    # 256-feature segments (SpinalNet's code); progressive as for VGG-5.
    "resnet18": {
        "fc": HeadConfig("fc"),
        "mlp": HeadConfig("mlp", hidden=512),
        "spinal": HeadConfig("spinal", hidden=128, layers=4, splits=2),
        "progressive": HeadConfig("progressive", hidden=128, layers=4, dropout=0.2),
    },
    "rescnn": {
        "fc": HeadConfig("fc"),
        "mlp": HeadConfig("mlp", hidden=128, dropout=0.5, dropout_in=False),
        "spinal": HeadConfig("spinal", hidden=64, layers=4, splits=2),
        "progressive": HeadConfig("progressive", hidden=64, layers=4, dropout=0.2),
    },
}


@dataclass(frozen=True)
class Preset:
    backbone: str
    head: str                  # head name as in model names: fc, fc512, spinal, ...
    overrides: tuple = ()      # (key, value) pairs applied to the backbone's default head
    note: str = ""


PRESETS = {
    "cnn": Preset("cnn", "fc50", note="SpinalNet Table II: CNN, 1HL 50 neurons"),
    "spinal-cnn-8": Preset("cnn", "spinal", (("hidden", 8),),
                           "SpinalNet Table II: CNN (Spinal FC), 6HL x 8"),
    "spinal-cnn-10": Preset("cnn", "spinal", (("hidden", 10),),
                            "SpinalNet Table II: CNN (Spinal FC), 6HL x 10"),
    "progressive-cnn": Preset("cnn", "progressive"),
    "vgg5": Preset("vgg5", "fc512", note="SpinalNet Table II: VGG-5, 1HL 512"),
    "spinal-vgg5": Preset("vgg5", "spinal", note="SpinalNet Table II: VGG-5 (Spinal FC) 4HL x 128"),
    "progressive-vgg5": Preset("vgg5", "progressive", note="ProgressiveSpinalNet, VGG-5"),
    "resnet18": Preset("resnet18", "fc"),
    "resnet18-fc512": Preset("resnet18", "fc512", note="Spinal-ResNet18 paper: ResNet-18, 1HL 512"),
    "spinal-resnet18": Preset("resnet18", "spinal",
                              note="Spinal-ResNet18 paper: 4HL x 128 (SpinalNet code: 2 segments)"),
    "spinal-resnet18-s4h64": Preset(
        "resnet18", "spinal", (("hidden", 64), ("splits", 4)),
        "Spinal-ResNet18 paper, its section 3.4 wording: 4 segments of 128, 64-wide layers"),
    "progressive-resnet18": Preset("resnet18", "progressive"),
    "rescnn": Preset("rescnn", "fc", note="residual CNN (digits paper), linear classifier"),
    "spinal-rescnn": Preset("rescnn", "spinal"),
    "progressive-rescnn": Preset("rescnn", "progressive"),
}


def resolve(name: str) -> Preset:
    """The :class:`Preset` for a preset name or a ``<backbone>-<head>`` name."""
    if name in PRESETS:
        return PRESETS[name]
    backbone, sep, head = name.partition("-")
    if sep and backbone in BACKBONES:
        parse_head_name(head)  # raises a clear error for an unknown head
        return Preset(backbone, head)
    raise ValueError(
        f"unknown model {name!r}; use a preset ({', '.join(PRESETS)}) or <backbone>-<head> "
        f"with backbone in {', '.join(BACKBONES)} and head in fc, fc<N>, spinal, progressive")


def head_config(name: str, **overrides) -> tuple[str, HeadConfig]:
    """(backbone name, head configuration) of model ``name`` with ``overrides`` applied,
    checked against the backbone's features (a clear ``ValueError`` if impossible)."""
    preset = resolve(name)
    kind, from_name = parse_head_name(preset.head)
    cfg = DEFAULT_HEADS[preset.backbone][kind]
    cfg = cfg.with_overrides(**from_name).with_overrides(**dict(preset.overrides))
    cfg = cfg.with_overrides(**overrides)
    cfg.validate(BACKBONES[preset.backbone].out_features)
    return preset.backbone, cfg


def build_head(name: str, num_classes: int, backend: str = "auto",
               **head_overrides) -> nn.Module:
    """The head of model ``name`` alone, for the features of its backbone (as in ``build``)."""
    backbone, cfg = head_config(name, **head_overrides)
    return make_head(cfg, BACKBONES[backbone].out_features, num_classes, backend)


class Classifier(nn.Module):
    """backbone -> head, for (B, 1, H, W) images; ``forward`` returns logits."""

    def __init__(self, name: str, backbone: nn.Module, head: nn.Module, head_cfg: HeadConfig,
                 num_classes: int):
        super().__init__()
        self.name = name
        self.head_cfg = head_cfg
        self.num_classes = num_classes
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build(name: str, num_classes: int, backend: str = "auto", **head_overrides) -> Classifier:
    """Build model ``name`` with ``num_classes`` outputs.

    ``backend`` picks the spinalkern kernels of spinal/progressive heads.  ``head_overrides``
    (``hidden``, ``layers``, ``splits``, ``dropout``, ``batch_norm``) change the head.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    backbone_name, cfg = head_config(name, **head_overrides)
    backbone = make_backbone(backbone_name)       # first: it draws its weights first
    head = make_head(cfg, backbone.out_features, num_classes, backend)
    return Classifier(name, backbone, head, cfg, num_classes)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
