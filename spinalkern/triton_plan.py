"""Launch plans of the Triton kernels: which kernels run, on what grid, with which tiles.

One description serves three users, so that what is checked and tuned is what runs:
- the launcher (``spinalkern.triton_head``) runs ``HeadPlan`` launches;
- the resource checker (``bench/check_triton_kernels.py``) compiles the same launches for
  sm_90 through Triton's own argument binder (same signature, constexprs, alignment
  specialisations);
- the tuner (``bench/tune.py``) builds plans from candidate ``HeadConfig`` s.

A plan is computed once per (head shape, dtype, device, batch, dropout, what backward needs)
and cached; a call then only allocates its outputs and launches.  Tiles come from the tuning
table for the current GPU (``triton_table.json`` beside this file, written by
``bench/tune.py``), else from the heuristics in ``default_config``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import _backends
from .rng import keep_threshold
from .spec import HeadSpec
from .triton_kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton.language as tl

    from . import triton_kernels as K

    _TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16,
                 torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}
else:  # pragma: no cover
    _TL_DTYPE = {}

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}
TABLE_PATH = Path(__file__).with_name("triton_table.json")
MAX_FUSED_WIDTH = 128  # padded H and C up to which one register tile holds a layer's outputs
INT32_LIMIT = 2 ** 31


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    block_m: int        # rows per program (batch dimension)
    block_n: int        # output columns per chunk (chunked kernels, wgrad)
    block_k: int        # reduction chunk
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class HeadConfig:
    """Everything tunable about one head at one batch size.  A variant is "fused"
    (activations on chip; needs padded H and C <= 128) or "chunked" (any width)."""
    fwd_variant: str
    bwd_variant: str
    fwd: KernelConfig
    chain: KernelConfig
    wgrad: KernelConfig
    persistent: bool = False  # fused kernels: grid of at most 2 programs per SM, looping

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "HeadConfig":
        return HeadConfig(d["fwd_variant"], d["bwd_variant"], KernelConfig(**d["fwd"]),
                          KernelConfig(**d["chain"]), KernelConfig(**d["wgrad"]),
                          bool(d.get("persistent", False)))


def head_key(spec: HeadSpec) -> str:
    """The tuning table's name of a head shape."""
    return (f"{spec.kind} D{spec.D} H{spec.H} n{spec.n} C{spec.C}"
            + (f" S{spec.num_splits}" if spec.kind == "spinal" else ""))


def batch_bucket(B: int) -> int:
    """Batches share a table entry per power of two (16 ... 65536)."""
    b = 16
    while b < B and b < 65536:
        b *= 2
    return b


def pow2(v: int, at_least: int = 16) -> int:
    p = at_least
    while p < v:
        p *= 2
    return p


def fused_fits(spec: HeadSpec) -> bool:
    return pow2(spec.H) <= MAX_FUSED_WIDTH and pow2(spec.C) <= MAX_FUSED_WIDTH


def default_config(spec: HeadSpec, dtype: torch.dtype, B: int, dropout: bool = False,
                   interpreting: bool | None = None) -> HeadConfig:
    """The heuristic tiles, used where the table has no entry (they are not measured).

    Every configuration returned here compiles without register spills for sm_90
    (bench/check_triton_kernels.py checks them).
    - fp16/bf16, training batches (< 8192 rows): the fused forward (activations on chip,
      16-row tiles so that B/16 programs spread over the SMs, 8 warps: the Philox state of
      the dropout tiles needs the registers).  The fused backward chain only for padded
      widths up to 32 without dropout; beyond that its on-chip dz tiles and their Philox
      state exceed the register file and the chunked chain runs.
    - fp16/bf16, larger batches: the chunked kernels with 64-row tiles.  Every row tile reads
      all weights from L2, so 64-row tiles read them 4x less often than 16-row ones (which the
      fused forward needs to stay within the registers); see docs/triton.md.
    - fp32 runs an exact ("ieee") dot on FMA units unless TF32 is allowed: the chunked
      kernels with small chunks.
    """
    if interpreting is None:
        interpreting = _backends.interpreting()
    fits = fused_fits(spec)
    if interpreting:  # the interpreter's cost is per program and op: few, large tiles
        big = KernelConfig(128, 64, 64, 4)
        v = "fused" if fits else "chunked"
        return HeadConfig(v, v, big, big, big)
    half = dtype in (torch.float16, torch.bfloat16)
    wgrad = KernelConfig(32, 64, 64, 4) if half else KernelConfig(16, 64, 32, 4)
    if not half:
        return HeadConfig("chunked", "chunked", KernelConfig(16, 16, 16, 4),
                          KernelConfig(16, 32, 16, 4), wgrad)
    if B >= 8192:
        return HeadConfig("chunked", "chunked", KernelConfig(64, 64, 32, 8),
                          KernelConfig(64, 32, 32, 8), wgrad)
    chain = KernelConfig(16, 32, 32, 8)
    if not fits:
        return HeadConfig("chunked", "chunked", KernelConfig(16, 64, 32, 4), chain, wgrad)
    fused_chain = pow2(spec.H) <= 32 and not dropout
    return HeadConfig("fused", "fused" if fused_chain else "chunked",
                      KernelConfig(16, 64, 64, 8), KernelConfig(16, 64, 64, 4)
                      if fused_chain else chain, wgrad)


