// The backward kernels: three launches, deterministic (fixed-order sums, no atomics).
//
//   chain  - one CTA per BM-row tile walks the layers in reverse.  dz_L (the A operand) is
//            built in shared memory from the dh accumulators and the ReLU mask of the saved
//            hidden tile (itself copied to shared memory in the prologue); du_L = dz_L W_L is
//            computed on W_L tiles streamed through a cp.async ring in consumption order
//            (across layers, as in the forward) and scattered, with the layer's dropout mask,
//            into fp32 grad_x and dh accumulators (shared memory when they fit).  dz_L also
//            goes to a padded (B, n*pad16(H) + pad16(C)) workspace for the next launch.
//   wgrad  - one CTA per (BM x BN tile of some dW_L, batch chunk): dW = dz_L^T u_L over the
//            chunk, both operands streamed with 16-byte cp.async (u_L from the padded x and
//            hidden, its dropout mask applied in shared memory), fp32 partials.  Tiles at the
//            first column block also sum dz_L over the chunk for db_L: every thread sums a
//            fixed slice of rows of one column, the slices are then added in a fixed order.
//   reduce - grad_params = the chunk partials summed in chunk order (16-byte loads).
#pragma once

#include "head_gemm.cuh"
#include "head_params.h"

namespace spinalkern {
namespace kern {

// Column offset of dz_L in the dz workspace.
SK_HD int dz_offset(const HeadDims& d, int L) { return L * pad16(d.H); }

// ---- launch 1: the activation-gradient chain ---------------------------------------------
// Stream order: for L = n..0, for each BN block of columns of u_L, the outputs of W_L in BK
// chunks (tile = BK rows x BN columns of W_L).
template <typename T, int BM>
struct ChainStream {
  using Cfg = ChainCfg<T, BM>;
  int L, cb, kc, ncb, nchunks, issued;

