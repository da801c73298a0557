"""The masked batch-norm modules call the per-channel kernel straight from the module where it takes the call
(_MaskedBatchNorm._lane: fast.per_channel.eager_call with batch statistics, one per_channel_norm call whose
Autograd kernel records a C++ node, and one per_channel_track call for the running statistics; with running
statistics _normalize_running without the route's checks). That lane must give the bits of the module's route
(_MaskedBatchNorm._route: _prepare, masked_norm_with_moments, _track) for the output, the gradients, the running
statistics and num_batches_tracked, leave every other call to that route, and raise what the route raises before
any work."""

import copy

import pytest
import torch
from support.lanes import BAD_CALLS, assert_rejected_before_work, failing_operators, spoil

import masknorm
from masknorm.fast import native, per_channel
from masknorm.modules import MaskedBatchNorm1d, MaskedBatchNorm2d
from masknorm.modules import _norm_base

pytestmark = pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")


def _same_bits(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _inputs(cls, dtype, with_mask, seed=0):
    """x (B, C, *S) with NaN and Inf in its padding, the (B, *S) mask (None without one), a gradient that is 0 at
    the padding."""
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 4, 10) if cls is MaskedBatchNorm1d else (3, 4, 3, 4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if not with_mask:
        return x, None, dy
    mask = torch.rand((shape[0], *shape[2:]), generator=gen) > 0.3
    mask[0] = True
    padding = ~mask.unsqueeze(1).expand(shape)
    x[padding] = float("nan")
    x[:, 1][~mask] = float("inf")
    return x, mask, dy.masked_fill(padding, 0)


def _module(cls, dtype, masked, affine=True, momentum=0.1, track=True):
    module = cls(4, momentum=momentum, affine=affine, track_running_stats=track, masked=masked).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return module


def _lane_only(monkeypatch):
    """The route's entry points fail the test: the call must be the lane's."""

    def route(*args, **kwargs):
        raise AssertionError("the route ran on a call the lane takes")

    monkeypatch.setattr(_norm_base, "masked_norm_with_moments", route)
    monkeypatch.setattr(_norm_base.MaskedRunningNorm, "_prepare", route)


def _state(module, out, x=None):
    """What a call leaves: output, gradients, buffers."""
    grads = [] if x is None else [x.grad, *(p.grad for p in module.parameters())]
    return [out.detach(), *grads, *(b.clone() for b in module.buffers())]


def _steps(module, calls, monkeypatch=None, grad=False, dy=None, create_graph=False):
    """The module's state after each of calls (a list of (x, mask)), through the lane (monkeypatch given: the
    route's entry points fail) or the route; create_graph: the backward recorded (double backward's first step)."""
    states = []
    for x, mask in calls:
        module.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            if monkeypatch is None:
                out = module._route(xr, mask)
            else:
                with monkeypatch.context() as patch:
                    _lane_only(patch)
                    out = module(xr, mask)
        if grad:
            out.backward(dy, create_graph=create_graph)
        states.append(_state(module, out, xr if grad else None))
    return states


def _compare(lane, route):
    for got_step, expected_step in zip(lane, route, strict=True):
        for got, expected in zip(got_step, expected_step, strict=True):
            if got is None or expected is None:
                assert got is expected
            else:
                _same_bits(got, expected)


@pytest.mark.parametrize("cls", [MaskedBatchNorm1d, MaskedBatchNorm2d], ids=["1d", "2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "average"])
@pytest.mark.parametrize("mode", ["train", "eval", "untracked"])
def test_the_lane_gives_the_routes_bits_without_grad(cls, dtype, masked, with_mask, affine, momentum, mode,
                                                     monkeypatch):
    module = _module(cls, dtype, masked, affine, momentum, track=mode != "untracked")
    module.train(mode != "eval")
    if mode == "eval":
        with torch.no_grad():
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    calls = [_inputs(cls, dtype, with_mask, seed)[:2] for seed in range(3)]
    route = _steps(copy.deepcopy(module), calls)
    _compare(_steps(module, calls, monkeypatch), route)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "recorded-backward"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")  # .grad is reset on every step
def test_the_lane_gives_the_routes_gradients(dtype, masked, affine, with_mask, create_graph, mode, monkeypatch):
    module = _module(MaskedBatchNorm1d, dtype, masked, affine).train(mode == "train")
    x, mask, dy = _inputs(MaskedBatchNorm1d, dtype, with_mask)
    route = _steps(copy.deepcopy(module), [(x, mask)] * 2, grad=True, dy=dy, create_graph=create_graph)
    _compare(_steps(module, [(x, mask)] * 2, monkeypatch, grad=True, dy=dy, create_graph=create_graph), route)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("garbage", [float("nan"), 1e30], ids=["nan", "huge"])
def test_a_gradient_at_garbage_padding_gives_the_routes_bits(dtype, garbage, monkeypatch):
    """Under "normalize" a nonzero gradient at a masked-out NaN (or a value so far out that its terms overflow)
    makes the kernel's sums non-finite: the node's backward takes the route's torch-kernel path."""
    module = _module(MaskedBatchNorm1d, dtype, "normalize")
    x, mask, _ = _inputs(MaskedBatchNorm1d, dtype, True)
    x = torch.where(mask.unsqueeze(1), x, garbage)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    route = _steps(copy.deepcopy(module), [(x, mask)], grad=True, dy=dy)
    _compare(_steps(module, [(x, mask)], monkeypatch, grad=True, dy=dy), route)


@pytest.mark.parametrize("case", ["all padding", "one valid value", "two valid values", "one position"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "average"])
@pytest.mark.parametrize("masked", ["normalize", "zero"])
def test_degenerate_batches_give_the_routes_bits(case, momentum, masked, monkeypatch):
    """k <= 1 keeps the running values (and, with momentum=None, does not count the batch); k = 0 passes x
    through."""
    module = _module(MaskedBatchNorm1d, torch.float32, masked, momentum=momentum)
    x, mask, dy = _inputs(MaskedBatchNorm1d, torch.float32, True)
    mask = torch.zeros_like(mask)  # the garbage of the old padding stays in x: row 0 was all valid
    if case == "one valid value":
        mask[0, 4] = True
    elif case == "two valid values":
        mask[0, 4] = mask[0, 7] = True
    elif case == "one position":
        x, dy, mask = x[:1, :, :1], dy[:1, :, :1], mask[:1, :1] | True
    calls = [(torch.randn(x.shape, generator=torch.Generator().manual_seed(4)), mask.clone().fill_(True)),
             (x, mask)]
    route = _steps(copy.deepcopy(module), calls, grad=True, dy=dy)
    _compare(_steps(module, calls, monkeypatch, grad=True, dy=dy), route)


def test_the_running_update_is_update_runnings_over_many_steps(monkeypatch):
    """momentum=None (factor 1/num_batches_tracked, a float64 tensor) and a float momentum, 20 steps: the running
    statistics the lane's per_channel_track leaves are the route's (update_running's) bit for bit."""
    for momentum in (None, 0.3):
        module = _module(MaskedBatchNorm2d, torch.float32, "normalize", momentum=momentum)
        calls = [_inputs(MaskedBatchNorm2d, torch.float32, True, seed)[:2] for seed in range(20)]
        route = _steps(copy.deepcopy(module), calls)
        _compare(_steps(module, calls, monkeypatch), route)


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "route"])
def test_a_running_update_invalidates_a_saved_running_statistic(lane):
    """An eval call that saved the running statistics for its backward, then a training call that updates them:
    the backward refuses to run on the updated values, after the lane's per_channel_track as after the route's
    in-place ops (both bump the buffers' version counters)."""
    module = _module(MaskedBatchNorm1d, torch.float32, "normalize").eval()
    x, mask, dy = _inputs(MaskedBatchNorm1d, torch.float32, True)
    out = module(x.clone().requires_grad_(), mask)
    module.train()
    with torch.no_grad():
        (module if lane else module._route)(x, mask)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(dy)


def test_the_lane_records_one_cpp_node_and_none_without_grad():
    module = _module(MaskedBatchNorm1d, torch.float32, "normalize")
    x, mask, _ = _inputs(MaskedBatchNorm1d, torch.float32, True)
    assert module(x.requires_grad_(), mask).grad_fn.name() == "PerChannelNormBackward"
    with torch.no_grad():
        assert module(x, mask).grad_fn is None


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_the_lanes_node_passes_gradgradcheck(masked):
    """Double backward: the node's backward in grad mode is the general closed form in differentiable ops."""
    module = _module(MaskedBatchNorm1d, torch.float64, masked, track=False)
    x, mask, _ = _inputs(MaskedBatchNorm1d, torch.float64, True)
    x = torch.where(mask.unsqueeze(1), x, 0.5).requires_grad_()
    weight, bias = (p.detach().clone().requires_grad_() for p in module.parameters())

    def norm(x, weight, bias):
        module.weight, module.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        return per_channel.eager_call(x, mask, weight, bias, module.eps, masked)

    assert norm(x, weight, bias).grad_fn.name() == "PerChannelNormBackward"
    assert torch.autograd.gradcheck(norm, (x, weight, bias))
    assert torch.autograd.gradgradcheck(norm, (x, weight, bias))


def test_a_channel_the_kernel_flags_leaves_the_lane_for_the_route():
    """A float32 variance above max/16 (values near 1e19): the kernel flags the channel, the lane gives the call
    back (no running update), and the route redoes it."""
    module = _module(MaskedBatchNorm1d, torch.float32, "normalize")
    x, mask, _ = _inputs(MaskedBatchNorm1d, torch.float32, True)
    x[:, 2] *= 1e19
    before = [b.clone() for b in module.buffers()]
    with torch.no_grad():
        running = (module.running_mean, module.running_var, module.num_batches_tracked, 0.1)
        assert per_channel.eager_call(x, mask, module.weight, module.bias, module.eps, "normalize", running) is None
        for got, expected in zip(module.buffers(), before):
            _same_bits(got, expected)
    route = _steps(copy.deepcopy(module), [(x, mask)])
    _compare(_steps(module, [(x, mask)]), route)


@pytest.mark.parametrize("case", ["channel mask", "broadcast mask", "float16", "weight of another dtype", "eps 0",
                                  "int eps", "over the kernel's size", "padding_mask", "padding block",
                                  "forward AD", "int momentum"])
def test_calls_the_lane_does_not_take_give_the_routes_bits(case):
    module = _module(MaskedBatchNorm1d, torch.float32, "keep")
    x, mask, _ = _inputs(MaskedBatchNorm1d, torch.float32, True)
    route_mask, kwargs = mask, {"mask": mask}
    if case == "channel mask":
        route_mask = mask.unsqueeze(1)
        kwargs = {"mask": route_mask}
    elif case == "broadcast mask":
        route_mask = mask[:1]
        kwargs = {"mask": route_mask}
    elif case == "float16":
        x, module = x.half(), module.half()
    elif case == "weight of another dtype":
        module.weight = torch.nn.Parameter(module.weight.detach().double())
    elif case == "eps 0":
        module.eps = 0.0
    elif case == "int eps":
        module.eps = 1
    elif case == "over the kernel's size":
        x = torch.randn(per_channel.KERNEL_MAX_NUMEL // 40 + 1, 4, 10, generator=torch.Generator().manual_seed(5))
        route_mask = torch.ones(x.shape[0], 10, dtype=torch.bool)
        kwargs = {"mask": route_mask}
    elif case == "padding_mask":
        kwargs = {"padding_mask": ~mask}
    elif case == "padding block":
        kwargs = {}
    elif case == "int momentum":
        module.momentum = 1
    x = torch.where(torch.isfinite(x), x, 0)
    reference = copy.deepcopy(module)
    with torch.no_grad():
        if case == "padding block":
            expected = _state(reference, reference._route(x, route_mask))
            with masknorm.padding(mask=mask, size=x.shape[-1]):
                got = _state(module, module(x, **kwargs))
        elif case == "forward AD":
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                tangent = torch.ones_like(x)
                outs = [fwAD.unpack_dual(call(fwAD.make_dual(x, tangent), route_mask))
                        for call in (reference._route, module)]
            expected, got = _state(reference, outs[0].primal), _state(module, outs[1].primal)
            _same_bits(outs[1].tangent, outs[0].tangent)
        else:
            expected = _state(reference, reference._route(x, route_mask))
            got = _state(module, module(x, **kwargs))
    _compare([got], [expected])


def test_a_padding_blocks_mask_takes_the_lane(monkeypatch):
    module = _module(MaskedBatchNorm1d, torch.float32, "zero")
    x, mask, _ = _inputs(MaskedBatchNorm1d, torch.float32, True)
    route = _steps(copy.deepcopy(module), [(x, mask)])
    with masknorm.padding(mask=mask, size=x.shape[-1]), monkeypatch.context() as patch:
        _lane_only(patch)
        with torch.no_grad():
            got = _state(module, module(x))
    _compare([got], route)


def _bad(case):
    """(module, x, kwargs) of a call that the route rejects."""
    module = _module(MaskedBatchNorm1d, torch.float32, "normalize")
    x, mask, _ = _inputs(MaskedBatchNorm1d, torch.float32, True)
    if case == "mask and padding_mask":
        return module, x, {"mask": mask, "padding_mask": ~mask}
    if case == "x of another rank":
        return module, x[..., None], {"mask": mask}
    module, x, mask = spoil(case, module, x, mask, lambda t: t[:, :3])  # "x of another width": fewer channels
    return module, x, {"mask": mask}


def test_the_lane_runs_the_operators_that_the_bad_call_test_makes_fail():
    """The bad-call test below would see the lane's work: with per_channel_norm failing, a good call fails."""
    module = _module(MaskedBatchNorm1d, torch.float32, "normalize")
    x, mask, _ = _inputs(MaskedBatchNorm1d, torch.float32, True)
    with failing_operators(["per_channel_norm"]), pytest.raises(AssertionError, match="the kernel ran"):
        module(x, mask)


@pytest.mark.parametrize("case", ["mask and padding_mask", "x of another rank", *BAD_CALLS])
def test_bad_calls_raise_what_the_route_raises_before_any_work(case, monkeypatch):
    module, x, kwargs = _bad(case)
    assert_rejected_before_work(
        monkeypatch, lambda: module(x, **kwargs),
        lane_off=[(type(module), "_lane_affine", lambda *args: None)],  # the module's route before the lane
        kernels=[], operators=["per_channel_norm", "per_channel_track"])


class _Doubled(torch.nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["weight", "bias", "running_var"])
def test_a_parametrized_parameter_or_buffer_is_the_one_used(name, training):
    """A parametrized weight, bias or running statistic (torch.nn.utils.parametrize: the name leaves _parameters /
    _buffers for a property) is read as the module reads it: the output equals the module whose tensor holds the
    parametrization's value (once the lane read _parameters directly and took a parametrized weight for None)."""
    if name == "running_var" and training:
        pytest.skip("training normalizes with the batch's statistics")
    x, mask, _ = _inputs(MaskedBatchNorm1d, torch.float32, True)
    plain = _module(MaskedBatchNorm1d, torch.float32, "normalize").train(training)
    with torch.no_grad():
        plain.running_var.uniform_(0.5, 2.0)
    parametrized = copy.deepcopy(plain)
    torch.nn.utils.parametrize.register_parametrization(parametrized, name, _Doubled(), unsafe=True)
    with torch.no_grad():
        tensor = getattr(plain, name)
        tensor.copy_(2 * tensor)
        _same_bits(parametrized(x, mask), plain(x, mask))
