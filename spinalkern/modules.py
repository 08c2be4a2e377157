"""SpinalHead and ProgressiveHead: drop-in nn.Modules over every backend."""
from __future__ import annotations

import torch
from torch import nn

from . import _backends, ops
from .reference import reference_forward
from .rng import new_seed
from .spec import HeadSpec


def _check_size(name, v, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be positive, got {v}")


class _Head(nn.Module):
    """The configuration is checked once, here; each call checks only x (shape, dtype,
    device) and runs the backend resolved for x's device (see ``spinalkern._backends``)."""

    def __init__(self, spec: HeadSpec, dropout: float, batch_norm: bool, backend: str):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if not isinstance(batch_norm, bool):
            raise TypeError(f"batch_norm must be a bool, got {type(batch_norm).__name__} "
                            f"{batch_norm!r}")
        self.spec = spec
        self.dropout = float(dropout)
        self.backend = _backends.check_name(backend)
        self.layers = nn.ModuleList(nn.Linear(spec.in_width(L), spec.H) for L in range(spec.n))
        self.out = nn.Linear(spec.in_width(spec.n), spec.C)
        self.norms = (nn.ModuleList(nn.BatchNorm1d(spec.H) for _ in range(spec.n))
                      if batch_norm else None)

    def _params(self):
        """([W_0..W_out], [b_0..b_out]) of the live submodules, read without nn.Module's
        attribute lookup (this runs on every call)."""
        linears = (*self._modules["layers"]._modules.values(), self._modules["out"])
        return ([m._parameters["weight"] for m in linears],
                [m._parameters["bias"] for m in linears])

    def weights(self) -> list[torch.Tensor]:
        return self._params()[0]

    def biases(self) -> list[torch.Tensor]:
        return self._params()[1]

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={s.D}, out_features={s.C}, hidden_features={s.H}, "
                f"num_layers={s.n}, num_splits={s.num_splits}, dropout={self.dropout}, "
                f"backend={self.backend!r}")

    def _check_input(self, x):
        w = self._modules["out"]._parameters["weight"]
        if type(x) is torch.Tensor and x.dtype == w.dtype and x.device == w.device \
                and x.dim() == 2 and x.shape[1] == self.spec.D:
            return  # the usual case, in a few attribute reads
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"x must have shape (batch, {self.spec.D}), got {tuple(x.shape)}")
        if x.shape[1] != self.spec.D:
            raise ValueError(f"x has {x.shape[1]} features, expected in_features={self.spec.D}")
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the head's parameters are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the head's parameters are {w.dtype}; "
                            "convert one, or use torch.autocast")

    def _folded_params(self):
        """Weights and biases with eval-mode BatchNorm folded in (z*scale + shift)."""
        ws, bs = self._params()
        for i, bn in enumerate(self.norms):
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            ws[i] = ws[i] * scale[:, None]
            bs[i] = bs[i] * scale + shift
        return ws, bs

    def _bn_uses_batch_stats(self) -> bool:
        """BatchNorm1d's rule: batch statistics in training, and in eval when it keeps no
        running statistics (track_running_stats=False)."""
        return self.training or any(bn.running_mean is None for bn in self.norms)

    def _bn_fusable(self) -> bool:
        """The BN op takes one eps and either every gamma/beta or none, and normalises every
        layer with batch statistics: heads whose norms differ in that run the reference."""
        norms = list(self.norms)
        first = norms[0]
        return all(bn.eps == first.eps and bn.affine == first.affine
                   and (bn.running_mean is None) == (first.running_mean is None)
                   for bn in norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        backend = _backends.resolve(self.backend, x.device)
        p = self.dropout if self.training else 0.0
        if self.norms is None:  # (the plain head first: its call is the one to keep short)
            ws, bs = self._params()
            if backend is None:
                return reference_forward(self.spec, x, ws, bs, p)
            return _run_op(backend, self.spec, x, ws, bs, p)
        batch_stats = self._bn_uses_batch_stats()
        if batch_stats and x.shape[0] == 1:  # as BatchNorm1d does
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {torch.Size([1, self.spec.H])}")
        if batch_stats and backend is not None and backend.bn_forward_op is not None \
                and self._bn_fusable():
            return self._bn_forward(backend.bn_forward_op, x, p)
        if backend is None or batch_stats:
            # The eager reference (also for BatchNorm with batch statistics on a backend
            # without a BN op, or norms that the op cannot express)
            ws, bs = self._params()
            return reference_forward(self.spec, x, ws, bs, p, norms=list(self.norms))
        ws, bs = self._folded_params()
        return _run_op(backend, self.spec, x, ws, bs, p)

    def _bn_forward(self, op, x, dropout: float):
        """The fused BN op (batch statistics), then the running statistics updated from its
        ``stats`` as BatchNorm1d updates them (in place, on the device)."""
        norms = list(self.norms)
        x, ws, bs = _autocast(x, *self._params())
        acc = ops.bn_accumulation_dtype(x)  # gamma and beta stay in the accumulation dtype
        gammas = [bn.weight.to(acc) for bn in norms] if norms[0].affine else []
        betas = [bn.bias.to(acc) for bn in norms] if norms[0].affine else []
        seed = new_seed(x.device) if dropout > 0.0 else None
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, *ws, *bs, *gammas, *betas))
        y, _, _, stats = op(x, ws, bs, gammas, betas, seed, self.spec.num_splits, dropout,
                            norms[0].eps, needs_grad)
        if self.training:
            with torch.no_grad():
                for bn, st in zip(norms, stats):
                    if not bn.track_running_stats:
                        continue
                    bn.num_batches_tracked.add_(1)
                    f = bn.momentum if bn.momentum is not None \
                        else 1.0 / bn.num_batches_tracked  # cumulative average, on the device
                    bn.running_mean.mul_(1 - f).add_(st[0] * f)
                    bn.running_var.mul_(1 - f).add_(st[2] * f)
        return y


