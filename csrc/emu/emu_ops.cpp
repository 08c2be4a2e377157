// The CUDA ops compiled for the CPU emulator (SK_EMU): the same host logic
// (head_device_ops.h) and kernels (head_kernels.cuh) as spinal_head_{forward,backward}.cu,
// registered as spinalkern_emu::{head_forward, head_backward, keep_mask} on CPU tensors.
// Built on demand by tests/test_cuda_ext.py (torch.utils.cpp_extension.load); never shipped.
#include <torch/library.h>

#define SK_EMU 1
#include "../head_device_ops.h"

namespace {

std::tuple<at::Tensor, at::Tensor> emu_forward(const at::Tensor& x, at::TensorList weights,
                                               at::TensorList biases,
                                               const std::optional<at::Tensor>& seed,
                                               int64_t kind, int64_t num_splits,
                                               double dropout, bool save_hidden) {
  return spinalkern::dev::head_forward<>("spinalkern_emu::head_forward", x, weights, biases,
                                         seed, kind, num_splits, dropout, save_hidden);
}

std::tuple<at::Tensor, at::Tensor> emu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                at::TensorList weights,
                                                const at::Tensor& hidden,
                                                const std::optional<at::Tensor>& seed,
                                                int64_t kind, int64_t num_splits,
                                                double dropout) {
  return spinalkern::dev::head_backward<>("spinalkern_emu::head_backward", grad_y, x, weights,
                                          hidden, seed, kind, num_splits, dropout);
}

at::Tensor emu_keep_mask(const at::Tensor& seed, int64_t stream, int64_t rows, int64_t cols,
                         double p) {
  return spinalkern::dev::keep_mask<>("spinalkern_emu::keep_mask", seed, stream, rows, cols, p);
}

}  // namespace

TORCH_LIBRARY(spinalkern_emu, m) {
  m.def("head_forward(Tensor x, Tensor[] weights, Tensor[] biases, Tensor? seed, int kind, "
        "int num_splits, float dropout, bool save_hidden) -> (Tensor, Tensor)");
  m.def("head_backward(Tensor grad_y, Tensor x, Tensor[] weights, Tensor hidden, Tensor? seed, "
        "int kind, int num_splits, float dropout) -> (Tensor, Tensor)");
  m.def("keep_mask(Tensor seed, int stream, int rows, int cols, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(spinalkern_emu, CPU, m) {
  m.impl("head_forward", &emu_forward);
  m.impl("head_backward", &emu_backward);
  m.impl("keep_mask", &emu_keep_mask);
}
