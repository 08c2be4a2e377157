// Autograd of spinalkern::cuda_head_forward, in C++ (registered for every device at the
// Autograd dispatch key), so that a backward runs in the C++ autograd engine without Python:
//
//   forward:  the op below autograd (CPU or CUDA kernel), then one gradient Node (a plain
//             torch::autograd::Node, HeadBackwardNode) saving x, hidden, seed, weights and
//             biases as SavedVariables (save_hidden=false: no hidden; backward recomputes it).
//   backward: spinalkern::cuda_head_backward, whose flat grad_params is handed out as views
//             (dW_L, db_L) of that one buffer.
//   backward with create_graph=True (a double backward, e.g. a gradient penalty): the same
//             gradients computed with differentiable ATen ops from a recomputed forward whose
//             hidden activations are teacher-forced to the saved ones (value h_i, derivative
//             through z_i where not h_i <= 0), then torch::autograd::grad; the C++ twin of
//             spinalkern.ops.differentiable_backward.
//
// The BatchNorm head's ops (cuda_head_bn_forward / _backward) are below, after the plain ones.
//
// spinalkern::cuda_head_backward itself is not differentiable: differentiating its outputs
// raises an error that says what to do instead.  Fake (meta) implementations are in Python
// (spinalkern/ops.py).  Nothing here synchronises with the device (CUDA-graph safe).
#include <ATen/TensorOperators.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "head_layout.h"
#include "op_checks.h"
#include "op_handles.h"

namespace spinalkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Appends dW_L (N_L, K_L) for every weight, then db_L (N_L,), as plain tensors over the flat
// grad_params buffer (made below autograd: no view tracking, as no graph is recorded here).
void append_param_grads(const at::Tensor& flat, const std::vector<at::Tensor>& weights,
                        variable_list& out) {
  at::AutoDispatchBelowADInplaceOrView below;
  const size_t first = out.size(), count = weights.size();
  out.resize(first + 2 * count);
  int64_t off = flat.storage_offset();
  for (size_t L = 0; L < count; ++L) {
    const int64_t N = weights[L].size(0), K = weights[L].size(1);
    out[first + L] = flat.as_strided({N, K}, {K, 1}, off);
    out[first + count + L] = flat.as_strided({N}, {1}, off + N * K);
    off += N * K + N;
  }
}

std::vector<SavedVariable> save_all(at::TensorList ts) {
  std::vector<SavedVariable> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.emplace_back(t, false);
  return out;
}

std::vector<at::Tensor> unpack_all(const std::vector<SavedVariable>& vs) {
  std::vector<at::Tensor> out;
  out.reserve(vs.size());
  for (const auto& v : vs) out.push_back(v.unpack());
  return out;
}

// Forward-mode AD (dual tensors) has no formula here: say so instead of dropping tangents.
void check_no_forward_grad(const char* op, const at::Tensor& x,
                           std::initializer_list<at::TensorList> lists) {
  bool dual = x._fw_grad(/*level=*/0).defined();
  for (at::TensorList ts : lists)
    for (const auto& t : ts) dual = dual || (t.defined() && t._fw_grad(/*level=*/0).defined());
  TORCH_CHECK(!dual, op, " has no forward-mode AD formula (an input is a dual tensor); "
              "differentiate it in reverse mode (backward or torch.autograd.grad)");
}

// The BatchNorm of the BN head's hidden layers in a differentiable backward: gamma_i and
// beta_i (empty for affine=False) and eps.
struct BnParams {
  std::vector<at::Tensor> gammas, betas;
  double eps = 0.0;
};

