"""masknorm.weight_norm (the parametrization) against the mpmath reference, in units of u: forward
and gradients per dtype, rows near overflow/underflow, zero rows, pruned entries holding garbage;
gradcheck, double backward, forward AD; torch's state_dict layout; bad input; the theorems of
proofs/weight_norm.py (scale invariance, row norm |g|, VJP orthogonal to v)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrizations

import masknorm
from masknorm._weight_norm import WeightNormFunction
from masknorm.reference import unit_roundoff, weight_norm as reference_w, weight_norm_errors, weight_norm_jvp

NAN, INF = float("nan"), float("inf")
# Worst measured over 30 seeds per dtype, float32 also with rows of 1e20 and 1e-25 (2026-12-02, torch 2.13 CPU,
# 2-core x86_64): forward 1.9, gradient 3.1 u (float64 1.9 / 2.6, float32 1.7 / 3.1, bfloat16 0.8 / 0.6).
BOUND = 8.0


def parametrized(v, g, mask=None, dim=0):
    """A Linear-like module whose weight is masknorm's weight norm of (g, v); returns it and (g, v)."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(v.clone())
    masknorm.weight_norm(module, dim=dim, mask=mask)
    with torch.no_grad():
        module.parametrizations.weight.original0.copy_(g)
        module.parametrizations.weight.original1.copy_(v)
    return module, module.parametrizations.weight.original0, module.parametrizations.weight.original1


def measured(v, g, mask, grad_w, dtype, dim=0):
    module, gp, vp = parametrized(v.to(dtype), g.to(dtype), mask, dim)
    w = module.weight
    grad_g, grad_v = torch.autograd.grad(w, (gp, vp), grad_w.to(dtype))
    return weight_norm_errors(w.detach(), grad_v, grad_g, vp.detach(), gp.detach(), grad_w.to(dtype), mask, dim,
                              dtype=dtype)


def inputs(seed, shape=(4, 7), scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    g = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=gen, dtype=torch.float64)
    mask = torch.rand(shape, generator=gen) > 0.25
    grad_w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return v, g, mask, grad_w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_forward_and_gradients_agree_with_the_reference(dtype, seed):
    v, g, mask, grad_w = inputs(seed)
    forward, gradient = measured(v, g, mask, grad_w, dtype)
    assert forward <= BOUND and gradient <= BOUND


@pytest.mark.parametrize("scale", [1e20, 1e-25, 1e35, 1e-37])
def test_float32_rows_whose_squares_overflow_or_underflow_are_exact(scale):
    v, g, mask, grad_w = inputs(7, scale=scale)
    naive = v.float().pow(2).sum(1)
    assert ((naive == 0) | torch.isinf(naive)).all()  # sum of squares in float32: 0 or inf on every row
    forward, gradient = measured(v.float().double(), g, mask, grad_w, torch.float32)
    assert forward <= BOUND and gradient <= BOUND


def test_float32_subnormal_rows_normalize_exactly():
    v, g, mask, _ = inputs(8, scale=1e-42)  # subnormal entries; the gradient (~1e42) is beyond float32
    module, _, _ = parametrized(v.float(), g.float(), mask)
    expected = reference_w(v.float(), g.float(), mask)
    error = np.abs(module.weight.detach().double().numpy() - expected) / (2.0**-24 * np.abs(g.float().double().numpy()))
    assert error.max() <= BOUND


@pytest.mark.parametrize("scale", [1e-39, 1e-41, 1e-44])
def test_float32_subnormal_rows_with_g_their_norm_have_exact_gradients_and_tangents(scale):
    # g = r (what registering gives): g/r = 1, the gradients are O(1); 1/r alone overflows float32
    v, _, mask, grad_w = inputs(12, scale=scale)
    v = v.float().double()  # the float32 values, so the reference sees what the module holds
    g = torch.sqrt((torch.where(mask, v, 0.0) ** 2).sum(1, keepdim=True)).float().double()
    _, gradient = measured(v, g, mask, grad_w, torch.float32)
    assert gradient <= BOUND
    # w is subnormal itself: within half its spacing (2^-150) of the reference, not u |g|
    module, _, _ = parametrized(v.float(), g.float(), mask)
    error = np.abs(module.weight.detach().double().numpy() - reference_w(v, g, mask))
    assert (error <= 2.0**-150 + BOUND * 2.0**-24 * g.numpy()).all()
    v_dot, g_dot = torch.randn_like(v), torch.randn_like(g)
    with torch.autograd.forward_ad.dual_level():
        dual = lambda t, d: torch.autograd.forward_ad.make_dual(t.float(), d.float())  # noqa: E731
        out = WeightNormFunction.apply(dual(g, g_dot), dual(v, v_dot), mask, 0)
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    expected = weight_norm_jvp(v, g, v_dot.float().double(), g_dot.float().double(), mask)
    scale_rows = (v_dot.abs().sum(1, keepdim=True) + g_dot.abs()).numpy()  # |g|/r = 1, ||u|| = 1
    assert (np.abs(tangent.double().numpy() - expected) / (2.0**-24 * scale_rows)).max() <= BOUND


