// Argument checks shared by every implementation of the ops (CPU, CUDA, emulator).
// Shape/value problems raise ValueError (TORCH_CHECK_VALUE), dtype problems TypeError
// (TORCH_CHECK_TYPE), always naming the argument.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <string>
#include <vector>

#include "head_layout.h"

namespace spinalkern {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

// Checks x and weights and returns the head's sizes (dropout fields filled from p).
inline HeadDims check_head_args(const char* op, const at::Tensor& x, at::TensorList weights,
                                const std::optional<at::Tensor>& seed, int64_t kind,
                                int64_t num_splits, double dropout) {
  TORCH_CHECK_VALUE(kind == kSpinal || kind == kProgressive, op,
                    ": kind must be 0 (spinal) or 1 (progressive), got ", kind);
  TORCH_CHECK_VALUE(weights.size() >= 2, op,
                    ": weights must hold at least one hidden layer and the output layer, got ",
                    weights.size(), " tensors");
  const int64_t n = (int64_t)weights.size() - 1;
  TORCH_CHECK_VALUE(n <= kMaxLayers, op, ": at most ", kMaxLayers, " hidden layers, got ", n);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (batch, in_features), got shape ",
                    shape_str(x));
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op,
                   ": x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(num_splits > 0, op, ": num_splits must be positive, got ", num_splits);
  TORCH_CHECK_VALUE(kind == kSpinal || num_splits == 1, op,
                    ": num_splits applies to the spinal head only, got ", num_splits,
                    " for the progressive head");
  TORCH_CHECK_VALUE(num_splits <= n, op, ": num_splits (", num_splits,
                    ") must not exceed num_layers (", n, "): layer i reads segment i mod "
                    "num_splits, so ", num_splits - n, " of the ", num_splits,
                    " segments of x would never be read");
  const int64_t D = x.size(1);
  TORCH_CHECK_VALUE(D > 0, op, ": x must have at least one feature, got shape ", shape_str(x));
  TORCH_CHECK_VALUE(D % num_splits == 0, op, ": in_features of x (", D,
                    ") must be divisible by num_splits (", num_splits, ")");
  for (size_t L = 0; L < weights.size(); ++L) {
    TORCH_CHECK_VALUE(weights[L].dim() == 2, op, ": weights[", L, "] must be 2-D, got shape ",
                      shape_str(weights[L]));
  }
  TORCH_CHECK_VALUE(weights[0].size(0) > 0 && weights[n].size(0) > 0, op,
                    ": hidden and output widths must be positive");
  TORCH_CHECK_VALUE(x.size(0) <= INT32_MAX && D <= INT32_MAX && weights[0].size(0) <= INT32_MAX &&
                        weights[n].size(0) <= INT32_MAX, op, ": sizes must fit in 32 bits");
  HeadDims d{};
  d.kind = (int)kind;
  d.B = (int)x.size(0);
  d.D = (int)D;
  d.S = (int)num_splits;
  d.seg = (int)(D / num_splits);
  d.H = (int)weights[0].size(0);
  d.n = (int)n;
  d.C = (int)weights[n].size(0);
  TORCH_CHECK_VALUE((int64_t)d.n * d.H <= INT32_MAX / 2, op, ": n * H too large");
  for (int L = 0; L <= d.n; ++L) {
    const LayerInfo li = layer_info(d, L);
    const at::Tensor& w = weights[L];
    TORCH_CHECK_VALUE(w.size(0) == li.N && w.size(1) == li.K, op, ": weights[", L,
                      "] has shape ", shape_str(w), ", expected (", li.N, ", ", li.K, ")");
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), op, ": weights[", L, "] has dtype ",
                     w.scalar_type(), " but x has ", x.scalar_type(),
                     "; the fused heads compute in one dtype (use torch.autocast)");
    TORCH_CHECK_VALUE(w.device() == x.device(), op, ": weights[", L, "] is on ", w.device(),
                      " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout < 1.0, op, ": dropout must be in [0, 1), got ",
                    dropout);
  d.dropout = dropout > 0.0;
  d.threshold = keep_threshold(dropout);
  d.scale = 1.0 / (1.0 - dropout);
  if (d.dropout) {
    TORCH_CHECK_VALUE(seed.has_value() && seed->defined(), op,
                      ": seed is required when dropout > 0");
    TORCH_CHECK_VALUE(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                      ": seed must be a one-element int64 tensor, got dtype ",
                      seed->scalar_type(), " with ", seed->numel(), " elements");
    TORCH_CHECK_VALUE(seed->device() == x.device(), op, ": seed is on ", seed->device(),
                      " but x is on ", x.device());
  }
  return d;
}

inline void check_biases(const char* op, const at::Tensor& x, at::TensorList weights,
                         at::TensorList biases) {
  TORCH_CHECK_VALUE(biases.size() == weights.size(), op, ": got ", weights.size(),
                    " weights but ", biases.size(), " biases");
  for (size_t L = 0; L < biases.size(); ++L) {
    const at::Tensor& b = biases[L];
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weights[L].size(0), op, ": biases[", L,
                      "] has shape ", shape_str(b), ", expected (", weights[L].size(0), ",)");
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), op, ": biases[", L, "] has dtype ",
                     b.scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device(), op, ": biases[", L, "] is on ", b.device(),
                      " but x is on ", x.device());
  }
}

