// CUDA kernels of both heads (spinal and progressive share every kernel: the layout of each
// layer's input u_L comes from layer_info(), see head_layout.h).
//
// All kernels are built from one block-level tile GEMM, C[BM x BN] = A[BM x K] * B[BN x K]^T:
// both operands are staged through shared memory k-contiguous (BK = 32 columns at a time) by
// *loader* functions (which gather u_L from x and the hidden activations, apply dropout, or
// transpose), then multiplied either on the tensor cores (fp16/bf16: WMMA 16x16x16, fp32
// accumulation) or with SIMT FMAs (fp32/fp64), and handed element by element to an
// *epilogue* function.
//
//   forward  (1 launch):  one CTA per BM-row tile runs the whole head: layer by layer,
//                         N-chunk by N-chunk; h_L stays in shared memory (or in a global
//                         buffer when the tile does not fit), bias + ReLU in the epilogue.
//   backward (3 launches): chain   - one CTA per row tile walks the layers in reverse:
//                                     du_L = dz_L W_L, scattered (with dropout masks) into
//                                     dh (shared memory, fp32) and grad_x (fp32), then
//                                     dz_{L-1} = dh_{L-1} * (h_{L-1} > 0), written to dz;
//                          dW      - one CTA per (weight tile, batch chunk) writes fp32
//                                     partial dW/db = dz^T u over its chunk (no atomics);
//                          reduce  - sums the chunk partials in a fixed order.
#pragma once

#include "cuda_compat.h"
#include "head_layout.h"

#ifndef SK_EMU
#define SK_GRID_CONSTANT __grid_constant__
#endif

namespace spinalkern {
namespace kern {

constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBK = 32;        // K step of the tile GEMM

SK_HD size_t align128(size_t v) { return (v + 127) & ~(size_t)127; }
SK_HD int cdiv(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------
// Block-level MMA on staged tiles As[BM][kLd], Bs[BN][kLd] (k contiguous).
// ---------------------------------------------------------------------------------------
template <typename T, int BM, int BN, bool TC = UsesTensorCores<T>::value>
struct TileMma;

// SIMT: a 16 x 16 thread grid, thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j.
template <typename T, int BM, int BN>
struct TileMma<T, BM, BN, false> {
  using A = acc_t<T>;
  static constexpr int kLd = kBK + 1;  // odd row length: conflict-free column reads
  static constexpr int kScratchBytes = 0;
  static constexpr int TM = BM / 16, TN = BN / 16;
  static_assert(BM % 16 == 0 && BN % 16 == 0, "SIMT tiles are multiples of 16");
  A c[TM][TN];

  SK_DEV void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) c[i][j] = A(0);
  }
  SK_DEV void step(const T* As, const T* Bs) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 2
    for (int k = 0; k < kBK; ++k) {
      A a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = to_acc(As[(ty + 16 * i) * kLd + k]);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = to_acc(Bs[(tx + 16 * j) * kLd + k]);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) c[i][j] += a[i] * b[j];
    }
  }
  template <class F>
  SK_DEV void epilogue(float* /*scratch*/, F&& f) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) f(ty + 16 * i, tx + 16 * j, c[i][j]);
  }
};

// Tensor cores: warps in a 2 x 4 grid, each owning FM x FN 16x16 accumulator fragments.
template <typename T, int BM, int BN>
struct TileMma<T, BM, BN, true> {
  using A = float;
  static constexpr int kLd = kBK + 8;  // 80-byte rows: 32-byte aligned fragments
  static constexpr int WM = 2, WN = kWarps / WM;
  static constexpr int FM = BM / (16 * WM), FN = BN / (16 * WN);
  static constexpr int kScratchBytes = kWarps * 256 * (int)sizeof(float);
  static_assert(FM >= 1 && FN >= 1 && BM % (16 * WM) == 0 && BN % (16 * WN) == 0,
                "WMMA tiles: BM multiple of 32, BN multiple of 64");
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[FM][FN];