  SK_DEV void setup(const HeadDims& d) {
    if (L < 0) return;
    ncb = cdiv(padded_layer(d, L).K_pad, Cfg::BN);
    nchunks = cdiv(L == d.n ? pad16(d.C) : pad16(d.H), Cfg::BK);
  }
  SK_DEV void begin(const HeadDims& d) {
    L = d.n;
    cb = kc = issued = 0;
    setup(d);
  }
  SK_DEV void issue(const BackwardParams<T>& p, T* ring) {
    if (L < 0) return;
    const HeadDims& d = p.d;
    const int K_pad = padded_layer(d, L).K_pad, N = L == d.n ? d.C : d.H;
    T* dst = ring + (size_t)(issued % Cfg::kStages) * Cfg::BK * Cfg::kStagePitch;
    copy_tile_async<Cfg::BK, Cfg::BN>(dst, Cfg::kStagePitch,
                                       p.w[L] + (int64_t)kc * Cfg::BK * K_pad + cb * Cfg::BN,
                                       K_pad, N - kc * Cfg::BK, K_pad - cb * Cfg::BN);
    ++issued;
    if (++kc < nchunks) return;
    kc = 0;
    if (++cb < ncb) return;
    cb = 0;
    --L;
    setup(d);
  }
};

template <typename T, int BM>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    head_backward_chain_kernel(SK_GRID_CONSTANT const BackwardParams<T> p) {
  using Cfg = ChainCfg<T, BM>;
  using A = acc_t<T>;
  constexpr int S = Cfg::kStages, BK = Cfg::BK, BN = Cfg::BN, SP = Cfg::kStagePitch;
  SK_DYNAMIC_SMEM(smem);
  const HeadDims& d = p.d;
  const ChainPlan& pl = p.chain;
  const int row0 = (int)blockIdx.x * BM, rows = min(BM, d.B - row0);
  const int hp = pad16(d.H), hpw = h_pad_width(d), nH = d.n * d.H;
  T* dzs = pl.smem.ptr<T>(smem, kSmDz);
  T* ring = pl.smem.ptr<T>(smem, kSmRing);
  // hidden of row m at hsrc[m * hpw + L * hp + j]; dh at dh[m * nH + ...]; grad_x at gx[m * D + ...]
  const T* hsrc = pl.ht_smem ? pl.smem.ptr<T>(smem, kSmHt) : p.hu + (int64_t)row0 * hpw;
  A* dh = pl.dh_smem ? pl.smem.ptr<A>(smem, kSmDh) : p.dh_g + (int64_t)row0 * nH;
  A* gx = pl.gx_smem ? pl.smem.ptr<A>(smem, kSmGx) : p.gx_g + (int64_t)row0 * d.D;

  if (pl.ht_smem) copy_rows_async(pl.smem.ptr<T>(smem, kSmHt), hpw, p.hu + (int64_t)row0 * hpw,
                                  hpw, BM, rows, hpw);
  cp_async_commit();
  ChainStream<T, BM> st;
  st.begin(d);
#pragma unroll 1
  for (int s = 0; s < S - 1; ++s) {
    st.issue(p, ring);
    cp_async_commit();
  }
  for (int idx = (int)threadIdx.x; idx < rows * nH; idx += kThreads) dh[idx] = A(0);
  for (int idx = (int)threadIdx.x; idx < rows * d.D; idx += kThreads) gx[idx] = A(0);

  int consumed = 0;
  auto next_tile = [&]() -> const T* {
    cp_async_wait<S - 2>();
    __syncthreads();
    st.issue(p, ring);
    cp_async_commit();
    return ring + (size_t)(consumed++ % S) * BK * SP;
  };

  for (int L = d.n; L >= 0; --L) {
    const PaddedLayer lay = padded_layer(d, L);
    const bool out = L == d.n;
    const int N = out ? d.C : d.H, Np = pad16(N);
    // dh_L is complete and the previous layer is done reading dz.  (For L < n the hidden tile
    // has landed: its commit group is older than the tiles consumed in layer n.)
    __syncthreads();
    for (int idx = (int)threadIdx.x; idx < BM * Np; idx += kThreads) {
      const int m = idx / Np, j = idx % Np, row = row0 + m;
      A v = A(0);
      if (row < d.B && j < N) {
        if (out) {
          v = to_acc(p.grad_y[(int64_t)row * d.C + j]);
        } else {  // ReLU backward as torch: zero where h <= 0 (a NaN h passes the gradient)
          const A hv = to_acc(hsrc[m * hpw + L * hp + j]);
          v = hv <= A(0) ? A(0) : dh[m * nH + L * d.H + j];
        }
      }
      const T z = from_acc<T>(v);
      dzs[m * pl.dz_pitch + j] = z;
      if (row < d.B) p.dz[(int64_t)row * p.ldz + dz_offset(d, L) + j] = z;
    }
    __syncthreads();
    const int ncb = cdiv(lay.K_pad, BN), nchunks = cdiv(Np, BK);
    for (int cb = 0; cb < ncb; ++cb) {
      WarpGemm<T, BM, BN, false, true> g;
      g.zero();
#pragma unroll 1
      for (int kc = 0; kc < nchunks; ++kc) {
        const T* tile = next_tile();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
          const int k = kc * BK + ks * 16;
          if (k < Np)
            g.step(dzs + k, pl.dz_pitch, tile + ks * 16 * SP, SP, rows, lay.K_pad - cb * BN);
        }
      }
      g.epilogue([&](int m, int nn, A v) {
        const int c = cb * BN + nn;
        if (m >= rows || c >= lay.K_pad) return;
        const UCol u = u_col(d, lay, c);
        if (!u.valid) return;
        if (u.in_x ? lay.drop_x : lay.drop_h)
          v = dropout(d, p.masks, v, u.mask_col, row0 + m, lay.stream);
        if (u.in_x)
          gx[m * d.D + u.col] += v;
        else
          dh[m * nH + u.col] += v;
      });
    }
  }
  __syncthreads();
  for (int idx = (int)threadIdx.x; idx < rows * d.D; idx += kThreads)
    p.grad_x[(int64_t)row0 * d.D + idx] = from_acc<T>(gx[idx]);
  cp_async_wait<0>();
}

// ---- launch 2: weight-gradient partials -------------------------------------------------------
template <typename T>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    head_backward_wgrad_kernel(SK_GRID_CONSTANT const BackwardParams<T> p) {
  using Cfg = WgradCfg<T>;
  using A = acc_t<T>;
  constexpr int S = Cfg::kStages, BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  constexpr int PA = Cfg::kPitchA, PB = Cfg::kPitchB, V = kVec<T>;
  constexpr int kGroups = kThreads / BM;  // row slices of the bias sum
  SK_DYNAMIC_SMEM(smem);
  const HeadDims& d = p.d;
  const WgradPlan& pl = p.wg;
  const int hp = pad16(d.H), hpw = h_pad_width(d), xpw = x_pad_width(d);
  // blockIdx.x enumerates the BM x BN tiles of dW_0, ..., dW_out (padded columns)
  int t = (int)blockIdx.x, L = 0;
  PaddedLayer lay = padded_layer(d, 0);
  int tk = 1;
  for (;; ++L) {
    lay = padded_layer(d, L);
    tk = cdiv(lay.K_pad, BN);
    if (t < cdiv(lay.N, BM) * tk || L == d.n) break;
    t -= cdiv(lay.N, BM) * tk;
  }
  const int j0 = (t / tk) * BM, c0 = (t % tk) * BN;
  const int r0 = (int)blockIdx.y * pl.chunk_rows, rows = min(pl.chunk_rows, d.B - r0);
  const int zoff = dz_offset(d, L) + j0, zvalid = pad16(lay.N) - j0;
  const bool drop = lay.drop_x || lay.drop_h;
  unsigned char* ring = smem + pl.smem.offset[kSmRing];

  // Stage kc: A = dz_L rows r0 + kc*BK .. (BK x BM, [r][j]); B = u_L rows (BK x BN, [r][c]).
  int issued = 0;
  const int nchunks = cdiv(rows, BK);
  auto issue = [&]() {
    if (issued >= nchunks) return;
    unsigned char* st = ring + (size_t)(issued % S) * Cfg::kStageBytes;
    const int rb = issued * BK, rvalid = rows - rb;
    copy_tile_async<BK, BM>(reinterpret_cast<T*>(st), PA, p.dz + (int64_t)(r0 + rb) * p.ldz + zoff,
                            p.ldz, rvalid, zvalid);
    T* bs = reinterpret_cast<T*>(st + Cfg::kStageBBytes);
#pragma unroll
    for (int i = (int)threadIdx.x; i < BK * (BN / V); i += kThreads) {
      const int r = i / (BN / V), c = c0 + (i % (BN / V)) * V, row = r0 + rb + r;
      const T* src = p.xu;
      int bytes = 0;
      if (r < rvalid && c < lay.K_pad) {
        bytes = 16;
        if (c < lay.xw_pad) {
          src = p.xu + (int64_t)row * xpw + lay.xoff_pad + c;
        } else {
          const int cc = c - lay.xw_pad, b = cc / hp;
          src = p.hu + (int64_t)row * hpw + (lay.hblk0 + b) * hp + (cc - b * hp);
        }
      }
      cp_async16(bs + r * PB + (c - c0), src, bytes);
    }
    ++issued;
  };
#pragma unroll 1
  for (int s = 0; s < S - 1; ++s) {
    issue();
    cp_async_commit();
  }

  // the mask column of this thread's column of the u tile (-1: not dropped)
  int mask_col = -1;
  if (drop) {
    const int c = c0 + (int)threadIdx.x % BN;
    const UCol u = u_col(d, lay, c);
    if (c < lay.K_pad && u.valid && (u.in_x ? lay.drop_x : lay.drop_h)) mask_col = u.mask_col;
  }
  WarpGemm<T, BM, BN, true, true> g;
  g.zero();
  A bsum = A(0);  // bias: column tid % BM, rows of slice tid / BM of every chunk
  for (int kc = 0; kc < nchunks; ++kc) {
    cp_async_wait<S - 2>();
    __syncthreads();
    unsigned char* st = ring + (size_t)(kc % S) * Cfg::kStageBytes;
    const T* as = reinterpret_cast<const T*>(st);
    T* bs = reinterpret_cast<T*>(st + Cfg::kStageBBytes);
    if (drop) {  // u_L's dropout mask, applied in place to the landed tile
      static_assert(kThreads % BN == 0, "a thread masks one column of the tile");
      const int nn = (int)threadIdx.x % BN;
      if (mask_col >= 0) {
        for (int r = (int)threadIdx.x / BN; r < BK; r += kThreads / BN) {
          const int row = r0 + kc * BK + r;
          if (row < d.B)
            bs[r * PB + nn] = from_acc<T>(
                dropout(d, p.masks, to_acc(bs[r * PB + nn]), mask_col, row, lay.stream));
        }
      }
      __syncthreads();
    }
    if (c0 == 0) {
      constexpr int kRows = BK / kGroups;
      const int col = (int)threadIdx.x % BM, g0 = (int)threadIdx.x / BM * kRows;
#pragma unroll
      for (int r = 0; r < kRows; ++r) bsum += to_acc(as[(g0 + r) * PA + col]);
    }
    issue();
    cp_async_commit();
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks)
      g.step(as + ks * 16 * PA, PA, bs + ks * 16 * PB, PB, lay.N - j0, lay.K_pad - c0);
  }
  cp_async_wait<0>();

