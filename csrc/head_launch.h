// Host side of the device ops (the "launch templates"): argument checks, packing into the
// padded layout when needed, workspaces, plans (head_plan.h) and kernel launches.  Included by
// the CUDA translation units (spinal_head_{forward,backward}.cu) and, with SK_EMU, by the CPU
// emulator build (csrc/emu/emu_ops.cpp), so the launch logic is tested with the kernels.
//
// Launches go to the current stream; nothing here synchronises with the host or reads a
// tensor value on the host (the dropout seed is read by the kernels), so a CUDA graph can
// capture every op.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "op_checks.h"  // ATen first: the emulator's CUDA names are macros
#include "head_backward_kernels.cuh"
#include "head_bn_kernels.cuh"
#include "head_forward_kernel.cuh"
#include "head_misc_kernels.cuh"
#include "head_plan.h"

#ifndef SK_EMU
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace spinalkern {
namespace dev {

using kern::DeviceInfo;
using kern::pad16;

#ifdef SK_EMU
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
#endif

template <typename S> struct DevType { using type = S; };
template <> struct DevType<at::Half> { using type = dev_half; };
template <> struct DevType<at::BFloat16> { using type = dev_bf16; };
template <typename T>
using ScalarOf = std::conditional_t<std::is_same_v<T, dev_half>, at::Half,
                                    std::conditional_t<std::is_same_v<T, dev_bf16>, at::BFloat16, T>>;

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr<ScalarOf<std::remove_const_t<T>>>());
}
inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline DeviceInfo device_info(const at::Device& device) {
#ifdef SK_EMU
  (void)device;
  return {132, 227 * 1024, 9};  // an H100
#else
  static std::mutex mu;
  static std::vector<DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  const int idx = device.index();
  if ((int)cache.size() <= idx) cache.resize(idx + 1, DeviceInfo{0, 0, 0});
  if (cache[idx].sms == 0) {
    int sms = 0, smem = 0, major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, idx));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, idx));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, idx));
    cache[idx] = DeviceInfo{sms, (size_t)smem, major};
  }
  return cache[idx];
#endif
}

// Debug/testing knobs (read on every call): SPINALKERN_CUDA_SMEM_LIMIT caps the shared memory
// the kernels may use (forces the fallbacks: smaller tiles, operands in global memory),
// SPINALKERN_CUDA_TILE_M / SPINALKERN_CUDA_CHAIN_TILE_M force the row tile of the forward /
// chain kernel, SPINALKERN_CUDA_BN_TILE_M that of the BatchNorm head's layer kernels,
// SPINALKERN_CUDA_DW_CHUNK_ROWS the batch chunk of the weight-gradient kernel.
inline int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? std::atoll(v) : dflt;
}

inline size_t smem_budget(const DeviceInfo& info) {
  const int64_t cap = env_int("SPINALKERN_CUDA_SMEM_LIMIT", 0);
  return cap > 0 ? std::min((size_t)cap, info.max_smem) : info.max_smem;
}

template <typename KFn>
void prepare_launch(KFn kfn, size_t smem_bytes) {
#ifdef SK_EMU
  (void)kfn;
  (void)smem_bytes;
#else
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute((const void*)kfn,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)smem_bytes));
#endif
}

inline void launch_check() {
#ifndef SK_EMU
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

inline sk_stream_t current_stream(const at::Device& device) {
#ifdef SK_EMU
  (void)device;
  return sk_stream_t{};
#else
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
#endif
}

inline void check_device(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().type() == kDeviceType, op, ": this implementation expects x on ",
                    kDeviceType, ", got ", x.device());
#ifndef SK_EMU
  const DeviceInfo info = device_info(x.device());
  TORCH_CHECK(info.major >= 8, op, ": the CUDA kernels need compute capability 8.0 or newer");
#endif
}

