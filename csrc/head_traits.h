// Compile-time traits of the CUDA kernels (tile shapes per element type and kernel), the
// padded layout of each layer's input that the kernels work in, and the one description of
// how each kernel carves its dynamic shared memory (SmemLayout), used by the kernels, by the
// launch planner (head_plan.h) and, through the cuda_launch_plan op, by the build checker.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda_compat.h"
#include "head_layout.h"

namespace spinalkern {
namespace kern {

constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
// Every part of a layer input u_L (the x part, each h block) is padded to a multiple of 16
// columns (one k-step of the mma.m16n8k16 tensor-core instruction), so a k-step never
// straddles two parts.
constexpr int kPad = 16;

SK_HD int cdiv(int a, int b) { return (a + b - 1) / b; }
SK_HD int pad16(int v) { return (v + kPad - 1) / kPad * kPad; }
SK_HD size_t align128(size_t v) { return (v + 127) & ~(size_t)127; }

// ---- element types -----------------------------------------------------------------------
// fp16/bf16 go through the tensor cores (ldmatrix + mma.sync, fp32 accumulation); fp32 and
// fp64 use SIMT FMAs (exact fp32 as torch's default matmul precision; fp64 for gradcheck).
// kBK: columns of K staged per pipeline step (128 bytes of a row for the forward's weights).
template <typename T> struct Elem;
template <> struct Elem<dev_half> { static constexpr bool kTC = true; static constexpr int kBK = 64; };
template <> struct Elem<dev_bf16> { static constexpr bool kTC = true; static constexpr int kBK = 64; };
template <> struct Elem<float> { static constexpr bool kTC = false; static constexpr int kBK = 32; };
template <> struct Elem<double> { static constexpr bool kTC = false; static constexpr int kBK = 16; };
template <typename T> constexpr int kVec = 16 / (int)sizeof(T);  // elements per 16-byte copy

// Row pitch (elements) of a shared-memory tile with `cols` columns: padded by 16 bytes so that
// the 8 rows an ldmatrix reads fall in 8 different 16-byte bank groups (pitch = odd * 16 bytes).
template <typename T>
SK_HD int smem_pitch(int cols) {
  return pad16(cols) + kVec<T>;
}

// ---- kernel configurations -----------------------------------------------------------------
// Forward: BM rows per CTA; hidden layers and a non-interleaved output layer are computed
// BN outputs at a time; an interleaved spinal output (C <= BNY) accumulates BM x BNY.
// The weight stream: tiles of BN rows x BK columns of W_L, kStages deep.
template <typename T, int BM_>
struct FwdCfg {
  static constexpr int BM = BM_;
  static constexpr int BN = Elem<T>::kTC ? 128 : 64;
  static constexpr int BNY = 64;
  static constexpr int BK = Elem<T>::kBK;
  static constexpr int kStages = 4;
  static constexpr int kStagePitch = BK + kVec<T>;
  static constexpr size_t kStageBytes = (size_t)BN * kStagePitch * sizeof(T);
};
// Chain (backward activation gradients): du_L = dz_L W_L, BN columns of du per pass; the
// stream carries tiles of BK rows (outputs j) x BN columns (inputs c) of W_L.
template <typename T, int BM_>
struct ChainCfg {
  static constexpr int BM = BM_;
  static constexpr int BN = Elem<T>::kTC ? 128 : 64;
  static constexpr int BK = Elem<T>::kTC ? 32 : Elem<T>::kBK;
  static constexpr int kStages = 3;
  static constexpr int kStagePitch = BN + kVec<T>;
  static constexpr size_t kStageBytes = (size_t)BK * kStagePitch * sizeof(T);
};
// Weight gradients: a CTA computes a BM (outputs j) x BN (inputs c) tile of dW_L over a batch
// chunk; both operands (dz_L and u_L, BK batch rows per step) are streamed.
template <typename T>
struct WgradCfg {
  static constexpr int BM = std::is_same_v<T, double> ? 32 : 64;
  static constexpr int BN = Elem<T>::kTC ? 128 : 64;
  static constexpr int BK = Elem<T>::kTC ? 32 : Elem<T>::kBK;
  static constexpr int kStages = 4;
  static constexpr int kPitchA = BM + kVec<T>;
  static constexpr int kPitchB = BN + kVec<T>;
  static constexpr size_t kStageBBytes = (size_t)BK * kPitchA * sizeof(T);  // B tile offset
  static constexpr size_t kStageBytes = kStageBBytes + (size_t)BK * kPitchB * sizeof(T);
};

// ---- the padded layout of u_L ----------------------------------------------------------------
// u_L = [x part (xw columns of x from xoff) ; hblks blocks of H columns (h_hblk0 ...)].  The
// kernels address it with the x part padded to xw_pad columns and every h block to pad16(H).
// The weights are read in the same padded layout (csrc/head_launch.h packs them when their
// natural layout differs, i.e. when seg or H is not a multiple of 16).
struct PaddedLayer {
  int xw, xw_pad, xoff, xoff_pad;  // x part: natural width, padded width, first column in x
                                   // (natural) and in the padded x (segment j at j*pad16(seg))
  int hblk0, hblks;                // h blocks read
  int K, K_pad, N;
  int stream;
  bool drop_x, drop_h;
};

SK_HD PaddedLayer padded_layer(const HeadDims& d, int L) {
  const LayerInfo li = layer_info(d, L);
  PaddedLayer p;
  p.xw = li.xw;
  p.xw_pad = pad16(li.xw);
  p.xoff = li.xoff;
  p.xoff_pad = (li.xw > 0 && d.kind == kSpinal) ? (li.xoff / d.seg) * pad16(d.seg) : 0;
  p.hblk0 = li.hw > 0 ? li.hoff / d.H : 0;
  p.hblks = li.hw / d.H;
  p.K = li.K;
  p.K_pad = p.xw_pad + p.hblks * pad16(d.H);
  p.N = li.N;
  p.stream = li.stream;
  p.drop_x = li.drop_x;
  p.drop_h = li.drop_h;
  return p;
}

// Padded width of x (S segments of pad16(seg)) and of the hidden activations (n blocks).
SK_HD int x_pad_width(const HeadDims& d) { return d.S * pad16(d.seg); }
SK_HD int h_pad_width(const HeadDims& d) { return d.n * pad16(d.H); }

// What padded column c of u_L is: in the x part or the h part, inside the natural width or in
// the padding, its natural column in x (x part) or in hidden = [h_0..h_{n-1}] (h part), its
// h block and column in it (h part), and its column in u_L for the dropout mask.
struct UCol {
  bool in_x, valid;
  int col;        // x part: column of x; h part: column of hidden
  int blk, j;     // h part: block index and column inside the block
  int mask_col;   // column of u_L (the dropout counter)
};
SK_HD UCol u_col(const HeadDims& d, const PaddedLayer& p, int c) {
  UCol u;
  if (c < p.xw_pad) {
    u.in_x = true;
    u.valid = c < p.xw;
    u.col = p.xoff + c;
    u.blk = 0;
    u.j = c;
    u.mask_col = c;
  } else {
    const int hp = pad16(d.H), cc = c - p.xw_pad, b = cc / hp;
    u.in_x = false;
    u.j = cc - b * hp;
    u.blk = p.hblk0 + b;
    u.valid = u.j < d.H;
    u.col = u.blk * d.H + u.j;
    u.mask_col = p.xw + b * d.H + u.j;
  }
  return u;
}

// ---- dropout keep-masks ----------------------------------------------------------------------
// With dropout, each op first computes every keep bit it needs once, in parallel over the whole
// GPU (dropout_mask_kernel), into a transient bitmask that its kernels read: stream s (spinal:
// s = L over the columns of u_L; progressive: s = 0 over the columns of x) at
// words [mask_offset(s) + row * mask_words(s), ...), bit c % 32 of word c / 32 of column c.
SK_HD int mask_streams(const HeadDims& d) { return d.kind == kSpinal ? d.n + 1 : 1; }
SK_HD int mask_width(const HeadDims& d, int s) {
  return d.kind == kSpinal ? layer_info(d, s).K : d.D;
}
SK_HD int mask_words(const HeadDims& d, int s) { return cdiv(mask_width(d, s), 32); }
SK_HD int64_t mask_offset(const HeadDims& d, int s) {  // s < mask_streams(d)
  // spinal widths: K_0 = seg, K_1..K_{n-1} = seg + H, K_n = n H; progressive: one stream
  if (s == 0) return 0;
  const int64_t words = cdiv(d.seg, 32) + (int64_t)(s - 1) * cdiv(d.seg + d.H, 32);
  return words * d.B;
}
// Dropout of v = element (row, column col of mask stream s).
template <typename A>
SK_DEV A dropout(const HeadDims& d, const uint32_t* masks, A v, int col, int row, int s) {
  const uint32_t w = masks[mask_offset(d, s) + (int64_t)row * mask_words(d, s) + col / 32];
  return (w >> (col % 32)) & 1u ? v * (A)d.scale : A(0);
}

// ---- shared memory -------------------------------------------------------------------------
// The regions a kernel may use, in this order, each 128-byte aligned.  A plan (head_plan.h)
// sizes the ones its kernel needs; absent regions have 0 bytes.
enum SmemRegion {
  kSmAct,    // forward: resident activations of the row tile, [x (padded) | h slots]
  kSmU,      // forward: the layer input u_L built with its dropout mask (or from global)
  kSmBias,   // forward: every layer's bias in the accumulation type
  kSmDz,     // chain: dz_L of the row tile (the A operand)
  kSmHt,     // chain: the saved hidden activations of the row tile (ReLU masks), when they fit
  kSmDh,     // chain: fp32 dh accumulators of the row tile (when they fit)
  kSmGx,     // chain: fp32 grad_x accumulators of the row tile (when they fit)
  kSmRing,   // the cp.async pipeline: kStages stages of streamed tiles
  kSmReduce, // wgrad: the bias-gradient partials
  kNumSmemRegions
};
SK_HD const char* smem_region_name(int r) {
  const char* names[kNumSmemRegions] = {"act", "u", "bias", "dz", "ht", "dh", "gx", "ring", "reduce"};
  return names[r];
}

struct SmemLayout {
  uint32_t offset[kNumSmemRegions];
  uint32_t bytes[kNumSmemRegions];
  uint32_t total;

  SK_HD void clear() {
    for (int r = 0; r < kNumSmemRegions; ++r) offset[r] = bytes[r] = 0;
    total = 0;
  }
  // Sizes region r (regions must be added in enum order); returns the new total.
  SK_HD size_t add(int r, size_t b) {
    offset[r] = total;
    bytes[r] = (uint32_t)align128(b);
    total += bytes[r];
    return total;
  }
  template <typename P>
  SK_HD P* ptr(unsigned char* smem, int r) const {
    return reinterpret_cast<P*>(smem + offset[r]);
  }
};

}  // namespace kern
}  // namespace spinalkern