@functools.lru_cache(maxsize=None)
def load_table(path: str | None = None) -> dict:
    """The tuning table: {"gpus": {gpu name: {head key: {dtype: {bucket: entry}}}}}.

    ``SPINALKERN_TRITON_TABLE`` names another file (the tuner uses it to try a new table)."""
    path = path or os.environ.get("SPINALKERN_TRITON_TABLE") or str(TABLE_PATH)
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        return {}
    if not isinstance(table, dict) or not isinstance(table.get("gpus", {}), dict):
        raise ValueError(f"{path} is not a spinalkern Triton tuning table")
    return table


def table_config(gpu_name: str, spec: HeadSpec, dtype: torch.dtype, B: int,
                 table: dict | None = None) -> HeadConfig | None:
    table = load_table() if table is None else table
    entry = (table.get("gpus", {}).get(gpu_name, {}).get(head_key(spec), {})
             .get(DTYPE_NAMES.get(dtype, ""), {}).get(str(batch_bucket(B))))
    if not entry:
        return None
    cfg = HeadConfig.from_json(entry["config"])
    if "fused" in (cfg.fwd_variant, cfg.bwd_variant) and not fused_fits(spec):
        raise ValueError(f"tuning table entry for {head_key(spec)} asks for the fused kernels, "
                         "which this head is too wide for")
    return cfg


def choose_config(spec: HeadSpec, dtype: torch.dtype, B: int, dropout: bool,
                  device: torch.device) -> HeadConfig:
    """The table's entry for this GPU, else the heuristics."""
    if device.type == "cuda" and not _backends.interpreting():
        cfg = table_config(_gpu_name(device), spec, dtype, B)
        if cfg is not None:
            return cfg
    return default_config(spec, dtype, B, dropout)


@functools.lru_cache(maxsize=None)
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ---------------------------------------------------------------------------------------------
# Launch plans
# ---------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch: the kernel, its grid, its constexprs and launch options, and for
    each runtime parameter (in signature order) the dtype of the tensor it takes (``None``:
    a scalar, whose value is in ``scalars``; a tuple: a tuple of tensors)."""
    name: str
    kernel: object
    grid: tuple
    params: tuple            # runtime parameter names, in the kernel's order
    tensor_dtypes: dict      # param -> torch dtype, or (dtype,) * k for tuple params
    scalars: dict            # param -> value fixed by the plan (B, thr_biased, scale, ...)
    constexprs: dict
    num_warps: int
    num_stages: int
    compiled: dict = field(default_factory=dict)  # alignment signature -> CompiledKernel

    def options(self) -> dict:
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass
class HeadPlan:
    spec: HeadSpec
    dtype: torch.dtype
    B: int
    config: HeadConfig
    fwd: Launch              # forward (writes hidden when the plan's save_hidden)
    chain: Launch
    wgrad: Launch
    reduce: Launch | None
    g_width: int             # columns of the gradient buffer G
    splits: int              # batch slices of the weight gradients
    thr_biased: int          # dropout arguments of the kernels
    scale: float
    acc_dtype: torch.dtype


def _dot_precision(dtype: torch.dtype, prec: str) -> str:
    return "tf32" if dtype == torch.float32 and prec != "highest" else "ieee"


def _compute_dtype(dtype: torch.dtype, interpreting: bool):
    # Triton's interpreter mishandles bf16 arithmetic: compute in fp32 there (loads upcast)
    if dtype == torch.bfloat16 and interpreting:
        return tl.float32
    return _TL_DTYPE[dtype]


def dropout_scalars(dropout: float) -> tuple[int, float]:
    """(threshold - 2**31, 1 / (1 - p)): the kernels' dropout arguments."""
    if dropout == 0.0:
        return -INT32_LIMIT, 1.0
    return keep_threshold(dropout) - INT32_LIMIT, 1.0 / (1.0 - dropout)