// ---- the padded layout ---------------------------------------------------------------------
// Operands whose natural layout is not the kernels' padded one (seg or H not a multiple of 16)
// or that are not 16-byte aligned are packed by one pack_kernel launch.
template <typename T>
struct Packer {
  kern::PackParams<T> params{};
  std::vector<at::Tensor> keep;
  int64_t max_elems = 0;

  T* add(const at::Tensor& src, int64_t rows, int a, int wa, int b, int wb) {
    const int cols_pad = a * pad16(wa) + b * pad16(wb);
    at::Tensor dst = at::empty({rows, (int64_t)cols_pad}, src.options());
    keep.push_back(dst);
    params.job[params.njobs++] = kern::PackJob<T>{ptr<const T>(src), ptr<T>(dst), rows, a, wa, b, wb};
    max_elems = std::max(max_elems, rows * cols_pad);
    return ptr<T>(dst);
  }
  void launch(sk_stream_t stream, const DeviceInfo& info) {
    if (params.njobs == 0 || max_elems == 0) return;
    const int blocks = (int)std::min<int64_t>((max_elems + kern::kThreads - 1) / kern::kThreads,
                                              4 * (int64_t)info.sms);
    auto kfn = kern::pack_kernel<T>;
    SK_LAUNCH(kfn, dim3(blocks, params.njobs), dim3(kern::kThreads), 0, stream, params);
    launch_check();
  }
};

// W_L in the padded layout of u_L: the tensors themselves, or packed copies.
template <typename T>
void padded_weights(const HeadDims& d, const std::vector<at::Tensor>& weights, Packer<T>& pk,
                    const T* (&w)[kMaxLayers + 1]) {
  bool natural = d.seg % kern::kPad == 0 && d.H % kern::kPad == 0;
  for (const auto& t : weights) natural = natural && aligned16(t);
  for (int L = 0; L <= d.n; ++L) {
    const kern::PaddedLayer lay = kern::padded_layer(d, L);
    w[L] = natural ? ptr<const T>(weights[L])
                   : pk.add(weights[L], lay.N, lay.xw > 0 ? 1 : 0, std::max(lay.xw, 1),
                            lay.hblks, d.H);
  }
}

// Every dropout keep bit the op needs (kern::mask_offset), computed once by a launch that
// spreads the Philox work over the whole GPU; the tensor lives as long as the op call.
inline at::Tensor dropout_masks(const HeadDims& d, const at::Tensor& seed, sk_stream_t stream,
                                const DeviceInfo& info) {
  const int ns = kern::mask_streams(d);
  const int64_t words = kern::mask_offset(d, ns - 1) + (int64_t)d.B * kern::mask_words(d, ns - 1);
  at::Tensor masks = at::empty({words}, seed.options().dtype(at::kInt));
  int64_t widest = 0;
  for (int s = 0; s < ns; ++s) widest = std::max<int64_t>(widest, (int64_t)d.B * kern::mask_words(d, s));
  const int blocks = (int)std::max<int64_t>(
      1, std::min<int64_t>((widest + kern::kThreads - 1) / kern::kThreads,
                           kern::cdiv(4 * info.sms, ns)));
  auto kfn = kern::dropout_mask_kernel<>;
  SK_LAUNCH(kfn, dim3(blocks, ns), dim3(kern::kThreads), 0, stream, seed.data_ptr<int64_t>(), d,
            reinterpret_cast<uint32_t*>(masks.data_ptr<int32_t>()));
  launch_check();
  return masks;
}

