// CUDA implementation of spinalkern::cuda_head_backward: three launches (activation-gradient
// chain, per-chunk dW/db partials, fixed-order reduction), plus a packing launch for heads
// whose widths are not multiples of 16.  Kernels: head_backward_kernels.cuh.  Also the
// BatchNorm head's backward (per-layer launches, head_bn_kernels.cuh, then the same weight
// gradient launches).
#include <torch/library.h>

#include "head_launch.h"

namespace spinalkern {
namespace {

std::tuple<at::Tensor, at::Tensor> head_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    const at::Tensor& hidden, const std::optional<at::Tensor>& seed, int64_t kind,
    int64_t num_splits, double dropout) {
  return dev::head_backward<>("spinalkern::cuda_head_backward", grad_y, x, weights, hidden, seed,
                              kind, num_splits, dropout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_bn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::TensorList bn_weights, const at::Tensor& hidden, const at::Tensor& z,
    const at::Tensor& stats, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout) {
  return dev::head_bn_backward<>("spinalkern::cuda_head_bn_backward", grad_y, x, weights,
                                 bn_weights, hidden, z, stats, seed, num_splits, dropout);
}

}  // namespace
}  // namespace spinalkern

TORCH_LIBRARY_IMPL(spinalkern, CUDA, m) {
  m.impl("cuda_head_backward", &spinalkern::head_backward_cuda);
  m.impl("cuda_head_bn_backward", &spinalkern::head_bn_backward_cuda);
}