// Gradients of x, every weight and every bias of the head (then, with ``bn``, every gamma and
// beta), with differentiable ATen ops (see the top of this file).  Called with grad mode on
// (create_graph=True).
variable_list differentiable_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                      const std::vector<at::Tensor>& weights,
                                      const std::vector<at::Tensor>& biases,
                                      const at::Tensor& hidden, const at::Tensor& seed,
                                      int64_t kind, int64_t num_splits, double p,
                                      const BnParams* bn = nullptr) {
  const char* op = "spinalkern::cuda_head_forward (double backward)";
  const HeadDims d = check_head_args(op, x, weights, opt(seed), kind, num_splits, p);
  check_backward_tensors(op, d, x, grad_y, hidden);
  // differentiate with respect to x, the weights and the biases (stand-ins when they need no
  // gradient); the biases matter: layer L+1's dW depends on b_L through h_L
  variable_list inputs{x};
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  inputs.insert(inputs.end(), biases.begin(), biases.end());
  const size_t first_gamma = inputs.size();
  const size_t num_gammas = bn ? bn->gammas.size() : 0;
  if (bn) {
    inputs.insert(inputs.end(), bn->gammas.begin(), bn->gammas.end());
    inputs.insert(inputs.end(), bn->betas.begin(), bn->betas.end());
  }
  for (auto& t : inputs)
    if (!t.requires_grad()) t = t.detach().requires_grad_(true);
  const at::Tensor& xl = inputs[0];
  const int64_t B = x.size(0);

  auto drop = [&](const at::Tensor& t, int stream) {
    const at::Tensor keep = keep_mask_op().call(seed, stream, B, t.size(1), p);
    return at::where(keep, t / (1.0 - p), at::zeros_like(t));
  };
  at::Tensor x_dropped;  // progressive: x~ = drop(x), stream 0
  if (d.kind == kProgressive && d.dropout) x_dropped = drop(xl, 0);

  std::vector<at::Tensor> hs;
  at::Tensor y;
  for (int L = 0; L <= d.n; ++L) {
    const LayerInfo li = layer_info(d, L);
    std::vector<at::Tensor> parts;
    if (li.xw > 0)
      parts.push_back(li.drop_x && d.kind == kProgressive ? x_dropped
                                                          : xl.narrow(1, li.xoff, li.xw));
    if (li.hw > 0) parts.push_back(at::cat(hs, 1).narrow(1, li.hoff, li.hw));
    at::Tensor u = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
    if (d.kind == kSpinal && d.dropout) u = drop(u, li.stream);
    at::Tensor z = at::linear(u, inputs[1 + L], inputs[1 + d.n + 1 + L]);
    if (bn && L < d.n) {  // batch statistics, in the accumulation dtype (as the ops)
      const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const at::Tensor gamma = num_gammas ? inputs[first_gamma + L] : at::Tensor();
      const at::Tensor beta = num_gammas ? inputs[first_gamma + num_gammas + L] : at::Tensor();
      z = at::batch_norm(z.to(acc), gamma, beta, {}, {}, /*training=*/true, 0.0, bn->eps,
                         /*cudnn_enabled=*/false)
              .to(z.scalar_type());
    }
    if (L == d.n) {
      y = z;
    } else {
      const at::Tensor h = hidden.narrow(1, (int64_t)L * d.H, d.H);
      hs.push_back(h + (z - z.detach()) * at::logical_not(h <= 0));
    }
  }
  return torch::autograd::grad({y}, inputs, {grad_y}, /*retain_graph=*/true,
                               /*create_graph=*/true, /*allow_unused=*/true);
}

// The gradient node of one head call: a plain autograd Node holding what backward needs (a
// torch::autograd::Function would add a context dictionary, per-input metadata and a wrapper
// around every call: microseconds per call, at sizes where the call is all that costs).
// Inputs: grad_y.  Outputs (next edges): x, weights..., biases...  The saved tensors are
// SavedVariables, so modifying one in place before backward, or a second backward without
// retain_graph, raises autograd's usual errors.
struct HeadBackwardNode : public torch::autograd::Node {
  int64_t kind = 0, num_splits = 1;
  double dropout = 0.0;
  bool save_hidden = true;  // false: hidden is recomputed from the inputs in backward
  SavedVariable x, hidden, seed;
  std::vector<SavedVariable> weights, biases;

