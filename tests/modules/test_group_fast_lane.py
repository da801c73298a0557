"""MaskedGroupNorm and the masked instance norms call the masked-positions kernel straight from the
module where it takes the call (fast.channel_lane.eager_call): eager mode on CPU data, a (B, *spatial)
or (B, 1, *spatial) bool mask or none. That lane must give the bits of masked_norm's route, outputs and
gradients (its operator's Autograd kernel records MaskedChannelsNormBackward; double backward takes the
route's general closed form), leave every other call to that route, and raise what the route raises,
before any work."""

import math

import pytest
import torch

from masknorm import masked_norm
from masknorm.fast import channel_lane, masked_positions, native
from masknorm.modules import MaskedGroupNorm, MaskedInstanceNorm1d, MaskedInstanceNorm2d
from support.lanes import BAD_CALLS, assert_rejected_before_work, failing_operators, spoil

pytestmark = pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")


def _same_bits(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _routed(module, x, mask):
    """The module's call through masked_norm (the route every call took before the lane)."""
    if isinstance(module, MaskedGroupNorm):
        lead = (module.num_groups, module.num_channels // module.num_groups)
    else:
        lead = (module.num_features,)
    spatial = tuple(x.shape[2:])
    grouped = x.reshape(x.shape[0], *lead, *spatial)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], *(1,) * len(lead), *spatial)
    params = [None if p is None else p.reshape(*lead, *(1,) * len(spatial)) for p in (module.weight, module.bias)]
    out = masked_norm(grouped, mask, tuple(range(2, grouped.dim())), eps=module.eps, weight=params[0],
                      bias=params[1], masked=module.masked)
    return out.reshape(x.shape)


def _inputs(dtype, with_mask, spatial=(12,), B=3, C=8):
    """x (B, C, *spatial) with NaN and inf at masked-out positions, sample 1 all padded, and its mask."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, *spatial, generator=gen).to(dtype)
    if not with_mask:
        return x, None
    mask = torch.rand(B, *spatial, generator=gen) > 0.3
    mask[1] = False
    mask[2].view(-1)[0] = True
    garbage = torch.tensor([math.nan, math.inf, -math.inf]).repeat(x[:, 0][~mask].numel())[: x[:, 0][~mask].numel()]
    x.transpose(0, 1)[:, ~mask] = garbage.to(dtype)
    return x, mask


def _module(cls, dtype, affine, masked, C=8):
    module = (cls(4, C, affine=affine, masked=masked) if cls is MaskedGroupNorm
              else cls(C, affine=affine, masked=masked)).to(dtype)
    if affine:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    return module


def _lane_calls(monkeypatch):
    """The lane's answers during the test: True where it took a call."""
    taken = []
    call = channel_lane.eager_call

    def recorded(*args):
        out = call(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(channel_lane, "eager_call", recorded)
    return taken


CLASSES = [(MaskedGroupNorm, (12,)), (MaskedGroupNorm, (3, 5)), (MaskedInstanceNorm1d, (12,)),
           (MaskedInstanceNorm2d, (3, 5))]
EVERY_CASE = [
    pytest.mark.parametrize("cls, spatial", CLASSES, ids=["group1d", "group2d", "instance1d", "instance2d"]),
    pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str),
    pytest.mark.parametrize("masked", ["normalize", "keep", "zero"]),
    pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"]),
    pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"]),
]


def every_case(test):
    """test parametrized over EVERY_CASE: classes and spatial shapes, dtypes, policies, mask or not, affine or not."""
    for mark in EVERY_CASE:
        test = mark(test)
    return test


@every_case
def test_the_lane_gives_the_routes_bits_without_grad(cls, spatial, dtype, masked, with_mask, affine, monkeypatch):
    module = _module(cls, dtype, affine, masked)
    x, mask = _inputs(dtype, with_mask, spatial)
    taken = _lane_calls(monkeypatch)
    with torch.no_grad():
        expected = _routed(module, x, mask)
        got = module(x, mask)
        if with_mask:
            _same_bits(module(x, mask.unsqueeze(1)), expected)  # (B, 1, *spatial)
    _same_bits(got, expected)
    # without a mask or parameters the route is the padded-rows kernel (one flag per group): not the lane's
    assert taken == [with_mask or affine] * len(taken) and taken


def test_the_lane_takes_the_benchmarks_call(monkeypatch):
    """MaskedGroupNorm(32, 256) on (1, 256, 100) with a lengths mask, under no_grad."""
    module = MaskedGroupNorm(32, 256)
    x = torch.randn(1, 256, 100, generator=torch.Generator().manual_seed(0))
    mask = torch.arange(100).unsqueeze(0) < 80
    taken = _lane_calls(monkeypatch)
    with torch.no_grad():
        _same_bits(module(x, mask), _routed(module, x, mask))
        _same_bits(module(x), _routed(module, x, None))
    assert taken == [True, True]