// ---- forward -------------------------------------------------------------------------------
template <typename T>
void forward_device(const HeadDims& d, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                    const std::vector<at::Tensor>& biases, const std::optional<at::Tensor>& seed,
                    const at::Tensor& y, const at::Tensor& hidden, bool save_hidden) {
  const DeviceInfo info = device_info(x.device());
  const sk_stream_t stream = current_stream(x.device());
  kern::ForwardParams<T> p{};
  Packer<T> pk;
  padded_weights<T>(d, weights, pk, p.w);
  pk.launch(stream, info);
  const bool x_aligned = d.seg % kern::kPad == 0 && aligned16(x);
  p.plan = kern::plan_forward<T>(d, info, smem_budget(info), x_aligned,
                                 (int)env_int("SPINALKERN_CUDA_TILE_M", 0));
  p.x = ptr<const T>(x);
  for (int L = 0; L <= d.n; ++L) p.b[L] = ptr<const T>(biases[L]);
  at::Tensor masks;
  if (d.dropout) {
    masks = dropout_masks(d, *seed, stream, info);
    p.masks = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  }
  p.y = ptr<T>(y);
  p.hidden = save_hidden ? ptr<T>(hidden) : nullptr;
  at::Tensor hscratch;
  if (!p.plan.h_res) {  // h in global memory: the hidden output itself when it has that layout
    if (save_hidden && d.H % kern::kPad == 0) {
      p.hscratch = p.hidden;
    } else {
      hscratch = at::empty({d.B, (int64_t)kern::h_pad_width(d)}, x.options());
      p.hscratch = ptr<T>(hscratch);
    }
  }
  p.d = d;
  const size_t smem = p.plan.smem.total;
  kern::with_forward_tile<T>(p.plan.bm, [&](auto BM) {
    auto kfn = kern::head_forward_kernel<T, decltype(BM)::value>;
    prepare_launch(kfn, smem);
    SK_LAUNCH(kfn, dim3(kern::cdiv(d.B, decltype(BM)::value)), dim3(kern::kThreads), smem, stream, p);
    launch_check();
  });
}

// (Templates only so that a translation unit instantiates just the ops it registers.)
template <typename Unused = void>
std::tuple<at::Tensor, at::Tensor> head_forward(
    const char* op, const at::Tensor& x_, at::TensorList weights_, at::TensorList biases_,
    const std::optional<at::Tensor>& seed, int64_t kind, int64_t num_splits, double dropout,
    bool save_hidden) {
  const HeadDims d = check_head_args(op, x_, weights_, seed, kind, num_splits, dropout);
  check_biases(op, x_, weights_, biases_);
  check_device(op, x_);
#ifndef SK_EMU
  const c10::cuda::CUDAGuard guard(x_.device());
#endif
  const at::Tensor x = x_.contiguous();
  const auto weights = contiguous_all(weights_);
  const auto biases = contiguous_all(biases_);
  at::Tensor y = at::empty({d.B, d.C}, x.options());
  at::Tensor hidden = save_hidden ? at::empty({d.B, (int64_t)d.n * d.H}, x.options())
                                  : at::empty({0}, x.options());
  if (d.B == 0) return {y, hidden};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "head_forward", [&] {
    forward_device<typename DevType<scalar_t>::type>(d, x, weights, biases, seed, y, hidden,
                                                     save_hidden);
  });
  return {y, hidden};
}

// ---- backward ------------------------------------------------------------------------------
template <typename T>
void weight_grads_device(kern::BackwardParams<T>& p, const at::Tensor& grad_params,
                         sk_stream_t stream, const DeviceInfo& info);