  A* P = p.partials + (int64_t)blockIdx.y * p.ldp + param_offset(d, L);
  g.epilogue([&](int m, int nn, A v) {
    const int j = j0 + m, c = c0 + nn;
    if (j >= lay.N || c >= lay.K_pad) return;
    const UCol u = u_col(d, lay, c);
    if (u.valid) P[(int64_t)j * lay.K + u.mask_col] = v;
  });
  if (c0 == 0) {  // fixed-order sum of the kGroups row slices
    A* red = pl.smem.ptr<A>(smem, kSmReduce);
    red[threadIdx.x] = bsum;
    __syncthreads();
    if ((int)threadIdx.x < BM && j0 + (int)threadIdx.x < lay.N) {
      A s = A(0);
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) s += red[gi * BM + threadIdx.x];
      P[(int64_t)lay.N * lay.K + j0 + threadIdx.x] = s;
    }
  }
}

// ---- launch 3: fixed-order reduction of the chunk partials ------------------------------------
template <typename T>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    head_backward_reduce_kernel(SK_GRID_CONSTANT const BackwardParams<T> p) {
  using A = acc_t<T>;
  constexpr int V = kVec<A>;  // 16 bytes of partials per load
  const int64_t nvec = (p.num_params + V - 1) / V, stride = (int64_t)gridDim.x * kThreads;
  for (int64_t v = (int64_t)blockIdx.x * kThreads + threadIdx.x; v < nvec; v += stride) {
    struct alignas(16) Vec { A e[V]; };
    A sum[V];
#pragma unroll
    for (int e = 0; e < V; ++e) sum[e] = A(0);
    for (int c = 0; c < p.wg.chunks; ++c) {
      const Vec part = *reinterpret_cast<const Vec*>(p.partials + (int64_t)c * p.ldp + v * V);
#pragma unroll
      for (int e = 0; e < V; ++e) sum[e] += part.e[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (v * V + e < p.num_params) p.grad_params[v * V + e] = from_acc<T>(sum[e]);
  }
}

}  // namespace kern
}  // namespace spinalkern
