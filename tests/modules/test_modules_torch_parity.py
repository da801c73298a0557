"""With mask=None every masknorm module equals the torch module it replaces (float64): outputs, input and
parameter gradients, running statistics over several training steps, eval outputs, state_dicts both ways,
constructor signatures, extra_repr and reset_parameters."""

import inspect

import pytest
import torch
from torch import nn

from masknorm.modules import (
    MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d, MaskedGroupNorm, MaskedInstanceNorm1d,
    MaskedInstanceNorm2d, MaskedInstanceNorm3d, MaskedLayerNorm, MaskedRMSNorm,
)

F64 = {"dtype": torch.float64}

# (ours, torch's, constructor args, constructor kwargs, input shape)
CASES = [
    (MaskedLayerNorm, nn.LayerNorm, (5,), {}, (3, 4, 5)),
    (MaskedLayerNorm, nn.LayerNorm, ((4, 5),), {"eps": 1e-3, "bias": False}, (3, 4, 5)),
    (MaskedLayerNorm, nn.LayerNorm, (5,), {"elementwise_affine": False}, (2, 5)),
    (MaskedRMSNorm, nn.RMSNorm, (5,), {}, (3, 4, 5)),
    (MaskedRMSNorm, nn.RMSNorm, ((4, 5),), {"eps": 1e-2}, (3, 4, 5)),
    (MaskedRMSNorm, nn.RMSNorm, (5,), {"elementwise_affine": False}, (2, 5)),
    (MaskedBatchNorm1d, nn.BatchNorm1d, (4,), {}, (6, 4)),
    (MaskedBatchNorm1d, nn.BatchNorm1d, (4,), {"momentum": None}, (3, 4, 5)),
    (MaskedBatchNorm1d, nn.BatchNorm1d, (4,), {"affine": False, "momentum": 0.3}, (3, 4, 5)),
    (MaskedBatchNorm1d, nn.BatchNorm1d, (4,), {"track_running_stats": False}, (3, 4, 5)),
    (MaskedBatchNorm2d, nn.BatchNorm2d, (3,), {"eps": 1e-3}, (2, 3, 4, 5)),
    (MaskedBatchNorm3d, nn.BatchNorm3d, (3,), {}, (2, 3, 2, 3, 4)),
    (MaskedGroupNorm, nn.GroupNorm, (3, 6), {}, (2, 6, 5)),
    (MaskedGroupNorm, nn.GroupNorm, (2, 6), {"affine": False}, (2, 6, 3, 4)),
    (MaskedGroupNorm, nn.GroupNorm, (6, 6), {"eps": 1e-2}, (3, 6)),
    (MaskedInstanceNorm1d, nn.InstanceNorm1d, (4,), {}, (3, 4, 5)),
    (MaskedInstanceNorm1d, nn.InstanceNorm1d, (4,), {"affine": True, "track_running_stats": True}, (3, 4, 5)),
    (MaskedInstanceNorm1d, nn.InstanceNorm1d, (4,), {"affine": True, "track_running_stats": True}, (4, 5)),
    (MaskedInstanceNorm2d, nn.InstanceNorm2d, (3,), {"track_running_stats": True, "momentum": 0.5}, (2, 3, 4, 5)),
    (MaskedInstanceNorm3d, nn.InstanceNorm3d, (3,), {"affine": True, "track_running_stats": True, "momentum": None},
     (2, 3, 2, 3, 4)),
]


def _ids(case):
    ours, _, args, kwargs, shape = case
    return f"{ours.__name__}{args}{kwargs}{shape}".replace(" ", "")


def _randomize(module, gen):
    """Non-trivial parameters and running statistics, so that loading and the affine map are really exercised."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, **F64))
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen, **F64))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen, **F64) + 0.5)


def _step(module, x, g):
    """Output, input gradient and parameter gradients of <module(x), g>."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, [x, *params], g)
    return out.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_equals_torch_without_mask(case):
    ours_cls, torch_cls, args, kwargs, shape = case
    gen = torch.Generator().manual_seed(7)
    theirs = torch_cls(*args, **kwargs, **F64)
    _randomize(theirs, gen)
    ours = ours_cls(*args, **kwargs, **F64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for mode in ("train", "train", "train", "eval", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = torch.randn(shape, generator=gen, **F64) * 3 + 1
        g = torch.randn(shape, generator=gen, **F64)
        out_o, grads_o = _step(ours, x, g)
        out_t, grads_t = _step(theirs, x, g)
        torch.testing.assert_close(out_o, out_t)
        for a, b in zip(grads_o, grads_t):
            torch.testing.assert_close(a, b)
        for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
            torch.testing.assert_close(a, b, msg=f"buffer {name} after a {mode} step")
    back = torch_cls(*args, **kwargs, **F64)
    back.load_state_dict(ours.state_dict(), strict=True)
    for (name, a), (_, b) in zip(theirs.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a, b, msg=f"state_dict entry {name}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_same_state_dict_keys_repr_and_reset(case):
    ours_cls, torch_cls, args, kwargs, _ = case
    ours, theirs = ours_cls(*args, **kwargs, **F64), torch_cls(*args, **kwargs, **F64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert repr(ours).startswith(ours_cls.__name__ + "(" + theirs.extra_repr() + ", masked='normalize'")
    gen = torch.Generator().manual_seed(1)
    _randomize(ours, gen)
    if getattr(ours, "num_batches_tracked", None) is not None:
        ours.num_batches_tracked.fill_(5)
    ours.reset_parameters()
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), f"{name} after reset_parameters"


PAIRS = [(MaskedLayerNorm, nn.LayerNorm), (MaskedRMSNorm, nn.RMSNorm), (MaskedBatchNorm1d, nn.BatchNorm1d),
         (MaskedBatchNorm2d, nn.BatchNorm2d), (MaskedBatchNorm3d, nn.BatchNorm3d), (MaskedGroupNorm, nn.GroupNorm),
         (MaskedInstanceNorm1d, nn.InstanceNorm1d), (MaskedInstanceNorm2d, nn.InstanceNorm2d),
         (MaskedInstanceNorm3d, nn.InstanceNorm3d)]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_constructor_is_torchs_plus_masked(ours, theirs):
    """Same parameter names, order and defaults as torch's constructor, plus the keyword `masked`."""
    mine = inspect.signature(ours.__init__).parameters
    torchs = inspect.signature(theirs.__init__).parameters
    assert list(mine)[: len(torchs)] == list(torchs)
    for name, p in torchs.items():
        assert (mine[name].default, mine[name].kind) == (p.default, p.kind), name
    assert mine["masked"].default == "normalize" and mine["masked"].kind == inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("cls, args", [(MaskedLayerNorm, (4,)), (MaskedBatchNorm1d, (4,)), (MaskedGroupNorm, (2, 4)),
                                       (MaskedInstanceNorm1d, (4,)), (MaskedRMSNorm, (4,))])
def test_factory_kwargs_and_policy_argument(cls, args):
    m = cls(*args, dtype=torch.float64, device="cpu", masked="zero")
    assert all(t.dtype == torch.float64 for t in m.parameters())
    assert m.masked == "zero" and "masked='zero'" in repr(m)
    with pytest.raises(ValueError, match="masked must be one of"):
        cls(*args, masked="drop")
