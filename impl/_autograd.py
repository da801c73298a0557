"""Masked normalization as one autograd.Function whose backward and jvp are the spec's closed forms.

    out = gamma * y_hat + beta   on P (positions normalized with their group's statistics)
    out = x                      on passthrough positions (degenerate groups; "keep" padding)
    out = 0                      elsewhere ("zero" padding)

Saved for backward: x, the mask, weight, and the per-group statistics (GroupStats); y_hat is
recomputed from x. When the backward itself is differentiated
(grad mode on inside backward: double backward, forward-over-reverse), the statistics are
recomputed from x with differentiable ops so that second derivatives are exact.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd import forward_ad

from masknorm._stats import GroupStats, group_stats, where_or_zero
from masknorm._tracing import eager_on_data
from masknorm.spec import closed_forms


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 accumulate in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`: t itself when it has it, never a no-op `t.to(dtype)`. An autograd.Function whose
    forward returns such an alias of an intermediate gets zero gradients under torch.compile on
    torch 2.11 (pytorch/pytorch#180642: Dynamo records the alias as a second output of the same
    tensor, and the incoming gradient is routed to another output's slot)."""
    return t if t.dtype == dtype else t.to(dtype)


def regions(
    mask: Optional[torch.Tensor], degenerate: torch.Tensor, masked: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, passthrough): where the output is the normalized value, and where it is x."""
    if mask is None or masked == "normalize":
        return ~degenerate, degenerate
    normalized = mask & ~degenerate
    if masked == "keep":
        return normalized, ~normalized
    return normalized, mask & degenerate


def affine(y_hat: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """gamma * y_hat + beta, each optional."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias, weight, y_hat)
    if weight is not None:
        return y_hat * weight
    return y_hat + bias if bias is not None else y_hat


def normalized(xc: torch.Tensor, st: GroupStats) -> torch.Tensor:
    """y_hat = (x/a - mu/a) * (a/s): scaled by an exact power of two a, so nothing overflows."""
    return (xc * st.scale - st.shift_scaled) * st.inv_s_scaled


def normalized_affine(xc, st: GroupStats, weight, bias, mask: Optional[torch.Tensor], masked: str) -> torch.Tensor:
    """gamma * y_hat + beta, with its overflow at masked-out positions repaired (overflow_safe)."""
    return overflow_safe(lambda xc, st, w, b: affine(normalized(xc, st), w, b), mask, masked, xc, st, weight, bias)


def overflow_safe(fn, mask: Optional[torch.Tensor], masked: str, xc: torch.Tensor, st: GroupStats, *tensors):
    """fn(xc, st, *tensors) (a tensor, or a tuple of tensors or None), recomputed in float64 where
    its result is not finite, when a float32 computation may overflow where the exact result does not.

    Under "normalize" a masked-out x_j is normalized with the valid positions' statistics, and
    y_hat_j = (x_j - mu)/s is unbounded: beyond the float32 range (1 beside a single valid 1e-45,
    eps = 0) it is inf, and gamma y_hat_j, the sums of g y_hat and the tangents become inf or
    inf * 0 = NaN where the exact value is finite (gamma = 0: beta). In float64 every such
    quantity of float32-range inputs is finite (|y_hat| below about 2^290, its products with the gradients
    and the other factors below 2^800), so the float64 value rounded to float32 is the correct
    result: finite where the exact one is, the matching infinity where it overflows. Finite results
    keep their bits. float64 inputs have no wider type and are not repaired (their overflow needs
    valid values near 1e-308 beside O(1) masked-out ones). On eager CPU data the float64 pass runs
    only when a result is not finite (reading that is no device sync); elsewhere (CUDA, traced,
    under torch.func) it always runs, a few times the cost of fn, so as not to add a host sync."""
    out = fn(xc, st, *tensors)
    if mask is None or masked != "normalize" or xc.dtype == torch.float64:
        return out
    parts = [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]
    if all(_known_finite(t) for t in parts):
        return out
    wide = fn(xc.double(), _wide_stats(st), *(None if t is None else t.double() for t in tensors))
    if isinstance(out, torch.Tensor):
        return _finite_or(out, wide)
    return tuple(None if t is None else _finite_or(t, w) for t, w in zip(out, wide))


