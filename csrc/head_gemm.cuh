// Building blocks shared by the kernels: 16-byte asynchronous tile copies (global -> shared)
// and a block-level tile GEMM on shared-memory operands, one k-step of 16 at a time.
//
// WarpGemm<T, BM, BN, A_KMAJOR, B_KMAJOR> accumulates C[BM x BN] += A[BM x 16] B[16 x BN] with
// the 8 warps in a WM x WN grid (WM = 2 from BM = 32 on, else 1), each warp owning an
// MW x NW block of C.  Operands are read from shared memory with a row pitch:
//   A(m, k) = A_KMAJOR ? a[k * lda + m] : a[m * lda + k]
//   B(k, n) = B_KMAJOR ? b[k * ldb + n] : b[n * ldb + k]
// fp16/bf16: fragments through ldmatrix (.trans for the k-major layouts), mma.m16n8k16 with
// fp32 accumulators.  fp32/fp64: SIMT, each lane owns (MW/4) x (NW/8) accumulators.
#pragma once

#include "head_traits.h"

namespace spinalkern {
namespace kern {

template <int BM, int BN>
struct WarpGrid {
  static constexpr int WM = BM >= 32 ? 2 : 1;
  static constexpr int WN = kWarps / WM;
  static constexpr int MW = BM / WM, NW = BN / WN;
  static_assert(MW % 16 == 0 && NW % 8 == 0, "warp tiles are multiples of 16 x 8");
  SK_DEV static int m0() { return (int)(threadIdx.x / 32) / WN * MW; }
  SK_DEV static int n0() { return (int)(threadIdx.x / 32) % WN * NW; }
};

template <typename T, int BM, int BN, bool A_KMAJOR, bool B_KMAJOR, bool TC = Elem<T>::kTC>
struct WarpGemm;

// ---- tensor cores ----------------------------------------------------------------------------
template <typename T, int BM, int BN, bool A_KMAJOR, bool B_KMAJOR>
struct WarpGemm<T, BM, BN, A_KMAJOR, B_KMAJOR, true> {
  using G = WarpGrid<BM, BN>;
  static constexpr int MT = G::MW / 16, NT = G::NW / 8;
  float acc[MT][NT][4];

  SK_DEV void zero() {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  // One k-step of 16.  Warps whose block starts at or past m_valid rows / n_valid columns have
  // nothing to compute and skip it (warp-uniform).
  SK_DEV void step(const T* a, int lda, const T* b, int ldb, int m_valid, int n_valid) {
    const int lane = (int)threadIdx.x % 32, wm0 = G::m0(), wn0 = G::n0();
    if (wm0 >= m_valid || wn0 >= n_valid) return;
    uint32_t af[MT][4], bf[NT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int mm = wm0 + i * 16;
      if (!A_KMAJOR)  // matrices (m 0-7 | 8-15) x (k 0-7 | 8-15): lane gives row m = lane % 16
        ldsm_x4(af[i], a + (mm + lane % 16) * lda + (lane / 16) * 8);
      else            // stored [k][m]: lane gives row k, transposed on load
        ldsm_x4_trans(af[i], a + ((lane % 8) + (lane / 16) * 8) * lda + mm + ((lane / 8) % 2) * 8);
    }
#pragma unroll
    for (int jp = 0; jp < NT / 2; ++jp) {
      const int nn = wn0 + jp * 16;
      uint32_t r[4];
      if (!B_KMAJOR)  // stored [n][k]
        ldsm_x4(r, b + (nn + (lane % 8) + (lane / 16) * 8) * ldb + ((lane / 8) % 2) * 8);
      else            // stored [k][n]
        ldsm_x4_trans(r, b + ((lane % 8) + ((lane / 8) % 2) * 8) * ldb + nn + (lane / 16) * 8);
      bf[2 * jp][0] = r[0];
      bf[2 * jp][1] = r[1];
      bf[2 * jp + 1][0] = r[2];
      bf[2 * jp + 1][1] = r[3];
    }
    if (NT % 2 == 1) {
      const int nn = wn0 + (NT - 1) * 8;
      uint32_t r[2];
      if (!B_KMAJOR)
        ldsm_x2(r, b + (nn + lane % 8) * ldb + ((lane / 8) % 2) * 8);
      else
        ldsm_x2_trans(r, b + ((lane % 8) + ((lane / 8) % 2) * 8) * ldb + nn);
      bf[NT - 1][0] = r[0];
      bf[NT - 1][1] = r[1];
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j) mma16816<T>(acc[i][j], af[i], bf[j]);
  }

  // f(m, n, value) for every accumulator of this thread (C fragment layout of mma.m16n8k16).
  template <class F>
  SK_DEV void epilogue(F&& f) const {
    const int lane = (int)threadIdx.x % 32, wm0 = G::m0(), wn0 = G::n0();
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          f(wm0 + i * 16 + lane / 4 + (e / 2) * 8, wn0 + j * 8 + (lane % 4) * 2 + (e % 2),
            acc[i][j][e]);
  }
};

// ---- SIMT (fp32, fp64) -----------------------------------------------------------------------
template <typename T, int BM, int BN, bool A_KMAJOR, bool B_KMAJOR>
struct WarpGemm<T, BM, BN, A_KMAJOR, B_KMAJOR, false> {
  using G = WarpGrid<BM, BN>;
  using Acc = acc_t<T>;
  static constexpr int TM = G::MW / 4, TN = G::NW / 8;  // lanes: 4 rows x 8 columns
  Acc acc[TM][TN];

