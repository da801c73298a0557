"""masked_norm on CUDA: every family forward and backward against the CPU result, on torch's kernels
(backend "auto") and on the Triton kernels (backend "triton"), garbage padding kept out, and no host
synchronization on the general path. Skipped without a CUDA device (none was available when these
were written: they have not run yet). The device-placement fix of the general path (constants made
on x's device, not on the CPU and copied over on every call) is checked on the meta device, which
runs everywhere.
"""

import importlib.util
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import masknorm
from masknorm._stats import valid_count

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (name, x shape, mask shape, dims, weight/bias shape, center)
FAMILIES = [
    ("layer, padded tokens", (4, 9, 32), (4, 9, 1), (2,), (32,), True),
    ("rms, padded tokens", (4, 9, 32), (4, 9, 1), (2,), (32,), False),
    ("layer, elementwise mask", (4, 9, 32), (4, 9, 32), (2,), (32,), True),
    ("batch", (6, 8, 20), (6, 1, 20), (0, 2), (8, 1), True),
    ("batch, elementwise mask", (6, 8, 20), (6, 8, 20), (0, 2), (8, 1), True),
    ("group", (3, 4, 2, 25), (3, 1, 1, 25), (2, 3), (4, 2, 1), True),
    ("instance", (3, 8, 25), (3, 1, 25), (2,), (8, 1), True),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POLICIES = ("normalize", "keep", "zero")


def _inputs(family, dtype, device, garbage=False):
    """(x, mask, weight, bias, upstream gradient) on `device`; NaN/Inf at the padding if `garbage`
    (with a zero upstream gradient there, so "normalize" keeps it out of the gradients)."""
    _, shape, mask_shape, _, pshape, _ = family
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2 + 1
    mask = torch.rand(mask_shape, generator=gen) > 0.3
    weight, bias = torch.rand(pshape, generator=gen) + 0.5, torch.randn(pshape, generator=gen)
    pad = ~mask.expand(shape)
    grad = torch.randn(shape, generator=gen).masked_fill(pad, 0)
    if garbage:
        x = x.masked_fill(pad, math.nan)
        x[..., 0] = torch.where(pad[..., 0], math.inf, x[..., 0])
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in (x, mask, weight, bias, grad)]


def _run(family, dtype, device, backend, masked, garbage=False):
    """(out, grad x, grad weight, grad bias) as float64 on the CPU."""
    name, _, _, dims, _, center = family
    x, mask, weight, bias, grad = _inputs(family, dtype, device, garbage)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = masknorm.masked_norm(leaves[0], mask, dims, weight=leaves[1], bias=leaves[2], center=center, masked=masked,
                               backend=backend)
    return [t.detach().double().cpu() for t in (out, *torch.autograd.grad(out, leaves, grad))]


def _close(got, want, dtype, valid):
    """Within a few units of dtype's rounding of the largest magnitude, at the valid positions
    (outputs and gradients of x) or everywhere (parameter gradients)."""
    u = max(torch.finfo(dtype).eps, 2**-23)
    for i, (a, b) in enumerate(zip(got, want)):
        if i < 2:
            a, b = a[valid], b[valid]
        torch.testing.assert_close(a, b, rtol=0, atol=8 * u * max(1.0, b.abs().max().item()))


@needs_cuda
@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_cuda_matches_the_cpu(family, dtype, masked):
    """Forward and backward on CUDA (backend "auto", torch's kernels) agree with the same call on
    the CPU within a few u, and garbage padding leaves the valid results as clean padding does."""
    cpu = _run(family, dtype, "cpu", "auto", masked)
    cuda = _run(family, dtype, "cuda", "auto", masked)
    valid = _inputs(family, dtype, "cpu")[1].expand(cpu[0].shape)
    _close(cuda, cpu, dtype, valid)
    dirty = _run(family, dtype, "cuda", "auto", masked, garbage=True)
    _close(dirty, cpu, dtype, valid)


@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (gpu extra)")
@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_triton_on_cuda_matches_the_cpu(family, dtype, masked):
    """The same on the Triton kernels compiled for the GPU (backend "triton"), garbage included."""
    cpu = _run(family, dtype, "cpu", "auto", masked)
    valid = _inputs(family, dtype, "cpu")[1].expand(cpu[0].shape)
    for garbage in (False, True):
        _close(_run(family, dtype, "cuda", "triton", masked, garbage), cpu, dtype, valid)


@needs_cuda
@pytest.mark.parametrize("family", [f for f in FAMILIES if f[0] in ("rms, padded tokens", "layer, elementwise mask",
                                                                    "group", "instance")],
                         ids=lambda f: f[0])
def test_general_path_does_not_synchronize(family):
    """The families that take the general path on CUDA (no fast path there) run forward and backward
    without a host synchronization (torch.cuda.set_sync_debug_mode("error") raises on one)."""
    name, _, _, dims, _, center = family
    x, mask, weight, bias, grad = _inputs(family, torch.float32, "cuda")
    x.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = masknorm.masked_norm(x, mask, dims, weight=weight, bias=bias, center=center)
        out.backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _CpuTensors(TorchDispatchMode):
    """Records every op that takes or makes a CPU tensor."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in tensors):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("mask_shape", [None, (2, 3, 1), (2, 3, 4)], ids=["no mask", "tokens", "elementwise"])
@pytest.mark.parametrize("dims", [(2,), (0, 2)], ids=["layer", "batch"])
def test_the_general_path_makes_no_cpu_tensor_for_a_device_x(dims, mask_shape):
    """Forward and backward of the general path on meta tensors (where it runs off the CPU, as on
    CUDA; the fast paths need data) neither make nor read a CPU tensor: its constants are made on
    x's device, not on the CPU and copied over on every call (valid_count without a mask did that)."""
    x = torch.randn(2, 3, 4, device="meta", requires_grad=True)
    weight = torch.ones((4,) if dims == (2,) else (3, 1), device="meta", requires_grad=True)
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool, device="meta")
    with _CpuTensors() as seen:
        out = masknorm.masked_norm(x, mask, dims, weight=weight)
        out.backward(torch.ones_like(out))
    assert seen.ops == []
    assert valid_count(None, (2, 3, 4), (1, 2), torch.float32, torch.device("meta")).device.type == "meta"