def _known_finite(t: torch.Tensor) -> bool:
    """True when t is eager CPU data (not traced, no torch.func transform, not fake) and finite."""
    return eager_on_data(t) and t.device.type == "cpu" and bool(torch.isfinite(t).all())


def _finite_or(t: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, wide.to(t.dtype))


def _wide_stats(st: GroupStats) -> GroupStats:
    """st with the factors of y_hat in float64 (exact: powers of two and float32 values)."""
    return st._replace(scale=st.scale.double(), shift_scaled=st.shift_scaled.double(),
                       inv_s_scaled=st.inv_s_scaled.double())


def compose(norm_out: torch.Tensor, xc: torch.Tensor, P: torch.Tensor, passthrough: torch.Tensor, masked: str) -> torch.Tensor:
    """Select per position between the normalized output, x and 0 (NaN-safe: no multiplications)."""
    if masked == "zero":
        return torch.where(P, norm_out, where_or_zero(passthrough, xc))
    return torch.where(P, norm_out, xc)


def redo_groups(out, st, redo, x, mask, weight, bias, dims, correction, eps, masked, center=True):
    """(out, stats) with the groups flagged in `redo` recomputed from the general statistics: the
    fast paths' way out for groups their fused kernels cannot do exactly."""
    general = group_stats(x, mask, dims, correction, eps, center)
    st = GroupStats(*(torch.where(redo, g, f) for g, f in zip(general, st)))
    P, passthrough = regions(mask, st.degenerate, masked)
    return torch.where(redo, compose(normalized_affine(x, st, weight, bias, mask, masked), x, P, passthrough, masked),
                       out), st


def records_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """True where autograd records a call on these tensors: grad mode is on and one of them
    requires grad, or forward-mode AD (torch.autograd.forward_ad) is active. Where it is False, a
    fast path's forward alone is the whole call: no autograd.Function is needed."""
    return forward_ad_active() or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def forward_ad_active() -> bool:
    """True inside torch.autograd.forward_ad.dual_level(): a call may carry tangents."""
    return forward_ad._current_level >= 0


def needs_general_backward(g_out: torch.Tensor) -> bool:
    """True when a fast path's backward must use the general closed form (differentiable, no host
    syncs): the backward is itself differentiated (double backward), or runs under a transform
    (torch.func), or on a batched gradient without data of its own (the vmap of
    torch.autograd.functional.jacobian(vectorize=True) cannot batch a host sync)."""
    return (
        torch.is_grad_enabled()
        or torch._C._are_functorch_transforms_active()
        or not torch._C._has_storage(g_out)
    )


def _safe_counts(st: GroupStats) -> Tuple[torch.Tensor, torch.Tensor]:
    """(k, nu) with degenerate groups set to 1: their formulas are discarded, and must not make inf/NaN
    that a second differentiation would multiply by zero."""
    return torch.where(st.degenerate, 1.0, st.k), torch.where(st.degenerate, 1.0, st.nu)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