  std::string name() const override { return "SpinalkernHeadBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&x, &hidden, &seed}) v->reset_data();
    for (auto& v : weights) v.reset_data();
    for (auto& v : biases) v.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad_y = grads[0];
    const size_t num_grads = 1 + weights.size() + biases.size();
    variable_list out;
    if (!grad_y.defined()) {  // y did not reach the loss: no gradients
      out.resize(num_grads);
      return out;
    }
    const bool create_graph = at::GradMode::is_enabled();
    const at::Tensor x_ = x.unpack(), seed_ = seed.unpack();
    const std::vector<at::Tensor> ws = unpack_all(weights);
    // the biases: to recompute hidden, and for a differentiable backward
    const std::vector<at::Tensor> bs =
        save_hidden && !create_graph ? std::vector<at::Tensor>() : unpack_all(biases);
    at::Tensor hidden_;
    if (save_hidden) {
      hidden_ = hidden.unpack();
    } else {  // recompute hidden from the inputs (no graph: hidden is not differentiated)
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below;
      hidden_ = std::get<1>(forward_op().call(x_, ws, bs, opt(seed_), kind, num_splits, dropout,
                                              true));
    }
    if (create_graph)
      return differentiable_backward(grad_y, x_, ws, bs, hidden_, seed_, kind, num_splits,
                                     dropout);
    auto [grad_x, flat] = backward_op().call(grad_y, x_, ws, hidden_, opt(seed_), kind,
                                             num_splits, dropout);
    out.reserve(num_grads);
    out.push_back(grad_x);
    append_param_grads(flat, ws, out);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> head_forward_autograd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    const std::optional<at::Tensor>& seed, int64_t kind, int64_t num_splits, double dropout,
    bool save_hidden) {
  const bool record = torch::autograd::compute_requires_grad(x, weights, biases);
  check_no_forward_grad("spinalkern::cuda_head_forward", x, {weights, biases});
  at::Tensor y, hidden;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(y, hidden) = forward_op().call(x, weights, biases, seed, kind, num_splits,
                                            dropout, save_hidden);
  }
  if (!record) return {y, hidden};
  auto node = std::shared_ptr<HeadBackwardNode>(new HeadBackwardNode(),
                                                torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(x, weights, biases));
  node->kind = kind;
  node->num_splits = num_splits;
  node->dropout = dropout;
  node->save_hidden = save_hidden;
  node->x = SavedVariable(x, false);
  if (save_hidden) node->hidden = SavedVariable(hidden, false);
  if (seed.has_value()) node->seed = SavedVariable(*seed, false);
  node->weights = save_all(weights);
  node->biases = save_all(biases);
  torch::autograd::set_history(y, node);  // hidden is not differentiable: no history
  return {y, hidden};
}