  SK_DEV void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(c[i][j], 0.0f);
  }
  SK_DEV void step(const T* As, const T* Bs) {
    const int warp = threadIdx.x / 32, wm = warp / WN, wn = warp % WN;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i)
        wmma::load_matrix_sync(a[i], As + (wm * FM * 16 + i * 16) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::load_matrix_sync(b[j], Bs + (wn * FN * 16 + j * 16) * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
  }
  // Fragments' element layout is opaque: go through a per-warp 16x16 fp32 scratch.
  template <class F>
  SK_DEV void epilogue(float* scratch, F&& f) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / WN, wn = warp % WN;
    float* s = scratch + warp * 256;
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::store_matrix_sync(s, c[i][j], 16, wmma::mem_row_major);
        SK_SYNCWARP();
#pragma unroll 1  // unrolled, the inlined epilogues of 8 elements double the register count
        for (int e = 0; e < 8; ++e) {
          const int idx = lane + 32 * e;
          f(wm * FM * 16 + i * 16 + idx / 16, wn * FN * 16 + j * 16 + idx % 16, s[idx]);
        }
        SK_SYNCWARP();
      }
    }
  }
};

// dst[r][k] = f(r, k0 + k) for a ROWS x kBK tile.  KFast: consecutive threads take
// consecutive k (coalesced when the source is k-contiguous), else consecutive r.
template <int ROWS, int LD, bool KFast, typename T, class F>
SK_DEV void stage_tile(T* dst, int k0, F& f) {
#pragma unroll 2
  for (int idx = threadIdx.x; idx < ROWS * kBK; idx += kThreads) {
    const int r = KFast ? idx / kBK : idx % ROWS;
    const int k = KFast ? idx % kBK : idx / ROWS;
    dst[r * LD + k] = f(r, k0 + k);
  }
}

// C = A * B^T over k in [0, K): A(m, k) = fa(m, k), B(n, k) = fb(n, k), both returning T
// (zero outside the valid range).  Starts with a barrier, so callers may write shared memory
// (other than As/Bs) up to the call and read it in the loaders.
template <bool AKFast, bool BKFast, int BM, int BN, class Mma, typename T, class FA, class FB>
SK_DEV void tile_gemm(Mma& mma, T* As, T* Bs, int K, FA& fa, FB& fb) {
  mma.zero();
  for (int k0 = 0; k0 < K; k0 += kBK) {
    __syncthreads();
    stage_tile<BM, Mma::kLd, AKFast>(As, k0, fa);
    stage_tile<BN, Mma::kLd, BKFast>(Bs, k0, fb);
    __syncthreads();
    mma.step(As, Bs);
  }
}

