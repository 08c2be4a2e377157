"""The backend registry: which fused backends exist, which one a module runs.

This module imports no backend.  Each fused backend registers itself when it is imported
(``spinalkern/__init__.py`` imports them): ``spinalkern/triton_head.py`` and
``spinalkern/cuda_backend.py`` each call :func:`register` with a :class:`Backend` that holds
its forward op object, so a module calls ``backend.forward_op(...)`` directly (no lookup by
name).  ``"torch"`` (the eager reference, :func:`resolve` returns ``None`` for it) and
``"auto"`` are not backends but choices.  :func:`names` lists every choice, in order, for the
modules, models, benchmarks and command lines.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# The choices that are not registered backends.
AUTO, TORCH = "auto", "torch"
# backend="auto" on a CUDA device: the first of these that is available (then any other
# registered backend, in registration order); on CPU always the eager reference.  The order
# is provisional: it will follow the GPU benchmarks (bench/).
AUTO_PREFERENCE = ("triton", "cuda")


@dataclass(frozen=True)
class Backend:
    """One fused backend.

    ``available(device)``: can it run on tensors of ``device`` here?  ``forward_op``: its
    ``torch.ops.spinalkern.<name>_head_forward.default`` (None when not built/loaded; then
    ``available`` is False).  ``build_hint()``: what to do when it is not available.
    ``bn_forward_op``: its training-mode BatchNorm op, when it has one.  ``forward_fast``:
    optionally, the forward op called without ``torch.ops``' per-call argument parsing, same
    arguments, returning only y, or ``NotImplemented`` when it cannot take these arguments
    (the caller then calls ``forward_op``); used by eager calls, not under torch.compile.
    """
    name: str
    available: Callable[[torch.device], bool]
    forward_op: Optional[torch._ops.OpOverload]
    build_hint: Callable[[], str]
    bn_forward_op: Optional[torch._ops.OpOverload] = None
    forward_fast: Optional[Callable] = None


_registry: dict[str, Backend] = {}
_resolved: dict[tuple[str, torch.device], Optional[Backend]] = {}


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def register(backend: Backend) -> Backend:
    """Add (or replace) a fused backend; called by each backend module when it loads."""
    if backend.name in (AUTO, TORCH):
        raise ValueError(f"{backend.name!r} is a reserved backend name")
    _registry[backend.name] = backend
    _resolved.clear()
    return backend


def names() -> tuple[str, ...]:
    """Every backend choice: "auto", "torch", then the registered fused backends."""
    return (AUTO, TORCH, *_registry)


def fused_names() -> tuple[str, ...]:
    """The registered fused backends, in registration order."""
    return tuple(_registry)


def get(name: str) -> Backend:
    """The registered fused backend ``name`` (ValueError for an unknown name)."""
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"backend must be one of {names()}, got {name!r}") from None


def check_name(name) -> str:
    """``name`` if it is a known choice, else a ValueError listing the choices."""
    if not isinstance(name, str) or name not in names():
        raise ValueError(f"backend must be one of {names()}, got {name!r}")
    return name


def available_backends(device) -> list[str]:
    """The choices that can run on ``device`` here ("torch" always; "auto" never listed)."""
    device = torch.device(device)
    return [TORCH] + [b.name for b in _registry.values() if b.available(device)]


def resolve(requested: str, device: torch.device) -> Optional[Backend]:
    """The backend that runs for ``requested`` on ``device``: a :class:`Backend`, or ``None``
    for the eager torch reference.  A fused backend that cannot run there raises a
    RuntimeError that says why and what to do.  Cached per (requested, device)."""
    key = (requested, device)
    try:
        return _resolved[key]
    except KeyError:
        pass
    out = _resolve(requested, device)
    _resolved[key] = out
    return out


def _resolve(requested: str, device: torch.device) -> Optional[Backend]:
    if requested == TORCH:
        return None
    if requested == AUTO:
        if device.type != "cuda":  # on CPU the fused backends exist for verification only
            return None
        order = [n for n in AUTO_PREFERENCE if n in _registry]
        order += [n for n in _registry if n not in order]
        return next((_registry[n] for n in order if _registry[n].available(device)), None)
    b = get(requested)
    if not b.available(device):
        raise RuntimeError(f"backend={requested!r} cannot run on {device}: {b.build_hint()}")
    return b
