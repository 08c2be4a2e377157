// CUDA implementation of spinalkern::cuda_head_forward (one fused kernel launch per call) and
// of the dropout-mask testing op.  Kernels: head_kernels.cuh; host logic: head_device_ops.h.
#include <torch/library.h>

#include "head_device_ops.h"

namespace spinalkern {
namespace {

std::tuple<at::Tensor, at::Tensor> head_forward_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    const std::optional<at::Tensor>& seed, int64_t kind, int64_t num_splits, double dropout,
    bool save_hidden) {
  return dev::head_forward<>("spinalkern::cuda_head_forward", x, weights, biases, seed, kind,
                           num_splits, dropout, save_hidden);
}

at::Tensor keep_mask_cuda(const at::Tensor& seed, int64_t stream, int64_t rows, int64_t cols,
                          double p) {
  return dev::keep_mask<>("spinalkern::cuda_keep_mask", seed, stream, rows, cols, p);
}

}  // namespace
}  // namespace spinalkern

TORCH_LIBRARY_IMPL(spinalkern, CUDA, m) {
  m.impl("cuda_head_forward", &spinalkern::head_forward_cuda);
  m.impl("cuda_keep_mask", &spinalkern::keep_mask_cuda);
}
