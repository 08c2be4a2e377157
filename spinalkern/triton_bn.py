"""The spinal head with training-mode BatchNorm1d after every hidden Linear, in Triton: the
kernels, their launcher and the registration of ``spinalkern::triton_head_bn_forward`` /
``triton_head_bn_backward`` (contract: ``spinalkern.ops.define_bn_ops``).

BatchNorm needs the statistics of the whole batch before any row can go on to the next layer,
so every hidden layer ends in a grid-wide reduction, done as two launches with no atomics and a
fixed summation order (results are deterministic and independent of the grid):

Forward, per hidden layer L (then one launch for the output layer): 2n + 1 launches.
  * ``bn_linear_kernel``: z_L = drop(u_L) W_L^T + b_L as one GEMM over (row tile, column
    tile), reading the pieces of u_L straight from x (segment L mod S) and from ``hidden``
    (h_{L-1}).  Its epilogue writes z_L and, per row tile and column, the tile's mean and sum
    of squared deviations (Chan's form: no cancellation).  The output layer is the same kernel
    without statistics.
  * ``bn_apply_kernel``: every program combines the row tiles' partials of its columns in
    tile order (Chan's pairwise update), giving the batch mean, the biased variance (for
    r = 1/sqrt(var + eps)) and the unbiased variance (for running_var); the first row tile
    writes them to ``stats``; then h_L = ReLU(gamma (z_L - mean) r + beta) for its tile.

Backward, per hidden layer j = n-1 .. 0, then grad_x and the weight gradients: 2n + 2 launches
(+1 to reduce the weight-gradient slices).  With g = dh_j * relu'(h_j) and
xhat = (z_j - mean) r:  dbeta = sum g, dgamma = sum g xhat,
dz_j = gamma r (g - dbeta / B - xhat dgamma / B).
  * ``bn_dgrad_kernel``: dh_j from dy (through W_out) and dz_{j+1} (through W_{j+1}), with
    their dropout masks; writes g into the gradient buffer G and per-row-tile partial sums of
    g and g xhat (and copies dy into G, for the weight gradients, in the first launch).
  * ``bn_dz_kernel``: combines the partials in tile order (the first row tile writes
    dgamma_j, dbeta_j) and turns g into dz_j in place.
  * ``bn_dx_kernel``: grad_x, segment by segment, from the dz of the layers that read it.
  * the weight gradients: ``wgrad_kernel`` and ``reduce_kernel`` of
    ``spinalkern.triton_kernels`` (G has their chunked layout: pieces 16-column aligned).
Dropout masks are the plain kernels' (``spinalkern.triton_kernels._drop``, recomputed).
The launches are ``spinalkern.triton_plan.Launch`` plans (``build_bn_plan``), cached per call
shape and run by the launcher of ``spinalkern.triton_head``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _backends, ops
from .spec import HeadSpec
from .triton_kernels import HAVE_TRITON
from .triton_plan import _TL_DTYPE, Launch, _compute_dtype, _dot_precision, _layer_tiles, \
    check_int32_sizes, default_config, dropout_scalars, sm_count, wgrad_splits

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from . import triton_kernels as K
    from .triton_kernels import _drop, _gemm_nn, _gemm_nt, _load_seed, _out, _relu, \
        _rows64, _threshold

    @triton.jit(do_not_specialize=["thr_biased"])
    def bn_linear_kernel(x_ptr, hid_ptr, w_ptr, b_ptr, seed_ptr, out_ptr, part_ptr, B,
                         thr_biased, scale, D: tl.constexpr, NH: tl.constexpr,
                         XOFF: tl.constexpr, XW: tl.constexpr, HOFF: tl.constexpr,
                         HW: tl.constexpr, N: tl.constexpr, OUT_STRIDE: tl.constexpr,
                         OUT_COL0: tl.constexpr, STREAM: tl.constexpr, DROPOUT: tl.constexpr,
                         STATS: tl.constexpr, CDT: tl.constexpr, ACC_DT: tl.constexpr,
                         DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        """out[rows, OUT_COL0 + cols] = drop([x[:, XOFF:XOFF+XW] ; hid[:, HOFF:HOFF+HW]])
        @ W[cols]^T + b[cols] (dropout stream STREAM); with STATS, also this row tile's mean
        and sum of squared deviations of each column of the stored values, to part[tile]."""
        tile = tl.program_id(0)
        rows, r64 = _rows64(tile, BLOCK_M)
        row_mask = rows < B
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = cols < N
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        threshold = _threshold(thr_biased)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
        acc = _gemm_nt(acc, x_ptr, D, XOFF, XW, rows, r64, row_mask, w_ptr, XW + HW, 0, cols,
                       n_mask, STREAM, seed_lo, seed_hi, threshold, scale, DROPOUT, CDT,
                       DOT_PREC, BLOCK_K)
        acc = _gemm_nt(acc, hid_ptr, NH, HOFF, HW, rows, r64, row_mask, w_ptr, XW + HW, XW,
                       cols, n_mask, STREAM, seed_lo, seed_hi, threshold, scale, DROPOUT, CDT,
                       DOT_PREC, BLOCK_K)
        z = _out(acc + tl.load(b_ptr + cols, mask=n_mask, other=0.0)[None, :], out_ptr)
        mask2 = row_mask[:, None] & n_mask[None, :]
        tl.store(out_ptr + r64[:, None] * OUT_STRIDE + OUT_COL0 + cols[None, :], z, mask=mask2)
        if STATS:
            zf = tl.where(mask2, z.to(ACC_DT), 0.0)
            count = tl.minimum(B - tile * BLOCK_M, BLOCK_M).to(ACC_DT)
            mean = tl.sum(zf, axis=0) / count
            dev = tl.where(mask2, zf - mean[None, :], 0.0)
            base = part_ptr + tile.to(tl.int64) * 2 * N + cols
            tl.store(base, mean, mask=n_mask)
            tl.store(base + N, tl.sum(dev * dev, axis=0), mask=n_mask)

    @triton.jit
    def _combine_stats(part_ptr, cols, n_mask, B, N: tl.constexpr, PART_ROWS: tl.constexpr,
                       ACC_DT: tl.constexpr, BLOCK_N: tl.constexpr):
        """(batch mean, sum of squared deviations) of columns ``cols`` from the row tiles'
        partials, combined in tile order with Chan's pairwise update."""
        mean = tl.zeros((BLOCK_N,), dtype=ACC_DT)
        m2 = tl.zeros((BLOCK_N,), dtype=ACC_DT)
        n_a = tl.zeros((), dtype=ACC_DT)
        for t in range(0, tl.cdiv(B, PART_ROWS)):
            base = part_ptr + t * 2 * N + cols
            mean_b = tl.load(base, mask=n_mask, other=0.0)
            m2_b = tl.load(base + N, mask=n_mask, other=0.0)
            n_b = tl.minimum(B - t * PART_ROWS, PART_ROWS).to(ACC_DT)
            n_ab = n_a + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / n_ab)
            m2 = m2 + m2_b + delta * delta * (n_a * n_b / n_ab)
            n_a = n_ab
        return mean, m2

    @triton.jit
    def _sums(part_ptr, cols, n_mask, B, N: tl.constexpr, PART_ROWS: tl.constexpr,
              ACC_DT: tl.constexpr, BLOCK_N: tl.constexpr):
        """Column sums of the two partial-sum rows of every row tile, in tile order."""
        s0 = tl.zeros((BLOCK_N,), dtype=ACC_DT)
        s1 = tl.zeros((BLOCK_N,), dtype=ACC_DT)
        for t in range(0, tl.cdiv(B, PART_ROWS)):
            base = part_ptr + t * 2 * N + cols
            s0 += tl.load(base, mask=n_mask, other=0.0)
            s1 += tl.load(base + N, mask=n_mask, other=0.0)
        return s0, s1

    @triton.jit
    def _affine(cols, n_mask, gamma_ptr, beta_ptr, AFFINE: tl.constexpr, ACC_DT: tl.constexpr):
        if AFFINE:
            gamma = tl.load(gamma_ptr + cols, mask=n_mask, other=0.0).to(ACC_DT)
            beta = tl.load(beta_ptr + cols, mask=n_mask, other=0.0).to(ACC_DT)
        else:
            gamma = tl.full(cols.shape, 1.0, ACC_DT)
            beta = tl.zeros(cols.shape, ACC_DT)
        return gamma, beta

    @triton.jit
    def bn_apply_kernel(z_ptr, part_ptr, gamma_ptr, beta_ptr, stats_ptr, hid_ptr, B, eps,
                        NH: tl.constexpr, COL0: tl.constexpr, H: tl.constexpr,
                        AFFINE: tl.constexpr, PART_ROWS: tl.constexpr, ACC_DT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Batch statistics of z[:, COL0:COL0+H] from the partials (row tile 0 writes them to
        stats = [mean; 1/sqrt(biased var + eps); unbiased var]), then this row tile's
        h = ReLU(gamma (z - mean) r + beta) to hid[:, COL0:COL0+H]."""
        rows, r64 = _rows64(tl.program_id(0), BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = cols < H
        mean, m2 = _combine_stats(part_ptr, cols, n_mask, B, H, PART_ROWS, ACC_DT, BLOCK_N)
        r = 1.0 / tl.sqrt(m2 / B + eps)
        if tl.program_id(0) == 0:
            tl.store(stats_ptr + cols, mean, mask=n_mask)
            tl.store(stats_ptr + H + cols, r, mask=n_mask)
            tl.store(stats_ptr + 2 * H + cols, m2 / (B - 1), mask=n_mask)
        gamma, beta = _affine(cols, n_mask, gamma_ptr, beta_ptr, AFFINE, ACC_DT)
        mask2 = (rows < B)[:, None] & n_mask[None, :]
        offs = r64[:, None] * NH + COL0 + cols[None, :]
        z = tl.load(z_ptr + offs, mask=mask2, other=0.0).to(ACC_DT)
        h = _relu((z - mean[None, :]) * (gamma * r)[None, :] + beta[None, :])
        tl.store(hid_ptr + offs, _out(h, hid_ptr), mask=mask2)

    @triton.jit(do_not_specialize=["thr_biased"])
    def bn_dgrad_kernel(dy_ptr, g_ptr, w_out_ptr, w_next_ptr, hid_ptr, z_ptr, stats_ptr,
                        seed_ptr, part_ptr, B, thr_biased, scale, J: tl.constexpr,
                        N_LAYERS: tl.constexpr, H: tl.constexpr, C: tl.constexpr,
                        SEG: tl.constexpr, HS: tl.constexpr, GS: tl.constexpr,
                        DROPOUT: tl.constexpr, CDT: tl.constexpr, ACC_DT: tl.constexpr,
                        DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        """g = relu'(h_J) * dh_J for one (row tile, column tile), dh_J pulled back from dy
        (output layer, stream n) and from dz_{J+1} in G (layer J+1, stream J+1); g goes to
        piece J of G, the tile's column sums of g and g xhat to part[tile].  The last layer's
        launch (J = n-1) also copies dy into G's last piece."""
        NH: tl.constexpr = N_LAYERS * H
        tile = tl.program_id(0)
        rows, r64 = _rows64(tile, BLOCK_M)
        row_mask = rows < B
        hc = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        h_mask = hc < H
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        threshold = _threshold(thr_biased)
        if J == N_LAYERS - 1:
            if tl.program_id(1) == 0:
                for c0 in range(0, C, BLOCK_N):
                    cc = c0 + tl.arange(0, BLOCK_N)
                    cmask = row_mask[:, None] & (cc < C)[None, :]
                    dy = tl.load(dy_ptr + r64[:, None] * C + cc[None, :], mask=cmask)
                    tl.store(g_ptr + r64[:, None] * GS + N_LAYERS * HS + cc[None, :], dy,
                             mask=cmask)
        dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
        dh = _gemm_nn(dh, dy_ptr, C, 0, C, r64, row_mask, w_out_ptr, NH, J * H + hc, h_mask,
                      CDT, DOT_PREC, BLOCK_K)
        if DROPOUT:
            dh = _drop(dh, rows, J * H + hc, N_LAYERS, seed_lo, seed_hi, threshold, scale)
        if J + 1 < N_LAYERS:  # layer J+1 reads h_J at its input columns SEG + hc
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
            part = _gemm_nn(part, g_ptr, GS, (J + 1) * HS, H, r64, row_mask, w_next_ptr,
                            SEG + H, SEG + hc, h_mask, CDT, DOT_PREC, BLOCK_K)
            if DROPOUT:
                part = _drop(part, rows, SEG + hc, J + 1, seed_lo, seed_hi, threshold, scale)
            dh += part
        mask2 = row_mask[:, None] & h_mask[None, :]
        offs = r64[:, None] * NH + J * H + hc[None, :]
        h = tl.load(hid_ptr + offs, mask=mask2, other=0.0)
        g = tl.where(h > 0, dh, 0.0)
        tl.store(g_ptr + r64[:, None] * GS + J * HS + hc[None, :], _out(g, g_ptr), mask=mask2)
        mean = tl.load(stats_ptr + hc, mask=h_mask, other=0.0)
        r = tl.load(stats_ptr + H + hc, mask=h_mask, other=0.0)
        z = tl.load(z_ptr + offs, mask=mask2, other=0.0).to(ACC_DT)
        xhat = (z - mean[None, :]) * r[None, :]
        base = part_ptr + tile.to(tl.int64) * 2 * H + hc
        tl.store(base, tl.sum(g, axis=0), mask=h_mask)
        tl.store(base + H, tl.sum(g * xhat, axis=0), mask=h_mask)

    @triton.jit
    def bn_dz_kernel(g_ptr, z_ptr, stats_ptr, gamma_ptr, part_ptr, gbn_ptr, B,
                     J: tl.constexpr, N_LAYERS: tl.constexpr, H: tl.constexpr,
                     HS: tl.constexpr, GS: tl.constexpr, AFFINE: tl.constexpr,
                     PART_ROWS: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """dbeta = sum g, dgamma = sum g xhat from the partials (row tile 0 writes them to
        gbn = [dgamma; dbeta]); then piece J of G: g -> dz = gamma r (g - (dbeta + xhat
        dgamma) / B) for this row tile."""
        NH: tl.constexpr = N_LAYERS * H
        rows, r64 = _rows64(tl.program_id(0), BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = cols < H
        sg, sgx = _sums(part_ptr, cols, n_mask, B, H, PART_ROWS, ACC_DT, BLOCK_N)
        if tl.program_id(0) == 0:
            tl.store(gbn_ptr + cols, sgx, mask=n_mask)
            tl.store(gbn_ptr + H + cols, sg, mask=n_mask)
        gamma, beta = _affine(cols, n_mask, gamma_ptr, gamma_ptr, AFFINE, ACC_DT)
        mean = tl.load(stats_ptr + cols, mask=n_mask, other=0.0)
        r = tl.load(stats_ptr + H + cols, mask=n_mask, other=0.0)
        mask2 = (rows < B)[:, None] & n_mask[None, :]
        z = tl.load(z_ptr + r64[:, None] * NH + J * H + cols[None, :], mask=mask2,
                    other=0.0).to(ACC_DT)
        xhat = (z - mean[None, :]) * r[None, :]
        g_offs = g_ptr + r64[:, None] * GS + J * HS + cols[None, :]
        g = tl.load(g_offs, mask=mask2, other=0.0).to(ACC_DT)
        dz = (gamma * r)[None, :] * (g - (sg[None, :] + xhat * sgx[None, :]) / B)
        tl.store(g_offs, _out(dz, g_ptr), mask=mask2)

    @triton.jit(do_not_specialize=["thr_biased"])
    def bn_dx_kernel(g_ptr, w_ptrs, seed_ptr, dx_ptr, B, thr_biased, scale,
                     N_LAYERS: tl.constexpr, D: tl.constexpr, H: tl.constexpr,
                     S: tl.constexpr, HS: tl.constexpr, GS: tl.constexpr,
                     DROPOUT: tl.constexpr, CDT: tl.constexpr, ACC_DT: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """grad_x for (row tile, column tile, segment s): the sum over the layers L that read
        segment s (L mod S == s) of drop_L(dz_L @ W_L[:, :SEG])."""
        SEG: tl.constexpr = D // S
        rows, r64 = _rows64(tl.program_id(0), BLOCK_M)
        row_mask = rows < B
        kc = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_mask = kc < SEG
        s = tl.program_id(2)
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        threshold = _threshold(thr_biased)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
        for L in tl.static_range(N_LAYERS):
            if L % S == s:
                px = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                px = _gemm_nn(px, g_ptr, GS, L * HS, H, r64, row_mask, w_ptrs[L],
                              SEG + (0 if L == 0 else H), kc, k_mask, CDT, DOT_PREC, BLOCK_K)
                if DROPOUT:
                    px = _drop(px, rows, kc, L, seed_lo, seed_hi, threshold, scale)
                acc += px
        tl.store(dx_ptr + r64[:, None] * D + s * SEG + kc[None, :], _out(acc, dx_ptr),
                 mask=row_mask[:, None] & k_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launch plans (``spinalkern.triton_plan.Launch``: also what bench/check_triton_kernels.py
# compiles for sm_90)
# ---------------------------------------------------------------------------------------------
@dataclass
class BNPlan:
    fwd: list                # per hidden layer (linear, apply), then the output layer
    bwd: list                # per hidden layer j = n-1 .. 0 (dgrad, dz), then dx
    wgrad: Launch
    reduce: Launch | None    # sums the weight-gradient slices when there are several
    tiles: int               # row tiles (rows of the partial-statistics buffer)
    HS: int                  # G's piece stride and row stride (16-column aligned pieces)
    GS: int
    acc_dtype: torch.dtype
    thr_biased: int
    scale: float


def _tiles(interpreting: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of every BN kernel: on a GPU 64 x 64 output
    tiles; in the interpreter (whose cost is per program and op) 32-row tiles, so that CPU
    tests with a few dozen rows still combine several row tiles' partials."""
    return (32, 32, 32, 4) if interpreting else (64, 64, 32, 4)


def build_bn_plan(spec: HeadSpec, dtype: torch.dtype, B: int, dropout: float, affine: bool,
                  prec: str = "highest", sms: int = 1,
                  interpreting: bool | None = None) -> BNPlan:
    """The launches of the BN ops for one head, dtype, batch (B >= 2) and dropout."""
    if interpreting is None:
        interpreting = _backends.interpreting()
    check_int32_sizes(spec)
    n, H, C, D, S, SEG = spec.n, spec.H, spec.C, spec.D, spec.num_splits, spec.seg
    NH = n * H
    BM, BN, BK, warps = _tiles(interpreting)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    drop = dropout > 0.0
    thr, scale = dropout_scalars(dropout)
    num = dict(CDT=_compute_dtype(dtype, interpreting), ACC_DT=_TL_DTYPE[acc],
               DOT_PREC=_dot_precision(dtype, prec))
    seed_dt = torch.int64 if drop else dtype  # without dropout the launcher passes x
    dts = {"x_ptr": dtype, "hid_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "out_ptr": dtype,
           "z_ptr": dtype, "dy_ptr": dtype, "g_ptr": dtype, "w_out_ptr": dtype,
           "w_next_ptr": dtype, "dx_ptr": dtype, "w_ptrs": (dtype,) * n, "seed_ptr": seed_dt,
           "part_ptr": acc, "gamma_ptr": acc, "beta_ptr": acc, "stats_ptr": acc,
           "gbn_ptr": acc}
    # (eps is a run-time float of each call: 1e-5 stands in for it, for the checker)
    scalars = {"B": B, "thr_biased": thr, "scale": scale, "eps": 1e-5}
    tiles = -(-B // BM)
    cols = lambda width: -(-width // BN)  # noqa: E731

    def launch(name, kernel, grid, params, consts, dtypes=dts, extra=None, w=warps, st=2):
        return Launch(name, kernel, grid, params, {p: dtypes[p] for p in params if p in dtypes},
                      {**scalars, **(extra or {})}, consts, w, st)

    lin_params = ("x_ptr", "hid_ptr", "w_ptr", "b_ptr", "seed_ptr", "out_ptr", "part_ptr", "B",
                  "thr_biased", "scale")
    lin = dict(num, D=D, NH=NH, DROPOUT=drop, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    fwd = []
    for L in range(n):
        fwd.append(launch(f"linear{L}", bn_linear_kernel, (tiles, cols(H), 1), lin_params,
                          dict(lin, XOFF=spec.x_offset(L), XW=SEG, HOFF=spec.h_offset(L),
                               HW=spec.h_width(L), N=H, OUT_STRIDE=NH, OUT_COL0=L * H,
                               STREAM=L, STATS=True)))
        fwd.append(launch(f"apply{L}", bn_apply_kernel, (tiles, cols(H), 1),
                          ("z_ptr", "part_ptr", "gamma_ptr", "beta_ptr", "stats_ptr", "hid_ptr",
                           "B", "eps"),
                          dict(NH=NH, COL0=L * H, H=H, AFFINE=affine, PART_ROWS=BM,
                               ACC_DT=num["ACC_DT"], BLOCK_M=BM, BLOCK_N=BN)))
    fwd.append(launch("linear_out", bn_linear_kernel, (tiles, cols(C), 1), lin_params,
                      dict(lin, XOFF=0, XW=0, HOFF=0, HW=NH, N=C, OUT_STRIDE=C, OUT_COL0=0,
                           STREAM=n, STATS=False)))
    HS = -(-H // 16) * 16
    GS = n * HS + -(-C // 16) * 16
    bwd = []
    for j in range(n - 1, -1, -1):
        bwd.append(launch(f"dgrad{j}", bn_dgrad_kernel, (tiles, cols(H), 1),
                          ("dy_ptr", "g_ptr", "w_out_ptr", "w_next_ptr", "hid_ptr", "z_ptr",
                           "stats_ptr", "seed_ptr", "part_ptr", "B", "thr_biased", "scale"),
                          dict(num, J=j, N_LAYERS=n, H=H, C=C, SEG=SEG, HS=HS, GS=GS,
                               DROPOUT=drop, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)))
        bwd.append(launch(f"dz{j}", bn_dz_kernel, (tiles, cols(H), 1),
                          ("g_ptr", "z_ptr", "stats_ptr", "gamma_ptr", "part_ptr", "gbn_ptr",
                           "B"),
                          dict(J=j, N_LAYERS=n, H=H, HS=HS, GS=GS, AFFINE=affine,
                               PART_ROWS=BM, ACC_DT=num["ACC_DT"], BLOCK_M=BM, BLOCK_N=BN)))
    bwd.append(launch("dx", bn_dx_kernel, (tiles, cols(SEG), S),
                      ("g_ptr", "w_ptrs", "seed_ptr", "dx_ptr", "B", "thr_biased", "scale"),
                      dict(num, N_LAYERS=n, D=D, H=H, S=S, HS=HS, GS=GS, DROPOUT=drop,
                           BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)))
    # the weight gradients: the plain head's kernels, reading G
    wc = default_config(spec, dtype, B, drop, interpreting).wgrad
    splits, rows = wgrad_splits(spec, B, wc, sms, interpreting)
    total = spec.num_params()
    wgrad = launch("wgrad", K.wgrad_kernel, (n + 1, _layer_tiles(spec, wc), splits),
                   ("g_ptr", "x_ptr", "hid_ptr", "seed_ptr", "out_ptr", "B", "rows_per_split",
                    "thr_biased", "scale"),
                   dict(num, KIND=0, N_LAYERS=n, D=D, H=H, C=C, S=S, HS=HS, GS=GS, TOTAL=total,
                        DROPOUT=drop, BLOCK_M=wc.block_m, BLOCK_N=wc.block_n,
                        BLOCK_K=wc.block_k),
                   dtypes={**dts, "out_ptr": acc if splits > 1 else dtype},
                   extra={"rows_per_split": rows}, w=wc.num_warps, st=wc.num_stages)
    reduce = None
    if splits > 1:
        reduce = Launch("reduce", K.reduce_kernel, (-(-total // 1024), 1, 1),
                        ("part_ptr", "out_ptr"), {"part_ptr": acc, "out_ptr": dtype}, {},
                        dict(TOTAL=total, SPLITS=splits, BLOCK=1024), 4, 2)
    return BNPlan(fwd, bwd, wgrad, reduce, tiles, HS, GS, acc, thr, scale)


_PLANS: dict = {}


def bn_plan_for(spec, dtype, B, dropout, affine, device) -> BNPlan:
    """The cached plan of one call."""
    prec = torch.get_float32_matmul_precision() if dtype == torch.float32 else "highest"
    key = (spec, dtype, B, dropout, affine, device, prec)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 512:  # e.g. many distinct batch sizes: start over
            _PLANS.clear()
        plan = _PLANS[key] = build_bn_plan(spec, dtype, B, dropout, affine, prec,
                                           sm_count(device))
    return plan


# ---------------------------------------------------------------------------------------------
# The ops' implementations
# ---------------------------------------------------------------------------------------------
def _check_triton_args(x):
    if not (x.is_cuda or (x.device.type == "cpu" and _backends.interpreting())):
        raise RuntimeError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")


def head_bn_forward(x, weights, biases, bn_weights, bn_biases, seed, num_splits, dropout, eps,
                    save_for_backward):
    from .triton_head import run_launch  # (that module imports this one)
    spec = ops.check_bn_forward_args(x, weights, biases, bn_weights, bn_biases, seed,
                                     num_splits, dropout, eps)
    _check_triton_args(x)
    B, n, H = x.shape[0], spec.n, spec.H
    affine = len(bn_weights) > 0
    plan = bn_plan_for(spec, x.dtype, B, dropout, affine, x.device)
    # ops accept any strides: inputs are made contiguous here (the kernels assume row-major)
    x = x.contiguous()
    ws = [w.contiguous() for w in weights]
    bs = [b.contiguous() for b in biases]
    y = torch.empty((B, spec.C), dtype=x.dtype, device=x.device)
    hidden = torch.empty((B, n * H), dtype=x.dtype, device=x.device)
    z = torch.empty((B, n * H), dtype=x.dtype, device=x.device)
    stats = torch.empty((n, 3, H), dtype=plan.acc_dtype, device=x.device)
    part = torch.empty((plan.tiles, 2, H), dtype=plan.acc_dtype, device=x.device)
    seed_arg = seed if seed is not None else x
    thr, scale = plan.thr_biased, plan.scale
    for L in range(n):
        gamma, beta = ((bn_weights[L].contiguous(), bn_biases[L].contiguous()) if affine
                       else (stats, stats))  # (not read without affine)
        run_launch(plan.fwd[2 * L], (x, hidden, ws[L], bs[L], seed_arg, z, part, B, thr, scale))
        run_launch(plan.fwd[2 * L + 1], (z, part, gamma, beta, stats[L], hidden, B, eps))
    run_launch(plan.fwd[2 * n], (x, hidden, ws[n], bs[n], seed_arg, y, part, B, thr, scale))
    if not save_for_backward:
        hidden = z = torch.empty((0,), dtype=x.dtype, device=x.device)
    return y, hidden, z, stats


def head_bn_backward(grad_y, x, weights, bn_weights, hidden, z, stats, seed, num_splits,
                     dropout):
    from .triton_head import run_launch  # (that module imports this one)
    spec = ops.check_bn_backward_args(grad_y, x, weights, bn_weights, hidden, z, stats, seed,
                                      num_splits, dropout)
    _check_triton_args(x)
    B, n, H = x.shape[0], spec.n, spec.H
    affine = len(bn_weights) > 0
    plan = bn_plan_for(spec, x.dtype, B, dropout, affine, x.device)
    grad_y, x, hidden, z = (t.contiguous() for t in (grad_y, x, hidden, z))
    stats = stats.contiguous()
    ws = [w.contiguous() for w in weights]
    g = torch.empty((B, plan.GS), dtype=x.dtype, device=x.device)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_bn = torch.empty((n, 2, H), dtype=plan.acc_dtype, device=x.device)
    part = torch.empty((plan.tiles, 2, H), dtype=plan.acc_dtype, device=x.device)
    seed_arg = seed if seed is not None else x
    thr, scale = plan.thr_biased, plan.scale
    for k, j in enumerate(range(n - 1, -1, -1)):
        gamma = bn_weights[j].contiguous() if affine else stats  # (not read without affine)
        run_launch(plan.bwd[2 * k], (grad_y, g, ws[n], ws[min(j + 1, n - 1)], hidden, z,
                                     stats[j], seed_arg, part, B, thr, scale))
        run_launch(plan.bwd[2 * k + 1], (g, z, stats[j], gamma, part, grad_bn[j], B))
    run_launch(plan.bwd[2 * n], (g, tuple(ws[:n]), seed_arg, grad_x, B, thr, scale))
    total = spec.num_params()
    grad_params = torch.empty((total,), dtype=ws[0].dtype, device=x.device)
    splits = plan.wgrad.grid[2]
    out = grad_params if plan.reduce is None else torch.empty(
        (splits, total), dtype=plan.acc_dtype, device=x.device)
    run_launch(plan.wgrad, (g, x, hidden, seed_arg, out, B,
                            plan.wgrad.scalars["rows_per_split"], thr, scale))
    if plan.reduce is not None:
        run_launch(plan.reduce, (out, grad_params))
    return grad_x, grad_params, grad_bn


# ---------------------------------------------------------------------------------------------
# Op registration (the Backend in spinalkern.triton_head holds the forward op)
# ---------------------------------------------------------------------------------------------
_lib = torch.library.Library("spinalkern", "FRAGMENT")
ops.define_bn_ops("triton", lib=_lib)
for _dev in ("CUDA", "CPU"):  # CPU: Triton's interpreter (TRITON_INTERPRET=1)
    _lib.impl("triton_head_bn_forward", head_bn_forward, _dev)
    _lib.impl("triton_head_bn_backward", head_bn_backward, _dev)
ops.register_bn_fakes("triton")
bn_forward_op = ops.register_python_bn_autograd("triton")
