// The op schemas, written once for C++: the extension (spinal_head.cpp, namespace spinalkern,
// ops named cuda_<name>) and the CPU emulator of the CUDA kernels (csrc/emu, ops named
// emu_<name>; its tools in namespace spinalkern_emu) define their ops from these strings.  spinalkern/ops.py holds the same
// schemas for Python (the Triton backend).
//
//   head_forward(x, weights, biases, seed, kind, num_splits, dropout, save_hidden)
//       -> (y, hidden)
//   head_backward(grad_y, x, weights, hidden, seed, kind, num_splits, dropout)
//       -> (grad_x, grad_params)
//   head_bn_forward(x, weights, biases, bn_weights, bn_biases, seed, num_splits, dropout, eps,
//                   save_for_backward) -> (y, hidden, z, stats)
//       the spinal head with training-mode BatchNorm1d after every hidden Linear
//   head_bn_backward(grad_y, x, weights, bn_weights, hidden, z, stats, seed, num_splits,
//                    dropout) -> (grad_x, grad_params, grad_bn)
//   keep_mask(seed, stream, rows, cols, p) -> the dropout keep-mask (a testing aid)
//   launch_plan(kind, B, D, H, n, C, S, dtype, dropout, sms, max_smem) -> JSON (CUDA kernels)
// Semantics: spinalkern/ops.py (docstring) and README.md, section "Ops".
#pragma once

#define SK_HEAD_FORWARD_SCHEMA                                                                \
  "(Tensor x, Tensor[] weights, Tensor[] biases, Tensor? seed, int kind, int num_splits, "    \
  "float dropout, bool save_hidden) -> (Tensor, Tensor)"
#define SK_HEAD_BACKWARD_SCHEMA                                                               \
  "(Tensor grad_y, Tensor x, Tensor[] weights, Tensor hidden, Tensor? seed, int kind, "        \
  "int num_splits, float dropout) -> (Tensor, Tensor)"
#define SK_HEAD_BN_FORWARD_SCHEMA                                                             \
  "(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] bn_weights, Tensor[] bn_biases, "   \
  "Tensor? seed, int num_splits, float dropout, float eps, bool save_for_backward) "          \
  "-> (Tensor, Tensor, Tensor, Tensor)"
#define SK_HEAD_BN_BACKWARD_SCHEMA                                                            \
  "(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] bn_weights, Tensor hidden, "          \
  "Tensor z, Tensor stats, Tensor? seed, int num_splits, float dropout) "                      \
  "-> (Tensor, Tensor, Tensor)"
#define SK_KEEP_MASK_SCHEMA "(Tensor seed, int stream, int rows, int cols, float p) -> Tensor"
#define SK_LAUNCH_PLAN_SCHEMA                                                                 \
  "(int kind, int B, int D, int H, int n, int C, int S, ScalarType dtype, float dropout, "    \
  "int sms=132, int max_smem=232448) -> str"
