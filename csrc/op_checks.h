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

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace spinalkern
