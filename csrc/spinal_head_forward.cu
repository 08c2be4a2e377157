// CUDA implementation of spinalkern::cuda_head_forward (one fused kernel launch per call, plus
// a packing launch for heads whose widths are not multiples of 16), of the BatchNorm head's
// forward (one launch per layer, head_bn_kernels.cuh), of the dropout-mask testing
// op, and the launch-plan op (the kernels' tile sizes and shared-memory layouts for a head,
// read by bench/check_cuda_build.py).  Kernels: head_*kernel*.cuh; host logic: head_launch.h.
#include <torch/library.h>

#include "head_launch.h"
#include "op_schemas.h"

namespace spinalkern {
namespace {

std::tuple<at::Tensor, at::Tensor> head_forward_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    const std::optional<at::Tensor>& seed, int64_t kind, int64_t num_splits, double dropout,
    bool save_hidden) {
  return dev::head_forward<>("spinalkern::cuda_head_forward", x, weights, biases, seed, kind,
                             num_splits, dropout, save_hidden);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_bn_forward_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
    at::TensorList bn_biases, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout, double eps, bool save_for_backward) {
  return dev::head_bn_forward<>("spinalkern::cuda_head_bn_forward", x, weights, biases,
                                bn_weights, bn_biases, seed, num_splits, dropout, eps,
                                save_for_backward);
}

at::Tensor keep_mask_cuda(const at::Tensor& seed, int64_t stream, int64_t rows, int64_t cols,
                          double p) {
  return dev::keep_mask<>("spinalkern::cuda_keep_mask", seed, stream, rows, cols, p);
}

std::string launch_plan(int64_t kind, int64_t B, int64_t D, int64_t H, int64_t n, int64_t C,
                        int64_t S, at::ScalarType dtype, double dropout, int64_t sms,
                        int64_t max_smem) {
  return dev::launch_plan<>(kind, B, D, H, n, C, S, dtype, dropout, sms, max_smem);
}

}  // namespace
}  // namespace spinalkern

TORCH_LIBRARY_FRAGMENT(spinalkern, m) {
  m.def("cuda_launch_plan" SK_LAUNCH_PLAN_SCHEMA,
        &spinalkern::launch_plan);
}

TORCH_LIBRARY_IMPL(spinalkern, CUDA, m) {
  m.impl("cuda_head_forward", &spinalkern::head_forward_cuda);
  m.impl("cuda_head_bn_forward", &spinalkern::head_bn_forward_cuda);
  m.impl("cuda_keep_mask", &spinalkern::keep_mask_cuda);
}