def check_int32_sizes(spec: HeadSpec):
    """Weight offsets are 32-bit in the kernels: refuse heads whose weights do not fit."""
    for L, (N, K) in enumerate(spec.weight_shapes()):
        if N * K >= INT32_LIMIT:
            raise ValueError(f"weights[{L}] has {N * K} elements; the Triton kernels address "
                             f"weights with 32-bit offsets (at most {INT32_LIMIT - 1})")
    if spec.num_params() >= INT32_LIMIT:
        raise ValueError(f"the head has {spec.num_params()} parameters; the Triton kernels "
                         f"need fewer than {INT32_LIMIT}")


def wgrad_splits(spec: HeadSpec, B: int, cfg: KernelConfig, sms: int,
                 interpreting: bool) -> tuple[int, int]:
    """(slices, rows per slice) of the weight-gradient GEMMs: enough programs for two per SM,
    never a slice smaller than one batch chunk.  The interpreter uses two slices whenever B
    spans two chunks, so that CPU tests run the partial-sum + reduction path."""
    chunks = -(-B // cfg.block_m)
    if interpreting:
        splits = min(2, chunks)
    else:
        tiles = sum(-(-N // cfg.block_n) * -(-K // cfg.block_k)
                    for N, K in spec.weight_shapes())
        splits = max(1, min(-(-2 * sms // tiles), chunks))
    rows = -(-(-(-B // splits)) // cfg.block_m) * cfg.block_m
    return -(-B // rows), rows


def _layer_tiles(spec: HeadSpec, cfg: KernelConfig) -> int:
    """Programs per layer in the weight-gradient grid: the widest layer's N tiles x (x-part
    K tiles + hidden-part K tiles)."""
    best = 0
    for L in range(spec.n + 1):
        kt = -(-spec.x_width(L) // cfg.block_k) + -(-spec.h_width(L) // cfg.block_k)
        best = max(best, -(-spec.out_width(L) // cfg.block_n) * kt)
    return best


def build_plan(spec: HeadSpec, dtype: torch.dtype, B: int, dropout: float, save_hidden: bool,
               prec: str = "highest", sms: int = 1, config: HeadConfig | None = None,
               interpreting: bool | None = None) -> HeadPlan:
    """The launches for one head, dtype, batch and dropout (B >= 1)."""
    if interpreting is None:
        interpreting = _backends.interpreting()
    check_int32_sizes(spec)
    cfg = config or default_config(spec, dtype, B, dropout > 0.0, interpreting)
    for v in (cfg.fwd_variant, cfg.bwd_variant):
        if v not in ("fused", "chunked"):
            raise ValueError(f"a variant must be 'fused' or 'chunked', got {v!r}")
    if "fused" in (cfg.fwd_variant, cfg.bwd_variant) and not fused_fits(spec):
        raise ValueError(f"{head_key(spec)} is too wide for the fused kernels")
    n, H, C = spec.n, spec.H, spec.C
    HP, CP = pow2(H), pow2(C)
    drop = dropout > 0.0
    thr, scale = dropout_scalars(dropout)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    common = dict(KIND=spec.kind_code, N_LAYERS=n, D=spec.D, H=H, C=C, S=spec.num_splits,
                  DROPOUT=drop, CDT=_compute_dtype(dtype, interpreting),
                  ACC_DT=_TL_DTYPE[acc_dtype], DOT_PREC=_dot_precision(dtype, prec))
    ws = (dtype,) * (n + 1)
    seed_dt = torch.int64 if drop else dtype  # without dropout the launcher passes x
    io = {"x_ptr": dtype, "y_ptr": dtype, "hid_ptr": dtype, "w_ptrs": ws, "b_ptrs": ws,
          "seed_ptr": seed_dt, "dy_ptr": dtype, "dx_ptr": dtype, "g_ptr": dtype}
    fwd_params = ("x_ptr", "y_ptr", "hid_ptr", "w_ptrs", "b_ptrs", "seed_ptr", "B",
                  "thr_biased", "scale")
    chain_params = ("dy_ptr", "x_ptr", "hid_ptr", "w_ptrs", "seed_ptr", "dx_ptr", "g_ptr", "B",
                    "thr_biased", "scale")
    scalars = {"B": B, "thr_biased": thr, "scale": scale}
    tiles = lambda bm: -(-B // bm)  # noqa: E731

    def launch(name, kernel, grid, params, kc, consts, dtypes=io, extra=None):
        return Launch(name, kernel, grid, params, {p: dtypes[p] for p in params if p in dtypes},
                      {**scalars, **(extra or {})}, consts, kc.num_warps, kc.num_stages)

    f, c = cfg.fwd, cfg.chain
    fused = dict(common, HP=HP, CP=CP)
    if cfg.fwd_variant == "fused":
        grid = tiles(f.block_m) if not cfg.persistent else min(tiles(f.block_m), 2 * sms)
        fwd = launch("fwd", K.fused_fwd_kernel, (grid, 1, 1), fwd_params, f,
                     dict(fused, SAVE_HIDDEN=save_hidden, BLOCK_M=f.block_m, BLOCK_K=f.block_k))
    else:
        fwd = launch("fwd", K.chunked_fwd_kernel, (tiles(f.block_m), 1, 1), fwd_params, f,
                     dict(common, BLOCK_M=f.block_m, BLOCK_N=f.block_n, BLOCK_K=f.block_k))
    if cfg.bwd_variant == "fused":
        grid = tiles(c.block_m) if not cfg.persistent else min(tiles(c.block_m), 2 * sms)
        chain = launch("bwd_chain", K.fused_bwd_chain_kernel, (grid, 1, 1), chain_params, c,
                       dict(fused, BLOCK_M=c.block_m, BLOCK_K=c.block_k))
        HS, g_width = HP, n * HP + CP
    else:
        # G's pieces start on 16-element boundaries: aligned rows for any H and C
        HS, g_width = -(-H // 16) * 16, n * (-(-H // 16) * 16) + -(-C // 16) * 16
        chain = launch("bwd_chain", K.chunked_bwd_chain_kernel, (tiles(c.block_m), 1, 1),
                       chain_params, c, dict(common, HS=HS, GS=g_width, BLOCK_M=c.block_m,
                                             BLOCK_N=c.block_n, BLOCK_K=c.block_k))
    w = cfg.wgrad
    splits, rows_per_split = wgrad_splits(spec, B, w, sms, interpreting)
    total = spec.num_params()
    part_dt = acc_dtype if splits > 1 else dtype  # one slice: the final gradient directly
    wgrad = launch("wgrad", K.wgrad_kernel, (n + 1, _layer_tiles(spec, w), splits),
                   ("g_ptr", "x_ptr", "hid_ptr", "seed_ptr", "out_ptr", "B",
                    "rows_per_split", "thr_biased", "scale"), w,
                   dict(common, HS=HS, GS=g_width, TOTAL=total, BLOCK_M=w.block_m,
                        BLOCK_N=w.block_n, BLOCK_K=w.block_k),
                   dtypes={**io, "out_ptr": part_dt}, extra={"rows_per_split": rows_per_split})
    reduce = None
    if splits > 1:
        block = 1024
        reduce = Launch("reduce", K.reduce_kernel, (-(-total // block), 1, 1),
                        ("part_ptr", "out_ptr"), {"part_ptr": acc_dtype, "out_ptr": dtype}, {},
                        dict(TOTAL=total, SPLITS=splits, BLOCK=block), 4, 2)
    return HeadPlan(spec, dtype, B, cfg, fwd, chain, wgrad, reduce, g_width, splits, thr, scale,
                    acc_dtype)


_PLANS: dict = {}
_OVERRIDES: dict = {}


@contextlib.contextmanager
def override(spec: HeadSpec, dtype: torch.dtype, B: int, config: HeadConfig):
    """Within this block, calls of this head, dtype and batch bucket use ``config`` (the
    tuner's candidates, tests of every variant)."""
    key = (spec, dtype, batch_bucket(B))
    old = _OVERRIDES.get(key)
    _OVERRIDES[key] = config
    _PLANS.clear()
    try:
        yield
    finally:
        if old is None:
            _OVERRIDES.pop(key, None)
        else:
            _OVERRIDES[key] = old
        _PLANS.clear()


def plan_for(spec: HeadSpec, dtype: torch.dtype, B: int, dropout: float, save_hidden: bool,
             device: torch.device) -> HeadPlan:
    """The cached plan for one call."""
    prec = torch.get_float32_matmul_precision() if dtype == torch.float32 else "highest"
    key = (spec, dtype, B, dropout, save_hidden, device, prec)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 512:  # e.g. many distinct batch sizes: start over
            _PLANS.clear()
        cfg = _OVERRIDES.get((spec, dtype, batch_bucket(B))) \
            or choose_config(spec, dtype, B, dropout > 0.0, device)
        plan = _PLANS[key] = build_plan(spec, dtype, B, dropout, save_hidden, prec,
                                        sm_count(device), cfg)
    return plan


def with_config(plan: HeadPlan, **changes) -> HeadConfig:
    """A copy of a plan's configuration with fields replaced (for the tuner)."""
    return replace(plan.config, **changes)
