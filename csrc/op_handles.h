// Typed dispatcher handles of the extension's ops, for the C++ that calls them through the
// dispatcher (csrc/head_autograd.cpp: the autograd nodes; csrc/python_module.cpp: the fast
// forward entry).  Each is looked up once; a call runs every dispatch key, as torch.ops does.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace spinalkern {

using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList,
                                                     at::TensorList,
                                                     const std::optional<at::Tensor>&, int64_t,
                                                     int64_t, double, bool);
using BackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      at::TensorList, const at::Tensor&,
                                                      const std::optional<at::Tensor>&,
                                                      int64_t, int64_t, double);
using KeepMaskFn = at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, double);

inline const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_head_forward", "")
                             .typed<ForwardFn>();
  return op;
}

inline const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_head_backward", "")
                             .typed<BackwardFn>();
  return op;
}

inline const c10::TypedOperatorHandle<KeepMaskFn>& keep_mask_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_keep_mask", "")
                             .typed<KeepMaskFn>();
  return op;
}

using BnForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
    const std::optional<at::Tensor>&, int64_t, double, double, bool);
using BnBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double);

inline const c10::TypedOperatorHandle<BnForwardFn>& bn_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_head_bn_forward", "")
                             .typed<BnForwardFn>();
  return op;
}

inline const c10::TypedOperatorHandle<BnBackwardFn>& bn_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spinalkern::cuda_head_bn_backward", "")
                             .typed<BnBackwardFn>();
  return op;
}

}  // namespace spinalkern
