"""Optimizers and learning-rate schedules that also work inside a captured CUDA graph.

The schedules are plain functions of the global step (no ``torch.optim.lr_scheduler``
objects), so resuming is exact and a CUDA graph never needs re-capturing: on CUDA the learning
rate lives in a 0-d tensor that the optimizer reads on the device, and each step only writes
the new value into it (``fill_``).  The optimizers there are the fused implementations
(``fused=True``; Adam/AdamW also ``capturable=True`` when a graph is captured), which accept a
tensor learning rate and a ``GradScaler``'s device-side ``found_inf`` without a host sync.
"""
from __future__ import annotations

import math
import warnings

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("const", "step", "cosine", "onecycle")


def make_optimizer(params, name: str, lr: float, device: torch.device, *, momentum: float = 0.9,
                   weight_decay: float | None = None, nesterov: bool = False,
                   graph_safe: bool = False) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (momentum).  ``graph_safe``: capturable for CUDA-graph capture.

    ``weight_decay=None`` means torch's default (0.01 for AdamW, 0 otherwise)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    cuda = device.type == "cuda"
    kw = {}
    lr_value = torch.tensor(lr, dtype=torch.float32, device=device) if cuda else lr
    if cuda:
        kw["fused"] = True  # fused kernels: fast, GradScaler-aware, tensor-lr capable
    if name in ("adam", "adamw"):
        if cuda and graph_safe:
            kw["capturable"] = True
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        if weight_decay is None:
            weight_decay = 0.01 if name == "adamw" else 0.0  # torch's defaults
        return cls(params, lr=lr_value, weight_decay=weight_decay, **kw)
    return torch.optim.SGD(params, lr=lr_value, momentum=momentum,
                           weight_decay=0.0 if weight_decay is None else weight_decay,
                           nesterov=nesterov and momentum > 0, **kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate, in place when it is a tensor (graph-safe)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def restore_tensor_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After ``load_state_dict``: make sure tensor learning rates live on ``device``."""
    if device.type != "cuda":
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])
        return
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def quiet_capturable_warning() -> None:
    """Capturable optimizers warn when stepped outside a capture (our warm-up steps)."""
    warnings.filterwarnings("ignore", message=".*capturable=True.*")


def lr_at(step: int, total_steps: int, steps_per_epoch: int, base_lr: float, schedule: str, *,
          milestones=(), gamma: float = 0.1, warmup_steps: int = 0,
          final_lr_fraction: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    * ``const``: ``base_lr``.
    * ``step``: multiplied by ``gamma`` at each epoch in ``milestones`` (e.g. x0.1 at epoch 15
      of 25 as in the Spinal-ResNet18 paper).
    * ``cosine``: cosine annealing from ``base_lr`` to ``final_lr_fraction * base_lr``.
    * ``onecycle``: from ``base_lr / 25`` up to ``base_lr`` over the first 30 % of the steps,
      then cosine down to ``base_lr / 25e4`` (the defaults of torch's ``OneCycleLR``).

    ``warmup_steps`` (not with onecycle) ramps linearly from 0 over the first steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    total_steps = max(total_steps, 1)
    if schedule == "onecycle":
        up = max(int(0.3 * total_steps), 1)
        start, peak, end = base_lr / 25.0, base_lr, base_lr / 25.0 / 1e4
        if step < up:
            return _cos_interp(start, peak, step / up)
        return _cos_interp(peak, end, min((step - up) / max(total_steps - up, 1), 1.0))
    if schedule == "const":
        lr = base_lr
    elif schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        lr = base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    else:  # cosine
        lr = _cos_interp(base_lr, final_lr_fraction * base_lr, min(step / total_steps, 1.0))
    if warmup_steps and step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    return lr


def _cos_interp(a: float, b: float, t: float) -> float:
    """Cosine interpolation from a (t=0) to b (t=1)."""
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))
