// Small helper kernels: packing operands into the padded layout of the main kernels (only for
// heads whose seg or H is not a multiple of 16, or misaligned tensors), and the dropout mask
// (a testing aid).
#pragma once

#include "head_params.h"

namespace spinalkern {
namespace kern {

// blockIdx.y = job: dst[r][padded column] = src[r][natural column], zero in the padding.
template <typename T>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads) pack_kernel(SK_GRID_CONSTANT const PackParams<T> p) {
  const PackJob<T>& jb = p.job[blockIdx.y];
  const int pa = pad16(jb.wa), pb = pad16(jb.wb);
  const int cols = jb.a * jb.wa + jb.b * jb.wb, cols_pad = jb.a * pa + jb.b * pb;
  const int64_t total = jb.rows * cols_pad, stride = (int64_t)gridDim.x * kThreads;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / cols_pad;
    const int c = (int)(i - r * cols_pad);
    int src = -1;
    if (c < jb.a * pa) {
      const int blk = c / pa, j = c - blk * pa;
      if (j < jb.wa) src = blk * jb.wa + j;
    } else {
      const int cc = c - jb.a * pa, blk = cc / pb, j = cc - blk * pb;
      if (j < jb.wb) src = jb.a * jb.wa + blk * jb.wb + j;
    }
    jb.dst[i] = src >= 0 ? jb.src[r * cols + src] : from_acc<T>(acc_t<T>(0));
  }
}

// Every keep bit of the op: blockIdx.y = mask stream s, one thread per 32-column word.
template <typename Unused = void>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    dropout_mask_kernel(const int64_t* seed, HeadDims d, uint32_t* masks) {
  const uint64_t key = (uint64_t)seed[0];
  const int s = (int)blockIdx.y, words = mask_words(d, s), width = mask_width(d, s);
  const int stream = d.kind == kSpinal ? s : 0;
  uint32_t* out = masks + mask_offset(d, s);
  const int64_t total = (int64_t)d.B * words, stride = (int64_t)gridDim.x * kThreads;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < total; i += stride) {
    const int row = (int)(i / words), c0 = (int)(i - (int64_t)row * words) * 32;
    uint32_t w = 0;
    for (int b = 0; b < 32 && c0 + b < width; ++b)
      w |= (uint32_t)keep_element(key, c0 + b, row, stream, d.threshold) << b;
    out[i] = w;
  }
}

// Testing aid: the dropout keep-mask of one stream, (rows, cols).  (A template only so that
// the header can be included by several translation units.)
template <typename Unused = void>
SK_GLOBAL void SK_LAUNCH_BOUNDS(kThreads)
    keep_mask_kernel(const int64_t* seed, int stream, int rows, int cols, uint32_t threshold,
                     bool* out) {
  const uint64_t s = (uint64_t)seed[0];
  const int64_t total = (int64_t)rows * cols;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < total; i += stride)
    out[i] = keep_element(s, (int)(i % cols), (int)(i / cols), stream, threshold);
}

}  // namespace kern
}  // namespace spinalkern
