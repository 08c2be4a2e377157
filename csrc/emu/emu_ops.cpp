// The CUDA ops compiled for the CPU emulator (SK_EMU): the same host logic (head_launch.h) and
// kernels (head_*kernel*.cuh) as spinal_head_{forward,backward}.cu, registered on CPU tensors as
// spinalkern::emu_head_{forward, backward, bn_forward, bn_backward} (the ops of the test backend
// "emu", see tests/conftest.py) and the tools spinalkern_emu::{keep_mask, launch_plan, set_fault}
// (fault injection, see cuda_emu.h).  Built on demand by the tests
// (torch.utils.cpp_extension.load); never shipped.
#include <torch/library.h>

#define SK_EMU 1
#include "../head_launch.h"
#include "../op_schemas.h"

namespace {

std::tuple<at::Tensor, at::Tensor> emu_forward(const at::Tensor& x, at::TensorList weights,
                                               at::TensorList biases,
                                               const std::optional<at::Tensor>& seed,
                                               int64_t kind, int64_t num_splits,
                                               double dropout, bool save_hidden) {
  return spinalkern::dev::head_forward<>("spinalkern::emu_head_forward", x, weights, biases,
                                         seed, kind, num_splits, dropout, save_hidden);
}

std::tuple<at::Tensor, at::Tensor> emu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                at::TensorList weights,
                                                const at::Tensor& hidden,
                                                const std::optional<at::Tensor>& seed,
                                                int64_t kind, int64_t num_splits,
                                                double dropout) {
  return spinalkern::dev::head_backward<>("spinalkern::emu_head_backward", grad_y, x, weights,
                                          hidden, seed, kind, num_splits, dropout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emu_bn_forward(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
    at::TensorList bn_biases, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout, double eps, bool save_for_backward) {
  return spinalkern::dev::head_bn_forward<>("spinalkern::emu_head_bn_forward", x, weights, biases,
                                            bn_weights, bn_biases, seed, num_splits, dropout, eps,
                                            save_for_backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emu_bn_backward(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::TensorList bn_weights, const at::Tensor& hidden, const at::Tensor& z,
    const at::Tensor& stats, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout) {
  return spinalkern::dev::head_bn_backward<>("spinalkern::emu_head_bn_backward", grad_y, x,
                                             weights, bn_weights, hidden, z, stats, seed,
                                             num_splits, dropout);
}

at::Tensor emu_keep_mask(const at::Tensor& seed, int64_t stream, int64_t rows, int64_t cols,
                         double p) {
  return spinalkern::dev::keep_mask<>("spinalkern_emu::keep_mask", seed, stream, rows, cols, p);
}

std::string emu_launch_plan(int64_t kind, int64_t B, int64_t D, int64_t H, int64_t n, int64_t C,
                            int64_t S, at::ScalarType dtype, double dropout, int64_t sms,
                            int64_t max_smem) {
  return spinalkern::dev::launch_plan<>(kind, B, D, H, n, C, S, dtype, dropout, sms, max_smem);
}

void emu_set_fault(const std::string& name) { sk_emu::set_fault(name); }

}  // namespace

// The head ops: the same schemas as every backend's, in spinalkern's namespace, so that the
// tests give them the shared fake and autograd implementations (spinalkern.ops) and run the
// conformance suite on them as the backend "emu".
TORCH_LIBRARY_FRAGMENT(spinalkern, m) {
  m.def("emu_head_forward" SK_HEAD_FORWARD_SCHEMA);
  m.def("emu_head_backward" SK_HEAD_BACKWARD_SCHEMA);
  m.def("emu_head_bn_forward" SK_HEAD_BN_FORWARD_SCHEMA);
  m.def("emu_head_bn_backward" SK_HEAD_BN_BACKWARD_SCHEMA);
}

TORCH_LIBRARY_IMPL(spinalkern, CPU, m) {
  m.impl("emu_head_forward", &emu_forward);
  m.impl("emu_head_backward", &emu_backward);
  m.impl("emu_head_bn_forward", &emu_bn_forward);
  m.impl("emu_head_bn_backward", &emu_bn_backward);
}

// Emulator tools
TORCH_LIBRARY(spinalkern_emu, m) {
  m.def("keep_mask" SK_KEEP_MASK_SCHEMA);
  m.def("launch_plan" SK_LAUNCH_PLAN_SCHEMA, &emu_launch_plan);
  m.def("set_fault(str name) -> ()", &emu_set_fault);
}

TORCH_LIBRARY_IMPL(spinalkern_emu, CPU, m) {
  m.impl("keep_mask", &emu_keep_mask);
}