inline void check_backward_tensors(const char* op, const HeadDims& d, const at::Tensor& x,
                                   const at::Tensor& grad_y, const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == d.B && grad_y.size(1) == d.C, op,
                    ": grad_y has shape ", shape_str(grad_y), ", expected (", d.B, ", ", d.C,
                    ")");
  TORCH_CHECK_VALUE(hidden.dim() == 2 && hidden.size(0) == d.B &&
                        hidden.size(1) == (int64_t)d.n * d.H, op,
                    ": hidden has shape ", shape_str(hidden), ", expected (", d.B, ", ",
                    (int64_t)d.n * d.H, ") (the forward must run with save_hidden=True)");
  for (const auto& pr : {std::make_pair("grad_y", &grad_y), std::make_pair("hidden", &hidden)}) {
    TORCH_CHECK_TYPE(pr.second->scalar_type() == x.scalar_type(), op, ": ", pr.first,
                     " has dtype ", pr.second->scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK_VALUE(pr.second->device() == x.device(), op, ": ", pr.first, " is on ",
                      pr.second->device(), " but x is on ", x.device());
  }
}

// ---- the BatchNorm ops (the spinal head only) ---------------------------------------------
// Statistics, gamma/beta and their gradients are in the accumulation dtype: float64 for
// float64 x, else float32.
inline at::ScalarType bn_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bn_batch(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.size(0) >= 2, op, ": training-mode BatchNorm needs more than 1 row per "
                    "batch (the batch variance of one row is undefined), got x of shape ",
                    shape_str(x));
}

// bn_weights / bn_biases: n (H,) tensors each, or both empty (affine=False).
inline void check_bn_params(const char* op, const HeadDims& d, const at::Tensor& x,
                            at::TensorList bn_weights, const at::TensorList* bn_biases) {
  const at::ScalarType acc = bn_acc_dtype(x);
  std::vector<std::pair<const char*, at::TensorList>> lists{{"bn_weights", bn_weights}};
  if (bn_biases) lists.emplace_back("bn_biases", *bn_biases);
  for (const auto& [name, ts] : lists) {
    TORCH_CHECK_VALUE(ts.size() == 0 || (int64_t)ts.size() == d.n, op, ": ", name, " must hold ",
                      d.n, " tensors (one per hidden layer) or none (affine=False), got ",
                      ts.size());
    for (size_t i = 0; i < ts.size(); ++i) {
      TORCH_CHECK_VALUE(ts[i].dim() == 1 && ts[i].size(0) == d.H, op, ": ", name, "[", i,
                        "] has shape ", shape_str(ts[i]), ", expected (", d.H, ",)");
      TORCH_CHECK_TYPE(ts[i].scalar_type() == acc, op, ": ", name, "[", i, "] has dtype ",
                       ts[i].scalar_type(), ", expected ", acc, " (BatchNorm parameters stay in ",
                       acc, " for ", x.scalar_type(), " x)");
      TORCH_CHECK_VALUE(ts[i].device() == x.device(), op, ": ", name, "[", i, "] is on ",
                        ts[i].device(), " but x is on ", x.device());
    }
  }
  if (bn_biases)
    TORCH_CHECK_VALUE(bn_weights.size() == bn_biases->size(), op, ": got ", bn_weights.size(),
                      " bn_weights but ", bn_biases->size(),
                      " bn_biases (both n, or both empty for affine=False)");
}

// Every check of head_bn_forward; returns the head's sizes.
inline HeadDims check_bn_forward_args(const char* op, const at::Tensor& x, at::TensorList weights,
                                      at::TensorList biases, at::TensorList bn_weights,
                                      at::TensorList bn_biases,
                                      const std::optional<at::Tensor>& seed, int64_t num_splits,
                                      double dropout, double eps) {
  const HeadDims d = check_head_args(op, x, weights, seed, kSpinal, num_splits, dropout);
  check_biases(op, x, weights, biases);
  check_bn_batch(op, x);
  check_bn_params(op, d, x, bn_weights, &bn_biases);
  TORCH_CHECK_VALUE(eps > 0.0, op, ": eps must be positive, got ", eps);
  return d;
}

// Every check of head_bn_backward; returns the head's sizes.
inline HeadDims check_bn_backward_args(const char* op, const at::Tensor& grad_y,
                                       const at::Tensor& x, at::TensorList weights,
                                       at::TensorList bn_weights, const at::Tensor& hidden,
                                       const at::Tensor& z, const at::Tensor& stats,
                                       const std::optional<at::Tensor>& seed, int64_t num_splits,
                                       double dropout) {
  const HeadDims d = check_head_args(op, x, weights, seed, kSpinal, num_splits, dropout);
  check_backward_tensors(op, d, x, grad_y, hidden);
  check_bn_batch(op, x);
  check_bn_params(op, d, x, bn_weights, nullptr);
  TORCH_CHECK_VALUE(z.sizes() == hidden.sizes(), op, ": z has shape ", shape_str(z),
                    ", expected ", shape_str(hidden),
                    " (the forward must run with save_for_backward=True)");
  TORCH_CHECK_TYPE(z.scalar_type() == x.scalar_type(), op, ": z has dtype ", z.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(z.device() == x.device(), op, ": z is on ", z.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == d.n && stats.size(1) == 3 &&
                        stats.size(2) == d.H, op, ": stats has shape ", shape_str(stats),
                    ", expected (", d.n, ", 3, ", d.H, ")");
  TORCH_CHECK_TYPE(stats.scalar_type() == bn_acc_dtype(x), op, ": stats has dtype ",
                   stats.scalar_type(), ", expected ", bn_acc_dtype(x));
  TORCH_CHECK_VALUE(stats.device() == x.device(), op, ": stats is on ", stats.device(),
                    " but x is on ", x.device());
  return d;
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace spinalkern
