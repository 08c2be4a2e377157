// What the kernels need from CUDA, spelled so that the same kernel source also compiles as
// plain C++ against the CPU emulator in csrc/emu/cuda_emu.h (SK_EMU), which is how the
// kernels' indexing, tiling, asynchronous copies and synchronisation are tested on machines
// without a GPU.
//
// Besides the launch/shared-memory macros, three families of primitives (sm_80+):
//   cp_async16 / cp_async_commit / cp_async_wait<N>   16-byte global -> shared copies
//        (cp.async.cg, the LDGSTS instruction) with zero-fill of the bytes past src_bytes,
//        grouped into commit groups; wait<N> returns once at most N groups of this thread
//        are still in flight.  The data is visible to other threads only after a barrier.
//   ldsm_x{2,4}[_trans]                                 warp-collective 8x8 b16 fragment loads
//        from shared memory (ldmatrix, the LDSM instruction): lane 8q+i gives the address
//        of row i of matrix q; lane l receives row l/4, elements 2(l%4) and 2(l%4)+1 of each
//        matrix (with _trans: column l/4, rows 2(l%4) and 2(l%4)+1).
//   mma16816<T>                                         warp-collective D += A * B on the
//        tensor cores, A 16x16 (4 registers), B 16x8 (2 registers), fp32 C/D (4 values),
//        T = dev_half or dev_bf16 (mma.sync.aligned.m16n8k16.row.col, the HMMA instruction).
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16".
#pragma once

#include <cstdint>

#ifdef SK_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define SK_DEV __device__ __forceinline__
#define SK_GLOBAL __global__
#define SK_LAUNCH_BOUNDS(n) __launch_bounds__(n, 1)
#define SK_GRID_CONSTANT __grid_constant__
#define SK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define SK_LAUNCH(kfn, grid, block, smem, stream, ...) \
  kfn<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)

namespace spinalkern {
using dev_half = __half;
using dev_bf16 = __nv_bfloat16;
using sk_stream_t = cudaStream_t;

SK_DEV uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

SK_DEV void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
SK_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
SK_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

SK_DEV void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
SK_DEV void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
SK_DEV void ldsm_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
SK_DEV void ldsm_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

template <typename T>
SK_DEV void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
SK_DEV void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
SK_DEV void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                    const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
}  // namespace spinalkern
#endif

namespace spinalkern {

// Accumulation type: fp32 for fp32/fp16/bf16, fp64 for fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

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
