// Head layout and dropout RNG shared by the C++ CPU implementation and the CUDA kernels.
//
// This is spinalkern/spec.py and spinalkern/rng.py written once in C++ (host + device):
// every layer L (0..n-1 hidden, L == n the output layer) reads an input row u_L made of
// x_width(L) columns of x starting at x_offset(L), followed by h_width(L) columns of the
// hidden activations [h_0; ...; h_{n-1}] starting at h_offset(L).  Dropout masks are
// Philox4x32-10 with key (seed lo, seed hi) and counter (col, row, stream, 0).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace spinalkern {

constexpr int kSpinal = 0;
constexpr int kProgressive = 1;
// Hidden layers supported by the CUDA kernels (weight pointers travel by value in the kernel
// parameters); the CPU implementation shares the limit so that both accept the same heads.
constexpr int kMaxLayers = 64;

// Sizes of one head call, plus the dropout parameters.
struct HeadDims {
  int kind;        // kSpinal or kProgressive
  int B, D, S, seg, H, n, C;
  bool dropout;    // p > 0
  uint32_t threshold;  // keep iff philox word >= threshold
  double scale;    // 1 / (1 - p)
};

// Layout of u_L (see spinalkern/spec.py) and how dropout applies to it.
struct LayerInfo {
  int xw, xoff;    // x part: columns [xoff, xoff + xw) of x
  int hw, hoff;    // hidden part: columns [hoff, hoff + hw) of hidden
  int K, N;        // in / out width of the layer
  int stream;      // Philox stream of this layer's masks
  bool drop_x, drop_h;  // which parts are dropped (mask column = column in u_L)
};

SK_HD LayerInfo layer_info(const HeadDims& d, int L) {
  LayerInfo li;
  const bool out = (L == d.n);
  if (d.kind == kSpinal) {
    li.xw = out ? 0 : d.seg;
    li.xoff = out ? 0 : (L % d.S) * d.seg;
    li.hw = out ? d.n * d.H : (L > 0 ? d.H : 0);
    li.hoff = (!out && L > 0) ? (L - 1) * d.H : 0;
    li.stream = L;
    li.drop_x = d.dropout;
    li.drop_h = d.dropout;
  } else {
    // progressive: u_0 = x (undropped), u_L = [x~; h_0..h_{L-1}], x~ = drop(x) on stream 0
    li.xw = d.D;
    li.xoff = 0;
    li.hw = (out ? d.n : L) * d.H;
    li.hoff = 0;
    li.stream = 0;
    li.drop_x = d.dropout && L > 0;
    li.drop_h = false;
  }
  li.K = li.xw + li.hw;
  li.N = out ? d.C : d.H;
  return li;
}

// Offset of dW_L in the flat gradient (db_L follows at + N*K); L == n + 1 gives the total.
SK_HD int64_t param_offset(const HeadDims& d, int L) {
  int64_t off = 0;
  for (int i = 0; i < L; ++i) {
    const LayerInfo li = layer_info(d, i);
    off += (int64_t)li.N * li.K + li.N;
  }
  return off;
}

// ---- Philox4x32-10 (Salmon et al., SC 2011), first output word --------------------------
SK_HD uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                            uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = (uint64_t)0xD2511F53u * c0;
    const uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Is element (row, col) of dropout stream `stream` kept?
SK_HD bool keep_element(uint64_t seed, int col, int row, int stream, uint32_t threshold) {
  return philox_word0((uint32_t)col, (uint32_t)row, (uint32_t)stream, 0u, (uint32_t)seed,
                      (uint32_t)(seed >> 32)) >= threshold;
}

// min(int(p * 2^32), 2^32 - 1), as spinalkern.rng.keep_threshold.
inline uint32_t keep_threshold(double p) {
  const double t = p * 4294967296.0;
  if (t >= 4294967295.0) return 0xFFFFFFFFu;
  return (uint32_t)(uint64_t)t;
}

}  // namespace spinalkern
