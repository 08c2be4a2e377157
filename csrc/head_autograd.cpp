// Autograd of spinalkern::cuda_head_forward, in C++ (registered for every device at the
// Autograd dispatch key), so that a backward runs in the C++ autograd engine without Python:
//
//   forward:  the op below autograd (CPU or CUDA kernel), saving x, hidden, seed, weights and
//             biases (save_hidden=false: no hidden; backward recomputes it).
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
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "head_layout.h"
#include "op_checks.h"

namespace spinalkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList,
                                                     at::TensorList,
                                                     const std::optional<at::Tensor>&, int64_t,
                                                     int64_t, double, bool);
using BackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      at::TensorList, const at::Tensor&,
                                                      const std::optional<at::Tensor>&,
                                                      int64_t, int64_t, double);
using KeepMaskFn = at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, double);

const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_head_forward", "")
                             .typed<ForwardFn>();
  return op;
}

const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_head_backward", "")
                             .typed<BackwardFn>();
  return op;
}

const c10::TypedOperatorHandle<KeepMaskFn>& keep_mask_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_keep_mask", "")
                             .typed<KeepMaskFn>();
  return op;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
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

struct HeadForward : public torch::autograd::Function<HeadForward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, const std::optional<at::Tensor>& seed,
                               int64_t kind, int64_t num_splits, double dropout,
                               bool save_hidden) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, hidden] = forward_op().call(x, weights, biases, seed, kind, num_splits, dropout,
                                         save_hidden);
    ctx->mark_non_differentiable({hidden});
    ctx->set_materialize_grads(false);  // no zeros for hidden's (unused) gradient
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["num_splits"] = num_splits;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["save_hidden"] = save_hidden;
    ctx->saved_data["num_weights"] = (int64_t)weights.size();
    // save_hidden: keep x, hidden, seed, weights, biases; otherwise keep the inputs only (x,
    // seed, weights, biases) and recompute hidden in backward with one more forward.  (The
    // biases: for that recomputation and for a differentiable backward.)
    variable_list keep;
    keep.reserve(3 + 2 * weights.size());
    keep.push_back(x);
    if (save_hidden) keep.push_back(hidden);
    keep.push_back(seed.has_value() ? *seed : at::Tensor());
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), biases.begin(), biases.end());
    ctx->save_for_backward(keep);
    return {y, hidden};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t kind = ctx->saved_data["kind"].toInt();
    const int64_t num_splits = ctx->saved_data["num_splits"].toInt();
    const double dropout = ctx->saved_data["dropout"].toDouble();
    const bool save_hidden = ctx->saved_data["save_hidden"].toBool();
    const int64_t num_weights = ctx->saved_data["num_weights"].toInt();
    const variable_list saved = ctx->get_saved_variables();
    const int first_weight = save_hidden ? 3 : 2;
    const at::Tensor& x = saved[0];
    const at::Tensor& seed = saved[first_weight - 1];
    const std::vector<at::Tensor> weights(saved.begin() + first_weight,
                                          saved.begin() + first_weight + num_weights);
    const std::vector<at::Tensor> biases(saved.begin() + first_weight + num_weights,
                                         saved.end());
    at::Tensor hidden;
    if (save_hidden) {
      hidden = saved[1];
    } else {  // recompute hidden from the inputs (no graph: hidden is not differentiated)
      at::NoGradGuard no_grad;
      at::AutoDispatchBelowADInplaceOrView below;
      hidden = std::get<1>(forward_op().call(x, weights, biases, opt(seed), kind, num_splits,
                                             dropout, true));
    }
    const at::Tensor& grad_y = grads[0];

    // gradients in the order of forward's arguments: x, weights, biases (as many as weights,
    // checked by the op), then seed, kind, num_splits, dropout, save_hidden (none)
    const size_t num_grads = 1 + 2 * weights.size() + 5;
    variable_list out;
    out.reserve(num_grads);
    if (!grad_y.defined()) {  // y did not reach the loss: no gradients
    } else if (at::GradMode::is_enabled()) {  // create_graph=True
      variable_list g = differentiable_backward(grad_y, x, weights, biases, hidden, seed, kind,
                                                num_splits, dropout);
      out = std::move(g);
    } else {
      auto [grad_x, flat] = backward_op().call(grad_y, x, weights, hidden, opt(seed), kind,
                                               num_splits, dropout);
      out.push_back(grad_x);
      // plain tensors over the flat buffer's storage, made below autograd (no view tracking
      // needed: no graph is recorded here)
      at::AutoDispatchBelowADInplaceOrView below;
      std::vector<at::Tensor> dbs;
      dbs.reserve(weights.size());
      int64_t off = flat.storage_offset();
      for (const auto& w : weights) {  // views of the flat gradient
        const int64_t N = w.size(0), K = w.size(1);
        out.push_back(flat.as_strided({N, K}, {K, 1}, off));
        dbs.push_back(flat.as_strided({N}, {1}, off + N * K));
        off += N * K + N;
      }
      out.insert(out.end(), dbs.begin(), dbs.end());
    }
    out.resize(num_grads);  // seed and the scalars: no gradient
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> head_forward_autograd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    const std::optional<at::Tensor>& seed, int64_t kind, int64_t num_splits, double dropout,
    bool save_hidden) {
  bool requires_grad = x.requires_grad();
  for (const auto& t : weights) requires_grad = requires_grad || t.requires_grad();
  for (const auto& t : biases) requires_grad = requires_grad || t.requires_grad();
  if (!at::GradMode::is_enabled() || !requires_grad) {  // no graph to record
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(x, weights, biases, seed, kind, num_splits, dropout, save_hidden);
  }
  variable_list out = HeadForward::apply(x, weights, biases, seed, kind, num_splits, dropout,
                                         save_hidden);
  return {out[0], out[1]};
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
using BnForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
    const std::optional<at::Tensor>&, int64_t, double, double, bool);
using BnBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double);

const c10::TypedOperatorHandle<BnForwardFn>& bn_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_head_bn_forward", "")
                             .typed<BnForwardFn>();
  return op;
}

const c10::TypedOperatorHandle<BnBackwardFn>& bn_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_head_bn_backward", "")
                             .typed<BnBackwardFn>();
  return op;
}

struct BnHeadForward : public torch::autograd::Function<BnHeadForward> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList bn_weights,
                               at::TensorList bn_biases, const std::optional<at::Tensor>& seed,
                               int64_t num_splits, double dropout, double eps,
                               bool save_for_backward) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, hidden, z, stats] = bn_forward_op().call(x, weights, biases, bn_weights, bn_biases,
                                                      seed, num_splits, dropout, eps, true);
    ctx->saved_data["num_splits"] = num_splits;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["num_weights"] = (int64_t)weights.size();
    // (biases and betas: only for a differentiable backward, create_graph=True)
    variable_list keep{x, hidden, z, stats, seed.has_value() ? *seed : at::Tensor()};
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), bn_weights.begin(), bn_weights.end());
    keep.insert(keep.end(), biases.begin(), biases.end());
    keep.insert(keep.end(), bn_biases.begin(), bn_biases.end());
    ctx->save_for_backward(keep);
    if (!save_for_backward) hidden = z = at::empty({0}, x.options());
    ctx->mark_non_differentiable({hidden, z, stats});
    ctx->set_materialize_grads(false);
    return {y, hidden, z, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t num_splits = ctx->saved_data["num_splits"].toInt();
    const double dropout = ctx->saved_data["dropout"].toDouble();
    const int64_t num_weights = ctx->saved_data["num_weights"].toInt();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &hidden = saved[1], &z = saved[2], &stats = saved[3],
                     &seed = saved[4];
    const int64_t num_bn = ((int64_t)saved.size() - 5 - 2 * num_weights) / 2;
    auto part = [&](int64_t begin, int64_t count) {
      return std::vector<at::Tensor>(saved.begin() + begin, saved.begin() + begin + count);
    };
    const std::vector<at::Tensor> weights = part(5, num_weights);
    const std::vector<at::Tensor> bn_weights = part(5 + num_weights, num_bn);
    const at::Tensor& grad_y = grads[0];
    // x, weights, biases, bn_weights, bn_biases (as many as bn_weights), then seed,
    // num_splits, dropout, eps, save_for_backward (none)
    const size_t num_grads = 1 + 2 * weights.size() + 2 * bn_weights.size() + 5;
    variable_list out;
    if (grad_y.defined() && at::GradMode::is_enabled()) {  // create_graph=True
      BnParams bn{bn_weights, part(5 + num_weights + num_bn + num_weights, num_bn),
                  ctx->saved_data["eps"].toDouble()};
      out = differentiable_backward(grad_y, x, weights, part(5 + num_weights + num_bn,
                                                             num_weights),
                                    hidden, seed, /*kind=*/0, num_splits, dropout, &bn);
    } else if (grad_y.defined()) {  // else y did not reach the loss: no gradients
      auto [grad_x, flat, grad_bn] = bn_backward_op().call(grad_y, x, weights, bn_weights, hidden,
                                                           z, stats, opt(seed), num_splits,
                                                           dropout);
      out.push_back(grad_x);
      at::AutoDispatchBelowADInplaceOrView below;  // plain views, no graph recorded here
      std::vector<at::Tensor> dbs;
      int64_t off = flat.storage_offset();
      for (const auto& w : weights) {
        const int64_t N = w.size(0), K = w.size(1);
        out.push_back(flat.as_strided({N, K}, {K, 1}, off));
        dbs.push_back(flat.as_strided({N}, {1}, off + N * K));
        off += N * K + N;
      }
      out.insert(out.end(), dbs.begin(), dbs.end());
      for (int part : {0, 1})  // dgamma_i, then dbeta_i
        for (size_t i = 0; i < bn_weights.size(); ++i) out.push_back(grad_bn[i][part]);
    }
    out.resize(num_grads);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_bn_forward_autograd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList bn_weights,
    at::TensorList bn_biases, const std::optional<at::Tensor>& seed, int64_t num_splits,
    double dropout, double eps, bool save_for_backward) {
  bool requires_grad = x.requires_grad();
  for (at::TensorList ts : {weights, biases, bn_weights, bn_biases})
    for (const auto& t : ts) requires_grad = requires_grad || t.requires_grad();
  if (!at::GradMode::is_enabled() || !requires_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return bn_forward_op().call(x, weights, biases, bn_weights, bn_biases, seed, num_splits,
                                dropout, eps, save_for_backward);
  }
  variable_list out = BnHeadForward::apply(x, weights, biases, bn_weights, bn_biases, seed,
                                           num_splits, dropout, eps, save_for_backward);
  return {out[0], out[1], out[2], out[3]};
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
