// CUDA implementation of spinalkern::cuda_head_backward: three launches (activation-gradient
// chain, per-chunk dW/db partials, fixed-order reduction), plus a packing launch for heads
// whose widths are not multiples of 16.  Kernels: head_backward_kernels.cuh.
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

}  // namespace
}  // namespace spinalkern

TORCH_LIBRARY_IMPL(spinalkern, CUDA, m) {
  m.impl("cuda_head_backward", &spinalkern::head_backward_cuda);
}