template <typename T>
void backward_device(const HeadDims& d, const at::Tensor& grad_y, const at::Tensor& x,
                     const std::vector<at::Tensor>& weights, const at::Tensor& hidden,
                     const std::optional<at::Tensor>& seed, const at::Tensor& grad_x,
                     const at::Tensor& grad_params) {
  using A = acc_t<T>;
  const at::ScalarType acc_dtype = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  const DeviceInfo info = device_info(x.device());
  const sk_stream_t stream = current_stream(x.device());
  const size_t budget = smem_budget(info);
  kern::BackwardParams<T> p{};
  Packer<T> pk;
  padded_weights<T>(d, weights, pk, p.w);
  p.xu = d.seg % kern::kPad == 0 && aligned16(x) ? ptr<const T>(x)
                                                  : pk.add(x, d.B, d.S, d.seg, 0, 1);
  p.hu = d.H % kern::kPad == 0 && aligned16(hidden) ? ptr<const T>(hidden)
                                                     : pk.add(hidden, d.B, 0, 1, d.n, d.H);
  pk.launch(stream, info);
  p.grad_y = ptr<const T>(grad_y);
  p.hidden = ptr<const T>(hidden);
  at::Tensor masks;
  if (d.dropout) {
    masks = dropout_masks(d, *seed, stream, info);
    p.masks = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  }
  p.d = d;
  p.chain = kern::plan_chain<T>(d, info, budget, (int)env_int("SPINALKERN_CUDA_CHAIN_TILE_M", 0));
  p.ldz = kern::h_pad_width(d) + pad16(d.C);
  const at::Tensor dz = at::empty({d.B, (int64_t)p.ldz}, x.options());
  p.dz = ptr<T>(dz);
  at::Tensor dh_g, gx_g;
  if (!p.chain.dh_smem) {
    dh_g = at::empty({d.B, (int64_t)d.n * d.H}, x.options().dtype(acc_dtype));
    p.dh_g = reinterpret_cast<A*>(dh_g.data_ptr());
  }
  if (!p.chain.gx_smem) {
    gx_g = at::empty({d.B, (int64_t)d.D}, x.options().dtype(acc_dtype));
    p.gx_g = reinterpret_cast<A*>(gx_g.data_ptr());
  }
  p.grad_x = ptr<T>(grad_x);

  kern::with_chain_tile<T>(p.chain.bm, [&](auto BM) {
    auto kfn = kern::head_backward_chain_kernel<T, decltype(BM)::value>;
    prepare_launch(kfn, p.chain.smem.total);
    SK_LAUNCH(kfn, dim3(kern::cdiv(d.B, decltype(BM)::value)), dim3(kern::kThreads),
              p.chain.smem.total, stream, p);
    launch_check();
  });
  weight_grads_device<T>(p, grad_params, stream, info);
}

// dW_L, db_L from the dz workspace and the padded x / hidden of p (filled by the caller):
// per-chunk partials (wgrad launch), then their fixed-order sum into grad_params (reduce).
template <typename T>
void weight_grads_device(kern::BackwardParams<T>& p, const at::Tensor& grad_params,
                         sk_stream_t stream, const DeviceInfo& info) {
  using A = acc_t<T>;
  const at::ScalarType acc_dtype = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  p.num_params = grad_params.numel();
  p.ldp = (p.num_params + kern::kVec<A> - 1) / kern::kVec<A> * kern::kVec<A>;
  p.wg = kern::plan_wgrad<T>(p.d, info, p.ldp, env_int("SPINALKERN_CUDA_DW_CHUNK_ROWS", 0));
  const at::Tensor partials = at::empty({p.wg.chunks, p.ldp}, grad_params.options().dtype(acc_dtype));
  p.partials = reinterpret_cast<A*>(partials.data_ptr());
  p.grad_params = ptr<T>(grad_params);
  {
    auto kfn = kern::head_backward_wgrad_kernel<T>;
    prepare_launch(kfn, p.wg.smem.total);
    SK_LAUNCH(kfn, dim3(p.wg.tiles, p.wg.chunks), dim3(kern::kThreads), p.wg.smem.total, stream, p);
    launch_check();
  }
  {
    auto kfn = kern::head_backward_reduce_kernel<T>;
    const int64_t nvec = p.ldp / kern::kVec<A>;
    const int blocks = (int)std::min<int64_t>((nvec + kern::kThreads - 1) / kern::kThreads,
                                              8 * (int64_t)info.sms);
    SK_LAUNCH(kfn, dim3(blocks), dim3(kern::kThreads), 0, stream, p);
    launch_check();
  }
}

