"""Fused Triton kernels for both heads (one parameterised kernel set, ``KIND`` selects the head).

Forward, one launch: each program owns BLOCK_M rows and runs the whole head on them.  Layer L
multiplies each piece of its input ``u_L`` (see ``spinalkern.spec``) with the matching column
block of ``W_L`` (never concatenating): the x part streams from x, the hidden part from the
hidden tile of the same rows, both in BLOCK_K chunks.  The hidden tiles are written to the
(B, n*H) buffer that backward needs anyway (a scratch buffer of that size when no backward will
run) and read back by the same program while they are still in L1/L2.  Keeping them in
registers instead needs whole [H, H] weight blocks in registers and spills.

Backward, at most three launches:
1. ``_head_bwd_chain_kernel``: per row tile, the activation-gradient chain in reverse layer
   order (dh_j pulled from every layer that reads h_j, dz_j = dh_j * [h_j > 0], written to a
   (B, n*H) buffer that step 2 reads) and grad_x.
2. ``_head_wgrad_kernel``: dW_L = dZ_L^T U_L and db_L = sum(dZ_L) for every layer, U_L gathered
   from x and hidden (never materialised).  Each program owns one weight tile and one slice of
   the batch and writes fp32 partial sums: deterministic, no atomics.
3. ``_reduce_kernel``: sums the per-slice partials in a fixed order (skipped when one slice).

Dropout masks are recomputed from the seed with Philox4x32-10 (``spinalkern.rng``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _backends
from .ops import checked_backward_args, checked_forward_args, define_backend_ops, \
    register_fakes, register_python_autograd
from .rng import keep_threshold

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with the CUDA build of torch on Linux
    HAVE_TRITON = False

if HAVE_TRITON:
    # Triton's interpreter converts fp32 -> bf16 by truncation; the GPU rounds to nearest even.
    # In the interpreter, stores round explicitly so that CPU tests see GPU-like bf16 numerics.
    _ROUND_BF16_ON_STORE = tl.constexpr(_backends.interpreting())

    @triton.jit
    def _out(v, ptr):
        """v converted to the element type of ``ptr`` for a store."""
        if _ROUND_BF16_ON_STORE and ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v.to(ptr.dtype.element_ty)

    @triton.jit
    def _philox_keep(seed_lo, seed_hi, c0, c1, stream, threshold):
        """keep = Philox4x32-10(key=seed, counter=(c0, c1, stream, 0))[0] >= threshold."""
        c0 = c0.to(tl.uint32)
        c1 = c1.to(tl.uint32)
        c2 = (c0 * 0 + stream).to(tl.uint32)
        c3 = c0 * 0
        k0 = seed_lo
        k1 = seed_hi
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo0 = c0 * 0xD2511F53
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            lo1 = c2 * 0xCD9E8D57
            c0 = hi1 ^ c1 ^ k0
            c1 = lo1
            c2 = hi0 ^ c3 ^ k1
            c3 = lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0 >= threshold

    @triton.jit
    def _drop(t, rows, cols, stream, seed_lo, seed_hi, threshold, scale):
        """Dropout of a [rows, cols] tile with the shared mask: kept * scale, else 0."""
        keep = _philox_keep(seed_lo, seed_hi, cols[None, :], rows[:, None], stream,
                            threshold.to(tl.uint32))
        return tl.where(keep, t * scale, 0.0)

    @triton.jit
    def _layer_layout(L, N_LAYERS: tl.constexpr, KIND: tl.constexpr, D, H, C, S, seg):
        """(x_width, x_offset, h_offset, h_width, out_width) of layer L, as in HeadSpec."""
        if KIND == 0:  # spinal
            is_out = L == N_LAYERS
            x_w = tl.where(is_out, 0, seg)
            x_off = tl.where(is_out, 0, (L % S) * seg)
            h_off = tl.where(is_out | (L == 0), 0, (L - 1) * H)
            h_w = tl.where(is_out, N_LAYERS * H, tl.where(L == 0, 0, H))
        else:
            x_w = D
            x_off = 0
            h_off = 0
            h_w = L * H
        n_out = tl.where(L == N_LAYERS, C, H)
        return x_w, x_off, h_off, h_w, n_out

    @triton.jit
    def _load_seed(seed_ptr, DROPOUT: tl.constexpr):
        if DROPOUT:
            seed = tl.load(seed_ptr)
            seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
            seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        else:
            seed_lo = tl.full((), 0, tl.uint32)
            seed_hi = tl.full((), 0, tl.uint32)
        return seed_lo, seed_hi

    @triton.jit
    def _gemm_nt(acc, src_ptr, src_stride, src_col0, width, src_rows, rows, row_mask, w_ptr,
                 k_in, w_col0, offs_n, n_mask, stream, seed_lo, seed_hi, threshold, scale,
                 DROP: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        """acc += drop(A) @ W[offs_n, w_col0 : w_col0 + width]^T, A = src[src_rows, src_col0 :
        src_col0 + width], in BLOCK_K chunks.  The dropout column of A's element c is
        w_col0 + c (its column in the layer input u), its row the global row."""
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, width, BLOCK_K):
            cols = k0 + offs_k
            k_mask = cols < width
            a = tl.load(src_ptr + src_rows[:, None] * src_stride + src_col0 + cols[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
            if DROP:
                a = _drop(a, rows, w_col0 + cols, stream, seed_lo, seed_hi, threshold,
                          scale).to(CDT)
            w = tl.load(w_ptr + offs_n[None, :] * k_in + w_col0 + cols[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(CDT)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def _gemm_nn(acc, g_ptr, g_stride, g_col0, width, rows, row_mask, w_ptr, k_in, w_cols,
                 w_col_mask, CDT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += G[rows, g_col0 : g_col0 + width] @ W[0:width, w_cols] (a gradient through
        a layer: G holds dz or dy, W's rows are that layer's outputs), in BLOCK_K chunks."""
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, width, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < width
            g = tl.load(g_ptr + rows[:, None] * g_stride + g_col0 + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
            w = tl.load(w_ptr + ks[:, None] * k_in + w_cols[None, :],
                        mask=k_mask[:, None] & w_col_mask[None, :], other=0.0).to(CDT)
            acc = tl.dot(g, w, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def _layer_acc(acc, L: tl.constexpr, rows, row_mask, offs_n, x_ptr, hid_ptr, w_ptr,
                   D, H, C, S, seg, seed_lo, seed_hi, threshold, scale,
                   KIND: tl.constexpr, N_LAYERS: tl.constexpr, DROPOUT: tl.constexpr,
                   CDT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += u_L[rows] @ W_L[offs_n, :]^T without materialising u_L: its x part read
        from x, its hidden part from the hidden buffer (same rows).  Spinal drops all of u_L (stream L); progressive drops x~ (stream 0)
        in every layer but the first."""
        x_w, x_off, h_off, h_w, n_out = _layer_layout(L, N_LAYERS, KIND, D, H, C, S, seg)
        k_in = x_w + h_w
        n_mask = offs_n < n_out
        acc = _gemm_nt(acc, x_ptr, D, x_off, x_w, rows, rows, row_mask, w_ptr, k_in, 0, offs_n,
                       n_mask, L if KIND == 0 else 0, seed_lo, seed_hi, threshold, scale,
                       DROPOUT and (KIND == 0 or L > 0), CDT, DOT_PREC, BLOCK_K)
        acc = _gemm_nt(acc, hid_ptr, N_LAYERS * H, h_off, h_w, rows, rows, row_mask, w_ptr,
                       k_in, x_w, offs_n, n_mask, L, seed_lo, seed_hi, threshold, scale,
                       DROPOUT and KIND == 0, CDT, DOT_PREC, BLOCK_K)
        return acc

    @triton.jit
    def _head_fwd_kernel(x_ptr, y_ptr, hid_ptr, w_ptrs, b_ptrs, seed_ptr,
                         B, D, H, C, S, seg, threshold, scale,
                         KIND: tl.constexpr, N_LAYERS: tl.constexpr, DROPOUT: tl.constexpr,
                         CDT: tl.constexpr, ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The whole head for one tile of BLOCK_M rows, layer by layer, each layer's outputs
        in BLOCK_N column chunks.  Hidden outputs go through ``hid_ptr`` (B, n*H): the buffer
        saved for backward, or scratch when nothing is saved."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        offs_n = tl.arange(0, BLOCK_N)
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        for L in tl.static_range(N_LAYERS + 1):
            n_out = C if L == N_LAYERS else H
            for n0 in range(0, n_out, BLOCK_N):
                cols = n0 + offs_n
                out_mask = row_mask[:, None] & (cols[None, :] < n_out)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                acc = _layer_acc(acc, L, rows, row_mask, cols, x_ptr, hid_ptr, w_ptrs[L], D, H,
                                 C, S, seg, seed_lo, seed_hi, threshold, scale, KIND, N_LAYERS,
                                 DROPOUT, CDT, DOT_PREC, BLOCK_K)
                z = acc + tl.load(b_ptrs[L] + cols, mask=cols < n_out, other=0.0)[None, :]
                if L < N_LAYERS:
                    # ReLU that keeps NaN (as torch.relu does)
                    h = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
                    tl.store(hid_ptr + rows[:, None] * (N_LAYERS * H) + L * H + cols[None, :],
                             _out(h, hid_ptr), mask=out_mask)
                else:
                    tl.store(y_ptr + rows[:, None] * C + cols[None, :],
                             _out(z, y_ptr), mask=out_mask)
            tl.debug_barrier()  # h_L is read back by other threads of this program

    @triton.jit
    def _head_bwd_chain_kernel(dy_ptr, x_ptr, hid_ptr, w_ptrs, seed_ptr, dx_ptr, dz_ptr,
                               B, D, H, C, S, seg, threshold, scale,
                               KIND: tl.constexpr, N_LAYERS: tl.constexpr,
                               DROPOUT: tl.constexpr, CDT: tl.constexpr,
                               ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        """Per row tile: dz_j (j = n-1 .. 0) pulled from every layer that reads h_j, written
        to dz (B, n*H) in BLOCK_N column chunks; then grad_x from every layer that reads x."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        offs_n = tl.arange(0, BLOCK_N)
        nH = N_LAYERS * H
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        for j in tl.static_range(N_LAYERS - 1, -1, -1):
            for n0 in range(0, H, BLOCK_N):
                hc = n0 + offs_n  # columns of h_j
                h_mask = hc < H
                # the output layer reads h_j at column x_w + j*H of its input
                x_w, x_off, h_off, h_w, n_out = _layer_layout(N_LAYERS, N_LAYERS, KIND, D, H,
                                                              C, S, seg)
                ucol = x_w + j * H + hc
                dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                dh = _gemm_nn(dh, dy_ptr, C, 0, C, rows, row_mask, w_ptrs[N_LAYERS], x_w + h_w,
                              ucol, h_mask, CDT, DOT_PREC, BLOCK_K)
                if DROPOUT and KIND == 0:
                    dh = _drop(dh, rows, ucol, N_LAYERS, seed_lo, seed_hi, threshold, scale)
                for L in tl.static_range(j + 1, N_LAYERS):
                    if (KIND != 0) or (L == j + 1):  # hidden layer L reads h_j
                        x_w, x_off, h_off, h_w, n_out = _layer_layout(L, N_LAYERS, KIND, D, H,
                                                                      C, S, seg)
                        # h_j's columns in u_L: spinal [seg; h_{L-1}], progressive [x; h_0..]
                        ucol = x_w + (0 if KIND == 0 else j * H) + hc
                        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                        part = _gemm_nn(part, dz_ptr, nH, L * H, H, rows, row_mask, w_ptrs[L],
                                        x_w + h_w, ucol, h_mask, CDT, DOT_PREC, BLOCK_K)
                        if DROPOUT and KIND == 0:
                            part = _drop(part, rows, ucol, L, seed_lo, seed_hi, threshold,
                                         scale)
                        dh += part
                mask2 = row_mask[:, None] & h_mask[None, :]
                h = tl.load(hid_ptr + rows[:, None] * nH + j * H + hc[None, :], mask=mask2,
                            other=0.0)
                tl.store(dz_ptr + rows[:, None] * nH + j * H + hc[None, :],
                         _out(tl.where(h > 0, dh, 0.0), dz_ptr), mask=mask2)
            tl.debug_barrier()  # dz_j is read back by other threads of this program
        # -- grad_x, one BLOCK_N column block at a time -----------------------------------------
        if KIND == 0:
            # spinal: segment s is read by the layers L with L % S == s, each with its own mask
            for s in range(0, S):
                for k0 in range(0, seg, BLOCK_N):
                    kc = k0 + offs_n
                    k_mask = kc < seg
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                    for L in tl.static_range(N_LAYERS):
                        if L % S == s:
                            px = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                            px = _gemm_nn(px, dz_ptr, nH, L * H, H, rows, row_mask, w_ptrs[L],
                                          seg + (0 if L == 0 else H), kc, k_mask, CDT,
                                          DOT_PREC, BLOCK_K)
                            if DROPOUT:
                                px = _drop(px, rows, kc, L, seed_lo, seed_hi, threshold,
                                           scale)
                            acc += px
                    tl.store(dx_ptr + rows[:, None] * D + s * seg + kc[None, :],
                             _out(acc, dx_ptr),
                             mask=row_mask[:, None] & k_mask[None, :])
        else:
            # progressive: layer 0 reads x; later layers and the output read x~ = drop(x)
            for k0 in range(0, D, BLOCK_N):
                kc = k0 + offs_n
                k_mask = kc < D
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                acc = _gemm_nn(acc, dy_ptr, C, 0, C, rows, row_mask, w_ptrs[N_LAYERS],
                               D + nH, kc, k_mask, CDT, DOT_PREC, BLOCK_K)
                for L in tl.static_range(1, N_LAYERS):
                    acc = _gemm_nn(acc, dz_ptr, nH, L * H, H, rows, row_mask, w_ptrs[L],
                                   D + L * H, kc, k_mask, CDT, DOT_PREC, BLOCK_K)
                if DROPOUT:
                    acc = _drop(acc, rows, kc, 0, seed_lo, seed_hi, threshold, scale)
                acc = _gemm_nn(acc, dz_ptr, nH, 0, H, rows, row_mask, w_ptrs[0], D, kc, k_mask,
                               CDT, DOT_PREC, BLOCK_K)
                tl.store(dx_ptr + rows[:, None] * D + kc[None, :],
                         _out(acc, dx_ptr),
                         mask=row_mask[:, None] & k_mask[None, :])

    @triton.jit
    def _head_wgrad_kernel(dy_ptr, dz_ptr, x_ptr, hid_ptr, seed_ptr, out_ptr,
                           B, D, H, C, S, seg, threshold, scale, rows_per_split, total,
                           KIND: tl.constexpr, N_LAYERS: tl.constexpr, DROPOUT: tl.constexpr,
                           CDT: tl.constexpr, ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (L, tile, split): one [BLOCK_N, BLOCK_K] tile of dW_L (and its slice of
        db_L) summed over one slice of the batch, written to out[split] (fp32 partials, or
        the final gradient when there is one split)."""
        L = tl.program_id(0)
        t = tl.program_id(1)
        split = tl.program_id(2)
        x_w, x_off, h_off, h_w, n_out = _layer_layout(L, N_LAYERS, KIND, D, H, C, S, seg)
        k_in = x_w + h_w
        tiles_k = tl.cdiv(k_in, BLOCK_K)
        if t < tl.cdiv(n_out, BLOCK_N) * tiles_k:
            tn = t // tiles_k
            tk = t % tiles_k
            offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tk * BLOCK_K + tl.arange(0, BLOCK_K)
            n_mask = offs_n < n_out
            from_x = offs_k < x_w
            from_h = (offs_k >= x_w) & (offs_k < k_in)
            seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
            if KIND == 0:  # spinal: all of u_L, stream L
                stream = L
                drop_cols = offs_k >= 0
            else:  # progressive: only x~ (stream 0); layer 0 reads the undropped x
                stream = L * 0
                drop_cols = from_x & (L > 0)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DT)
            bacc = tl.zeros((BLOCK_N,), dtype=ACC_DT)
            m_start = split * rows_per_split
            for m0 in range(m_start, tl.minimum(m_start + rows_per_split, B), BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                rmask = rows < B
                if L == N_LAYERS:
                    g = tl.load(dy_ptr + rows[:, None] * C + offs_n[None, :],
                                mask=rmask[:, None] & n_mask[None, :], other=0.0).to(CDT)
                else:
                    g = tl.load(dz_ptr + rows[:, None] * (N_LAYERS * H) + L * H
                                + offs_n[None, :],
                                mask=rmask[:, None] & n_mask[None, :], other=0.0).to(CDT)
                ux = tl.load(x_ptr + rows[:, None] * D + x_off + offs_k[None, :],
                             mask=rmask[:, None] & from_x[None, :], other=0.0)
                uh = tl.load(hid_ptr + rows[:, None] * (N_LAYERS * H) + h_off
                             + (offs_k[None, :] - x_w),
                             mask=rmask[:, None] & from_h[None, :], other=0.0)
                u = (ux.to(ACC_DT) + uh.to(ACC_DT)).to(CDT)
                if DROPOUT:
                    ud = _drop(u, rows, offs_k, stream, seed_lo, seed_hi, threshold,
                               scale).to(CDT)
                    u = tl.where(drop_cols[None, :], ud, u)
                acc = tl.dot(tl.trans(g), u, acc, input_precision=DOT_PREC,
                             out_dtype=acc.dtype)
                bacc += tl.sum(g.to(ACC_DT), axis=0)
            w_off = 0
            for l in range(0, L):
                xl, _a, _b, hl, nl = _layer_layout(l, N_LAYERS, KIND, D, H, C, S, seg)
                w_off += nl * (xl + hl) + nl
            base = out_ptr + split * total + w_off
            tl.store(base + offs_n[:, None] * k_in + offs_k[None, :],
                     _out(acc, out_ptr),
                     mask=n_mask[:, None] & (offs_k[None, :] < k_in))
            if tk == 0:
                tl.store(base + n_out * k_in + offs_n, _out(bacc, out_ptr),
                         mask=n_mask)

    @triton.jit
    def _reduce_kernel(part_ptr, out_ptr, total, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        """out[i] = sum over splits of part[split, i], always in the same order."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
        for s in range(SPLITS):
            acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, _out(acc, out_ptr), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
_TL_DTYPE = {}
if HAVE_TRITON:
    _TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16,
                 torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


@dataclass(frozen=True)
class Config:
    block_m: int   # rows per program (the batch dimension)
    block_n: int   # output columns per chunk
    block_k: int   # reduction chunk
    num_warps: int


def kernel_config(kernel: str, B: int, dtype: torch.dtype) -> Config:
    """Tiles of ``kernel`` ("fwd", "bwd_chain" or "wgrad") for a batch of B rows.

    The head is small, so a training batch of 64-1024 rows is cut into 16-row tiles to give
    every SM work; from 8192 rows on, 64-row tiles let each program re-read the weights from
    L2 for four times as many rows.  Every operand is a chunk of at most 64 x 64 whatever H
    and C are.  The sizes are the largest that compile without register spills for sm_90
    (scripts/check_triton_kernels.py checks every one): fp32, whose exact ("ieee") dot runs
    on FMA units, needs smaller chunks than fp16/bf16.
    """
    if _backends.interpreting():  # the interpreter's cost is per program: few, large tiles
        return Config(128, 64, 64, 4) if kernel == "wgrad" else Config(64, 64, 64, 4)
    half = dtype in (torch.float16, torch.bfloat16)
    if kernel == "wgrad":
        return Config(32, 64, 64, 4) if half else Config(16, 64, 32, 4)
    if not half:
        return Config(16, 16, 16, 4) if kernel == "fwd" else Config(16, 32, 16, 8)
    if B >= 8192:
        return Config(64, 64 if kernel == "fwd" else 32, 32, 8)
    return Config(16, 64 if kernel == "fwd" else 32, 32, 4)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _compute_dtype(dtype: torch.dtype):
    # Triton's interpreter mishandles bf16 arithmetic: compute in fp32 there (loads upcast)
    if dtype == torch.bfloat16 and _backends.interpreting():
        return tl.float32
    return _TL_DTYPE[dtype]


def _acc_dtype(dtype: torch.dtype):
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (used by gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dropout_args(dropout: float):
    if dropout == 0.0:
        return 0, 1.0
    return keep_threshold(dropout), 1.0 / (1.0 - dropout)


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Output allocation (tests poison it: ``spinalkern.testing.poisoned_outputs()`` makes
    torch.empty fill with NaN, so an element a kernel forgets to write shows up)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _check_triton_args(x, weights):
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not (x.is_cuda or (x.device.type == "cpu" and _backends.interpreting())):
        raise RuntimeError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")


def head_forward(x, weights, biases, seed, kind, num_splits, dropout, save_hidden):
    spec = checked_forward_args(x, weights, biases, seed, kind, num_splits, dropout)
    _check_triton_args(x, weights)
    # ops accept any strides: inputs are made contiguous here (the kernels assume row-major)
    x = x.contiguous()
    weights = [w.contiguous() for w in weights]
    biases = [b.contiguous() for b in biases]
    B = x.shape[0]
    y = _empty((B, spec.C), x)
    hidden = _empty((B, spec.n * spec.H) if save_hidden else (0,), x)
    if B == 0:
        return y, hidden
    cfg = kernel_config("fwd", B, x.dtype)
    threshold, scale = _dropout_args(dropout)
    scratch = hidden if save_hidden else torch.empty((B, spec.n * spec.H), dtype=x.dtype,
                                                     device=x.device)
    _head_fwd_kernel[(triton.cdiv(B, cfg.block_m),)](
        x, y, scratch, tuple(weights), tuple(biases),
        seed if seed is not None else x,
        B, spec.D, spec.H, spec.C, spec.num_splits, spec.seg, threshold, scale,
        KIND=kind, N_LAYERS=spec.n, DROPOUT=dropout > 0.0, CDT=_compute_dtype(x.dtype),
        ACC_DT=_acc_dtype(x.dtype), DOT_PREC=_dot_precision(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return y, hidden


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def wgrad_splits(spec, B: int, cfg: Config, device: torch.device) -> int:
    """How many batch slices the weight-gradient GEMMs use: enough programs for two per SM,
    never a slice smaller than one batch chunk.  The interpreter uses two slices whenever B
    spans two chunks, so that CPU tests run the partial-sum + reduction path."""
    if _backends.interpreting():
        return min(2, triton.cdiv(B, cfg.block_m))
    tiles = sum(triton.cdiv(N, cfg.block_n) * triton.cdiv(K, cfg.block_k)
                for N, K in spec.weight_shapes())
    return max(1, min(triton.cdiv(2 * _sm_count(device), tiles), triton.cdiv(B, cfg.block_m)))


def head_backward(grad_y, x, weights, hidden, seed, kind, num_splits, dropout):
    spec = checked_backward_args(grad_y, x, weights, hidden, seed, kind, num_splits, dropout)
    _check_triton_args(x, weights)
    # ops accept any strides: inputs are made contiguous here (the kernels assume row-major)
    grad_y, x, hidden = grad_y.contiguous(), x.contiguous(), hidden.contiguous()
    weights = [w.contiguous() for w in weights]
    B = x.shape[0]
    total = spec.num_params()
    grad_x = _empty(x.shape, x)
    grad_params = _empty((total,), x, weights[0].dtype)
    if B == 0:
        return grad_x.zero_(), grad_params.zero_()
    cdt, prec = _compute_dtype(x.dtype), _dot_precision(x.dtype)
    threshold, scale = _dropout_args(dropout)
    seed_arg = seed if seed is not None else x
    common = dict(KIND=kind, N_LAYERS=spec.n, DROPOUT=dropout > 0.0, CDT=cdt,
                  ACC_DT=_acc_dtype(x.dtype), DOT_PREC=prec)
    sizes = (B, spec.D, spec.H, spec.C, spec.num_splits, spec.seg, threshold, scale)

    cfg = kernel_config("bwd_chain", B, x.dtype)
    dz = _empty((B, spec.n * spec.H), x)
    _head_bwd_chain_kernel[(triton.cdiv(B, cfg.block_m),)](
        grad_y, x, hidden, tuple(weights), seed_arg, grad_x, dz, *sizes, **common,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)

    wcfg = kernel_config("wgrad", B, x.dtype)
    splits = wgrad_splits(spec, B, wcfg, x.device)
    rows_per_split = triton.cdiv(triton.cdiv(B, splits), wcfg.block_m) * wcfg.block_m
    splits = triton.cdiv(B, rows_per_split)
    max_tiles = max(triton.cdiv(N, wcfg.block_n) * triton.cdiv(K, wcfg.block_k)
                    for N, K in spec.weight_shapes())
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = grad_params if splits == 1 else _empty((splits, total), x, acc_dtype)
    _head_wgrad_kernel[(spec.n + 1, max_tiles, splits)](
        grad_y, dz, x, hidden, seed_arg, out, *sizes, rows_per_split, total, **common,
        BLOCK_M=wcfg.block_m, BLOCK_N=wcfg.block_n, BLOCK_K=wcfg.block_k,
        num_warps=wcfg.num_warps)
    if splits > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(total, block),)](out, grad_params, total, SPLITS=splits,
                                                     BLOCK=block)
    return grad_x, grad_params


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
    name="triton", available=_available, forward_op=forward_op, build_hint=_build_hint))