def test_registering_a_subnormal_float32_weight_gives_finite_gradients():
    # FINDINGS reproducer: Linear(6, 3) weight * 1e-40 gave v.grad = +-inf (float64 reference: O(1))
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 6) * 1e-40)
    weight = lin.weight.detach().clone()
    masknorm.weight_norm(lin)
    x = torch.randn(2, 6)
    lin(x).sum().backward()
    g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    assert torch.equal(lin.weight.detach(), weight)
    assert torch.isfinite(v.grad).all() and v.grad.abs().max() > 0.1
    grad_w = x.sum(0).expand(3, 6)
    _, gradient = weight_norm_errors(lin.weight.detach(), v.grad, g.grad, v.detach(), g.detach(), grad_w,
                                     None, 0, dtype=torch.float32)  # w is subnormal: checked above, not in u |g|
    assert gradient <= BOUND


@pytest.mark.parametrize("dtype, row", [(torch.float32, [3e38, 3e38, 0.0]), (torch.float16, [6e4, 6e4, 1.0])])
def test_a_finite_row_whose_norm_overflows_is_refused(dtype, row):
    module = torch.nn.Linear(3, 2, bias=False).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], row]))
    with pytest.raises(ValueError, match=rf"row\(s\) \[1\] along dim=0 overflows {dtype}"):
        masknorm.weight_norm(module)
    assert not hasattr(module, "parametrizations")
    masknorm.weight_norm(module, mask=torch.tensor([True, False, True]))  # the masked norm fits: accepted
    assert torch.equal(module.weight, torch.tensor([[1.0, 0.0, 3.0], [row[0], 0.0, row[2]]], dtype=dtype))


def test_a_row_whose_norm_nearly_overflows_float32_is_kept():
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[2e38, 2e38]]))  # norm 2.83e38 < 3.40e38
    masknorm.weight_norm(module)
    assert torch.allclose(module.weight, torch.tensor([[2e38, 2e38]]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dim", [1, None, -1])
def test_other_dims(dim):
    v, _, mask, grad_w = inputs(3, shape=(3, 4, 5))
    g = torch.rand(() if dim is None else (1, 1, 5) if dim == -1 else (1, 4, 1), dtype=torch.float64) + 0.5
    forward, gradient = measured(v, g, mask, grad_w, torch.float64, dim)
    assert forward <= BOUND and gradient <= BOUND


def test_zero_rows_give_zero_weights_and_zero_gradients_never_nan():
    v = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 4.0], [5.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])  # row 2: 5 is pruned
    module, g, vp = parametrized(v, torch.tensor([[2.0], [1.0], [3.0]], dtype=torch.float64), mask)
    w = module.weight
    assert w.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 0.0]]
    grad_g, grad_v = torch.autograd.grad(w.sum(), (g, vp))
    assert grad_g[0].item() == 0.0 and grad_g[2].item() == 0.0 and (grad_v[[0, 2]] == 0).all()
    assert torch.isfinite(grad_v).all() and torch.isfinite(grad_g).all()


def test_garbage_in_pruned_entries_never_reaches_weights_or_gradients():
    v, g, mask, grad_w = inputs(11)
    clean_module, clean_g, clean_v = parametrized(v, g, mask)
    clean = torch.autograd.grad(clean_module.weight, (clean_g, clean_v), grad_w)
    garbage = torch.tensor([NAN, INF, -INF, 1e308], dtype=torch.float64)
    dirty_v = torch.where(mask, v, garbage[torch.arange(v.numel()).reshape(v.shape) % 4])
    dirty_grad = torch.where(mask, grad_w, torch.tensor(NAN, dtype=torch.float64))
    module, gp, vp = parametrized(dirty_v, g, mask)
    dirty = torch.autograd.grad(module.weight, (gp, vp), dirty_grad)
    assert torch.equal(module.weight, clean_module.weight)
    assert all(torch.equal(a, b) for a, b in zip(dirty, clean))

@pytest.mark.theorem("weight_norm_closed_forms")

