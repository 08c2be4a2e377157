// What the kernels need from CUDA, spelled so that the same kernel source also compiles as
// plain C++ against the CPU emulator in csrc/emu/cuda_emu.h (SK_EMU), which is how the
// kernels' indexing, tiling and synchronisation are tested on machines without a GPU.
#pragma once

#ifdef SK_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#define SK_DEV __device__ __forceinline__
#define SK_GLOBAL __global__
#define SK_LAUNCH_BOUNDS(n) __launch_bounds__(n, 1)
#define SK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define SK_LAUNCH(kfn, grid, block, smem, stream, ...) \
  kfn<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define SK_SYNCWARP() __syncwarp()

namespace spinalkern {
using dev_half = __half;
using dev_bf16 = __nv_bfloat16;
namespace wmma = nvcuda::wmma;
using sk_stream_t = cudaStream_t;
}  // namespace spinalkern
#endif

namespace spinalkern {

// Accumulation type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// Element types that go through the tensor cores (WMMA, fp32 accumulation).
template <typename T> struct UsesTensorCores { static constexpr bool value = false; };
template <> struct UsesTensorCores<dev_half> { static constexpr bool value = true; };
template <> struct UsesTensorCores<dev_bf16> { static constexpr bool value = true; };

SK_DEV float to_acc(float v) { return v; }
SK_DEV double to_acc(double v) { return v; }
template <typename T> SK_DEV T from_acc(acc_t<T> v);
template <> SK_DEV float from_acc<float>(float v) { return v; }
template <> SK_DEV double from_acc<double>(double v) { return v; }
#ifdef SK_EMU
SK_DEV float to_acc(dev_half v) { return static_cast<float>(v); }
SK_DEV float to_acc(dev_bf16 v) { return static_cast<float>(v); }
template <> SK_DEV dev_half from_acc<dev_half>(float v) { return dev_half(v); }
template <> SK_DEV dev_bf16 from_acc<dev_bf16>(float v) { return dev_bf16(v); }
#else
SK_DEV float to_acc(dev_half v) { return __half2float(v); }
SK_DEV float to_acc(dev_bf16 v) { return __bfloat162float(v); }
template <> SK_DEV dev_half from_acc<dev_half>(float v) { return __float2half_rn(v); }
template <> SK_DEV dev_bf16 from_acc<dev_bf16>(float v) { return __float2bfloat16_rn(v); }
#endif

}  // namespace spinalkern