def _trained(module, x, mask, dy, lane, wanted):
    """(output, grad x, grad weight, grad bias) of one training call, through the lane (the module) or the route;
    `wanted`: "x", "parameters" or "both" require grad."""
    xr = x.clone().requires_grad_(wanted != "parameters")
    module.zero_grad()
    module.requires_grad_(wanted != "x")
    out = module(xr, mask) if lane else _routed(module, xr, mask)
    out.backward(dy)
    return out, xr.grad, *(None if p is None else p.grad for p in (module.weight, module.bias))


def _grad_inputs(dtype, with_mask, spatial):
    x, mask = _inputs(dtype, with_mask, spatial)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    if with_mask:
        dy.transpose(0, 1)[:, ~mask] = 0.0  # but one masked-out gradient in a sample with valid positions
        b = next(b for b in range(mask.shape[0]) if mask[b].any() and not mask[b].all())
        dy[b, 0].view(-1)[(~mask[b]).view(-1).nonzero()[0]] = 1.0  # which "normalize" counts
    return x, mask, dy


@every_case
def test_the_lane_gives_the_routes_bits_with_grad(cls, spatial, dtype, masked, with_mask, affine, monkeypatch):
    """Garbage (NaN, inf) at masked-out positions, an all-padded sample; the gradient of x, of the parameters, of
    both: the outputs and gradients are the route's, and the lane's output carries its operator's node."""
    module = _module(cls, dtype, affine, masked)
    x, mask, dy = _grad_inputs(dtype, with_mask, spatial)
    for wanted in (["x", "parameters", "both"] if affine else ["x"]):
        taken = _lane_calls(monkeypatch)
        got = _trained(module, x, mask, dy, True, wanted)
        assert taken == [with_mask or affine]
        if taken[0]:
            assert got[0].grad_fn.name() == "MaskedChannelsNormBackward"
        monkeypatch.undo()
        expected = _trained(module, x, mask, dy, False, wanted)
        for a, b in zip(got, expected):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype
                _same_bits(a, b)


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_lanes_gradients_do_not_depend_on_the_thread_count(masked, dtype):
    """(B, C, L) = (70, 8, 40): the backward splits its work over more than one block of samples and groups."""
    module = _module(MaskedGroupNorm, dtype, True, masked)
    x, mask, dy = _grad_inputs(dtype, True, (40,))
    x, mask, dy = (t.repeat(24, *(1,) * (t.dim() - 1))[:70] for t in (x, mask, dy))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_trained(module, x, mask, dy, True, "both"))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        _same_bits(a, b)


@pytest.mark.parametrize("cls, spatial", CLASSES, ids=["group1d", "group2d", "instance1d", "instance2d"])
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_double_backward_gives_the_routes_bits(cls, spatial, masked, with_mask):
    """grad with create_graph, then the backward of a function of the gradients: the node's general closed form on
    the route's views gives the route's bits at both orders."""
    module = _module(cls, torch.float64, True, masked)
    x, mask = _inputs(torch.float64, with_mask, spatial)
    x = torch.nan_to_num(x)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for lane in (True, False):
        xr = x.clone().requires_grad_()
        module.zero_grad()
        out = module(xr, mask) if lane else _routed(module, xr, mask)
        assert (out.grad_fn.name() == "MaskedChannelsNormBackward") == lane
        gx, gw, gb = torch.autograd.grad(out, (xr, module.weight, module.bias), dy, create_graph=True)
        (gx.square().sum() + gw.sum() * gb.sum()).backward()
        results.append([out, gx, gw, gb, xr.grad, module.weight.grad, module.bias.grad])
    for a, b in zip(*results):
        _same_bits(a, b)


