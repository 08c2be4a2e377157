"""The Triton backend: launchers of the kernels in ``spinalkern.triton_kernels`` and the
registration of ``spinalkern::triton_head_forward`` / ``triton_head_backward``.

A call checks its arguments, makes them contiguous, allocates its outputs and runs the cached
launch plan (``spinalkern.triton_plan``): one launch forward; backward the activation-gradient
chain, the weight-gradient GEMMs and, when the batch is cut into slices, their reduction.

On a GPU the first launch of each plan goes through Triton's launcher, which compiles (or
loads from Triton's cache) the kernel for the arguments' specialisation; later launches call
the compiled kernel directly, skipping Triton's per-call argument binding, as long as every
tensor is 16-byte aligned as before (otherwise Triton's launcher runs again).
"""
from __future__ import annotations

import torch

from . import _backends
from .ops import checked_backward_args, checked_forward_args, define_backend_ops, \
    register_fakes, register_python_autograd
from .spec import HeadSpec
from .triton_bn import bn_forward_op
from .triton_kernels import HAVE_TRITON
from .triton_plan import KernelConfig, default_config, plan_for, sm_count
from .triton_plan import wgrad_splits as _wgrad_splits

if HAVE_TRITON:
    from triton import knobs

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------
def _aligned(args) -> bool:
    """True when every tensor argument starts on a 16-byte boundary."""
    bits = 0
    for a in args:
        if isinstance(a, tuple):
            for t in a:
                bits |= t.data_ptr()
        elif not isinstance(a, (int, float)):  # a tensor
            bits |= a.data_ptr()
    return bits & 15 == 0


def run_launch(launch, args: tuple):
    """Run one planned launch; ``args`` are its runtime parameters in signature order."""
    if args[0].device.type != "cuda":  # Triton's interpreter
        launch.kernel[launch.grid](*args, **launch.options())
        return
    if not _aligned(args):  # a view with an odd offset: Triton's launcher specialises anew
        launch.kernel[launch.grid](*args, **launch.options())
        return
    fast = launch.compiled.get(True)
    if fast is None:
        compiled = launch.kernel[launch.grid](*args, **launch.options())
        consts = tuple(launch.constexprs[p] for p in launch.kernel.arg_names[len(args):])
        launch.compiled[True] = (compiled, compiled.run, compiled.function,
                                 compiled.packed_metadata, consts)
        return
    compiled, run, function, metadata, consts = fast
    g0, g1, g2 = launch.grid
    stream = torch.cuda.current_stream(args[0].device).cuda_stream
    full = args + consts  # what Triton's launcher passes: every parameter, in order
    meta = compiled.launch_metadata(launch.grid, stream, *full)
    run(g0, g1, g2, stream, function, metadata, meta, knobs.runtime.launch_enter_hook,
        knobs.runtime.launch_exit_hook, *full)


# ---------------------------------------------------------------------------------------------
# Argument checks (the shape/dtype/device checks shared by every backend are in spinalkern.ops)
# ---------------------------------------------------------------------------------------------
def _check_triton_args(x):
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not (x.is_cuda or (x.device.type == "cpu" and _backends.interpreting())):
        raise RuntimeError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")


# ---------------------------------------------------------------------------------------------
# The ops' implementations
# ---------------------------------------------------------------------------------------------
def head_forward(x, weights, biases, seed, kind, num_splits, dropout, save_hidden):
    spec = checked_forward_args(x, weights, biases, seed, kind, num_splits, dropout)
    _check_triton_args(x)
    B = x.shape[0]
    y = torch.empty((B, spec.C), dtype=x.dtype, device=x.device)
    hidden = torch.empty((B, spec.n * spec.H) if save_hidden else (0,), dtype=x.dtype,
                         device=x.device)
    if B == 0:
        return y, hidden
    plan = plan_for(spec, x.dtype, B, dropout, save_hidden, x.device)
    hid = hidden
    if not save_hidden and plan.config.fwd_variant == "chunked":  # it passes h through memory
        hid = torch.empty((B, spec.n * spec.H), dtype=x.dtype, device=x.device)
    # ops accept any strides: inputs are made contiguous here (the kernels assume row-major)
    x = x.contiguous()
    run_launch(plan.fwd, (x, y, hid, tuple(w.contiguous() for w in weights),
                          tuple(b.contiguous() for b in biases),
                          seed if seed is not None else x, B, plan.thr_biased, plan.scale))
    return y, hidden


