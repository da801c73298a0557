"""Without padding, masknorm.masked_norm is torch's own normalization: F.layer_norm, F.rms_norm,
F.group_norm, F.instance_norm and F.batch_norm (training statistics) with matching settings, in
outputs and in gradients of x, weight and bias. mask=None and an all-True mask (which takes the
general, masked code path) must both agree.

Inputs are standard normal (well conditioned: kappa of a few units), so the two implementations
may differ only by rounding: float64 within TOL64, float32 within TOL32 (absolute and relative).
"""

import pytest
import torch
import torch.nn.functional as F

import masknorm

# Measured worst |masknorm - torch| / (1 + |torch|) over outputs and gradients, every layer, both
# mask variants, seeds 0..19: 2.1e-15 (float64), 1.7e-6 (float32); the tolerances are about 5x that.
TOL64 = dict(rtol=1e-14, atol=1e-14)
TOL32 = dict(rtol=1e-5, atol=1e-5)
EPS = 1e-5


def _group_norm(x, w, b, mask):
    """Group norm with 2 groups as masked_norm over (channels in the group, length) of x viewed as
    (N, 2, C/2, L), the per-channel affine viewed alike."""
    n, c, length = x.shape
    view = (n, 2, c // 2, length)
    y = masknorm.masked_norm(x.reshape(view), None if mask is None else mask.reshape(view), (2, 3), eps=EPS,
                             weight=w.reshape(2, c // 2, 1), bias=b.reshape(2, c // 2, 1))
    return y.reshape(x.shape)


# name: (shape of weight and bias, torch's layer, masknorm's counterpart) for x of shape (N, C, L) = (3, 4, 5)
LAYERS = {
    "layer_norm": (
        (4, 5),
        lambda x, w, b: F.layer_norm(x, (4, 5), w, b, EPS),
        lambda x, w, b, m: masknorm.masked_norm(x, m, (-2, -1), eps=EPS, weight=w, bias=b),
    ),
    "rms_norm": (
        (5,),
        lambda x, w, b: F.rms_norm(x, (5,), w, EPS),
        lambda x, w, b, m: masknorm.masked_norm(x, m, -1, eps=EPS, weight=w, center=False),
    ),
    "group_norm": ((4,), lambda x, w, b: F.group_norm(x, 2, w, b, EPS), _group_norm),
    "instance_norm": (
        (4,),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPS),
        lambda x, w, b, m: masknorm.masked_norm(x, m, -1, eps=EPS, weight=w[:, None], bias=b[:, None]),
    ),
    "batch_norm": (
        (4,),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=EPS),
        lambda x, w, b, m: masknorm.masked_norm(x, m, (0, 2), eps=EPS, weight=w[:, None], bias=b[:, None]),
    ),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["float64", "float32"])
@pytest.mark.parametrize("all_true_mask", [False, True], ids=["mask-None", "mask-all-True"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch(layer, dtype, tol, all_true_mask, seed):
    """Output and the gradients of x, weight and bias equal torch's layer's within tol (rms_norm
    has no bias: both give it no gradient)."""
    param_shape, torch_layer, masked_layer = LAYERS[layer]
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 4, 5)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    w = 1 + 0.5 * torch.randn(param_shape, generator=gen, dtype=dtype)
    b = torch.randn(param_shape, generator=gen, dtype=dtype)
    grad_out = torch.randn(shape, generator=gen, dtype=dtype)
    mask = torch.ones(shape, dtype=torch.bool) if all_true_mask else None

    def run(layer_fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = layer_fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
        return out, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]

    expected, expected_grads = run(torch_layer)
    out, grads = run(lambda x, w, b: masked_layer(x, w, b, mask))
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **tol)
    for name, g, e in zip(("x", "weight", "bias"), grads, expected_grads):
        torch.testing.assert_close(g, e, **tol, msg=lambda m: f"grad of {name}: {m}")
