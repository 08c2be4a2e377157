// Host side of the device ops: argument checks, workspace allocation, tile-config choice and
// kernel launches.  Included by the CUDA translation units (spinal_head_{forward,backward}.cu)
// and, with SK_EMU, by the CPU emulator build (csrc/emu/emu_ops.cpp), so the launch logic is
// tested together with the kernels.
//
// Launches go to the current stream; nothing here synchronises with the host or reads a
// tensor value on the host (the dropout seed is read by the kernels), so a CUDA graph can
// capture every op.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <vector>

#include "op_checks.h"  // ATen first: the emulator's CUDA names are macros
#include "head_kernels.cuh"

#ifndef SK_EMU
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace spinalkern {
namespace dev {

#ifdef SK_EMU
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
#endif

template <typename S> struct DevType { using type = S; };
template <> struct DevType<at::Half> { using type = dev_half; };
template <> struct DevType<at::BFloat16> { using type = dev_bf16; };

template <typename T, typename S>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr<S>());
}

struct DeviceInfo {
  int sms;
  size_t max_smem;  // opt-in dynamic shared memory per block
  int major;
};

inline DeviceInfo device_info(const at::Device& device) {
#ifdef SK_EMU
  (void)device;
  return {132, 227 * 1024, 9};
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
// the kernels may use (forces the global-memory fallbacks), SPINALKERN_CUDA_TILE_M forces the
// forward row tile (32 or 64), SPINALKERN_CUDA_DW_CHUNK_ROWS the batch chunk of launch 2.
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

// ---- forward -----------------------------------------------------------------------------
// Compiled tile configs (BM rows x BN outputs per pass).  BN follows H (one pass per hidden
// layer for H in {64, 128, 256}; larger H and the output layer loop over BN chunks); BM = 64
// when the batch fills the GPU with 64-row tiles, else 32.  fp32 (SIMT) stops at BN = 128
// (a 64 x 256 SIMT tile needs ~255 registers), fp64 has one general config.
template <typename T>
int forward_bn(int H) {
  if (std::is_same_v<T, double>) return 64;
  const int max_bn = UsesTensorCores<T>::value ? 256 : 128;
  return std::min(max_bn, H <= 64 ? 64 : (H <= 128 ? 128 : 256));
}

template <typename T, class F>
void with_forward_config(int bm, int bn, F&& f) {
  using I32 = std::integral_constant<int, 32>;
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  using I256 = std::integral_constant<int, 256>;
  if constexpr (std::is_same_v<T, double>) {
    f(I32{}, I64{});
  } else {
    if (bm == 32 && bn == 64) return f(I32{}, I64{});
    if (bm == 32 && bn == 128) return f(I32{}, I128{});
    if (bm == 64 && bn == 64) return f(I64{}, I64{});
    if (bm == 64 && bn == 128) return f(I64{}, I128{});
    if constexpr (UsesTensorCores<T>::value) {
      if (bm == 32 && bn == 256) return f(I32{}, I256{});
      if (bm == 64 && bn == 256) return f(I64{}, I256{});
    }
    TORCH_CHECK(false, "spinalkern: no forward kernel for tile ", bm, "x", bn);
  }
}

template <typename T>
size_t forward_smem(int bm, int bn, int nH, bool in_smem) {
  size_t bytes = 0;
  with_forward_config<T>(bm, bn, [&](auto BM, auto BN) {
    bytes = kern::forward_smem_bytes<T, decltype(BM)::value, decltype(BN)::value>(nH, in_smem);
  });
  return bytes;
}

template <typename T>
void forward_device(const HeadDims& d, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                    const std::vector<at::Tensor>& biases, const std::optional<at::Tensor>& seed,
                    const at::Tensor& y, const at::Tensor& hidden, bool save_hidden) {
  using S = typename std::conditional_t<std::is_same_v<T, dev_half>, at::Half,
            std::conditional_t<std::is_same_v<T, dev_bf16>, at::BFloat16, T>>;
  const DeviceInfo info = device_info(x.device());
  const int nH = d.n * d.H;
  const bool is_f64 = std::is_same_v<T, double>;
  const int bn = forward_bn<T>(d.H);
  int bm = 32;
  if (!is_f64) {
    const int64_t forced = env_int("SPINALKERN_CUDA_TILE_M", 0);
    bm = (forced == 32 || forced == 64) ? (int)forced
                                        : (kern::cdiv(d.B, 64) >= 2 * info.sms ? 64 : 32);
  }
  const size_t budget = smem_budget(info);
  bool in_smem = true;
  if (bm == 64 && forward_smem<T>(64, bn, nH, true) > budget) bm = 32;
  if (forward_smem<T>(bm, bn, nH, true) > budget) in_smem = false;
  const size_t smem = forward_smem<T>(bm, bn, nH, in_smem);
  TORCH_CHECK(smem <= info.max_smem, "spinalkern: forward needs ", smem,
              " bytes of shared memory, the device allows ", info.max_smem);

  kern::ForwardParams<T> p{};
  p.x = ptr<const T, S>(x);
  for (int L = 0; L <= d.n; ++L) {
    p.w[L] = ptr<const T, S>(weights[L]);
    p.b[L] = ptr<const T, S>(biases[L]);
  }
  p.seed = d.dropout ? seed->data_ptr<int64_t>() : nullptr;
  p.y = ptr<T, S>(y);
  p.hidden = save_hidden ? ptr<T, S>(hidden) : nullptr;
  at::Tensor hscratch;
  if (!in_smem) {
    // the hidden tile does not fit in shared memory: keep it in global memory (the hidden
    // output itself when it is saved)
    if (save_hidden) {
      p.hglobal = p.hidden;
    } else {
      hscratch = at::empty({d.B, (int64_t)nH}, x.options());
      p.hglobal = ptr<T, S>(hscratch);
    }
  }
  p.d = d;
  const sk_stream_t stream = current_stream(x.device());
  with_forward_config<T>(bm, bn, [&](auto BM, auto BN) {
    constexpr int kBM = decltype(BM)::value, kBN = decltype(BN)::value;
    auto kfn = kern::head_forward_kernel<T, kBM, kBN>;
    prepare_launch(kfn, smem);
    SK_LAUNCH(kfn, dim3(kern::cdiv(d.B, kBM)), dim3(kern::kThreads), smem, stream, p);
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

// ---- backward ----------------------------------------------------------------------------
constexpr int kChainBM = 32, kChainBN = 128;  // launch 1 tile: rows x du columns per pass
constexpr int kDwBM = 64, kDwBN = 64;         // launch 2 tile of dW_L: out x in features

template <typename T>
void backward_device(const HeadDims& d, const at::Tensor& grad_y, const at::Tensor& x,
                     const std::vector<at::Tensor>& weights, const at::Tensor& hidden,
                     const std::optional<at::Tensor>& seed, const at::Tensor& grad_x,
                     const at::Tensor& grad_params) {
  using S = typename std::conditional_t<std::is_same_v<T, dev_half>, at::Half,
            std::conditional_t<std::is_same_v<T, dev_bf16>, at::BFloat16, T>>;
  using A = acc_t<T>;
  const at::ScalarType acc_dtype = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  const DeviceInfo info = device_info(x.device());
  const int nH = d.n * d.H;

  kern::BackwardParams<T> p{};
  p.grad_y = ptr<const T, S>(grad_y);
  p.x = ptr<const T, S>(x);
  for (int L = 0; L <= d.n; ++L) p.w[L] = ptr<const T, S>(weights[L]);
  p.hidden = ptr<const T, S>(hidden);
  p.seed = d.dropout ? seed->data_ptr<int64_t>() : nullptr;
  const at::Tensor dz = at::empty({d.B, (int64_t)nH}, x.options());
  p.dz = ptr<T, S>(dz);
  p.grad_x = ptr<T, S>(grad_x);
  at::Tensor gx_acc;
  if (std::is_same_v<T, A>) {
    p.gx_acc = reinterpret_cast<A*>(p.grad_x);
  } else {
    gx_acc = at::empty({d.B, d.D}, x.options().dtype(acc_dtype));
    p.gx_acc = reinterpret_cast<A*>(gx_acc.data_ptr());
  }
  // launch 1: dh of a row tile in shared memory when it fits
  size_t chain_smem = kern::chain_smem_bytes<T, kChainBM, kChainBN>(nH, true);
  at::Tensor dh_global;
  if (chain_smem > smem_budget(info)) {
    chain_smem = kern::chain_smem_bytes<T, kChainBM, kChainBN>(nH, false);
    dh_global = at::empty({d.B, (int64_t)nH}, x.options().dtype(acc_dtype));
    p.dh_global = reinterpret_cast<A*>(dh_global.data_ptr());
  }
  // launch 2: enough (tile, chunk) blocks to fill the GPU about four times over
  int tiles = 0;
  for (int L = 0; L <= d.n; ++L) {
    const LayerInfo li = layer_info(d, L);
    tiles += kern::cdiv(li.N, kDwBM) * kern::cdiv(li.K, kDwBN);
  }
  int chunk_rows = (int)std::min<int64_t>(env_int("SPINALKERN_CUDA_DW_CHUNK_ROWS", 0), d.B);
  if (chunk_rows <= 0) {
    const int want = std::max(1, std::min(kern::cdiv(4 * info.sms, tiles), kern::cdiv(d.B, 64)));
    chunk_rows = kern::cdiv(kern::cdiv(d.B, want), kern::kBK) * kern::kBK;
  }
  chunk_rows = std::max(chunk_rows, kern::cdiv(d.B, 65535));  // gridDim.y limit
  p.chunk_rows = chunk_rows;
  p.chunks = kern::cdiv(d.B, chunk_rows);
  p.num_params = grad_params.numel();
  const at::Tensor partials = at::empty({p.chunks, p.num_params}, x.options().dtype(acc_dtype));
  p.partials = reinterpret_cast<A*>(partials.data_ptr());
  p.grad_params = ptr<T, S>(grad_params);
  p.d = d;

  const sk_stream_t stream = current_stream(x.device());
  {
    auto kfn = kern::head_backward_chain_kernel<T, kChainBM, kChainBN>;
    prepare_launch(kfn, chain_smem);
    SK_LAUNCH(kfn, dim3(kern::cdiv(d.B, kChainBM)), dim3(kern::kThreads), chain_smem, stream, p);
    launch_check();
  }
  {
    auto kfn = kern::head_backward_dw_kernel<T, kDwBM, kDwBN>;
    const size_t smem = kern::dw_smem_bytes<T, kDwBM, kDwBN>();
    prepare_launch(kfn, smem);
    SK_LAUNCH(kfn, dim3(tiles, p.chunks), dim3(kern::kThreads), smem, stream, p);
    launch_check();
  }
  {
    auto kfn = kern::head_backward_reduce_kernel<T>;
    const int blocks = (int)std::min<int64_t>((p.num_params + kern::kThreads - 1) / kern::kThreads,
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

}  // namespace dev
}  // namespace spinalkern