def head_backward(grad_y, x, weights, hidden, seed, kind, num_splits, dropout):
    spec = checked_backward_args(grad_y, x, weights, hidden, seed, kind, num_splits, dropout)
    _check_triton_args(x)
    B = x.shape[0]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_params = torch.empty((spec.num_params(),), dtype=weights[0].dtype, device=x.device)
    if B == 0:
        return grad_x.zero_(), grad_params.zero_()
    plan = plan_for(spec, x.dtype, B, dropout, True, x.device)
    # ops accept any strides: inputs are made contiguous here (the kernels assume row-major)
    grad_y, x, hidden = grad_y.contiguous(), x.contiguous(), hidden.contiguous()
    ws = tuple(w.contiguous() for w in weights)
    seed_arg = seed if seed is not None else x
    thr, scale = plan.thr_biased, plan.scale
    g = torch.empty((B, plan.g_width), dtype=x.dtype, device=x.device)
    run_launch(plan.chain, (grad_y, x, hidden, ws, seed_arg, grad_x, g, B, thr, scale))
    out = grad_params if plan.reduce is None else torch.empty(
        (plan.splits, spec.num_params()), dtype=plan.acc_dtype, device=x.device)
    run_launch(plan.wgrad, (g, x, hidden, seed_arg, out, B,
                            plan.wgrad.scalars["rows_per_split"], thr, scale))
    if plan.reduce is not None:
        run_launch(plan.reduce, (out, grad_params))
    return grad_x, grad_params


# ---------------------------------------------------------------------------------------------
# Tiles (for tests and tools; the launchers use spinalkern.triton_plan directly)
# ---------------------------------------------------------------------------------------------
_VGG_HEAD = HeadSpec("spinal", 256, 128, 4, 62, 2)


def kernel_config(kernel: str, B: int, dtype: torch.dtype,
                  spec: HeadSpec = _VGG_HEAD) -> KernelConfig:
    """The heuristic tiles of ``kernel`` ("fwd", "bwd_chain" or "wgrad") for B rows."""
    cfg = default_config(spec, dtype, B)
    return {"fwd": cfg.fwd, "bwd_chain": cfg.chain, "wgrad": cfg.wgrad}[kernel]


def wgrad_splits(spec: HeadSpec, B: int, cfg: KernelConfig, device: torch.device) -> int:
    """How many batch slices the weight-gradient GEMMs use (see triton_plan.wgrad_splits)."""
    device = torch.device(device)
    return _wgrad_splits(spec, B, cfg, sm_count(device), _backends.interpreting())[0]


# ---------------------------------------------------------------------------------------------
# Op registration
# ---------------------------------------------------------------------------------------------
_lib = torch.library.Library("spinalkern", "FRAGMENT")
define_backend_ops("triton", lib=_lib)
for _dev in ("CUDA", "CPU"):  # CPU: Triton's interpreter (TRITON_INTERPRET=1)
    _lib.impl("triton_head_forward", head_forward, _dev)
    _lib.impl("triton_head_backward", head_backward, _dev)
register_fakes("triton")
forward_op = register_python_autograd("triton")


def _available(device: torch.device) -> bool:
    return HAVE_TRITON and (device.type == "cuda"
                            or (device.type == "cpu" and _backends.interpreting()))


def _build_hint() -> str:
    return ("it needs a CUDA tensor and the triton package (or TRITON_INTERPRET=1 set before "
            "importing triton, to run the kernels on CPU tensors in Triton's interpreter)")


BACKEND = _backends.register(_backends.Backend(
    name="triton", available=_available, forward_op=forward_op, build_hint=_build_hint,
    bn_forward_op=bn_forward_op))
