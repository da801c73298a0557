"""A masked normalization over time steps with a classic bug, to try `masknorm check` on:

    masknorm check examples.buggy_norm:sequence_norm --ndim 2 --grad            (in a checkout)
    masknorm check masknorm.examples.buggy_norm:sequence_norm --ndim 2 --grad   (installed)

x is (batch, time) with padded time steps (mask False). The padding is zero-filled, then the mean
and variance are taken over the whole time axis, so every padded step counts as a zero.
"""

import torch


def sequence_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last axis; the bug: zero-filled padding enters mean and var."""
    filled = x.masked_fill(~mask, 0.0)
    mean = filled.mean(-1, keepdim=True)
    var = filled.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)