template <typename Unused = void>
std::tuple<at::Tensor, at::Tensor> head_backward(
    const char* op, const at::Tensor& grad_y_, const at::Tensor& x_, at::TensorList weights_,
    const at::Tensor& hidden_, const std::optional<at::Tensor>& seed, int64_t kind,
    int64_t num_splits, double dropout) {
  const HeadDims d = check_head_args(op, x_, weights_, seed, kind, num_splits, dropout);
  check_backward_tensors(op, d, x_, grad_y_, hidden_);
  check_device(op, x_);
#ifndef SK_EMU
  const c10::cuda::CUDAGuard guard(x_.device());
#endif
  const at::Tensor x = x_.contiguous(), grad_y = grad_y_.contiguous(),
                   hidden = hidden_.contiguous();
  const auto weights = contiguous_all(weights_);
  at::Tensor grad_x = at::empty({d.B, d.D}, x.options());
  const int64_t np = param_offset(d, d.n + 1);
  if (d.B == 0) return {grad_x, at::zeros({np}, x.options())};
  at::Tensor grad_params = at::empty({np}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "head_backward", [&] {
    backward_device<typename DevType<scalar_t>::type>(d, grad_y, x, weights, hidden, seed,
                                                      grad_x, grad_params);
  });
  return {grad_x, grad_params};
}

// ---- the BatchNorm head (one launch per layer, see head_bn_kernels.cuh) ---------------------
template <typename T, class F>
void with_bn_tile(int bm, F&& f) {
  using I16 = std::integral_constant<int, 16>;
  using I64 = std::integral_constant<int, 64>;
  if (bm == 16) return f(I16{});
  if constexpr (!std::is_same_v<T, double>) {
    if (bm == 64) return f(I64{});
  }
  TORCH_CHECK(false, "spinalkern: no ", kern::dtype_name<T>(), " BatchNorm kernels with ", bm,
              "-row tiles");
}

// Largest dynamic shared memory of the BatchNorm layer launches with bm-row tiles.
template <typename T>
size_t bn_max_smem(const HeadDims& d, int bm) {
  size_t m = 0;
  for (int L = 0; L <= d.n; ++L)
    m = std::max({m, kern::bn_smem<T>(d, L, bm, false).total, kern::bn_smem<T>(d, L, bm, true).total});
  return m;
}

// Row tile of the BatchNorm layer launches (compiled: 16 and, except fp64, 64): 64 rows (each
// CTA re-reads W_L from L2 four times less often) when that still gives at least half as many
// CTAs as SMs and fits, else 16.  SPINALKERN_CUDA_BN_TILE_M forces one.
template <typename T>
int plan_bn_tile(const HeadDims& d, const DeviceInfo& info, size_t budget) {
  const bool has64 = !std::is_same_v<T, double>;
  int bm = (int)env_int("SPINALKERN_CUDA_BN_TILE_M", 0);
  if (bm != 16 && !(bm == 64 && has64)) bm = 0;
  if (bm == 0)
    bm = has64 && kern::cdiv(d.B, 64) >= info.sms / 2 && bn_max_smem<T>(d, 64) <= budget ? 64 : 16;
  TORCH_CHECK_VALUE(bn_max_smem<T>(d, bm) <= budget, "spinalkern: this head is too large for the "
                    "BatchNorm kernels' shared memory (", budget, " bytes; widest layer input ",
                    kern::max_k_pad(d), " columns): use backend='triton'");
  return bm;
}

