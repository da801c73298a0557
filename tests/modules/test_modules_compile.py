"""Every module under torch.compile gives eager's outputs, gradients and running statistics, in training and eval."""

import copy

import pytest
import torch

from masknorm.modules import (
    MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedGroupNorm, MaskedInstanceNorm1d, MaskedLayerNorm, MaskedNorm,
    MaskedRMSNorm,
)

CASES = [
    (lambda: MaskedBatchNorm1d(4, masked="zero"), (3, 4, 5), (3, 5)),
    (lambda: MaskedBatchNorm2d(4, momentum=None), (2, 4, 3, 3), (2, 3, 3)),
    (lambda: MaskedLayerNorm(5), (3, 4, 5), (3, 4)),
    (lambda: MaskedRMSNorm(5, masked="keep"), (3, 4, 5), (3, 4)),
    (lambda: MaskedGroupNorm(2, 4), (3, 4, 5), (3, 5)),
    (lambda: MaskedInstanceNorm1d(4, affine=True, track_running_stats=True), (3, 4, 5), (3, 5)),
    (lambda: MaskedNorm("b (h c) n", "c n", "h c", h=2, c=2), (3, 4, 5), (3, 5)),
]


def _run(module, x, mask):
    x = x.clone().requires_grad_(True)
    out = module(x, mask)
    grads = torch.autograd.grad(out, [x, *module.parameters()], torch.ones_like(out))
    return [out.detach(), *grads, *[b.clone() for b in module.buffers()]]


@pytest.mark.parametrize("backend", ["aot_eager"])
@pytest.mark.parametrize("make, x_shape, mask_shape", CASES)
def test_compiled_equals_eager(make, x_shape, mask_shape, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    eager = make()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend=backend)
    for training in (True, True, False):
        eager.train(training)
        compiled_module.train(training)
        x = torch.randn(x_shape, generator=gen)
        mask = torch.rand(mask_shape, generator=gen) > 0.3
        for a, b in zip(_run(compiled, x, mask), _run(eager, x, mask)):
            torch.testing.assert_close(a, b)


def test_batch_norm_under_inductor():
    test_compiled_equals_eager(*CASES[0], backend="inductor")