@pytest.mark.parametrize("cls, spatial", CLASSES[:3], ids=["group1d", "group2d", "instance1d"])
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_the_lanes_node_passes_gradcheck_and_gradgradcheck(cls, spatial, masked):
    module = _module(cls, torch.float64, True, masked, C=4) if cls is not MaskedGroupNorm else \
        MaskedGroupNorm(2, 4, masked=masked).double()
    x, mask = _inputs(torch.float64, True, spatial, C=4)
    x = x.nan_to_num(0.0, 0.0, 0.0)
    w, b = (torch.randn(4, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (3, 4))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    del module.weight, module.bias  # plain attributes from here: the leaves below

    def norm(x, w, b):
        module.weight, module.bias = w, b
        return module(x, mask)

    assert norm(*leaves).grad_fn.name() == "MaskedChannelsNormBackward"
    assert torch.autograd.gradcheck(norm, leaves)
    assert torch.autograd.gradgradcheck(norm, leaves)


def test_a_group_the_kernel_flags_leaves_a_training_call_to_the_route():
    """A flagged group with a gradient wanted: the lane gives the call back (its node is dropped) and the route's
    gradients are the module's; the operator called directly answers its node's backward with the general closed
    form (its output at the flagged group is x, the caller's to redo: the gradient is that of the norm)."""
    module = MaskedGroupNorm(2, 4)
    x = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[1, 2:] = 1e6 + 1e-3 * x[1, 2:]
    x = x.float()
    mask = torch.arange(10) < torch.tensor([[7], [10]])
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    got, expected = (_trained(module, x, mask, dy, lane, "both") for lane in (True, False))
    for a, b in zip(got, expected):
        _same_bits(a, b)
    leaves = [t.clone().requires_grad_() for t in (x, module.weight.detach(), module.bias.detach())]
    y, *_, count = torch.ops.masknorm.masked_channels_norm(leaves[0], mask, *leaves[1:], 2, 1e-5, 0)
    assert int(count) == 1 and y.grad_fn.name() == "MaskedChannelsNormBackward"
    y.backward(dy)
    for leaf, g in zip(leaves, expected[1:]):
        torch.testing.assert_close(leaf.grad, g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_the_lanes_operator_passes_opcheck(dtype, with_mask):
    """Contiguous x, x with its batch and channel axes swapped in memory, and x a slice of a wider tensor;
    the mask as given, and (with x's garbage replaced by 0, as the expanded mask marks other positions valid)
    expanded from one sample."""
    x, mask = _inputs(dtype, with_mask, (3, 5))
    weight, bias = (torch.randn(8, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (1, 2))
    cases = [(x, mask)] if mask is None else [(x, mask), (x.nan_to_num(0.0, 0.0, 0.0), mask[:1].expand(mask.shape))]
    for xc, m in cases:
        for xl in (xc, xc.transpose(0, 1).contiguous().transpose(0, 1), torch.cat([xc, xc], 3)[..., :5]):
            torch.library.opcheck(torch.ops.masknorm.masked_channels_norm.default,
                                  (xl, m, weight, bias if with_mask else None, 4, 1e-5, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("policy", [0, 1, 2])
def test_the_lanes_autograd_kernel_passes_opcheck(dtype, with_mask, policy):
    """With a gradient wanted, the operator's own Autograd kernel records MaskedChannelsNormBackward: opcheck's
    autograd registration and traced-backward tests (x, weight and bias leaves, the padding's garbage replaced)."""
    x, mask = _inputs(dtype, with_mask, (3, 5))
    weight, bias = (torch.randn(8, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (1, 2))
    leaves = [t.clone().requires_grad_() for t in (x.nan_to_num(0.0, 0.0, 0.0), weight, bias)]
    args = (leaves[0], mask, leaves[1], leaves[2], 4, 1e-5, policy)
    assert torch.ops.masknorm.masked_channels_norm(*args)[0].grad_fn.name() == "MaskedChannelsNormBackward"
    torch.library.opcheck(torch.ops.masknorm.masked_channels_norm.default, args)


@pytest.mark.parametrize("B, C, spatial", [(1, 4, (5,)), (2, 4, (1,)), (2, 4, (1, 4)), (2, 4, (3, 1)), (1, 6, (2, 3)),
                                           (2, 2, (1, 2, 1))])
@pytest.mark.parametrize("mask_kind", ["none", "(B, *S)", "(B, 1, *S)"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_sizes_of_one_give_the_routes_bits(B, C, spatial, mask_kind, affine):
    """Axes of size 1 move the route's (B, G, C/G, L) split (the mask's and the parameters' varying axes):
    whatever the split, the lane's call is the routed one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, *spatial, generator=gen)
    mask = None if mask_kind == "none" else torch.rand(B, *spatial, generator=gen) > 0.3
    for groups in sorted({1, 2, C}):
        module = MaskedGroupNorm(groups, C, affine=affine)
        if affine:
            with torch.no_grad():
                for p in module.parameters():
                    p.uniform_(-2, 2, generator=gen)
        with torch.no_grad():
            got = module(x, None if mask is None else mask.unsqueeze(1) if mask_kind == "(B, 1, *S)" else mask)
            _same_bits(got, _routed(module, x, mask))


@pytest.mark.parametrize("groups", [8, 4])
def test_x_without_spatial_axes_takes_the_route(groups, monkeypatch):
    """x (B, C): with G = C the route's split has L = 1, which the lane's operator (x as (B, C, *S)) does not take."""
    module = MaskedGroupNorm(groups, 8)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    taken = _lane_calls(monkeypatch)
    with torch.no_grad():
        _same_bits(module(x), _routed(module, x, None))
    assert taken == [False]


@pytest.mark.parametrize("off", ["kernels(False)", "MASKNORM_KERNELS=0"])
def test_with_the_kernels_off_the_lane_gives_the_call_to_the_route(off, monkeypatch):
    module = MaskedGroupNorm(4, 8)
    x, mask = _inputs(torch.float32, True)
    with torch.no_grad():
        module(x, mask)  # the signature's plan is kept
        taken = _lane_calls(monkeypatch)
        if off == "MASKNORM_KERNELS=0":
            monkeypatch.setenv("MASKNORM_KERNELS", "0")
            got, expected = module(x, mask), _routed(module, x, mask)
        else:
            with native.kernels(False):
                got, expected = module(x, mask), _routed(module, x, mask)
    _same_bits(got, expected)
    assert taken == [False]


def test_a_group_the_kernel_flags_leaves_the_lane_for_the_route():
    """kappa = |mu|/sigma far above 1/(4u) (mean 1e6, spread 1e-3 in float32): the kernel flags the
    group, the lane gives the call back, and the route redoes it."""
    module = MaskedGroupNorm(2, 4)
    x = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    x[1, 2:] = 1e6 + 1e-3 * x[1, 2:]
    mask = torch.ones(2, 10, dtype=torch.bool)
    with torch.no_grad():
        assert channel_lane.eager_call(x, mask, (2, 2), 1e-5, module.weight, module.bias, "normalize") is None
        _same_bits(module(x, mask), _routed(module, x, mask))


def test_a_padding_mask_takes_the_lane(monkeypatch):
    module = MaskedGroupNorm(4, 8)
    x, mask = _inputs(torch.float32, True)
    taken = _lane_calls(monkeypatch)
    with torch.no_grad():
        _same_bits(module(x, padding_mask=~mask), _routed(module, x, mask))
    assert taken == [True]


@pytest.mark.parametrize("case", ["broadcast mask", "weight of another dtype", "int eps", "forward AD",
                                  "eval with running statistics"])
def test_calls_the_lane_does_not_take_give_the_routes_bits(case, monkeypatch):
    module = MaskedGroupNorm(4, 8)
    x, mask = _inputs(torch.float32, True)
    x = torch.nan_to_num(x)
    if case == "broadcast mask":
        mask = mask[:1]
    elif case == "weight of another dtype":
        module.weight = torch.nn.Parameter(module.weight.detach().double())
    elif case == "int eps":
        module.eps = 0
    elif case == "eval with running statistics":
        module = MaskedInstanceNorm1d(8, affine=True, track_running_stats=True).eval()
        module.running_mean.uniform_()
    taken = _lane_calls(monkeypatch)
    with torch.no_grad():
        if case == "forward AD":
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                got = fwAD.unpack_dual(module(fwAD.make_dual(x, torch.ones_like(x)), mask)).primal
        else:
            got = module(x, mask)
        if case == "eval with running statistics":
            expected = MaskedInstanceNorm1d(8, affine=True, track_running_stats=True).eval()
            expected.load_state_dict(module.state_dict())
            expected = torch.nn.functional.instance_norm(x, expected.running_mean, expected.running_var,
                                                         expected.weight, expected.bias, False, 0.0, expected.eps)
        else:
            expected = _routed(module, x, mask)
    _same_bits(got, expected)
    assert not any(taken)


def test_the_lane_runs_the_operator_that_the_bad_call_test_makes_fail():
    """The bad-call test below would see the lane's work: with masked_channels_norm failing, a good call fails."""
    x, mask = _inputs(torch.float32, True)
    with failing_operators(["masked_channels_norm"]), torch.no_grad(), \
            pytest.raises(AssertionError, match="the kernel ran"):
        MaskedGroupNorm(4, 8)(x, mask)


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_raise_what_the_route_raises_before_any_work(case, monkeypatch):
    x, mask = _inputs(torch.float32, True)
    module, x, mask = spoil(case, MaskedGroupNorm(4, 8), x, mask, lambda t: t[:, :6])

    def call():
        with torch.no_grad():
            return module(x, mask)

    monkeypatch.setattr(channel_lane, "_GROUPS", {})
    assert_rejected_before_work(
        monkeypatch, call, lane_off=[(channel_lane, "eager_call", lambda *args: None)],  # the route before the lane
        kernels=[(masked_positions, "fused_forward"), (masked_positions.MaskedPositionsFunction, "apply")],
        operators=["masked_channels_norm", "masked_positions_norm"])
