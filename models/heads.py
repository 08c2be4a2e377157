"""Classifier heads: ``fc``, ``fcN`` (one hidden layer of N), ``spinal`` and ``progressive``.

The spinal and progressive heads are :mod:`spinalkern`'s fused modules, so their kernel
backend (one of ``spinalkern.backend_names()``) is selectable; the other two are plain torch.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from torch import nn

import spinalkern

HEAD_KINDS = ("fc", "mlp", "spinal", "progressive")
BACKENDS = spinalkern.backend_names()  # "auto", "torch", then every registered fused backend


@dataclass(frozen=True)
class HeadConfig:
    """What a head looks like (sizes other than in/out features, dropout, BatchNorm)."""
    kind: str                  # "fc" | "mlp" | "spinal" | "progressive"
    hidden: int = 0            # mlp: hidden width; spinal/progressive: layer width H
    layers: int = 0            # spinal/progressive: number of hidden layers n
    splits: int = 2            # spinal: number of input segments S
    dropout: float = 0.0
    batch_norm: bool = False   # mlp / spinal: BatchNorm1d after each hidden Linear
    dropout_in: bool = True    # fc / mlp: dropout also before the first Linear

    def with_overrides(self, **kw) -> "HeadConfig":
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = set(kw) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown head option(s) {sorted(unknown)}; "
                             f"known: {sorted(asdict(self))}")
        return replace(self, **kw)

    def validate(self, in_features: int) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; known: {HEAD_KINDS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {self.dropout}")
        if self.kind != "fc" and self.hidden <= 0:
            raise ValueError(f"{self.kind} head needs a positive hidden width, got {self.hidden}")
        if self.kind in ("spinal", "progressive") and self.layers <= 0:
            raise ValueError(f"{self.kind} head needs >= 1 layer, got {self.layers}")
        if self.kind == "spinal":
            if self.splits <= 0 or in_features % self.splits:
                raise ValueError(f"spinal head: {in_features} input features cannot be split "
                                 f"into {self.splits} equal segments")


def parse_head_name(name: str) -> tuple[str, dict]:
    """``fc`` | ``fc<N>`` | ``spinal`` | ``progressive`` -> (kind, overrides)."""
    if name in ("fc", "spinal", "progressive"):
        return name, {}
    m = re.fullmatch(r"fc(\d+)", name)
    if m:
        return "mlp", {"hidden": int(m.group(1))}
    raise ValueError(f"unknown head {name!r}; known: fc, fc<N> (e.g. fc512), spinal, progressive")


class FCHead(nn.Sequential):
    """[Dropout] Linear."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0):
        layers = [nn.Dropout(dropout)] if dropout > 0 else []
        super().__init__(*layers, nn.Linear(in_features, out_features))


class MLPHead(nn.Sequential):
    """[Dropout] Linear [BatchNorm1d] ReLU [Dropout] Linear: the original VGG-5 classifier
    (dropout 0.5 + BatchNorm), the small CNN's 50-unit layer, ResNet-18's 512-unit layer."""

    def __init__(self, in_features: int, hidden: int, out_features: int, dropout: float = 0.0,
                 batch_norm: bool = False, dropout_in: bool = True):
        layers = []
        if dropout > 0 and dropout_in:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(in_features, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, out_features))
        super().__init__(*layers)


def make_head(cfg: HeadConfig, in_features: int, num_classes: int,
              backend: str = "auto") -> nn.Module:
    """Build the head ``cfg`` for ``in_features`` inputs and ``num_classes`` outputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    cfg.validate(in_features)
    if cfg.kind == "fc":
        return FCHead(in_features, num_classes, cfg.dropout if cfg.dropout_in else 0.0)
    if cfg.kind == "mlp":
        return MLPHead(in_features, cfg.hidden, num_classes, cfg.dropout, cfg.batch_norm,
                       cfg.dropout_in)
    if cfg.kind == "spinal":
        return spinalkern.SpinalHead(in_features, num_classes, cfg.hidden, cfg.layers,
                                     cfg.splits, dropout=cfg.dropout,
                                     batch_norm=cfg.batch_norm, backend=backend)
    if cfg.batch_norm:
        raise ValueError("the progressive head has no BatchNorm option")
    return spinalkern.ProgressiveHead(in_features, num_classes, cfg.hidden, cfg.layers,
                                      dropout=cfg.dropout, backend=backend)