class MaskedNormFunction(torch.autograd.Function):
    """out = masked_norm(x, mask, dims, ...); see masknorm.masked_norm for the contract."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mask, weight, bias, dims, correction, eps, center, masked):
        ct = compute_dtype(x.dtype)
        xc = x.to(ct)
        st = group_stats(xc, mask, dims, correction, eps, center)
        P, passthrough = regions(mask, st.degenerate, masked)
        out = compose(normalized_affine(xc, st, _cast(weight, ct), _cast(bias, ct), mask, masked), xc, P, passthrough,
                      masked)
        return (as_dtype(out, x.dtype), *st)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mask, weight, bias, dims, correction, eps, center, masked = inputs
        st = output[1:]
        ctx.config = (dims, correction, eps, center, masked)
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, mask, weight, *st)
        ctx.save_for_forward(x, mask, weight, *st)
        ctx.mark_non_differentiable(*st)
        ctx.set_materialize_grads(True)

    @staticmethod
    def backward(ctx, grad_out, *_unused_stats_grads):
        x, mask, weight, *saved = ctx.saved_tensors
        stats = None if torch.is_grad_enabled() else GroupStats(*saved)
        gx, gw, gb = general_vjp(grad_out, x, mask, weight, ctx.bias_shape, ctx.config, ctx.needs_input_grad, stats)
        return gx, None, gw, gb, None, None, None, None, None


class MaskedNormFunctionWithJvp(MaskedNormFunction):
    """MaskedNormFunction plus forward-mode AD; Dynamo cannot trace a custom jvp, so torch.compile
    uses the parent class (forward-mode AD through a compiled call is not supported)."""

    @staticmethod
    def jvp(ctx, x_dot, _mask_dot, weight_dot, bias_dot, *_config_dots):
        x, mask, weight, *saved = ctx.saved_tensors
        dims, correction, eps, center, masked = ctx.config
        ct = compute_dtype(x.dtype)
        xc = x.to(ct)
        st = GroupStats(*saved)
        y_dot = masked_norm_jvp(xc, x_dot.to(ct), mask, _cast(weight, ct), _cast(weight_dot, ct),
                                _cast(bias_dot, ct), st, dims, center, masked)
        return (y_dot.to(x.dtype), *(None for _ in saved))


def general_vjp(grad_out, x, mask, weight, bias_shape, config, needs_input_grad, stats=None, reduce_sums=None):
    """(grad x, grad weight, grad bias) in the inputs' dtypes and shapes.

    With stats=None the statistics are recomputed from x with differentiable ops, so that the
    result can itself be differentiated (double backward, forward-over-reverse). reduce_sums: see
    masked_norm_vjp.
    """
    dims, correction, eps, center, masked = config
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    st = group_stats(xc, mask, dims, correction, eps, center) if stats is None else stats
    w = _cast(weight, ct)
    gx, gw, gb = masked_norm_vjp(grad_out.to(ct), xc, mask, w, st, dims, center, masked,
                                 needs_input_grad[2], bias_shape is not None and needs_input_grad[3], reduce_sums)
    gx = gx.to(x.dtype) if needs_input_grad[0] else None
    gw = None if gw is None else gw.sum_to_size(weight.shape).to(weight.dtype)
    gb = None if gb is None else gb.sum_to_size(bias_shape[0]).to(bias_shape[1])
    return gx, gw, gb


def masked_norm_vjp(g_out, xc, mask, w, st, dims, center, masked, want_w, want_b, reduce_sums=None):
    """_vjp, with its overflow at masked-out positions repaired (overflow_safe); not with
    reduce_sums (each process would have to take the same float64 recomputation)."""
    if reduce_sums is not None:
        return _vjp(g_out, xc, mask, w, st, dims, center, masked, want_w, want_b, reduce_sums)
    return overflow_safe(lambda xc, st, g_out, w: _vjp(g_out, xc, mask, w, st, dims, center, masked, want_w, want_b),
                         mask, masked, xc, st, g_out, w)


def _vjp(g_out, xc, mask, w, st, dims, center, masked, want_w, want_b, reduce_sums=None):
    """(grad x, grad weight before summing to its shape, grad bias likewise), closed form:

    gx_j = (1/s) [ g_j [j in P] - (m_j/k) sum_P g - (m_j y_hat_j / nu) sum_P g y_hat ] + [j passes] g_out_j
    with g = gamma * g_out; a padded position whose upstream gradient is 0 contributes nothing.
    Evaluated with a/s, then scaled by 1/a, so 1/s itself need not be representable.
    reduce_sums(sum_g, sum_gy) -> (sum_g, sum_gy), when given, completes the two sums over positions
    this call does not hold (the other processes of a synchronized batch norm).
    """
    P, passthrough = regions(mask, st.degenerate, masked)
    y_hat = normalized(xc, st)
    if mask is not None and masked == "normalize":
        P_used = P & (mask | (g_out != 0))
    else:
        P_used = P
    y_hat = where_or_zero(P_used, y_hat)
    g_out_P = where_or_zero(P_used, g_out)
    gy = g_out_P * y_hat
    g = g_out_P if w is None else g_out_P * w
    sum_g = g.sum(dims, keepdim=True)
    sum_gy = (gy if w is None else gy * w).sum(dims, keepdim=True)
    if reduce_sums is not None:
        sum_g, sum_gy = reduce_sums(sum_g, sum_gy)
    m = 1.0 if mask is None else mask.to(xc.dtype)
    k, nu = _safe_counts(st)
    if center:
        core = closed_forms.vjp_centered(g, 1.0, m, y_hat, sum_g, sum_gy, k, nu, st.inv_s_scaled)
    else:
        core = closed_forms.vjp_rms(g, 1.0, m, y_hat, sum_gy, nu, st.inv_s_scaled)
    core = core * st.scale
    gx = compose(core, g_out, P, passthrough, masked)
    return gx, (gy if want_w else None), (g_out_P if want_b else None)


def saved_jvp(ctx, x_dot, weight_dot, bias_dot):
    """The output tangent (x's dtype) of a fast path's autograd.Function that saved (x, mask, weight,
    *GroupStats) for forward and keeps ctx.config = (dims, correction, eps, center, masked):
    stats_jvp with the statistics the forward computed."""
    x, mask, weight, *saved = ctx.saved_tensors
    return stats_jvp(x, mask, weight, GroupStats(*saved), ctx.config, x_dot, weight_dot, bias_dot)


def stats_jvp(x, mask, weight, st: GroupStats, config, x_dot, weight_dot, bias_dot):
    """masked_norm_jvp in x's computation dtype with the statistics st, as x's dtype; config =
    (dims, correction, eps, center, masked)."""
    dims, _, _, center, masked = config
    ct = compute_dtype(x.dtype)
    y_dot = masked_norm_jvp(x.to(ct), x_dot.to(ct), mask, _cast(weight, ct), _cast(weight_dot, ct),
                            _cast(bias_dot, ct), st, dims, center, masked)
    return y_dot.to(x.dtype)


def masked_norm_jvp(xc, x_dot, mask, w, w_dot, b_dot, st, dims, center, masked):
    """_jvp, with its overflow at masked-out positions repaired (overflow_safe)."""
    return overflow_safe(lambda xc, st, x_dot, w, w_dot, b_dot: _jvp(xc, x_dot, mask, w, w_dot, b_dot, st, dims, center,
                                                                     masked),
                         mask, masked, xc, st, x_dot, w, w_dot, b_dot)


def _jvp(xc, x_dot, mask, w, w_dot, b_dot, st, dims, center, masked):
    """Tangent of the output, closed form on P:

    y_hat_dot_p = (1/s) [ x_dot_p - (1/k) sum_V x_dot - (y_hat_p/nu) sum_V y_hat x_dot ]
    out_dot = gamma y_hat_dot + gamma_dot y_hat + beta_dot on P, x_dot where x passes through.
    """
    P, passthrough = regions(mask, st.degenerate, masked)
    y_hat = normalized(xc, st)
    x_dot_v = x_dot if mask is None else where_or_zero(mask, x_dot)
    yx = x_dot_v * y_hat if mask is None else where_or_zero(mask, x_dot_v * y_hat)
    sum_yx = yx.sum(dims, keepdim=True)
    k, nu = _safe_counts(st)
    if center:
        sum_x = x_dot_v.sum(dims, keepdim=True)
        y_hat_dot = closed_forms.jvp_centered(x_dot, y_hat, sum_x, sum_yx, k, nu, st.inv_s_scaled)
    else:
        y_hat_dot = closed_forms.jvp_rms(x_dot, y_hat, sum_yx, nu, st.inv_s_scaled)
    # gamma before the scale 1/a: with gamma = 0 the term is 0 even where y_hat_dot overflows
    gamma_y_hat_dot = (y_hat_dot if w is None else w * y_hat_dot) * st.scale
    one = torch.ones((), dtype=xc.dtype, device=xc.device)
    zero = torch.zeros((), dtype=xc.dtype, device=xc.device)
    out_dot = closed_forms.affine_jvp(one, gamma_y_hat_dot, zero if w_dot is None else w_dot,
                                      y_hat, zero if b_dot is None else b_dot)
    return compose(out_dot, x_dot, P, passthrough, masked)