def test_gradcheck_gradgradcheck_and_forward_ad():
    v, g, mask, _ = inputs(5, shape=(3, 4))
    g, v = g.requires_grad_(), v.requires_grad_()
    fn = lambda g_, v_: WeightNormFunction.apply(g_, v_, mask, 0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (g, v))
    assert torch.autograd.gradgradcheck(fn, (g, v))
    v_dot, g_dot = torch.randn_like(v), torch.randn_like(g)
    with torch.autograd.forward_ad.dual_level():
        out = fn(torch.autograd.forward_ad.make_dual(g.detach(), g_dot), torch.autograd.forward_ad.make_dual(v.detach(), v_dot))
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    expected = weight_norm_jvp(v.detach(), g.detach(), v_dot, g_dot, mask)
    assert np.allclose(tangent.numpy(), expected, rtol=1e-14, atol=1e-300)


def test_parameters_and_state_dict_are_torchs():
    ours = torch.nn.Linear(5, 3)
    theirs = torch.nn.Linear(5, 3)
    theirs.load_state_dict(ours.state_dict())
    masknorm.weight_norm(ours)
    parametrizations.weight_norm(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert value.shape == ours.state_dict()[key].shape
        assert torch.allclose(value, ours.state_dict()[key], rtol=1e-6, atol=0)
    ours.load_state_dict(theirs.state_dict())
    assert torch.allclose(ours.weight, theirs.weight, rtol=1e-6, atol=0)
    whole = masknorm.weight_norm(torch.nn.Linear(5, 3), dim=None)
    assert whole.parametrizations.weight.original0.shape == ()


def test_right_inverse_keeps_the_weight_and_sets_g_to_the_masked_row_norm():
    module = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[3e30, 4e30, 7.0], [1e-30, 0.0, 0.0]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    masknorm.weight_norm(module, mask=mask)
    assert module.parametrizations.weight.original0.flatten().tolist() == pytest.approx([5e30, 1e-30], rel=1e-6)
    expected = reference_w(torch.tensor([[3e30, 4e30, 7.0], [1e-30, 0.0, 0.0]]), torch.tensor([5e30, 1e-30]), mask)
    assert np.allclose(module.weight.detach().double().numpy(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(name="bias_missing"), ValueError, "no tensor attribute 'bias_missing'"),
    (dict(name=3), TypeError, "name must be a str"),
    (dict(dim=2), ValueError, r"dim must be in \[-2, 2\)"),
    (dict(dim=1.0), TypeError, "dim must be an int or None"),
    (dict(mask=torch.ones(3, 5)), TypeError, "mask must be a bool tensor"),
    (dict(mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, r"mask of shape \(4, 5\) does not broadcast"),
])
def test_bad_arguments_are_refused_before_any_change(kwargs, error, words):
    module = torch.nn.Linear(5, 3)
    with pytest.raises(error, match=words):
        masknorm.weight_norm(module, **kwargs)
    assert not hasattr(module, "parametrizations")


def test_integer_weights_are_refused():
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        masknorm.weight_norm(module)


def test_torch_func_transforms_and_compile():
    from torch.func import functional_call, grad, jacfwd, jacrev, vmap

    v, g, mask, _ = inputs(9, shape=(3, 4))
    fn = WeightNormFunction.apply
    assert torch.allclose(jacrev(fn, argnums=(0, 1))(g, v, mask, 0)[1], jacfwd(fn, argnums=(0, 1))(g, v, mask, 0)[1])
    batch = torch.randn(5, 3, 4, dtype=torch.float64)
    assert torch.equal(vmap(fn, in_dims=(None, 0, None, None))(g, batch, mask, 0),
                       torch.stack([fn(g, row, mask, 0) for row in batch]))
    module = masknorm.weight_norm(torch.nn.Linear(4, 3).double(), mask=mask)
    x = torch.randn(6, 4, dtype=torch.float64)
    params = {name: p.detach() for name, p in module.named_parameters()}
    grads = grad(lambda ps: functional_call(module, ps, (x,)).sum())(params)
    module(x).sum().backward()
    assert all(torch.allclose(grads[name], p.grad, rtol=1e-14, atol=0) for name, p in module.named_parameters())
    compiled = torch.compile(module, backend="aot_eager")
    assert torch.allclose(compiled(x), module(x), rtol=1e-14, atol=0)


def test_a_one_dimensional_weight_has_one_g_per_entry_along_dim_0_as_torchs():
    """dim=0 of a 1-D weight leaves no axis to reduce: each entry is its own row (torch's g has the
    weight's shape); a sum over no axes must not become the whole tensor's norm."""
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor([3.0, -4.0, 0.5], dtype=torch.float64))

        def forward(self, x):
            return x * self.weight

    ours, theirs = masknorm.weight_norm(Scale(), dim=0), torch.nn.utils.parametrizations.weight_norm(Scale(), dim=0)
    assert ours.parametrizations.weight.original0.shape == theirs.parametrizations.weight.original0.shape == (3,)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for m in (ours, theirs):
        m(x).pow(2).sum().backward()
    torch.testing.assert_close(ours.weight, theirs.weight)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