  SK_DEV void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);
  }

  SK_DEV void step(const T* a, int lda, const T* b, int ldb, int m_valid, int n_valid) {
    const int lane = (int)threadIdx.x % 32, wm0 = G::m0() + lane / 8, wn0 = G::n0() + lane % 8;
    if (G::m0() >= m_valid || G::n0() >= n_valid) return;
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      Acc av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int m = wm0 + 4 * i;
        av[i] = to_acc(A_KMAJOR ? a[k * lda + m] : a[m * lda + k]);
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int n = wn0 + 8 * j;
        bv[j] = to_acc(B_KMAJOR ? b[k * ldb + n] : b[n * ldb + k]);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
    }
  }

  template <class F>
  SK_DEV void epilogue(F&& f) const {
    const int lane = (int)threadIdx.x % 32, wm0 = G::m0() + lane / 8, wn0 = G::n0() + lane % 8;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) f(wm0 + 4 * i, wn0 + 8 * j, acc[i][j]);
  }
};

// ---- asynchronous tile copies ----------------------------------------------------------------
// ROWS x COLS tile of a row-major global matrix (ld elements per row) -> shared memory (pitch
// elements per row), 16 bytes per cp.async; rows >= rows_valid and columns >= cols_valid are
// zero-filled (the copy's src_bytes).  src and ld must keep every 16-byte vector aligned.
template <int ROWS, int COLS, typename T>
SK_DEV void copy_tile_async(T* dst, int pitch, const T* src, int64_t ld, int rows_valid,
                            int cols_valid) {
  constexpr int V = kVec<T>, VPR = COLS / V;
  static_assert(COLS % V == 0, "tile width must be a multiple of 16 bytes");
#pragma unroll
  for (int i = (int)threadIdx.x; i < ROWS * VPR; i += kThreads) {
    const int r = i / VPR, c = (i % VPR) * V;
    int bytes = 0;
    if (r < rows_valid && c < cols_valid) bytes = min(V, cols_valid - c) * (int)sizeof(T);
    cp_async16(dst + r * pitch + c, bytes > 0 ? src + r * ld + c : src, bytes);
  }
}

// Same for a tile whose width is known at run time only (a multiple of 16 bytes).
template <typename T>
SK_DEV void copy_rows_async(T* dst, int pitch, const T* src, int64_t ld, int rows, int rows_valid,
                            int cols) {
  constexpr int V = kVec<T>;
  const int vpr = cols / V;
  for (int i = (int)threadIdx.x; i < rows * vpr; i += kThreads) {
    const int r = i / vpr, c = (i % vpr) * V;
    const bool ok = r < rows_valid;
    cp_async16(dst + r * pitch + c, ok ? src + r * ld + c : src, ok ? 16 : 0);
  }
}

}  // namespace kern
}  // namespace spinalkern
