"""The Triton kernels of both heads (``KIND`` 0 = spinal, 1 = progressive; see ``spinalkern.spec``).

Two kernel families; ``spinalkern.triton_plan`` chooses one per head and batch:

``fused`` (the whole padded hidden width ``HP`` fits one register tile, HP <= 128):
  * ``fused_fwd_kernel``: each program owns BLOCK_M rows (persistent: it loops over row tiles)
    and runs every layer on them with the activations on chip.  Layer L loops over the natural
    pieces of its input: the x piece in BLOCK_K chunks, then each hidden piece h_j as one
    [BLOCK_M, HP] register tile.  The spinal output layer is accumulated as each h_i appears.
    ``hidden`` is written only when backward will need it.
  * ``fused_bwd_chain_kernel``: per row tile, the activation-gradient chain in reverse layer
    order with every dz_j kept on chip, then grad_x from the on-chip dz_j.  dz_j and a copy of
    dy go to the gradient buffer G (padded layout, 16-byte aligned rows) for the weight
    gradients.

``chunked`` (any width, e.g. H = 512): every layer's outputs in BLOCK_N column chunks, hidden
  activations and dz through global memory (read back by the same program from L1/L2):
  ``chunked_fwd_kernel``, ``chunked_bwd_chain_kernel`` (G's pieces padded to multiples of 16
  columns).

Shared by both: ``wgrad_kernel`` (dW_L = dZ_L^T U_L, db_L = sum dZ_L as GEMMs over batch slices,
the x part and the hidden part of U_L in separate, vectorisable loops, fp32 partial sums) and
``reduce_kernel`` (fixed-order sum of the slices): deterministic, no atomics.

Addressing: every offset that scales with the batch (rows * D, rows * C, rows * n*H, the
partial-sum slices) is formed in 64 bits (``_rows64``); weight offsets stay 32-bit, which
``spinalkern.triton_plan`` checks (each weight and the flat gradient below 2**31 elements).
Dropout masks are recomputed from the seed with Philox4x32-10 (``spinalkern.rng``).
"""
from __future__ import annotations

from . import _backends

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with the CUDA build of torch on Linux
    HAVE_TRITON = False

