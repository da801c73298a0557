"""The suite's error bounds and error measures against the mpmath reference, in units of u * kappa.

Error scales (u of the dtype of the result):
- forward: |y - y*| / (u (kappa |gamma| + |beta|)), the reference's metric, with kappa from
  masknorm.reference.kappa (plus |y_hat*| at masked-out positions under "normalize", see
  strategies.Case.kappa);
- derivatives: |d - d*| / (u S), S the first-order propagation of relative errors of size
  u kappa' (kappa' = max(kappa, 1)) in y_hat through the closed forms: strategies.Scales.
Pass-through and zeroed positions must be exact whatever the scale. A reference value beyond the
dtype's range must come out as the matching infinity, and an underflowing one within one smallest
subnormal (see _range_limited).

Bounds: about twice the worst value measured over many random examples; the measurements are
written above the bounds.
"""

import numpy as np
import torch

import masknorm.reference as ref
from support.strategies import Case, Scales, impl_jvp, impl_vjp, inv_s, like


# Worst measured error per dtype, in the units of the module docstring, and the bound (about twice
# the worst, rounded up). Measured on 2026-11-21 with the strategies of the tests below (cases(),
# padded_tokens(), channels()), 1000 examples per dtype and strategy and run (before the three
# bugs now in test_impl_regressions.py were fixed, their cases left out): six independent random
# runs for the forward and for grad_weight/grad_bias, two for grad_x and the JVP (whose scales were
# last changed then), one for channels(). A later thorough run (HYPOTHESIS_PROFILE=thorough) found
# a float32 forward error of 10.9 on channels() (one 0.75 among zeros in a group of 64, so
# |y_hat| ~ 8 while kappa ~ 1: each relative error of 1/s counts ~8 times), and the bound was
# raised to 16 for it. The batch-norm path now forms its statistics in float64 from cascaded
# per-sample sums; re-measured on 2026-11-21 (4000 examples of channels(), 2000 of
# padded_tokens() in float32; 2000 and 1000 in float64), the fast paths' worst are: forward
# 4.88 (channels) / 6.10 (tokens) in float32, 4.99 / 3.98 in float64; grad_x 2.69 / 2.91 and
# 4.36 / 3.03; grad_w/b 1.68 / 2.10 and 1.37 / 1.56; JVP 2.64 / 3.36 and 2.46 / 2.33. The float32
# forward bound is back to 10 (the table's 10.9 is the old path's, kept for the record). Those
# token numbers are torch's kernels (now padded_tokens_on_torch_kernels()); the fused CPU kernel,
# measured on 2026-11-21 over 2000 examples of padded_tokens() per dtype: forward 3.52 / 3.98
# (float32 / float64), grad_x 2.71 / 3.27, grad_w/b 1.00 / 2.29, JVP 2.94 / 2.92.
#                 float64  float32  bfloat16  float16
# forward           6.66    10.9      1.99     1.97
# VJP grad_x        3.58     3.10     0.86     0.81
# VJP grad_w/b      2.04     2.96     1.00     1.00
# JVP               2.92     3.49     0.90     0.91
FORWARD_BOUND = {torch.float64: 14.0, torch.float32: 10.0, torch.bfloat16: 4.0, torch.float16: 4.0}


VJP_X_BOUND = {torch.float64: 8.0, torch.float32: 7.0, torch.bfloat16: 2.0, torch.float16: 2.0}


VJP_AFFINE_BOUND = {torch.float64: 5.0, torch.float32: 6.0, torch.bfloat16: 2.5, torch.float16: 2.5}


JVP_BOUND = {torch.float64: 6.0, torch.float32: 7.0, torch.bfloat16: 2.0, torch.float16: 2.0}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _range_limited(expected: np.ndarray, y: torch.Tensor, slack=1.0) -> np.ndarray:
    """The reference value as the metric may judge it in y's dtype: where its rounding to the
    dtype overflows, that infinity (y must be it, exactly); where y is within `slack` times the
    dtype's smallest subnormal of it, y itself (results, or inputs, in the subnormal range carry
    an absolute error of that size, which no relative bound can cover)."""
    rounded = torch.from_numpy(expected).to(y.dtype).double().numpy()
    yv = as_numpy(y)
    tiny = torch.finfo(y.dtype).smallest_normal * torch.finfo(y.dtype).eps
    expected = np.where(np.isinf(rounded), rounded, expected)
    with np.errstate(invalid="ignore"):  # inf - inf: not close, judged by the metric
        return np.where(np.abs(yv - expected) <= tiny * slack, yv, expected)