// Element c of u_L for one row (dropout applied): xrow = x + row * D, hrow = that row of the
// hidden activations.
template <typename T>
SK_DEV acc_t<T> input_elem(const HeadDims& d, const LayerInfo& li, uint64_t seed,
                           const T* xrow, const T* hrow, int row, int c) {
  using A = acc_t<T>;
  const bool in_x = c < li.xw;
  A v = in_x ? to_acc(xrow[li.xoff + c]) : to_acc(hrow[li.hoff + c - li.xw]);
  if (in_x ? li.drop_x : li.drop_h)
    v = keep_element(seed, c, row, li.stream, d.threshold) ? v * (A)d.scale : A(0);
  return v;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------
template <typename T>
struct ForwardParams {
  const T* x;                       // (B, D)
  const T* w[kMaxLayers + 1];       // W_0..W_{n-1}, W_out
  const T* b[kMaxLayers + 1];
  const int64_t* seed;              // (1,), read only with dropout
  T* y;                             // (B, C)
  T* hidden;                        // (B, n*H) output, or nullptr
  T* hglobal;                       // (B, n*H) storage for h when the tile is not in smem
  HeadDims d;
};

template <typename T, int BM, int BN>
SK_HD size_t forward_smem_bytes(int nH, bool hidden_in_smem) {
  using Mma = TileMma<T, BM, BN>;
  return (hidden_in_smem ? align128((size_t)BM * nH * sizeof(T)) : 0) +
         align128((size_t)BM * Mma::kLd * sizeof(T)) + align128((size_t)BN * Mma::kLd * sizeof(T)) +
         Mma::kScratchBytes;
}

template <typename T, int BM, int BN>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads) head_forward_kernel(SK_GRID_CONSTANT const ForwardParams<T> p) {
  using A = acc_t<T>;
  using Mma = TileMma<T, BM, BN>;
  SK_DYNAMIC_SMEM(smem);
  const HeadDims& d = p.d;
  const int nH = d.n * d.H;
  const int row0 = blockIdx.x * BM;
  unsigned char* s = smem;
  T* hbuf;  // row m of this tile's hidden activations at hbuf + m * nH
  if (p.hglobal != nullptr) {
    hbuf = p.hglobal + (int64_t)row0 * nH;
  } else {
    hbuf = reinterpret_cast<T*>(s);
    s += align128((size_t)BM * nH * sizeof(T));
  }
  T* As = reinterpret_cast<T*>(s);
  s += align128((size_t)BM * Mma::kLd * sizeof(T));
  T* Bs = reinterpret_cast<T*>(s);
  s += align128((size_t)BN * Mma::kLd * sizeof(T));
  float* scratch = reinterpret_cast<float*>(s);
  const uint64_t seed = d.dropout ? (uint64_t)p.seed[0] : 0;
  const T zero = from_acc<T>(A(0));

  for (int L = 0; L <= d.n; ++L) {
    const LayerInfo li = layer_info(d, L);
    const T* W = p.w[L];
    const T* bias = p.b[L];
    auto load_u = [&](int m, int c) -> T {
      const int row = row0 + m;
      if (row >= d.B || c >= li.K) return zero;
      return from_acc<T>(
          input_elem(d, li, seed, p.x + (int64_t)row * d.D, hbuf + (int64_t)m * nH, row, c));
    };
    for (int n0 = 0; n0 < li.N; n0 += BN) {
      auto load_w = [&](int nn, int c) -> T {
        const int j = n0 + nn;
        return (j < li.N && c < li.K) ? W[(int64_t)j * li.K + c] : zero;
      };
      Mma mma;
      tile_gemm<true, true, BM, BN>(mma, As, Bs, li.K, load_u, load_w);
      if (L < d.n) {
        mma.epilogue(scratch, [&](int m, int nn, A v) {
          const int row = row0 + m, j = n0 + nn;
          if (row >= d.B || j >= li.N) return;
          v += to_acc(bias[j]);
          const T h = from_acc<T>(v < A(0) ? A(0) : v);  // ReLU that keeps NaN
          hbuf[(int64_t)m * nH + L * d.H + j] = h;
          if (p.hidden != nullptr && p.hglobal == nullptr)
            p.hidden[(int64_t)row * nH + L * d.H + j] = h;
        });
      } else {
        mma.epilogue(scratch, [&](int m, int nn, A v) {
          const int row = row0 + m, j = n0 + nn;
          if (row >= d.B || j >= li.N) return;
          p.y[(int64_t)row * d.C + j] = from_acc<T>(v + to_acc(bias[j]));
        });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------
template <typename T>
struct BackwardParams {
  const T* grad_y;                  // (B, C)
  const T* x;                       // (B, D)
  const T* w[kMaxLayers + 1];
  const T* hidden;                  // (B, n*H) post-ReLU activations from the forward
  const int64_t* seed;
  T* dz;                            // (B, n*H) workspace: dz_L of every hidden layer
  T* grad_x;                        // (B, D)
  acc_t<T>* gx_acc;                 // (B, D) accumulators (== grad_x when T is acc_t<T>)
  acc_t<T>* dh_global;              // (B, n*H) dh accumulators if not in smem, else nullptr
  acc_t<T>* partials;               // (chunks, num_params)
  T* grad_params;                   // (num_params,)
  int64_t num_params;
  int chunk_rows, chunks;
  HeadDims d;
};

template <typename T, int BM, int BN>
SK_HD size_t chain_smem_bytes(int nH, bool dh_in_smem) {
  using Mma = TileMma<T, BM, BN>;
  return (dh_in_smem ? align128((size_t)BM * nH * sizeof(acc_t<T>)) : 0) +
         align128((size_t)BM * Mma::kLd * sizeof(T)) + align128((size_t)BN * Mma::kLd * sizeof(T)) +
         Mma::kScratchBytes;
}

template <typename T, int BM, int BN>
SK_HD size_t dw_smem_bytes() {
  using Mma = TileMma<T, BM, BN>;
  return align128((size_t)BM * Mma::kLd * sizeof(T)) + align128((size_t)BN * Mma::kLd * sizeof(T)) +
         Mma::kScratchBytes;
}

// Launch 1: activation-gradient chain for a BM-row tile (BN = columns of du_L per pass).
template <typename T, int BM, int BN>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads) head_backward_chain_kernel(SK_GRID_CONSTANT const BackwardParams<T> p) {
  using A = acc_t<T>;
  using Mma = TileMma<T, BM, BN>;
  SK_DYNAMIC_SMEM(smem);
  const HeadDims& d = p.d;
  const int nH = d.n * d.H;
  const int row0 = blockIdx.x * BM;
  const int rows = min(BM, d.B - row0);
  unsigned char* s = smem;
  A* dh;  // dh of row m at dh + m * nH
  if (p.dh_global != nullptr) {
    dh = p.dh_global + (int64_t)row0 * nH;
  } else {
    dh = reinterpret_cast<A*>(s);
    s += align128((size_t)BM * nH * sizeof(A));
  }
  T* As = reinterpret_cast<T*>(s);
  s += align128((size_t)BM * Mma::kLd * sizeof(T));
  T* Bs = reinterpret_cast<T*>(s);
  s += align128((size_t)BN * Mma::kLd * sizeof(T));
  float* scratch = reinterpret_cast<float*>(s);
  A* gx = p.gx_acc + (int64_t)row0 * d.D;
  const uint64_t seed = d.dropout ? (uint64_t)p.seed[0] : 0;
  const T zero = from_acc<T>(A(0));

  for (int idx = threadIdx.x; idx < rows * nH; idx += kThreads) dh[idx] = A(0);
  for (int64_t idx = threadIdx.x; idx < (int64_t)rows * d.D; idx += kThreads) gx[idx] = A(0);

  for (int L = d.n; L >= 0; --L) {
    const LayerInfo li = layer_info(d, L);
    const T* W = p.w[L];
    const T* zsrc;  // dz_L of row m at zsrc + m * zld
    int zld;
    if (L == d.n) {
      zsrc = p.grad_y + (int64_t)row0 * d.C;
      zld = d.C;
    } else {
      __syncthreads();  // every contribution to dh_L has landed
      T* dz = p.dz + (int64_t)row0 * nH + L * d.H;
      const T* h = p.hidden + (int64_t)row0 * nH + L * d.H;
      for (int idx = threadIdx.x; idx < rows * d.H; idx += kThreads) {
        const int m = idx / d.H, j = idx % d.H;
        const A hv = to_acc(h[(int64_t)m * nH + j]);
        // ReLU backward as torch: zero where h <= 0 (a NaN h passes the gradient)
        dz[(int64_t)m * nH + j] = hv <= A(0) ? zero : from_acc<T>(dh[m * nH + L * d.H + j]);
      }
      zsrc = dz;
      zld = nH;
    }
    auto load_dz = [&](int m, int j) -> T {
      return (m < rows && j < li.N) ? zsrc[(int64_t)m * zld + j] : zero;
    };
    for (int c0 = 0; c0 < li.K; c0 += BN) {
      auto load_w = [&](int cc, int j) -> T {
        const int c = c0 + cc;
        return (c < li.K && j < li.N) ? W[(int64_t)j * li.K + c] : zero;
      };
      Mma mma;
      tile_gemm<true, false, BM, BN>(mma, As, Bs, li.N, load_dz, load_w);
      mma.epilogue(scratch, [&](int m, int cc, A v) {
        const int c = c0 + cc;
        if (m >= rows || c >= li.K) return;
        const bool in_x = c < li.xw;
        if (in_x ? li.drop_x : li.drop_h)
          v = keep_element(seed, c, row0 + m, li.stream, d.threshold) ? v * (A)d.scale : A(0);
        if (in_x)
          gx[(int64_t)m * d.D + li.xoff + c] += v;
        else
          dh[m * nH + li.hoff + c - li.xw] += v;
      });
    }
  }
  if ((void*)p.gx_acc != (void*)p.grad_x) {
    __syncthreads();
    T* out = p.grad_x + (int64_t)row0 * d.D;
    for (int64_t idx = threadIdx.x; idx < (int64_t)rows * d.D; idx += kThreads)
      out[idx] = from_acc<T>(gx[idx]);
  }
}

// Launch 2: per-chunk partial weight/bias gradients.  blockIdx.x enumerates the BM x BN tiles
// of dW_0, dW_1, ..., dW_out in order; blockIdx.y is the batch chunk.
template <typename T, int BM, int BN>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads) head_backward_dw_kernel(SK_GRID_CONSTANT const BackwardParams<T> p) {
  using A = acc_t<T>;
  using Mma = TileMma<T, BM, BN>;
  SK_DYNAMIC_SMEM(smem);
  const HeadDims& d = p.d;
  const int nH = d.n * d.H;
  int t = blockIdx.x, L = 0, tk = 1;
  LayerInfo li = layer_info(d, 0);
  for (;; ++L) {
    li = layer_info(d, L);
    const int tn = cdiv(li.N, BM);
    tk = cdiv(li.K, BN);
    if (t < tn * tk || L == d.n) break;
    t -= tn * tk;
  }
  const int n0 = (t / tk) * BM, k0 = (t % tk) * BN;
  const int r0 = blockIdx.y * p.chunk_rows;
  const int rows = min(p.chunk_rows, d.B - r0);
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + align128((size_t)BM * Mma::kLd * sizeof(T)));
  float* scratch = reinterpret_cast<float*>(
      smem + align128((size_t)BM * Mma::kLd * sizeof(T)) + align128((size_t)BN * Mma::kLd * sizeof(T)));
  const uint64_t seed = d.dropout ? (uint64_t)p.seed[0] : 0;
  const T zero = from_acc<T>(A(0));
  const T* zsrc = (L == d.n) ? p.grad_y : p.dz + L * d.H;
  const int zld = (L == d.n) ? d.C : nH;

  // A(m, r) = dz_L[r0 + r, n0 + m], B(cc, r) = u_L[r0 + r, k0 + cc]
  auto load_dz = [&](int m, int r) -> T {
    const int j = n0 + m;
    return (j < li.N && r < rows) ? zsrc[(int64_t)(r0 + r) * zld + j] : zero;
  };
  auto load_u = [&](int cc, int r) -> T {
    const int c = k0 + cc, row = r0 + r;
    if (c >= li.K || r >= rows) return zero;
    return from_acc<T>(input_elem(d, li, seed, p.x + (int64_t)row * d.D,
                                  p.hidden + (int64_t)row * nH, row, c));
  };
  Mma mma;
  tile_gemm<false, false, BM, BN>(mma, As, Bs, rows, load_dz, load_u);
  A* P = p.partials + (int64_t)blockIdx.y * p.num_params + param_offset(d, L);
  mma.epilogue(scratch, [&](int m, int cc, A v) {
    const int j = n0 + m, c = k0 + cc;
    if (j < li.N && c < li.K) P[(int64_t)j * li.K + c] = v;
  });
  if (k0 == 0) {
    for (int m = threadIdx.x; m < BM; m += kThreads) {
      const int j = n0 + m;
      if (j >= li.N) continue;
      A sum = A(0);
      for (int r = 0; r < rows; ++r) sum += to_acc(zsrc[(int64_t)(r0 + r) * zld + j]);
      P[(int64_t)li.N * li.K + j] = sum;
    }
  }
}

// Launch 3: grad_params[i] = sum over chunks (in order) of partials[chunk][i].
template <typename T>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads) head_backward_reduce_kernel(SK_GRID_CONSTANT const BackwardParams<T> p) {
  using A = acc_t<T>;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < p.num_params; i += stride) {
    A sum = A(0);
    for (int c = 0; c < p.chunks; ++c) sum += p.partials[(int64_t)c * p.num_params + i];
    p.grad_params[i] = from_acc<T>(sum);
  }
}

// Testing aid: the dropout keep-mask of one stream, (rows, cols).  (A template only so that
// the header can be included by several translation units.)
template <typename Unused = void>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads) keep_mask_kernel(const int64_t* seed, int stream, int rows, int cols,
                                           uint32_t threshold, bool* out) {
  const uint64_t s = (uint64_t)seed[0];
  const int64_t total = (int64_t)rows * cols;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < total; i += stride)
    out[i] = keep_element(s, (int)(i % cols), (int)(i / cols), stream, threshold);
}

}  // namespace kern
}  // namespace spinalkern