# ---- the theorems of proofs/weight_norm.py on masknorm.weight_norm, sums taken exactly (Fraction) ----------

def _exact(t: torch.Tensor) -> list:
    """Row i of t as exact rationals."""
    return [[Fraction(x) for x in row] for row in t.detach().double().tolist()]


theorem_dtypes = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])


@pytest.mark.theorem("weight_norm_scale_invariance")
@theorem_dtypes
@pytest.mark.parametrize("a", [9 / 8 * 2.0**-90, 13 / 8 * 2.0**-7, 11 / 8 * 2.0**3, 15 / 8 * 2.0**60])
def test_weight_norm_scale_invariance(dtype, a):
    """w(a v, g) = w(v, g): v holds 11-bit integers times 2^-10 and a a 4-bit mantissa, so a v is
    exact and both weights are within BOUND u |g| of the same exact w: |w(a v) - w(v)| <= 2 BOUND u |g|."""
    gen = torch.Generator().manual_seed(13)
    v = (torch.randint(-(2**10), 2**10 + 1, (4, 7), generator=gen) * 2.0**-10).to(dtype)
    g = torch.randn(4, 1, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(4, 7, generator=gen) > 0.25
    assert torch.equal((v * a).double(), v.double() * a)  # the scaling is exact
    w, scaled = (parametrized(values, g, mask)[0].weight.detach() for values in (v, v * a))
    allowed = 2 * BOUND * unit_roundoff(dtype) * g.double().abs()
    assert bool(((scaled.double() - w.double()).abs() <= allowed).all()), (scaled - w).abs().max()


@pytest.mark.theorem("weight_norm_row_norm")
@theorem_dtypes
@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-25])
@pytest.mark.parametrize("seed", range(3))
def test_weight_norm_row_norm(dtype, scale, seed):
    """Each row of w has norm |g|: with e = sqrt(k) BOUND u |g| (k entries take part, each within
    BOUND u |g| of w*, so ||w - w*|| <= e, and ||w*|| = |g|), |sum w^2 - g^2| <= e (2 |g| + e);
    pruned entries are 0 exactly."""
    v, g, mask, _ = inputs(seed, scale=scale)
    w = parametrized(v.to(dtype), g.to(dtype), mask)[0].weight
    assert bool((w[~mask] == 0).all())
    u = unit_roundoff(dtype)
    for row, gain, k in zip(_exact(w), g.to(dtype).double().flatten().tolist(), mask.sum(1).tolist()):
        e = math.sqrt(k) * BOUND * u * abs(gain)
        gap = sum((x * x for x in row), Fraction(0)) - Fraction(gain) ** 2
        assert abs(gap) <= e * (2 * abs(gain) + e), f"||w||^2 - g^2 = {float(gap):.3g}, bound {e * (2 * abs(gain) + e):.3g}"


@pytest.mark.theorem("weight_norm_vjp_orthogonality")
@theorem_dtypes
@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-25])
@pytest.mark.parametrize("seed", range(3))
def test_weight_norm_vjp_orthogonality(dtype, scale, seed):
    """sum_j v_j grad_v_j = 0 per row: each grad_v_j is within BOUND u |g| ||m gw|| / r of grad_v*
    (weight_norm_errors' gradient scale), so |<v, grad_v>| <= ||m v||_1 BOUND u |g| ||m gw|| / r
    <= sqrt(k) BOUND u |g| ||m gw|| (Cauchy-Schwarz, r = ||m v||); grad_v is 0 at pruned entries."""
    v, g, mask, grad_w = inputs(seed, scale=scale)
    module, gp, vp = parametrized(v.to(dtype), g.to(dtype), mask)
    _, grad_v = torch.autograd.grad(module.weight, (gp, vp), grad_w.to(dtype))
    assert bool((grad_v[~mask] == 0).all())
    u = unit_roundoff(dtype)
    gw_norm = torch.where(mask, grad_w.to(dtype).double(), 0).norm(dim=1).tolist()
    rows = zip(_exact(vp), _exact(grad_v), g.to(dtype).double().flatten().tolist(), mask.sum(1).tolist(), gw_norm)
    for values, grads, gain, k, norm in rows:
        paired = sum((a * b for a, b in zip(values, grads)), Fraction(0))
        bound = math.sqrt(k) * BOUND * u * abs(gain) * norm
        assert abs(paired) <= bound, f"<v, grad_v> = {float(paired):.3g}, bound {bound:.3g}"