def _error(d: torch.Tensor, expected: np.ndarray, scale: torch.Tensor) -> float:
    """max |d - expected| / (u scale), u of d's dtype (0 where equal, inf on a zero scale)."""
    return ref.max_error_in_ukappa(d, _range_limited(expected, d), np.ones(()), weight=as_numpy(scale))


def forward_error(case: Case) -> float:
    """max over positions of |y - y*| / (u (kappa |gamma| + |beta|)); checks the output dtype.
    Subnormal inputs: an absolute error of 2 + 2 n |gamma| / s smallest subnormals (n the group
    size) is not counted: that is what rounding x - mu to the subnormal grid, then scaling by
    gamma/s, may cost."""
    y = case.run()
    assert y.dtype == case.x.dtype and y.shape == case.x.shape
    n = case.x.numel() // inv_s(case).numel()
    gamma = torch.ones(()) if case.weight is None else case.weight.double().abs()
    slack = as_numpy(2 + 2 * n * gamma * inv_s(case)).astype(np.float64)
    expected = _range_limited(case.reference(), y, np.broadcast_to(slack, y.shape))
    return ref.max_error_in_ukappa(y, expected, case.kappa(), weight=case.weight, bias=case.bias)


def grad_x_error(case: Case, grad_out: torch.Tensor, gx: torch.Tensor, expected: np.ndarray) -> float:
    """max |gx - expected| / (u S), S the grad_x scale of the module docstring."""
    return _error(gx, expected, Scales(case).grad_x(grad_out))


def vjp_errors(case: Case, grad_out: torch.Tensor):
    """(error of grad_x, error of grad_weight, error of grad_bias) in units of u S (0 when absent);
    checks the gradients' dtypes and shapes."""
    gx, gw, gb = impl_vjp(case, grad_out)
    rx, rw, rb = ref.vjp(grad_out, case.x, case.mask, case.dim, **case.kwargs)
    assert gx.dtype == case.x.dtype and gx.shape == case.x.shape
    scales = Scales(case)
    errors = [_error(gx, rx, scales.grad_x(grad_out))]
    for grad, expected, param, with_y_hat in ((gw, rw, case.weight, True), (gb, rb, case.bias, False)):
        if param is None:
            assert grad is None and expected is None
            errors.append(0.0)
            continue
        assert grad.dtype == param.dtype and grad.shape == param.shape
        errors.append(_error(grad, expected, scales.grad_affine(grad_out, param.shape, with_y_hat)))
    return tuple(errors)


def jvp_error(case: Case, x_dot: torch.Tensor, weight_dot, bias_dot) -> float:
    """max |y_dot - y_dot*| / (u S), S the JVP scale of the module docstring; checks the dtype."""
    y_dot = impl_jvp(case, x_dot, weight_dot, bias_dot)
    expected = ref.jvp(case.x, x_dot, case.mask, case.dim, weight_dot=weight_dot, bias_dot=bias_dot, **case.kwargs)
    assert y_dot.dtype == case.x.dtype
    return _error(y_dot, expected, Scales(case).jvp(x_dot, weight_dot, bias_dot))


def draw_tangents(data, case: Case):
    """(x_dot, weight_dot, bias_dot): random tangents, None for an absent weight / bias."""
    return (
        like(data.draw, case.x),
        None if case.weight is None else like(data.draw, case.weight),
        None if case.bias is None else like(data.draw, case.bias),
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """The same values bit for bit (NaN equal to NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def assert_wide_token_rows_within_bound(dtype: torch.dtype, **case_fields) -> None:
    """Forward and VJP of layer norm over (2, 3, 1500) values offset by 1e3, weight and bias, two
    tokens padded, within bound; case_fields: Case's fields that choose the implementation."""
    gen = torch.Generator().manual_seed(0)
    x = (1e3 + torch.randn(2, 3, 1500, generator=gen, dtype=torch.float64)).to(dtype)
    weight, bias = (torch.randn(1500, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    mask = torch.tensor([[True, False, True], [True, True, False]]).reshape(2, 3, 1)
    case = Case(x, mask, -1, weight=weight, bias=bias, **case_fields)
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