template <typename T>
void bn_forward_device(const HeadDims& d, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                       const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& gammas,
                       const std::vector<at::Tensor>& betas, const std::optional<at::Tensor>& seed,
                       double eps, const at::Tensor& y, const at::Tensor& hidden,
                       const at::Tensor& z, const at::Tensor& stats, bool save) {
  using A = acc_t<T>;
  const DeviceInfo info = device_info(x.device());
  const sk_stream_t stream = current_stream(x.device());
  kern::BnParams<T> p{};
  Packer<T> pk;
  padded_weights<T>(d, weights, pk, p.w);
  pk.launch(stream, info);
  p.x = ptr<const T>(x);
  for (int L = 0; L <= d.n; ++L) p.b[L] = ptr<const T>(biases[L]);
  for (size_t i = 0; i < gammas.size(); ++i) {
    p.gamma[i] = ptr<const A>(gammas[i]);
    p.beta[i] = ptr<const A>(betas[i]);
  }
  at::Tensor masks;
  if (d.dropout) {
    masks = dropout_masks(d, *seed, stream, info);
    p.masks = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  }
  p.y = ptr<T>(y);
  p.hidden = save ? ptr<T>(hidden) : nullptr;
  const at::Tensor zbuf = save ? z : at::empty({d.B, (int64_t)d.n * d.H}, x.options());
  p.z = ptr<T>(zbuf);
  p.stats = ptr<A>(stats);
  p.eps = eps;
  p.bm = plan_bn_tile<T>(d, info, smem_budget(info));
  const int tiles = kern::cdiv(d.B, p.bm);
  const at::Tensor part = at::empty({tiles, 2, (int64_t)d.H}, stats.options());
  p.part = ptr<A>(part);
  p.d = d;
  with_bn_tile<T>(p.bm, [&](auto BM) {
    auto kfn = kern::bn_forward_layer_kernel<T, decltype(BM)::value>;
    prepare_launch(kfn, bn_max_smem<T>(d, BM));
    for (int L = 0; L <= d.n; ++L) {
      SK_LAUNCH(kfn, dim3(tiles), dim3(kern::kThreads), kern::bn_smem<T>(d, L, BM, false).total,
                stream, p, L);
      launch_check();
      if (L < d.n) {
        auto sfn = kern::bn_stats_kernel<T>;
        SK_LAUNCH(sfn, dim3(kern::cdiv(d.H, kern::kThreads)), dim3(kern::kThreads), 0, stream, p, L);
        launch_check();
      }
    }
  });
}

