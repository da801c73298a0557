// masknorm::masked_channels_norm's Autograd kernel (the group and instance norm modules' lane, fast/channel_lane.py):
// the call below autograd, and a MaskedChannelsNormBackward node on y where x, weight or bias requires grad in grad
// mode. With x (B, C, *S) read as (B, G, C/G, L = prod S) and the mask as (B, L) (absent: every position valid):
//
//   (dx, dweight, dbias) = masknorm::masked_positions_norm_backward(dy, x, mask, mean, rstd, state, weight,
//                                                                  correction 0, centered, policy)
//
// dx viewed as x, the per-channel sums rounded to the parameters' dtypes: the bits of masked_norm's route
// (fast.masked_positions.MaskedPositionsFunction's backward on the same kernel, which also sums them over a leading
// axis of size 1: a no-op, as the kernel's double sums start at +0 and so are never -0). Where that cannot be the
// answer, the node calls masknorm::masked_channels_python_backward (fast.channel_lane registers it from Python as a
// CompositeImplicitAutograd operator): the route's general closed form in differentiable torch ops, when the
// backward is itself recorded (grad mode on: double backward), when the inputs have no data to check (traced), or
// when the forward flagged a group (its output is the caller's to redo).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "autograd_node.h"

namespace {

using masknorm_kernels::has_data;

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, int64_t, double, int64_t);
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

c10::optional<at::Tensor> present(const torch::autograd::SavedVariable& v, bool has) {
  return has ? c10::optional<at::Tensor>(v.unpack()) : c10::nullopt;
}

struct MaskedChannelsNormBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, mask, weight, mean, rstd, state, flagged;
  std::vector<int64_t> weight_shape, bias_shape;
  at::ScalarType weight_dtype = at::kFloat, bias_dtype = at::kFloat;
  int64_t groups = 1, policy = 0;
  double eps = 0;
  bool has_mask = false, has_weight = false, has_bias = false;

  std::string name() const override { return "MaskedChannelsNormBackward"; }

  void release_variables() override {
    for (auto* v : {&x, &mask, &weight, &mean, &rstd, &state, &flagged}) v->reset_data();
  }

  // The fused backward on (B, G, C/G, L) views; dweight and dbias per channel in their parameters' dtypes.
  Grads fused(const at::Tensor& dy, const at::Tensor& x_, const c10::optional<at::Tensor>& mask_,
              const c10::optional<at::Tensor>& weight_) const {
    static const auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("masknorm::masked_positions_norm_backward", "")
        .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, bool, int64_t)>();
    const int64_t B = x_.size(0), C = x_.size(1), L = x_.numel() / (B * C);
    const std::vector<int64_t> shape = {B, groups, C / groups, L};
    const auto m2 = mask_ ? mask_->reshape({B, L}) : at::ones({B, L}, x_.options().dtype(at::kBool));
    at::AutoDispatchBelowADInplaceOrView guard;  // to the kernel, not through autograd's boxed fallback
    auto [dx, dw, db] = op.call(dy.reshape(shape), x_.reshape(shape), m2, mean.unpack(), rstd.unpack(), state.unpack(),
                                weight_, 0, true, policy);
    return {dx.view(x_.sizes()), dw.to(weight_dtype), db.to(bias_dtype)};
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const auto x_ = x.unpack(getptr());
    const auto mask_ = present(mask, has_mask), weight_ = present(weight, has_weight);
    const auto dy = grads[0].defined() ? grads[0] : at::zeros_like(x_);
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled() || !has_data(x_) || !has_data(dy) ||
        *flagged.unpack().const_data_ptr<int64_t>() != 0) {
      static const auto python = c10::Dispatcher::singleton()
          .findSchemaOrThrow("masknorm::masked_channels_python_backward", "")
          .typed<Grads(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                       const c10::optional<at::Tensor>&, int64_t, double, int64_t, bool)>();
      std::tie(dx, dw, db) = python.call(dy, x_, mask_, weight_, groups, eps, policy, has_bias);
      if (has_bias) db = db.to(bias_dtype);
    } else {
      std::tie(dx, dw, db) = fused(dy, x_, mask_, weight_);
    }
    return {should_compute_output(0) ? dx : at::Tensor(),
            should_compute_output(1) ? dw.reshape(weight_shape) : at::Tensor(),
            should_compute_output(2) ? db.reshape(bias_shape) : at::Tensor()};
  }
};

// masked_channels_norm's Autograd kernel (autograd_node.h's record). Forward-mode AD has no formula.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_channels_norm_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t groups, double eps, int64_t policy) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("masknorm::masked_channels_norm", "")
      .typed<Forward>();
  return masknorm_kernels::record<MaskedChannelsNormBackward>(
      "masknorm::masked_channels_norm", x, mask, weight, bias,
      [&] { return op.call(x, mask, weight, bias, groups, eps, policy); },
      [&](MaskedChannelsNormBackward& node, const auto& out) {
        node.mean = torch::autograd::SavedVariable(std::get<1>(out), false);
        node.rstd = torch::autograd::SavedVariable(std::get<2>(out), false);
        node.state = torch::autograd::SavedVariable(std::get<3>(out), false);
        node.flagged = torch::autograd::SavedVariable(std::get<4>(out), false);
        if (node.has_weight) {
          node.weight_shape = weight->sizes().vec();
          node.weight_dtype = weight->scalar_type();
        }
        if (node.has_bias) {
          node.bias_shape = bias->sizes().vec();
          node.bias_dtype = bias->scalar_type();
        }
        node.groups = groups;
        node.eps = eps;
        node.policy = policy;
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(masknorm, Autograd, m) {
  m.impl("masked_channels_norm", &masked_channels_norm_autograd);
}
