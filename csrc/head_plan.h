// Launch planning (host): which compiled tile size each kernel runs with, what stays in shared
// memory, and the SmemLayout, for one head call.  Used by the launchers (head_launch.h), the
// CPU emulator and the cuda_launch_plan op (what bench/check_cuda_build.py reports).
//
// Row tile of the forward and of the chain (compiled sizes: fp16/bf16 forward 16/64/128,
// chain 16/64; fp32 16/64; fp64 16): the largest that still gives at least half as many CTAs
// as the GPU has SMs (bigger tiles re-read the weights from L2 fewer times), else 16, the
// smallest tile of the tensor-core instruction (small batches: ceil(B/16) CTAs, twice the
// SMs of 32-row tiles) -- among the tiles whose layout keeps everything on chip (forward: x
// and h; chain: grad_x and dh accumulators) if any fits, else with fallbacks, given up in
// this order: x tile, h (forward); hidden tile, grad_x accumulators, dh accumulators (chain).
#pragma once

#include <algorithm>
#include <iterator>
#include <sstream>
#include <string>
#include <type_traits>

#include <c10/util/Exception.h>

#include "head_params.h"

namespace spinalkern {
namespace kern {

struct DeviceInfo {
  int sms;
  size_t max_smem;  // opt-in dynamic shared memory per block
  int major;
};

template <typename T> const char* dtype_name();
template <> inline const char* dtype_name<dev_half>() { return "half"; }
template <> inline const char* dtype_name<dev_bf16>() { return "bf16"; }
template <> inline const char* dtype_name<float>() { return "float"; }
template <> inline const char* dtype_name<double>() { return "double"; }

// Compiled row tiles, largest first.
template <typename T> struct Tiles {
  static constexpr int kForward[3] = {Elem<T>::kTC ? 128 : (std::is_same_v<T, float> ? 64 : 0),
                                      Elem<T>::kTC ? 64 : (std::is_same_v<T, float> ? 16 : 0),
                                      Elem<T>::kTC ? 16 : (std::is_same_v<T, double> ? 16 : 0)};
  static constexpr int kChain[2] = {std::is_same_v<T, double> ? 0 : 64, 16};
};

template <typename T, class F>
void with_forward_tile(int bm, F&& f) {
  using I16 = std::integral_constant<int, 16>;
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  if (bm == 16) return f(I16{});
  if constexpr (!std::is_same_v<T, double>) {
    if (bm == 64) return f(I64{});
    if constexpr (Elem<T>::kTC) {
      if (bm == 128) return f(I128{});
    }
  }
  TORCH_CHECK(false, "spinalkern: no ", dtype_name<T>(), " forward kernel with ", bm, "-row tiles");
}
template <typename T, class F>
void with_chain_tile(int bm, F&& f) {
  using I16 = std::integral_constant<int, 16>;
  using I64 = std::integral_constant<int, 64>;
  if (bm == 16) return f(I16{});
  if constexpr (!std::is_same_v<T, double>) {
    if (bm == 64) return f(I64{});
  }
  TORCH_CHECK(false, "spinalkern: no ", dtype_name<T>(), " chain kernel with ", bm, "-row tiles");
}

inline int max_k_pad(const HeadDims& d) {
  int k = 0;
  for (int L = 0; L <= d.n; ++L) k = std::max(k, padded_layer(d, L).K_pad);
  return k;
}

// ---- forward -------------------------------------------------------------------------------
// level 0: x and h resident; 1: h resident; 2: neither.
template <typename T, int BM>
ForwardPlan forward_layout(const HeadDims& d, int level, bool x_aligned) {
  using Cfg = FwdCfg<T, BM>;
  using A = acc_t<T>;
  ForwardPlan pl{};
  const int hp = pad16(d.H);
  pl.bm = BM;
  pl.interleave = d.kind == kSpinal && d.C <= Cfg::BNY;
  pl.hslots = pl.interleave ? std::min(d.n, 2) : d.n;
  pl.x_res = level == 0 && x_aligned;
  pl.h_res = level <= 1;
  pl.use_u = d.dropout || !pl.x_res || !pl.h_res;
  pl.act_hcol = pl.x_res ? x_pad_width(d) : 0;
  const int act_cols = pl.act_hcol + (pl.h_res ? pl.hslots * hp : 0);
  pl.act_pitch = smem_pitch<T>(act_cols);
  pl.u_pitch = smem_pitch<T>(max_k_pad(d));
  SmemLayout& s = pl.smem;
  s.clear();
  s.add(kSmAct, act_cols > 0 ? (size_t)BM * pl.act_pitch * sizeof(T) : 0);
  s.add(kSmU, pl.use_u ? (size_t)BM * pl.u_pitch * sizeof(T) : 0);
  s.add(kSmBias, (size_t)(d.n * hp + pad16(d.C)) * sizeof(A));
  s.add(kSmDz, 0);
  s.add(kSmHt, 0);
  s.add(kSmDh, 0);
  s.add(kSmGx, 0);
  s.add(kSmRing, Cfg::kStages * Cfg::kStageBytes);
  s.add(kSmReduce, 0);
  return pl;
}

// Returns false when no layout of this tile size up to `max_level` fits in `budget` bytes.
template <typename T>
bool forward_plan_for_tile(const HeadDims& d, int bm, bool x_aligned, size_t budget,
                           ForwardPlan& out, int max_level = 2) {
  bool ok = false;
  with_forward_tile<T>(bm, [&](auto BM) {
    for (int level = 0; level <= max_level && !ok; ++level) {
      out = forward_layout<T, decltype(BM)::value>(d, level, x_aligned);
      ok = out.smem.total <= budget;
    }
  });
  return ok;
}

template <typename T>
ForwardPlan plan_forward(const HeadDims& d, const DeviceInfo& info, size_t budget,
                         bool x_aligned, int forced_bm) {
  ForwardPlan pl{};
  if (std::find(std::begin(Tiles<T>::kForward), std::end(Tiles<T>::kForward), forced_bm) ==
      std::end(Tiles<T>::kForward))
    forced_bm = 0;  // (a forced tile applies to the element types compiled with it)
  if (forced_bm > 0) {
    TORCH_CHECK_VALUE(forward_plan_for_tile<T>(d, forced_bm, x_aligned, budget, pl),
                      "spinalkern: the forced ", forced_bm, "-row forward tile does not fit in ",
                      budget, " bytes of shared memory");
    return pl;
  }
  // first everything on chip, then the fallbacks
  for (int max_level : {0, 2}) {
    for (int bm : Tiles<T>::kForward) {
      if (bm == 0) continue;
      const bool enough_ctas = cdiv(d.B, bm) >= info.sms / 2;
      if ((enough_ctas || bm == 16) &&
          forward_plan_for_tile<T>(d, bm, x_aligned, budget, pl, max_level))
        return pl;
    }
  }
  for (int bm : Tiles<T>::kForward)  // a tile size that fits, whatever the batch
    if (bm != 0 && forward_plan_for_tile<T>(d, bm, x_aligned, budget, pl)) return pl;
  TORCH_CHECK_VALUE(false, "spinalkern: this head is too large for the CUDA kernels' shared "
                    "memory (", budget, " bytes; widest layer input ", max_k_pad(d),
                    " columns): use backend='triton'");
  return pl;
}

// ---- backward: chain -------------------------------------------------------------------------
// level 0: hidden tile, grad_x and dh in shared memory; 1: no hidden tile; 2: grad_x global;
// 3: dh global too.
template <typename T, int BM>
ChainPlan chain_layout(const HeadDims& d, int level) {
  using Cfg = ChainCfg<T, BM>;
  using A = acc_t<T>;
  ChainPlan pl{};
  pl.bm = BM;
  pl.ht_smem = level == 0;
  pl.gx_smem = level <= 1;
  pl.dh_smem = level <= 2;
  pl.dz_pitch = smem_pitch<T>(std::max(pad16(d.H), pad16(d.C)));
  SmemLayout& s = pl.smem;
  s.clear();
  s.add(kSmAct, 0);
  s.add(kSmU, 0);
  s.add(kSmBias, 0);
  s.add(kSmDz, (size_t)BM * pl.dz_pitch * sizeof(T));
  s.add(kSmHt, pl.ht_smem ? (size_t)BM * h_pad_width(d) * sizeof(T) : 0);
  s.add(kSmDh, pl.dh_smem ? (size_t)BM * d.n * d.H * sizeof(A) : 0);
  s.add(kSmGx, pl.gx_smem ? (size_t)BM * d.D * sizeof(A) : 0);
  s.add(kSmRing, Cfg::kStages * Cfg::kStageBytes);
  s.add(kSmReduce, 0);
  return pl;
}

template <typename T>
bool chain_plan_for_tile(const HeadDims& d, int bm, size_t budget, ChainPlan& out,
                         int max_level = 3) {
  bool ok = false;
  with_chain_tile<T>(bm, [&](auto BM) {
    for (int level = 0; level <= max_level && !ok; ++level) {
      out = chain_layout<T, decltype(BM)::value>(d, level);
      ok = out.smem.total <= budget;
    }
  });
  return ok;
}

template <typename T>
ChainPlan plan_chain(const HeadDims& d, const DeviceInfo& info, size_t budget, int forced_bm) {
  ChainPlan pl{};
  if (std::find(std::begin(Tiles<T>::kChain), std::end(Tiles<T>::kChain), forced_bm) ==
      std::end(Tiles<T>::kChain))
    forced_bm = 0;
  if (forced_bm > 0) {
    TORCH_CHECK_VALUE(chain_plan_for_tile<T>(d, forced_bm, budget, pl),
                      "spinalkern: the forced ", forced_bm, "-row chain tile does not fit in ",
                      budget, " bytes of shared memory");
    return pl;
  }
  // first the accumulators on chip (global ones cost memory and traffic), then the fallbacks
  for (int max_level : {1, 3}) {
    for (int bm : Tiles<T>::kChain) {
      if (bm == 0) continue;
      const bool enough_ctas = cdiv(d.B, bm) >= info.sms / 2;
      if ((enough_ctas || bm == 16) && chain_plan_for_tile<T>(d, bm, budget, pl, max_level))
        return pl;
    }
  }
  TORCH_CHECK_VALUE(false, "spinalkern: this head is too large for the CUDA kernels' shared "
                    "memory (", budget, " bytes): use backend='triton'");
  return pl;
}

// ---- backward: weight gradients ----------------------------------------------------------------
// Batch chunks: enough (tile, chunk) CTAs to fill the GPU twice, at least 64 rows per chunk,
// and the fp32 partials (a temporary of the backward) at most the bytes of hidden.
template <typename T>
WgradPlan plan_wgrad(const HeadDims& d, const DeviceInfo& info, int64_t ldp, int64_t forced_rows) {
  using Cfg = WgradCfg<T>;
  using A = acc_t<T>;
  WgradPlan pl{};
  pl.tiles = 0;
  for (int L = 0; L <= d.n; ++L) {
    const PaddedLayer lay = padded_layer(d, L);
    pl.tiles += cdiv(lay.N, Cfg::BM) * cdiv(lay.K_pad, Cfg::BN);
  }
  int64_t rows = forced_rows > 0 ? std::min<int64_t>(forced_rows, d.B) : 0;
  if (rows <= 0) {
    int64_t want = std::max(1, std::min(cdiv(2 * info.sms, pl.tiles), cdiv(d.B, 64)));
    const int64_t cap = (int64_t)d.B * d.n * d.H * (int64_t)sizeof(T) / (ldp * (int64_t)sizeof(A));
    want = std::max<int64_t>(1, std::min(want, cap));
    rows = (int64_t)cdiv(cdiv(d.B, (int)want), Cfg::BK) * Cfg::BK;
  }
  rows = std::max<int64_t>(rows, cdiv(d.B, 65535));  // gridDim.y limit
  pl.chunk_rows = (int)rows;
  pl.chunks = cdiv(d.B, pl.chunk_rows);
  SmemLayout& s = pl.smem;
  s.clear();
  for (int r = kSmAct; r < kSmRing; ++r) s.add(r, 0);
  s.add(kSmRing, Cfg::kStages * Cfg::kStageBytes);
  s.add(kSmReduce, kThreads * sizeof(A));
  return pl;
}

// ---- description (cuda_launch_plan op) ---------------------------------------------------------
inline void describe_smem(std::ostream& o, const SmemLayout& s) {
  o << "{";
  for (int r = 0; r < kNumSmemRegions; ++r)
    if (s.bytes[r] > 0) o << "\"" << smem_region_name(r) << "\": " << s.bytes[r] << ", ";
  o << "\"total\": " << s.total << "}";
}

template <typename T>
std::string describe_plans(const HeadDims& d, const DeviceInfo& info, size_t budget,
                           bool x_aligned) {
  std::ostringstream o;
  o << std::boolalpha;
  const ForwardPlan f = plan_forward<T>(d, info, budget, x_aligned, 0);
  const ChainPlan c = plan_chain<T>(d, info, budget, 0);
  const int64_t np = param_offset(d, d.n + 1);
  const int64_t ldp = (np + kVec<acc_t<T>> - 1) / kVec<acc_t<T>> * kVec<acc_t<T>>;
  const WgradPlan w = plan_wgrad<T>(d, info, ldp, 0);
  o << "{\"forward\": {\"kernel\": \"head_forward_kernel<" << dtype_name<T>() << ", " << f.bm
    << ">\", \"ctas\": " << cdiv(d.B, f.bm) << ", \"x_resident\": " << f.x_res
    << ", \"h_resident\": " << f.h_res << ", \"u_buffer\": " << f.use_u
    << ", \"interleaved_output\": " << f.interleave << ", \"smem\": ";
  describe_smem(o, f.smem);
  o << "}, \"chain\": {\"kernel\": \"head_backward_chain_kernel<" << dtype_name<T>() << ", "
    << c.bm << ">\", \"ctas\": " << cdiv(d.B, c.bm) << ", \"hidden_tile_smem\": " << c.ht_smem
    << ", \"dh_smem\": " << c.dh_smem << ", \"gx_smem\": " << c.gx_smem << ", \"smem\": ";
  describe_smem(o, c.smem);
  o << "}, \"wgrad\": {\"kernel\": \"head_backward_wgrad_kernel<" << dtype_name<T>()
    << ">\", \"ctas\": " << (int64_t)w.tiles * w.chunks << ", \"tiles\": " << w.tiles
    << ", \"chunks\": " << w.chunks << ", \"chunk_rows\": " << w.chunk_rows << ", \"smem\": ";
  describe_smem(o, w.smem);
  o << "}}";
  return o.str();
}

}  // namespace kern
}  // namespace spinalkern