template <typename Unused = void>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_bn_forward(
    const char* op, const at::Tensor& x_, at::TensorList weights_, at::TensorList biases_,
    at::TensorList bn_weights_, at::TensorList bn_biases_, const std::optional<at::Tensor>& seed,
    int64_t num_splits, double dropout, double eps, bool save_for_backward) {
  const HeadDims d = check_bn_forward_args(op, x_, weights_, biases_, bn_weights_, bn_biases_,
                                           seed, num_splits, dropout, eps);
  check_device(op, x_);
#ifndef SK_EMU
  const c10::cuda::CUDAGuard guard(x_.device());
#endif
  const at::Tensor x = x_.contiguous();
  const auto weights = contiguous_all(weights_), biases = contiguous_all(biases_);
  const auto gammas = contiguous_all(bn_weights_), betas = contiguous_all(bn_biases_);
  const std::vector<int64_t> saved_shape =
      save_for_backward ? std::vector<int64_t>{d.B, (int64_t)d.n * d.H} : std::vector<int64_t>{0};
  at::Tensor y = at::empty({d.B, d.C}, x.options());
  at::Tensor hidden = at::empty(saved_shape, x.options()), z = at::empty(saved_shape, x.options());
  at::Tensor stats = at::empty({d.n, 3, d.H}, x.options().dtype(bn_acc_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "head_bn_forward", [&] {
    bn_forward_device<typename DevType<scalar_t>::type>(d, x, weights, biases, gammas, betas, seed,
                                                        eps, y, hidden, z, stats,
                                                        save_for_backward);
  });
  return {y, hidden, z, stats};
}

template <typename T>
void bn_backward_device(const HeadDims& d, const at::Tensor& grad_y, const at::Tensor& x,
                        const std::vector<at::Tensor>& weights,
                        const std::vector<at::Tensor>& gammas, const at::Tensor& hidden,
                        const at::Tensor& z, const at::Tensor& stats,
                        const std::optional<at::Tensor>& seed, const at::Tensor& grad_x,
                        const at::Tensor& grad_params, const at::Tensor& grad_bn) {
  using A = acc_t<T>;
  const DeviceInfo info = device_info(x.device());
  const sk_stream_t stream = current_stream(x.device());
  kern::BnParams<T> p{};
  kern::BackwardParams<T> q{};  // for the weight-gradient launches
  Packer<T> pk;
  padded_weights<T>(d, weights, pk, q.w);
  q.xu = d.seg % kern::kPad == 0 && aligned16(x) ? ptr<const T>(x)
                                                  : pk.add(x, d.B, d.S, d.seg, 0, 1);
  q.hu = d.H % kern::kPad == 0 && aligned16(hidden) ? ptr<const T>(hidden)
                                                     : pk.add(hidden, d.B, 0, 1, d.n, d.H);
  pk.launch(stream, info);
  for (int L = 0; L <= d.n; ++L) p.w[L] = q.w[L];
  for (size_t i = 0; i < gammas.size(); ++i) p.gamma[i] = ptr<const A>(gammas[i]);
  at::Tensor masks;
  if (d.dropout) {
    masks = dropout_masks(d, *seed, stream, info);
    p.masks = q.masks = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  }
  p.grad_y = q.grad_y = ptr<const T>(grad_y);
  p.hidden = ptr<T>(hidden);
  q.hidden = p.hidden;
  p.z = ptr<T>(z);
  p.stats = ptr<A>(stats);
  const at::Tensor dh = at::zeros({d.B, (int64_t)d.n * d.H}, stats.options());
  const at::Tensor gx = at::zeros({d.B, (int64_t)d.D}, stats.options());
  p.dh = ptr<A>(dh);
  p.gx = ptr<A>(gx);
  p.grad_x = ptr<T>(grad_x);
  p.ldz = q.ldz = kern::h_pad_width(d) + pad16(d.C);
  const at::Tensor dz = at::empty({d.B, (int64_t)p.ldz}, x.options());
  p.dz = q.dz = ptr<T>(dz);
  p.gbn = ptr<A>(grad_bn);
  p.bm = plan_bn_tile<T>(d, info, smem_budget(info));
  const int tiles = kern::cdiv(d.B, p.bm);
  const at::Tensor part = at::empty({tiles, 2, (int64_t)d.H}, stats.options());
  p.part = ptr<A>(part);
  p.d = q.d = d;
  with_bn_tile<T>(p.bm, [&](auto BM) {
    auto kfn = kern::bn_backward_layer_kernel<T, decltype(BM)::value>;
    prepare_launch(kfn, bn_max_smem<T>(d, BM));
    for (int L = d.n; L >= 0; --L) {
      SK_LAUNCH(kfn, dim3(tiles), dim3(kern::kThreads), kern::bn_smem<T>(d, L, BM, true).total,
                stream, p, L);
      launch_check();
      if (L >= 1) {
        auto sfn = kern::bn_grad_sums_kernel<T>;
        SK_LAUNCH(sfn, dim3(kern::cdiv(d.H, kern::kThreads)), dim3(kern::kThreads), 0, stream, p,
                  L - 1);
        launch_check();
      }
    }
  });
  weight_grads_device<T>(q, grad_params, stream, info);
}

template <typename Unused = void>
std::tuple<at::Tensor, at::Tensor, at::Tensor> head_bn_backward(
    const char* op, const at::Tensor& grad_y_, const at::Tensor& x_, at::TensorList weights_,
    at::TensorList bn_weights_, const at::Tensor& hidden_, const at::Tensor& z_,
    const at::Tensor& stats_, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout) {
  const HeadDims d = check_bn_backward_args(op, grad_y_, x_, weights_, bn_weights_, hidden_, z_,
                                            stats_, seed, num_splits, dropout);
  check_device(op, x_);
#ifndef SK_EMU
  const c10::cuda::CUDAGuard guard(x_.device());
#endif
  const at::Tensor x = x_.contiguous(), grad_y = grad_y_.contiguous(),
                   hidden = hidden_.contiguous(), z = z_.contiguous(), stats = stats_.contiguous();
  const auto weights = contiguous_all(weights_), gammas = contiguous_all(bn_weights_);
  at::Tensor grad_x = at::empty({d.B, d.D}, x.options());
  at::Tensor grad_params = at::empty({param_offset(d, d.n + 1)}, x.options());
  at::Tensor grad_bn = at::empty({d.n, 2, d.H}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "head_bn_backward", [&] {
    bn_backward_device<typename DevType<scalar_t>::type>(d, grad_y, x, weights, gammas, hidden, z,
                                                         stats, seed, grad_x, grad_params,
                                                         grad_bn);
  });
  return {grad_x, grad_params, grad_bn};
}

// ---- dropout mask (testing aid) ----------------------------------------------------------
template <typename Unused = void>
at::Tensor keep_mask(const char* op, const at::Tensor& seed, int64_t stream, int64_t rows,
                     int64_t cols, double p) {
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
                    ": seed must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0 && rows <= INT32_MAX && cols <= INT32_MAX, op,
                    ": rows and cols must be in [0, 2^31)");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  check_device(op, seed);
#ifndef SK_EMU
  const c10::cuda::CUDAGuard guard(seed.device());
#endif
  const at::Tensor s = seed.contiguous();
  at::Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  if (rows * cols == 0) return out;
  const int blocks = (int)std::min<int64_t>((rows * cols + kern::kThreads - 1) / kern::kThreads,
                                            8 * (int64_t)device_info(seed.device()).sms);
  auto kfn = kern::keep_mask_kernel<>;
  SK_LAUNCH(kfn, dim3(blocks), dim3(kern::kThreads), 0, current_stream(seed.device()),
            s.data_ptr<int64_t>(), (int)stream, (int)rows, (int)cols, keep_threshold(p),
            out.data_ptr<bool>());
  launch_check();
  return out;
}

