"""Calls that record no autograd take the fast paths without an autograd.Function: the padded-rows
path in one kernel call (padded_rows_norm, whose accuracy count sends flagged rows back to the
full path), the masked-positions and per-channel paths through their forward alone, eval-mode
batch norm through torch's batch_norm alone. Each must give the bits of the recorded call (the
autograd.Function that the suite's accuracy and garbage tests exercise), and the padded-rows
operators must pass opcheck. With a gradient wanted, the padded-rows operator's own Autograd
kernel (C++) records the node: its gradients must be the Python Function's bits, and its double
backward (the general closed form, registered from Python) must pass gradgradcheck."""

import pytest
import torch

import masknorm
from masknorm import masked_norm
from masknorm.fast import native

pytestmark = pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")


def _both(fn, *tensors):
    """fn's output under no_grad and with every floating tensor requiring grad (recorded)."""
    with torch.no_grad():
        quiet = fn(*tensors)
    recorded = fn(*[t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in tensors])
    assert recorded.grad_fn is not None
    return quiet, recorded.detach()


def _same_bits(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _tokens(dtype, gen, B=3, T=7, D=24):
    x = torch.randn(B, T, D, generator=gen).to(dtype)
    x[0, -2:] = float("nan")  # garbage in the padding
    mask = torch.ones(B, T, 1, dtype=torch.bool)
    mask[0, -2:] = False
    mask[2, 3] = False
    return x, mask, torch.randn(D, generator=gen).to(dtype), torch.randn(D, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_padded_rows_without_grad_give_the_recorded_bits(dtype, masked, center, with_mask):
    x, mask, w, b = _tokens(dtype, torch.Generator().manual_seed(0))
    if not with_mask:
        x, mask = torch.nan_to_num(x), None

    def norm(x, w, b):
        return masked_norm(x, mask, -1, weight=w, bias=b, center=center, masked=masked)

    quiet, recorded = _both(norm, x, w, b)
    _same_bits(quiet, recorded)


def test_a_row_the_kernel_flags_is_redone_without_grad():
    """A row with kappa = |mu|/sigma far above 1/(4u) (mean 1e6, spread 1e-3 in float32): the
    kernel counts it, and the call without grad gives the recorded call's bits (its redo)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, generator=gen)
    x[1] = 1e6 + 1e-3 * torch.randn(32, generator=gen)
    mask = torch.tensor([True, True, False, True]).unsqueeze(1)
    _, _, _, flagged = native.ops().padded_rows_norm(x, mask, None, None, 1, 1e-5, True, False)
    assert int(flagged) == 1
    quiet, recorded = _both(lambda x: masked_norm(x, mask, -1), x)
    _same_bits(quiet, recorded)


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_group_and_batch_norm_without_grad_give_the_recorded_bits(masked):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, 10, generator=gen)
    mask = torch.rand(3, 10, generator=gen) > 0.3
    x = torch.where(mask.unsqueeze(1), x, torch.tensor(float("inf")))
    group = masknorm.MaskedGroupNorm(2, 8, masked=masked)
    batch = masknorm.MaskedBatchNorm1d(8, masked=masked, track_running_stats=False)
    for module in (group, batch):
        quiet, recorded = _both(lambda x: module(x, mask), x)
        _same_bits(quiet, recorded)


def test_eval_batch_norm_without_grad_gives_the_recorded_bits():
    gen = torch.Generator().manual_seed(3)
    bn = masknorm.MaskedBatchNorm1d(8).eval()
    bn.running_mean.normal_(generator=gen)
    bn.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.randn(2, 8, 5, generator=gen)
    quiet, recorded = _both(lambda x: bn(x), x)
    _same_bits(quiet, recorded)


def _token_layouts(x):
    """x (B, T, D) as the memory layouts a caller may hand over: contiguous, time-first
    (transposed), sliced along D, expanded along B."""
    yield x
    yield x.transpose(0, 1).contiguous().transpose(0, 1)
    yield torch.cat([x, x], 2)[:, :, ::2]
    yield x[:1].expand(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_mask", ["mask", "token-mask", "no-mask"])
def test_the_padded_rows_operators_pass_opcheck(dtype, with_mask):
    """Every dtype, x contiguous, transposed, sliced and expanded, the mask of x's rank, one flag per token
    (x.shape[:-1], as the layer modules' lane passes it) or none."""
    gen = torch.Generator().manual_seed(4)
    x, mask, w, b = _tokens(dtype, gen)
    mask = {"mask": mask, "token-mask": mask.squeeze(-1), "no-mask": None}[with_mask]
    with_mask = mask is not None
    ops = native.ops()
    for xl in _token_layouts(torch.nan_to_num(x)):
        torch.library.opcheck(ops.padded_rows_norm.default, (xl, mask, w, None if with_mask else b, 1, 1e-5, True, False))
        _, mean, rstd, _ = ops.padded_rows_norm(xl, mask, w, b, 1, 1e-5, True, False)
        dy = torch.randn(xl.shape, generator=gen).to(dtype)
        torch.library.opcheck(ops.padded_rows_norm_backward.default, (dy, xl, mask, mean, rstd, w, 1, True, False))


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_the_operators_autograd_node_gives_the_python_functions_gradients(masked, center):
    from masknorm.fast.padded_rows import PaddedRowsFunction

    x, mask, w, b = _tokens(torch.float32, torch.Generator().manual_seed(5))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    grads = []
    for node in ("operator", "function"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        if node == "operator":
            out = masked_norm(leaves[0], mask, -1, weight=leaves[1], bias=leaves[2], center=center, masked=masked)
            assert "PaddedRowsNorm" in out.grad_fn.name()
        else:
            out = PaddedRowsFunction.apply(leaves[0], mask, leaves[1], leaves[2], 1, 1e-5, center, masked)
        grads.append(torch.autograd.grad(out, leaves, g))
    for a, b_ in zip(*grads):
        _same_bits(a, b_)


@pytest.mark.parametrize("masked", ["normalize", "zero"])
def test_the_operators_double_backward_passes_gradgradcheck(masked):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4]).unsqueeze(-1)

    def norm(x, w, b):
        return masked_norm(x, mask, -1, weight=w, bias=b, masked=masked)

    assert "PaddedRowsNorm" in norm(x, w, b).grad_fn.name()
    assert torch.autograd.gradgradcheck(norm, (x, w, b))


def test_the_operator_refuses_a_tangent():
    """padded_rows_norm has no forward-mode formula: a tangent is an error, never dropped."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(2, 3, 8), torch.ones(2, 3, 8))
        with pytest.raises(RuntimeError, match="no forward-mode AD formula"):
            native.ops().padded_rows_norm(x, None, None, None, 1, 1e-5, True, False)
