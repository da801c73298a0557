"""Inputs at the edges of what torch accepts: meta tensors, empty tensors, NaN padding under eval-mode
statistics, the vmapped backward of jacobian(vectorize=True). Each was a crash or a leak once."""

import pytest
import torch

import masknorm
from masknorm.modules._frozen_stats import frozen_norm


@pytest.mark.parametrize("make, x_shape, mask_shape", [
    (lambda: masknorm.MaskedLayerNorm(8, device="meta"), (4, 10, 8), (4, 10)),
    (lambda: masknorm.MaskedBatchNorm1d(8, device="meta"), (4, 8, 10), (4, 10)),
    (lambda: masknorm.MaskedGroupNorm(2, 8, device="meta"), (4, 8, 10), (4, 10)),
    (lambda: masknorm.MaskedInstanceNorm1d(8, device="meta"), (4, 8, 10), (4, 10)),
])
@pytest.mark.parametrize("with_mask", [True, False])
def test_meta_tensors_give_meta_outputs_of_the_input_shape(make, x_shape, mask_shape, with_mask):
    mask = torch.ones(mask_shape, dtype=torch.bool, device="meta") if with_mask else None
    out = make()(torch.empty(x_shape, device="meta"), mask)
    assert out.device.type == "meta" and out.shape == x_shape


@pytest.mark.parametrize("make, x_shape, mask_shape", [
    (lambda: masknorm.MaskedLayerNorm(8), (4, 10, 8), (4, 10)),
    (lambda: masknorm.MaskedBatchNorm1d(8), (4, 8, 10), (4, 10)),
    (lambda: masknorm.MaskedGroupNorm(2, 8), (4, 8, 10), (4, 10)),
])
def test_fake_tensors_take_the_general_path(make, x_shape, mask_shape):
    """Under FakeTensorMode (as torch.export and make_fx trace) the fast paths, whose safety checks
    read values, are not taken: the call gives a fake output of x's shape instead of failing."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    with FakeTensorMode():
        module, x = make(), torch.randn(x_shape)
        out = module(x, torch.ones(mask_shape, dtype=torch.bool))
    assert is_fake(out) and out.shape == x_shape


@pytest.mark.parametrize("shape, dim", [((4, 0), -1), ((0,), -1), ((0, 8), -1), ((0, 3, 5), (0, 2)), ((2, 3, 0), (0, 2))])
def test_masked_norm_of_an_empty_tensor_is_empty(shape, dim):
    x = torch.randn(shape, requires_grad=True)
    out = masknorm.masked_norm(x, torch.ones(shape, dtype=torch.bool), dim)
    assert out.shape == x.shape
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("masked_cls, torch_cls, x_shape", [
    (lambda: masknorm.MaskedBatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), (0, 3, 5)),
    (lambda: masknorm.MaskedBatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), (2, 3, 0)),
    (lambda: masknorm.MaskedGroupNorm(1, 3), lambda: torch.nn.GroupNorm(1, 3), (0, 3, 5)),
    (lambda: masknorm.MaskedInstanceNorm1d(3), lambda: torch.nn.InstanceNorm1d(3), (2, 3, 0)),
    (lambda: masknorm.MaskedLayerNorm(0), lambda: torch.nn.LayerNorm(0), (2, 0)),
])
def test_empty_batches_and_lengths_behave_as_torch(masked_cls, torch_cls, x_shape):
    """The output, the parameter gradients and the running statistics are torch's."""
    results = []
    for module in (masked_cls(), torch_cls()):
        x = torch.randn(x_shape, requires_grad=True)
        out = module(x)
        out.sum().backward()
        results.append((out.shape, [p.grad for p in module.parameters()], [b.clone() for b in module.buffers()]))
    (shape_a, grads_a, buffers_a), (shape_b, grads_b, buffers_b) = results
    assert shape_a == shape_b
    for a, b in zip(grads_a + buffers_a, grads_b + buffers_b):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make", [
    lambda: masknorm.MaskedBatchNorm1d(3, affine=True),
    lambda: masknorm.MaskedInstanceNorm1d(3, affine=True, track_running_stats=True),
])
def test_eval_statistics_keep_nan_padding_out_of_the_parameter_gradients(make):
    """Fine-tuning with frozen statistics: NaN in the padding, upstream gradient 0 there; weight.grad
    was NaN (0 * NaN in batch_norm's backward). The gradients equal those of the same batch with
    the padding zeroed."""
    module = make().double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1, generator=gen)
        module.running_var.uniform_(0.5, 2, generator=gen)
        module.weight.uniform_(0.5, 2, generator=gen)
        module.bias.uniform_(-1, 1, generator=gen)
    module.eval()
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    g = torch.where(mask[:, None], torch.randn(2, 3, 5, dtype=torch.float64, generator=gen), 0)
    grads = []
    for padding in (float("nan"), 0.0):
        module.zero_grad()
        xr = torch.where(mask[:, None], x, padding).requires_grad_()
        module(xr, mask).backward(g)
        grads.append([xr.grad[mask[:, None].expand_as(x)], module.weight.grad.clone(), module.bias.grad.clone()])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frozen_norm_derivatives():
    gen = torch.Generator().manual_seed(4)
    mean, var = torch.randn(3, dtype=torch.float64, generator=gen), torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    inputs = [torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in ((2, 3, 4), (3,), (3,))]

    def f(x, w, b):
        return frozen_norm(x, mean, var, w, b, 1e-5)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("mask_shape, dim", [((2, 1, 4), (0, 2)), ((2, 4, 1), -1), ((2, 1, 4), (1, 2)), ((2, 3, 4), 1)],
                         ids=["batch-norm-layout", "padded-tokens", "group-norm-layout", "general"])
def test_jacobian_vectorized_equals_the_loop(mask_shape, dim):
    """jacobian(vectorize=True) vmaps the backward; the fast paths' host syncs cannot be batched
    ('Batching rule not implemented for aten::is_nonzero'), so they hand it to the general one."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    if mask_shape == (2, 4, 1):
        x = x.transpose(1, 2).contiguous()
    mask = torch.rand(mask_shape, generator=gen) > 0.3

    def f(x):
        return masknorm.masked_norm(x, mask, dim)

    vectorized = torch.autograd.functional.jacobian(f, x, vectorize=True)
    looped = torch.autograd.functional.jacobian(f, x)
    torch.testing.assert_close(vectorized, looped, rtol=1e-13, atol=1e-13)