// The backward op's own autograd: it has no derivative; differentiating it raises.
struct HeadBackwardNotDifferentiable
    : public torch::autograd::Function<HeadBackwardNotDifferentiable> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y,
                               const at::Tensor& x, at::TensorList weights,
                               const at::Tensor& hidden, const std::optional<at::Tensor>& seed,
                               int64_t kind, int64_t num_splits, double dropout) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_params] =
        backward_op().call(grad_y, x, weights, hidden, seed, kind, num_splits, dropout);
    return {grad_x, grad_params};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false,
                "spinalkern::cuda_head_backward is not differentiable; to differentiate a "
                "gradient (create_graph=True), differentiate through "
                "spinalkern::cuda_head_forward, whose backward is then computed with "
                "differentiable ops");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor> head_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    const at::Tensor& hidden, const std::optional<at::Tensor>& seed, int64_t kind,
    int64_t num_splits, double dropout) {
  bool requires_grad = grad_y.requires_grad() || x.requires_grad() || hidden.requires_grad();
  for (const auto& w : weights) requires_grad = requires_grad || w.requires_grad();
  if (at::GradMode::is_enabled() && requires_grad) {
    variable_list out = HeadBackwardNotDifferentiable::apply(grad_y, x, weights, hidden, seed,
                                                             kind, num_splits, dropout);
    return {out[0], out[1]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(grad_y, x, weights, hidden, seed, kind, num_splits, dropout);
}

// ---- the BatchNorm head (spinalkern::cuda_head_bn_forward) -----------------------------------
// forward:  the op below autograd, always with save_for_backward=true when a graph is recorded
//           (hidden, z and stats are what the backward needs; hidden and z are handed out only
//           when the caller asked for them); saves x, hidden, z, stats, seed, the weights and
//           gamma (and, for a differentiable backward, the biases and betas).
// backward: spinalkern::cuda_head_bn_backward; dW_L, db_L are views of its flat grad_params,
//           dgamma_i / dbeta_i views of grad_bn.  With create_graph=True, the same gradients
//           from differentiable ATen ops (differentiable_backward with batch_norm in training
//           mode, hidden teacher-forced), as for the plain head.
struct BnHeadBackwardNode : public torch::autograd::Node {
  int64_t num_splits = 1;
  double dropout = 0.0, eps = 0.0;
  SavedVariable x, hidden, z, stats, seed;
  // weights and gammas for the backward op; biases and betas for a differentiable backward
  std::vector<SavedVariable> weights, gammas, biases, betas;

  std::string name() const override { return "SpinalkernBnHeadBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&x, &hidden, &z, &stats, &seed}) v->reset_data();
    for (auto* list : {&weights, &gammas, &biases, &betas})
      for (auto& v : *list) v.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad_y = grads[0];
    // x, weights, biases, gammas, betas
    const size_t num_grads = 1 + 2 * weights.size() + 2 * gammas.size();
    variable_list out;
    if (!grad_y.defined()) {  // y did not reach the loss: no gradients
      out.resize(num_grads);
      return out;
    }
    const at::Tensor x_ = x.unpack(), hidden_ = hidden.unpack(), seed_ = seed.unpack();
    const std::vector<at::Tensor> ws = unpack_all(weights), gs = unpack_all(gammas);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      BnParams bn{gs, unpack_all(betas), eps};
      return differentiable_backward(grad_y, x_, ws, unpack_all(biases), hidden_, seed_,
                                     /*kind=*/0, num_splits, dropout, &bn);
    }
    auto [grad_x, flat, grad_bn] = bn_backward_op().call(grad_y, x_, ws, gs, hidden_,
                                                         z.unpack(), stats.unpack(),
                                                         opt(seed_), num_splits, dropout);
    out.reserve(num_grads);
    out.push_back(grad_x);
    append_param_grads(flat, ws, out);
    for (int part : {0, 1})  // dgamma_i, then dbeta_i
      for (size_t i = 0; i < gs.size(); ++i) out.push_back(grad_bn[i][part]);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_bn_forward_autograd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
    at::TensorList bn_biases, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout, double eps, bool save_for_backward) {
  const bool record =
      torch::autograd::compute_requires_grad(x, weights, biases, bn_weights, bn_biases);
  check_no_forward_grad("spinalkern::cuda_head_bn_forward", x,
                        {weights, biases, bn_weights, bn_biases});
  at::Tensor y, hidden, z, stats;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    // a recorded graph needs hidden, z and stats in backward, whatever the caller asked for
    std::tie(y, hidden, z, stats) =
        bn_forward_op().call(x, weights, biases, bn_weights, bn_biases, seed, num_splits,
                             dropout, eps, save_for_backward || record);
  }
  if (!record) return {y, hidden, z, stats};
  auto node = std::shared_ptr<BnHeadBackwardNode>(new BnHeadBackwardNode(),
                                                  torch::autograd::deleteNode);
  node->set_next_edges(
      torch::autograd::collect_next_edges(x, weights, biases, bn_weights, bn_biases));
  node->num_splits = num_splits;
  node->dropout = dropout;
  node->eps = eps;
  node->x = SavedVariable(x, false);
  node->hidden = SavedVariable(hidden, false);
  node->z = SavedVariable(z, false);
  node->stats = SavedVariable(stats, false);
  if (seed.has_value()) node->seed = SavedVariable(*seed, false);
  node->weights = save_all(weights);
  node->gammas = save_all(bn_weights);
  node->biases = save_all(biases);
  node->betas = save_all(bn_biases);
  torch::autograd::set_history(y, node);  // hidden, z and stats are not differentiable
  if (!save_for_backward) hidden = z = at::empty({0}, x.options());
  return {y, hidden, z, stats};
}

struct BnBackwardNotDifferentiable
    : public torch::autograd::Function<BnBackwardNotDifferentiable> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_y,
                               const at::Tensor& x, at::TensorList weights,
                               at::TensorList bn_weights, const at::Tensor& hidden,
                               const at::Tensor& z, const at::Tensor& stats,
                               const std::optional<at::Tensor>& seed, int64_t num_splits,
                               double dropout) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [a, b, c] = bn_backward_op().call(grad_y, x, weights, bn_weights, hidden, z, stats, seed,
                                           num_splits, dropout);
    return {a, b, c};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false, "spinalkern::cuda_head_bn_backward is not differentiable; to "
                "differentiate a gradient (create_graph=True), differentiate through "
                "spinalkern::cuda_head_bn_forward, whose backward is then computed with "
                "differentiable ops");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_bn_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::TensorList bn_weights, const at::Tensor& hidden, const at::Tensor& z,
    const at::Tensor& stats, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout) {
  bool requires_grad = grad_y.requires_grad() || x.requires_grad() || hidden.requires_grad() ||
                       z.requires_grad() || stats.requires_grad();
  for (at::TensorList ts : {weights, bn_weights})
    for (const auto& t : ts) requires_grad = requires_grad || t.requires_grad();
  if (at::GradMode::is_enabled() && requires_grad) {
    variable_list out = BnBackwardNotDifferentiable::apply(grad_y, x, weights, bn_weights, hidden,
                                                           z, stats, seed, num_splits, dropout);
    return {out[0], out[1], out[2]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return bn_backward_op().call(grad_y, x, weights, bn_weights, hidden, z, stats, seed,
                               num_splits, dropout);
}

}  // namespace
}  // namespace spinalkern

TORCH_LIBRARY_IMPL(spinalkern, Autograd, m) {
  m.impl("cuda_head_forward", &spinalkern::head_forward_autograd);
  m.impl("cuda_head_backward", &spinalkern::head_backward_autograd);
  m.impl("cuda_head_bn_forward", &spinalkern::head_bn_forward_autograd);
  m.impl("cuda_head_bn_backward", &spinalkern::head_bn_backward_autograd);
}
