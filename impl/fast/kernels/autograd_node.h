// What the fused kernels' Autograd kernels share (included by padded_rows.cpp, per_channel.cpp and
// masked_channels.cpp): how a C++ autograd node is made, when one is recorded and what it keeps of the inputs, and
// when its backward may read values.

#pragma once

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <type_traits>

namespace masknorm_kernels {

// A new autograd node of type N, held as autograd holds its nodes: std::shared_ptr before torch 2.13,
// c10::intrusive_ptr since (Edge::function's type says which).
template <typename N>
auto make_node() {
  if constexpr (std::is_same_v<decltype(torch::autograd::Edge::function), std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>();
  } else {
    return c10::make_intrusive<N>();
  }
}

// True where autograd would record a call on t (grad mode is on and t requires grad).
inline bool wants_grad(const c10::optional<at::Tensor>& t) {
  return t && t->defined() && t->requires_grad();
}

// An Autograd kernel of an operator (x, mask, weight, bias, ...) -> (y, ...): refuses a tangent (`name` has no
// forward-mode AD formula), runs below() (the operator below autograd, through the dispatcher: fake tensors too)
// and, where x, weight or bias requires grad in grad mode, records on y a node N with edges (x, weight, bias),
// x, the mask and the weight saved, which of mask, weight and bias were given (N's members of those names), and
// what keep(node, out) adds.
template <typename N, typename Below, typename Keep>
auto record(const char* name, const at::Tensor& x, const c10::optional<at::Tensor>& mask,
            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, Below below, Keep keep) {
  using torch::autograd::isFwGradDefined;
  using torch::autograd::SavedVariable;
  TORCH_CHECK(!isFwGradDefined(x) && !isFwGradDefined(weight) && !isFwGradDefined(bias), name,
              " has no forward-mode AD formula");
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return below();
  }();
  if (at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(weight) || wants_grad(bias))) {
    auto node = make_node<N>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight.value_or(at::Tensor()),
                                                             bias.value_or(at::Tensor())));
    node->x = SavedVariable(x, false);
    node->mask = SavedVariable(mask.value_or(at::Tensor()), false);
    node->weight = SavedVariable(weight.value_or(at::Tensor()), false);
    node->has_mask = mask.has_value() && mask->defined();
    node->has_weight = weight.has_value() && weight->defined();
    node->has_bias = bias.has_value() && bias->defined();
    keep(*node, out);
    torch::autograd::set_history(std::get<0>(out), node);
  }
  return out;
}

// True where t is a CPU tensor with data of its own (not fake, functional, batched or meta): its values can be read.
inline bool has_data(const at::Tensor& t) {
  const auto wrappers = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                             c10::DispatchKey::FuncTorchBatched,
                                             c10::DispatchKey::FuncTorchGradWrapper});
  return t.device().is_cpu() && t.has_storage() && !t.key_set().has_any(wrappers);
}

}  // namespace masknorm_kernels