if HAVE_TRITON:
    # Triton's interpreter converts fp32 -> bf16 by truncation; the GPU rounds to nearest even.
    # In the interpreter, stores round explicitly so that CPU tests see GPU-like bf16 numerics.
    _ROUND_BF16 = tl.constexpr(_backends.interpreting())

    @triton.jit
    def _round_bf16(v):
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _out(v, ptr):
        """v converted to the element type of ``ptr`` for a store."""
        if _ROUND_BF16 and ptr.dtype.element_ty == tl.bfloat16:
            v = _round_bf16(v)
        return v.to(ptr.dtype.element_ty)

    @triton.jit
    def _as_io(v, ptr, CDT: tl.constexpr):
        """v rounded as a store to ``ptr`` would round it, in the compute dtype: what a later
        layer reads when the value is kept on chip instead of being re-read from memory."""
        if _ROUND_BF16 and ptr.dtype.element_ty == tl.bfloat16:
            return _round_bf16(v).to(CDT)
        return v.to(ptr.dtype.element_ty).to(CDT)

    @triton.jit
    def _rows64(tile, BLOCK_M: tl.constexpr):
        """The rows of a row tile and their 64-bit copy for address arithmetic (rows * width
        may exceed 2**31 for large batches)."""
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        return rows, rows.to(tl.int64)

    @triton.jit
    def _threshold(thr_biased):
        """The uint32 dropout threshold, passed as threshold - 2**31 so that it is always an
        int32 launch argument (one compiled kernel for every dropout probability)."""
        return thr_biased.to(tl.uint32, bitcast=True) ^ 0x80000000

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
        keep = _philox_keep(seed_lo, seed_hi, cols[None, :], rows[:, None], stream, threshold)
        return tl.where(keep, t * scale, 0.0)

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
    def _relu(z):
        """ReLU that keeps NaN (as torch.relu does)."""
        return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)

    # -- fused family: building blocks ---------------------------------------------------------
    @triton.jit
    def _x_piece(acc, x_ptr, rows, r64, row_mask, XOFF: tl.constexpr, XW: tl.constexpr,
                 D: tl.constexpr, w_ptr, KIN: tl.constexpr, offs_n, n_mask, DROP: tl.constexpr,
                 stream, seed_lo, seed_hi, threshold, scale, CDT: tl.constexpr,
                 DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += drop(x[rows, XOFF : XOFF+XW]) @ W[offs_n, 0:XW]^T in BLOCK_K chunks (the x
        piece is always first in u_L, so its dropout column is its column in the piece)."""
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, XW, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < XW
            a = tl.load(x_ptr + r64[:, None] * D + XOFF + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
            if DROP:
                a = _drop(a, rows, ks, stream, seed_lo, seed_hi, threshold, scale).to(CDT)
            w = tl.load(w_ptr + offs_n[None, :] * KIN + ks[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(CDT)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def _h_piece(acc, h, rows, offs_h, h_mask, w_ptr, KIN: tl.constexpr, COL0: tl.constexpr,
                 offs_n, n_mask, DROP: tl.constexpr, stream, seed_lo, seed_hi, threshold, scale,
                 CDT: tl.constexpr, DOT_PREC: tl.constexpr):
        """acc += drop(h) @ W[offs_n, COL0 : COL0+H]^T for an on-chip [BLOCK_M, HP] tile h
        that sits at column COL0 of the layer input (its dropout columns)."""
        if DROP:
            h = _drop(h, rows, COL0 + offs_h, stream, seed_lo, seed_hi, threshold, scale).to(CDT)
        w = tl.load(w_ptr + offs_n[None, :] * KIN + COL0 + offs_h[:, None],
                    mask=n_mask[None, :] & h_mask[:, None], other=0.0).to(CDT)
        return tl.dot(h, w, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)

    @triton.jit
    def _back(acc, g, offs_g, g_mask, w_ptr, KIN: tl.constexpr, COL0: tl.constexpr, offs_o,
              o_mask, CDT: tl.constexpr, DOT_PREC: tl.constexpr):
        """acc += g @ W[offs_g, COL0 + offs_o]: a gradient g (on chip, one column per output
        of the layer) pulled back to the layer-input columns COL0 + offs_o."""
        w = tl.load(w_ptr + offs_g[:, None] * KIN + COL0 + offs_o[None, :],
                    mask=g_mask[:, None] & o_mask[None, :], other=0.0).to(CDT)
        return tl.dot(g, w, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)

    @triton.jit(do_not_specialize=["thr_biased"])
    def fused_fwd_kernel(x_ptr, y_ptr, hid_ptr, w_ptrs, b_ptrs, seed_ptr, B, thr_biased, scale,
                         KIND: tl.constexpr, N_LAYERS: tl.constexpr, D: tl.constexpr,
                         H: tl.constexpr, C: tl.constexpr, S: tl.constexpr, HP: tl.constexpr,
                         CP: tl.constexpr, DROPOUT: tl.constexpr, SAVE_HIDDEN: tl.constexpr,
                         CDT: tl.constexpr, ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """The whole head for row tiles of BLOCK_M rows, activations on chip (see module doc)."""
        SEG: tl.constexpr = D // S
        NH: tl.constexpr = N_LAYERS * H
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        threshold = _threshold(thr_biased)
        offs_h = tl.arange(0, HP)
        h_mask = offs_h < H
        offs_c = tl.arange(0, CP)
        c_mask = offs_c < C
        num_tiles = tl.cdiv(B, BLOCK_M)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            rows, r64 = _rows64(tile, BLOCK_M)
            row_mask = rows < B
            y_acc = tl.zeros((BLOCK_M, CP), dtype=ACC_DT)
            hs = ()
            for L in tl.static_range(N_LAYERS):
                acc = tl.zeros((BLOCK_M, HP), dtype=ACC_DT)
                if KIND == 0:  # [segment L % S ; h_{L-1}], all dropped with stream L
                    acc = _x_piece(acc, x_ptr, rows, r64, row_mask, (L % S) * SEG, SEG, D,
                                   w_ptrs[L], SEG if L == 0 else SEG + H, offs_h, h_mask,
                                   DROPOUT, L, seed_lo, seed_hi, threshold, scale, CDT,
                                   DOT_PREC, BLOCK_K)
                    if L > 0:
                        acc = _h_piece(acc, hs[L - 1], rows, offs_h, h_mask, w_ptrs[L],
                                       SEG + H, SEG, offs_h, h_mask, DROPOUT, L, seed_lo,
                                       seed_hi, threshold, scale, CDT, DOT_PREC)
                else:  # [x (layer 0) or x~ ; h_0 ; ... ; h_{L-1}]
                    acc = _x_piece(acc, x_ptr, rows, r64, row_mask, 0, D, D, w_ptrs[L],
                                   D + L * H, offs_h, h_mask, DROPOUT and L > 0, 0, seed_lo,
                                   seed_hi, threshold, scale, CDT, DOT_PREC, BLOCK_K)
                    for j in tl.static_range(L):
                        acc = _h_piece(acc, hs[j], rows, offs_h, h_mask, w_ptrs[L],
                                       D + L * H, D + j * H, offs_h, h_mask, False, 0, seed_lo,
                                       seed_hi, threshold, scale, CDT, DOT_PREC)
                b = tl.load(b_ptrs[L] + offs_h, mask=h_mask, other=0.0).to(ACC_DT)
                h = tl.where(h_mask[None, :], _relu(acc + b[None, :]), 0.0)
                if SAVE_HIDDEN:
                    tl.store(hid_ptr + r64[:, None] * NH + L * H + offs_h[None, :],
                             _out(h, hid_ptr), mask=row_mask[:, None] & h_mask[None, :])
                h = _as_io(h, x_ptr, CDT)
                hs = hs + (h,)
                if KIND == 0:  # the output layer reads h_L at column L*H, stream n
                    y_acc = _h_piece(y_acc, h, rows, offs_h, h_mask, w_ptrs[N_LAYERS], NH,
                                     L * H, offs_c, c_mask, DROPOUT, N_LAYERS, seed_lo, seed_hi,
                                     threshold, scale, CDT, DOT_PREC)
            if KIND == 1:  # output layer: [x~ ; h_0 ; ... ; h_{n-1}]
                y_acc = _x_piece(y_acc, x_ptr, rows, r64, row_mask, 0, D, D, w_ptrs[N_LAYERS],
                                 D + NH, offs_c, c_mask, DROPOUT, 0, seed_lo, seed_hi, threshold,
                                 scale, CDT, DOT_PREC, BLOCK_K)
                for j in tl.static_range(N_LAYERS):
                    y_acc = _h_piece(y_acc, hs[j], rows, offs_h, h_mask, w_ptrs[N_LAYERS],
                                     D + NH, D + j * H, offs_c, c_mask, False, 0, seed_lo,
                                     seed_hi, threshold, scale, CDT, DOT_PREC)
            b = tl.load(b_ptrs[N_LAYERS] + offs_c, mask=c_mask, other=0.0).to(ACC_DT)
            tl.store(y_ptr + r64[:, None] * C + offs_c[None, :], _out(y_acc + b[None, :], y_ptr),
                     mask=row_mask[:, None] & c_mask[None, :])

    @triton.jit(do_not_specialize=["thr_biased"])
    def fused_bwd_chain_kernel(dy_ptr, x_ptr, hid_ptr, w_ptrs, seed_ptr, dx_ptr, g_ptr, B,
                               thr_biased, scale, KIND: tl.constexpr, N_LAYERS: tl.constexpr,
                               D: tl.constexpr, H: tl.constexpr, C: tl.constexpr,
                               S: tl.constexpr, HP: tl.constexpr, CP: tl.constexpr,
                               DROPOUT: tl.constexpr, CDT: tl.constexpr, ACC_DT: tl.constexpr,
                               DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        """Per row tile: dz_j for j = n-1 .. 0 (kept on chip, written to G = [dz_0 | ... |
        dz_{n-1} | dy], each piece padded to HP / CP columns), then grad_x."""
        SEG: tl.constexpr = D // S
        NH: tl.constexpr = N_LAYERS * H
        GS: tl.constexpr = N_LAYERS * HP + CP
        XOUT: tl.constexpr = 0 if KIND == 0 else D  # x columns of the output layer's input
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        threshold = _threshold(thr_biased)
        offs_h = tl.arange(0, HP)
        h_mask = offs_h < H
        offs_c = tl.arange(0, CP)
        c_mask = offs_c < C
        offs_k = tl.arange(0, BLOCK_K)
        num_tiles = tl.cdiv(B, BLOCK_M)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            rows, r64 = _rows64(tile, BLOCK_M)
            row_mask = rows < B
            dy = tl.load(dy_ptr + r64[:, None] * C + offs_c[None, :],
                         mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            tl.store(g_ptr + r64[:, None] * GS + N_LAYERS * HP + offs_c[None, :],
                     dy.to(g_ptr.dtype.element_ty), mask=row_mask[:, None])
            dy = dy.to(CDT)
            dzs = ()  # dzs[k] = dz_{j+k} after step j
            for j in tl.static_range(N_LAYERS - 1, -1, -1):
                dh = tl.zeros((BLOCK_M, HP), dtype=ACC_DT)
                dh = _back(dh, dy, offs_c, c_mask, w_ptrs[N_LAYERS], XOUT + NH, XOUT + j * H,
                           offs_h, h_mask, CDT, DOT_PREC)
                if KIND == 0:
                    if DROPOUT:
                        dh = _drop(dh, rows, j * H + offs_h, N_LAYERS, seed_lo, seed_hi,
                                   threshold, scale)
                    if j + 1 < N_LAYERS:  # layer j+1 reads h_j at column SEG, stream j+1
                        part = tl.zeros((BLOCK_M, HP), dtype=ACC_DT)
                        part = _back(part, dzs[0], offs_h, h_mask, w_ptrs[j + 1], SEG + H, SEG,
                                     offs_h, h_mask, CDT, DOT_PREC)
                        if DROPOUT:
                            part = _drop(part, rows, SEG + offs_h, j + 1, seed_lo, seed_hi,
                                         threshold, scale)
                        dh += part
                else:  # every later layer L reads h_j at column D + j*H (never dropped)
                    for L in tl.static_range(j + 1, N_LAYERS):
                        dh = _back(dh, dzs[L - j - 1], offs_h, h_mask, w_ptrs[L], D + L * H,
                                   D + j * H, offs_h, h_mask, CDT, DOT_PREC)
                h = tl.load(hid_ptr + r64[:, None] * NH + j * H + offs_h[None, :],
                            mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                dz = tl.where(h <= 0, 0.0, dh)  # as torch: zero where h <= 0 (NaN passes)
                tl.store(g_ptr + r64[:, None] * GS + j * HP + offs_h[None, :], _out(dz, g_ptr),
                         mask=row_mask[:, None])
                dzs = (_as_io(dz, g_ptr, CDT),) + dzs
            # -- grad_x, BLOCK_K columns at a time, from the on-chip dz ------------------------
            if KIND == 0:  # segment s is read by the layers L with L % S == s (stream L)
                for s in tl.static_range(S):
                    for k0 in range(0, SEG, BLOCK_K):
                        ks = k0 + offs_k
                        k_mask = ks < SEG
                        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DT)
                        for L in tl.static_range(N_LAYERS):
                            if L % S == s:
                                px = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DT)
                                px = _back(px, dzs[L], offs_h, h_mask, w_ptrs[L],
                                           SEG if L == 0 else SEG + H, 0, ks, k_mask, CDT,
                                           DOT_PREC)
                                if DROPOUT:
                                    px = _drop(px, rows, ks, L, seed_lo, seed_hi, threshold,
                                               scale)
                                acc += px
                        tl.store(dx_ptr + r64[:, None] * D + s * SEG + ks[None, :],
                                 _out(acc, dx_ptr), mask=row_mask[:, None] & k_mask[None, :])
            else:  # layer 0 reads x; later layers and the output read x~ = drop(x), stream 0
                for k0 in range(0, D, BLOCK_K):
                    ks = k0 + offs_k
                    k_mask = ks < D
                    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DT)
                    acc = _back(acc, dy, offs_c, c_mask, w_ptrs[N_LAYERS], D + NH, 0, ks, k_mask,
                                CDT, DOT_PREC)
                    for L in tl.static_range(1, N_LAYERS):
                        acc = _back(acc, dzs[L], offs_h, h_mask, w_ptrs[L], D + L * H, 0, ks,
                                    k_mask, CDT, DOT_PREC)
                    if DROPOUT:
                        acc = _drop(acc, rows, ks, 0, seed_lo, seed_hi, threshold, scale)
                    acc = _back(acc, dzs[0], offs_h, h_mask, w_ptrs[0], D, 0, ks, k_mask, CDT,
                                DOT_PREC)
                    tl.store(dx_ptr + r64[:, None] * D + ks[None, :], _out(acc, dx_ptr),
                             mask=row_mask[:, None] & k_mask[None, :])

    # -- chunked family (any width) ------------------------------------------------------------
    @triton.jit
    def _layer_layout(L, N_LAYERS: tl.constexpr, KIND: tl.constexpr, D, H, C, S):
        """(x_width, x_offset, h_offset, h_width, out_width) of layer L, as in HeadSpec."""
        seg = D // S
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
    def _gemm_nt(acc, src_ptr, src_stride, src_col0, width, rows, r64, row_mask, w_ptr, k_in,
                 w_col0, offs_n, n_mask, stream, seed_lo, seed_hi, threshold, scale,
                 DROP: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        """acc += drop(A) @ W[offs_n, w_col0 : w_col0 + width]^T, A = src[rows, src_col0 :
        src_col0 + width], in BLOCK_K chunks; A's element c has dropout column w_col0 + c."""
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, width, BLOCK_K):
            cols = k0 + offs_k
            k_mask = cols < width
            a = tl.load(src_ptr + r64[:, None] * src_stride + src_col0 + cols[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
            if DROP:
                a = _drop(a, rows, w_col0 + cols, stream, seed_lo, seed_hi, threshold,
                          scale).to(CDT)
            w = tl.load(w_ptr + offs_n[None, :] * k_in + w_col0 + cols[:, None],
                        mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(CDT)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def _gemm_nn(acc, g_ptr, g_stride, g_col0, width, r64, row_mask, w_ptr, k_in, w_cols,
                 w_col_mask, CDT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc += G[rows, g_col0 : g_col0 + width] @ W[0:width, w_cols] (a gradient through
        a layer: G holds dz or dy, W's rows are that layer's outputs), in BLOCK_K chunks."""
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, width, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < width
            g = tl.load(g_ptr + r64[:, None] * g_stride + g_col0 + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(CDT)
            w = tl.load(w_ptr + ks[:, None] * k_in + w_cols[None, :],
                        mask=k_mask[:, None] & w_col_mask[None, :], other=0.0).to(CDT)
            acc = tl.dot(g, w, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)
        return acc

    @triton.jit(do_not_specialize=["thr_biased"])
    def chunked_fwd_kernel(x_ptr, y_ptr, hid_ptr, w_ptrs, b_ptrs, seed_ptr, B, thr_biased, scale,
                           KIND: tl.constexpr, N_LAYERS: tl.constexpr, D: tl.constexpr,
                           H: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                           DROPOUT: tl.constexpr, CDT: tl.constexpr, ACC_DT: tl.constexpr,
                           DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The whole head for one tile of BLOCK_M rows, each layer's outputs in BLOCK_N column
        chunks; hidden outputs go through ``hid_ptr`` (B, n*H) (saved, or scratch)."""
        NH: tl.constexpr = N_LAYERS * H
        rows, r64 = _rows64(tl.program_id(0), BLOCK_M)
        row_mask = rows < B
        offs_n = tl.arange(0, BLOCK_N)
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        threshold = _threshold(thr_biased)
        for L in tl.static_range(N_LAYERS + 1):
            x_w, x_off, h_off, h_w, n_out = _layer_layout(L, N_LAYERS, KIND, D, H, C, S)
            k_in = x_w + h_w
            for n0 in range(0, n_out, BLOCK_N):
                cols = n0 + offs_n
                n_mask = cols < n_out
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                acc = _gemm_nt(acc, x_ptr, D, x_off, x_w, rows, r64, row_mask, w_ptrs[L], k_in,
                               0, cols, n_mask, L if KIND == 0 else 0, seed_lo, seed_hi,
                               threshold, scale, DROPOUT and (KIND == 0 or L > 0), CDT, DOT_PREC,
                               BLOCK_K)
                acc = _gemm_nt(acc, hid_ptr, NH, h_off, h_w, rows, r64, row_mask, w_ptrs[L],
                               k_in, x_w, cols, n_mask, L, seed_lo, seed_hi, threshold, scale,
                               DROPOUT and KIND == 0, CDT, DOT_PREC, BLOCK_K)
                z = acc + tl.load(b_ptrs[L] + cols, mask=n_mask, other=0.0)[None, :]
                out_mask = row_mask[:, None] & n_mask[None, :]
                if L < N_LAYERS:
                    tl.store(hid_ptr + r64[:, None] * NH + L * H + cols[None, :],
                             _out(_relu(z), hid_ptr), mask=out_mask)
                else:
                    tl.store(y_ptr + r64[:, None] * C + cols[None, :], _out(z, y_ptr),
                             mask=out_mask)
            tl.debug_barrier()  # h_L is read back by other threads of this program

    @triton.jit(do_not_specialize=["thr_biased"])
    def chunked_bwd_chain_kernel(dy_ptr, x_ptr, hid_ptr, w_ptrs, seed_ptr, dx_ptr, g_ptr, B,
                                 thr_biased, scale, KIND: tl.constexpr, N_LAYERS: tl.constexpr,
                                 D: tl.constexpr, H: tl.constexpr, C: tl.constexpr,
                                 S: tl.constexpr, HS: tl.constexpr, GS: tl.constexpr,
                                 DROPOUT: tl.constexpr, CDT: tl.constexpr,
                                 ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
        """Per row tile: dz_j (j = n-1 .. 0) pulled from every layer that reads h_j, written
        to G = [dz_0 | ... | dz_{n-1} | dy] (row stride GS, pieces HS columns apart: rows and
        pieces start 16-byte aligned) in BLOCK_N column chunks; then grad_x from every layer
        reading x."""
        rows, r64 = _rows64(tl.program_id(0), BLOCK_M)
        row_mask = rows < B
        offs_n = tl.arange(0, BLOCK_N)
        NH: tl.constexpr = N_LAYERS * H
        SEG: tl.constexpr = D // S
        seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
        threshold = _threshold(thr_biased)
        for c0 in range(0, C, BLOCK_N):  # dy, copied into G for the weight gradients
            cc = c0 + offs_n
            cmask = row_mask[:, None] & (cc < C)[None, :]
            dy = tl.load(dy_ptr + r64[:, None] * C + cc[None, :], mask=cmask, other=0.0)
            tl.store(g_ptr + r64[:, None] * GS + N_LAYERS * HS + cc[None, :],
                     dy.to(g_ptr.dtype.element_ty), mask=cmask)
        tl.debug_barrier()  # from here on dy is read from its aligned copy in G
        for j in tl.static_range(N_LAYERS - 1, -1, -1):
            for n0 in range(0, H, BLOCK_N):
                hc = n0 + offs_n  # columns of h_j
                h_mask = hc < H
                # the output layer reads h_j at column x_w + j*H of its input
                x_w, x_off, h_off, h_w, n_out = _layer_layout(N_LAYERS, N_LAYERS, KIND, D, H, C,
                                                              S)
                ucol = x_w + j * H + hc
                dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                dh = _gemm_nn(dh, g_ptr, GS, N_LAYERS * HS, C, r64, row_mask, w_ptrs[N_LAYERS],
                              x_w + h_w, ucol, h_mask, CDT, DOT_PREC, BLOCK_K)
                if DROPOUT and KIND == 0:
                    dh = _drop(dh, rows, ucol, N_LAYERS, seed_lo, seed_hi, threshold, scale)
                for L in tl.static_range(j + 1, N_LAYERS):
                    if (KIND != 0) or (L == j + 1):  # hidden layer L reads h_j
                        x_w, x_off, h_off, h_w, n_out = _layer_layout(L, N_LAYERS, KIND, D, H,
                                                                      C, S)
                        # h_j's columns in u_L: spinal [seg; h_{L-1}], progressive [x; h_0..]
                        ucol = x_w + (0 if KIND == 0 else j * H) + hc
                        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                        part = _gemm_nn(part, g_ptr, GS, L * HS, H, r64, row_mask, w_ptrs[L],
                                        x_w + h_w, ucol, h_mask, CDT, DOT_PREC, BLOCK_K)
                        if DROPOUT and KIND == 0:
                            part = _drop(part, rows, ucol, L, seed_lo, seed_hi, threshold,
                                         scale)
                        dh += part
                mask2 = row_mask[:, None] & h_mask[None, :]
                h = tl.load(hid_ptr + r64[:, None] * NH + j * H + hc[None, :], mask=mask2,
                            other=0.0)
                tl.store(g_ptr + r64[:, None] * GS + j * HS + hc[None, :],
                         _out(tl.where(h <= 0, 0.0, dh), g_ptr), mask=mask2)
            tl.debug_barrier()  # dz_j is read back by other threads of this program
        # -- grad_x, one BLOCK_N column block at a time -----------------------------------------
        if KIND == 0:
            # spinal: segment s is read by the layers L with L % S == s, each with its own mask
            for s in tl.static_range(S):
                for k0 in range(0, SEG, BLOCK_N):
                    kc = k0 + offs_n
                    k_mask = kc < SEG
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                    for L in tl.static_range(N_LAYERS):
                        if L % S == s:
                            px = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                            px = _gemm_nn(px, g_ptr, GS, L * HS, H, r64, row_mask, w_ptrs[L],
                                          SEG + (0 if L == 0 else H), kc, k_mask, CDT,
                                          DOT_PREC, BLOCK_K)
                            if DROPOUT:
                                px = _drop(px, rows, kc, L, seed_lo, seed_hi, threshold,
                                           scale)
                            acc += px
                    tl.store(dx_ptr + r64[:, None] * D + s * SEG + kc[None, :],
                             _out(acc, dx_ptr), mask=row_mask[:, None] & k_mask[None, :])
        else:
            # progressive: layer 0 reads x; later layers and the output read x~ = drop(x)
            for k0 in range(0, D, BLOCK_N):
                kc = k0 + offs_n
                k_mask = kc < D
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
                acc = _gemm_nn(acc, g_ptr, GS, N_LAYERS * HS, C, r64, row_mask, w_ptrs[N_LAYERS],
                               D + NH, kc, k_mask, CDT, DOT_PREC, BLOCK_K)
                for L in tl.static_range(1, N_LAYERS):
                    acc = _gemm_nn(acc, g_ptr, GS, L * HS, H, r64, row_mask, w_ptrs[L],
                                   D + L * H, kc, k_mask, CDT, DOT_PREC, BLOCK_K)
                if DROPOUT:
                    acc = _drop(acc, rows, kc, 0, seed_lo, seed_hi, threshold, scale)
                acc = _gemm_nn(acc, g_ptr, GS, 0, H, r64, row_mask, w_ptrs[0], D, kc, k_mask,
                               CDT, DOT_PREC, BLOCK_K)
                tl.store(dx_ptr + r64[:, None] * D + kc[None, :], _out(acc, dx_ptr),
                         mask=row_mask[:, None] & k_mask[None, :])

    # -- weight gradients (both families) ------------------------------------------------------
    @triton.jit(do_not_specialize=["thr_biased"])
    def wgrad_kernel(g_ptr, x_ptr, hid_ptr, seed_ptr, out_ptr, B, rows_per_split,
                     thr_biased, scale, KIND: tl.constexpr, N_LAYERS: tl.constexpr,
                     D: tl.constexpr, H: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                     HS: tl.constexpr, GS: tl.constexpr, TOTAL: tl.constexpr,
                     DROPOUT: tl.constexpr,
                     CDT: tl.constexpr, ACC_DT: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (L, tile, split): one [BLOCK_N, BLOCK_K] tile of dW_L (and its slice of
        db_L) summed over one slice of the batch, written to out[split] (fp32 partials, or the
        final gradient when there is one split).  A tile's columns lie either in the x piece
        or in the hidden piece of u_L, so each tile streams one source with a plain strided
        load.  The gradient of layer L's outputs is piece L of G (row stride GS, column L*HS):
        dz_L, or dy for the output layer (L = n)."""
        L = tl.program_id(0)
        t = tl.program_id(1)
        split = tl.program_id(2)
        NH: tl.constexpr = N_LAYERS * H
        x_w, x_off, h_off, h_w, n_out = _layer_layout(L, N_LAYERS, KIND, D, H, C, S)
        k_in = x_w + h_w
        tiles_x = tl.cdiv(x_w, BLOCK_K)
        tiles_k = tiles_x + tl.cdiv(h_w, BLOCK_K)
        if t < tl.cdiv(n_out, BLOCK_N) * tiles_k:
            tn = t // tiles_k
            tk = t % tiles_k
            is_x = tk < tiles_x
            # this tile's source: columns [k0, k0 + BLOCK_K) of x (row stride D) or of hidden
            k0 = tl.where(is_x, tk, tk - tiles_x) * BLOCK_K
            src_w = tl.where(is_x, x_w, h_w)
            src_col = tl.where(is_x, x_off, h_off) + k0
            ucol0 = tl.where(is_x, 0, x_w) + k0  # the tile's first column in u_L
            offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            n_mask = offs_n < n_out
            k_mask = (k0 + offs_k) < src_w
            seed_lo, seed_hi = _load_seed(seed_ptr, DROPOUT)
            threshold = _threshold(thr_biased)
            # spinal: all of u_L, stream L; progressive: x~ only (stream 0), not in layer 0
            stream = tl.where(KIND == 0, L, 0)
            drop_tile = (KIND == 0) | (is_x & (L > 0))
            # the two operands' sources, chosen once: the loop body is one strided load each
            g_base = g_ptr + L * HS
            u_base = tl.where(is_x, x_ptr, hid_ptr) + src_col
            u_stride = tl.where(is_x, D, NH)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DT)
            bacc = tl.zeros((BLOCK_N,), dtype=ACC_DT)
            m_start = split * rows_per_split
            for m0 in range(m_start, tl.minimum(m_start + rows_per_split, B), BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                r64 = rows.to(tl.int64)
                rmask = rows < B
                g = tl.load(g_base + r64[:, None] * GS + offs_n[None, :],
                            mask=rmask[:, None] & n_mask[None, :], other=0.0).to(CDT)
                u = tl.load(u_base + r64[:, None] * u_stride + offs_k[None, :],
                            mask=rmask[:, None] & k_mask[None, :], other=0.0).to(CDT)
                if DROPOUT:
                    if drop_tile:
                        u = _drop(u, rows, ucol0 + offs_k, stream, seed_lo, seed_hi, threshold,
                                  scale).to(CDT)
                acc = tl.dot(tl.trans(g), u, acc, input_precision=DOT_PREC,
                             out_dtype=acc.dtype)
                bacc += tl.sum(g.to(ACC_DT), axis=0)
            # offset of dW_L in the flat gradient: the sizes of the layers before it
            w_off = 0
            for l in tl.static_range(N_LAYERS + 1):
                xl, _a, _b, hl, nl = _layer_layout(l, N_LAYERS, KIND, D, H, C, S)
                w_off += tl.where(l < L, nl * (xl + hl) + nl, 0)
            base = out_ptr + split.to(tl.int64) * TOTAL + w_off
            tl.store(base + offs_n[:, None] * k_in + ucol0 + offs_k[None, :], _out(acc, out_ptr),
                     mask=n_mask[:, None] & k_mask[None, :])
            if tk == 0:
                tl.store(base + n_out * k_in + offs_n, _out(bacc, out_ptr), mask=n_mask)

    @triton.jit
    def reduce_kernel(part_ptr, out_ptr, TOTAL: tl.constexpr, SPLITS: tl.constexpr,
                      BLOCK: tl.constexpr):
        """out[i] = sum over splits of part[split, i], always in the same order."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < TOTAL
        acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
        ptrs = part_ptr + offs.to(tl.int64)
        for s in range(SPLITS):
            acc += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += TOTAL  # 64-bit pointer arithmetic: SPLITS * TOTAL may exceed 2**31
        tl.store(out_ptr + offs, _out(acc, out_ptr), mask=mask)
