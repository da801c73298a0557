// What the fused kernels' Autograd kernels share (included by padded_rows.cpp and per_channel.cpp): how a C++
// autograd node is made and when one is recorded.

#pragma once

#include <torch/autograd.h>

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

}  // namespace masknorm_kernels