// ---- launch plan (report / testing aid) ----------------------------------------------------
// (Its schema, SK_LAUNCH_PLAN_SCHEMA, is in op_schemas.h.)

// The plans of forward, chain and wgrad for a head of these sizes on a device with `sms` SMs
// and `max_smem` bytes of shared memory per block, as JSON (a 16-byte aligned x assumed).
template <typename Unused = void>
std::string launch_plan(int64_t kind, int64_t B, int64_t D, int64_t H, int64_t n, int64_t C,
                        int64_t S, at::ScalarType dtype, double dropout, int64_t sms,
                        int64_t max_smem) {
  TORCH_CHECK_VALUE(kind == kSpinal || kind == kProgressive, "kind must be 0 or 1");
  TORCH_CHECK_VALUE(B > 0 && D > 0 && H > 0 && n > 0 && n <= kMaxLayers && C > 0 && S > 0 &&
                        D % S == 0 && (kind == kSpinal || S == 1) && sms > 0 && max_smem > 0,
                    "launch_plan: invalid sizes");
  HeadDims d{};
  d.kind = (int)kind;
  d.B = (int)B;
  d.D = (int)D;
  d.S = (int)S;
  d.seg = (int)(D / S);
  d.H = (int)H;
  d.n = (int)n;
  d.C = (int)C;
  d.dropout = dropout > 0.0;
  d.threshold = keep_threshold(dropout);
  d.scale = 1.0 / (1.0 - dropout);
  const DeviceInfo info{(int)sms, (size_t)max_smem, 9};
  std::string out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "launch_plan", [&] {
    out = kern::describe_plans<typename DevType<scalar_t>::type>(d, info, info.max_smem,
                                                                  d.seg % kern::kPad == 0);
  });
  return out;
}

}  // namespace dev
}  // namespace spinalkern