def _autocast(x, weights, biases):
    """x, weights and biases in the autocast dtype when autocast is on for x's device (the
    fused ops compute in one dtype)."""
    if not torch._C._is_any_autocast_enabled():
        return x, weights, biases
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases]
    return x, weights, biases


def _run_op(backend: _backends.Backend, spec: HeadSpec, x, weights, biases, dropout: float):
    """Call a fused backend's forward op: cast for autocast, draw the dropout seed, and save
    the hidden activations only when a backward can follow."""
    x, weights, biases = _autocast(x, weights, biases)
    # (without autocast the op itself checks that every weight has x's dtype; it also accepts
    # any strides)
    seed = new_seed(x.device) if dropout > 0.0 else None
    save_hidden = False
    if torch.is_grad_enabled():
        for t in (x, *weights, *biases):
            if t.requires_grad:
                # hidden is saved for backward, or (from ops.RECOMPUTE_HIDDEN_FROM_BATCH rows
                # on) recomputed there from the inputs
                save_hidden = not ops.recompute_hidden(x.shape[0])
                break
    args = (x, weights, biases, seed, spec.kind_code, spec.num_splits, dropout, save_hidden)
    if backend.forward_fast is not None and not torch.compiler.is_compiling():
        y = backend.forward_fast(*args)
        if y is not NotImplemented:
            return y
    return backend.forward_op(*args)[0]


def fused_head(spec: HeadSpec, x, weights, biases, dropout: float, backend="auto"):
    """y of the head ``spec`` through a fused backend (a name, or a registered
    ``spinalkern._backends.Backend``), as the modules run it (autocast, dropout seed)."""
    if isinstance(backend, str):
        name = backend
        backend = _backends.resolve(_backends.check_name(name), x.device)
        if backend is None:
            raise ValueError(f"backend={name!r} runs no fused backend on {x.device}")
    return _run_op(backend, spec, x, weights, biases, dropout)


class SpinalHead(_Head):
    """Sequential SpinalNet head (see ``spinalkern.spec``)."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int = 128,
                 num_layers: int = 4, num_splits: int = 2, dropout: float = 0.0,
                 batch_norm: bool = False, backend: str = "auto"):
        for name, v in (("in_features", in_features), ("out_features", out_features),
                        ("hidden_features", hidden_features), ("num_layers", num_layers),
                        ("num_splits", num_splits)):
            _check_size(name, v)
        spec = HeadSpec("spinal", in_features, hidden_features, num_layers, out_features,
                        num_splits)
        super().__init__(spec, dropout, batch_norm, backend)


class ProgressiveHead(_Head):
    """ProgressiveSpinalNet head (see ``spinalkern.spec``)."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int = 128,
                 num_layers: int = 4, dropout: float = 0.0, backend: str = "auto"):
        for name, v in (("in_features", in_features), ("out_features", out_features),
                        ("hidden_features", hidden_features), ("num_layers", num_layers)):
            _check_size(name, v)
        spec = HeadSpec("progressive", in_features, hidden_features, num_layers, out_features)
        super().__init__(spec, dropout, False, backend)
