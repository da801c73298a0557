"""`masknorm verify`'s WeightNorm rows: masknorm.weight_norm against the reference, per dtype and seed.

Each case is a (4, 6) weight of four rows: entries of order 1, entries whose squares overflow the
dtype (finfo.max ** 0.6), entries whose squares underflow it (finfo.tiny ** 0.6), and a zero row;
about a quarter of the entries pruned (mask False) and holding NaN/Inf, with a NaN upstream gradient
there. Errors in units of u (`masknorm.reference.weight_norm_errors`: forward relative to |g|,
gradients normwise per row).
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

import masknorm

from .weight_norm import weight_norm_errors

DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def _inputs(dtype: torch.dtype, seed: int) -> Tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    scales = torch.tensor([[1.0], [info.max ** 0.6], [info.tiny ** 0.6], [0.0]], dtype=torch.float64)
    v = torch.randn(4, 6, generator=gen, dtype=torch.float64) * scales
    mask = torch.rand(4, 6, generator=gen) > 0.25
    mask[:, 0] = True
    garbage = torch.tensor([float("nan"), float("inf")], dtype=torch.float64)[torch.arange(24).reshape(4, 6) % 2]
    v = torch.where(mask, v, garbage).to(dtype)
    g = (torch.rand(4, 1, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    grad_w = torch.where(mask, torch.randn(4, 6, generator=gen, dtype=torch.float64), garbage[0]).to(dtype)
    return v, g, mask, grad_w


def check_case(dtype: torch.dtype, seed: int) -> Tuple[str, float, float]:
    """(case name, forward error, gradient error) of one seeded case."""
    v, g, mask, grad_w = _inputs(dtype, seed)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(v.clone())
    masknorm.weight_norm(module, mask=mask)
    g_param, v_param = module.parametrizations.weight.original0, module.parametrizations.weight.original1
    with torch.no_grad():
        g_param.copy_(g)
    w = module.weight
    grad_g, grad_v = torch.autograd.grad(w, (g_param, v_param), grad_w)
    forward, gradient = weight_norm_errors(w.detach(), grad_v, grad_g, v, g, grad_w, mask, dtype=dtype)
    return f"{'weight-norm':<15} {'-':<9} {str(dtype).removeprefix('torch.'):<8} {seed}", forward, gradient


def run(thorough: bool, progress: Callable[[str], None]) -> List[Tuple[str, float, float]]:
    """Every dtype, one seed (five with --thorough)."""
    cases = [(d, s) for d in DTYPES for s in (range(5) if thorough else range(1))]
    out = []
    for i, (dtype, seed) in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] weight norm {dtype} seed {seed}")
        out.append(check_case(dtype, seed))
    return out
