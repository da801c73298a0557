"""`masknorm verify`: the spec is current, and the torch layers agree with the mpmath reference.

Runs `masknorm derive --check`, then, for a fixed seeded set of cases per family (layer, RMS,
batch, group, instance) x policy x dtype, compares masknorm.masked_norm's forward and VJP with
the reference and prints the worst errors in units of u*kappa:

    forward:  max |y - y*| / (u (kappa |gamma| + |beta|))                     (per position)
    gradient: max over groups of max|gx - gx*| / (u kappa max|gx*|)          (normwise per group)
              and for weight/bias: max|g - g*| / (u kappa_max max|g*|)

Then masknorm.weight_norm's rows (`masknorm.reference.verify_weight_norm`), measured in units of u.
Masked-out positions hold NaN/Inf garbage and a zero upstream gradient, so every case also checks
that garbage stays out of valid outputs and gradients. A case passes when both errors are at most
the bounds below (the worst measured over the --thorough sweep, with margin). The inputs have
kappa of a few units; the property suite covers kappa up to 1e6.

`--backend triton` runs every family's cases through the Triton kernels (layer and RMS norm on the
padded-token kernels; batch, group and instance norm on the group kernels), on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1, set here when absent), float16 included; a case they did
not take would be listed as skipped with the reason, as weight_norm's are. A summary gives the
worst errors per dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch

from masknorm import masked_norm
from masknorm.fast import backend as fast_backend
from masknorm.reference.derivatives import vjp
from masknorm.reference.error import kappa, unit_roundoff
from masknorm.reference.forward import masked_norm as reference_norm
from masknorm.reference.oracle.compare import forward_error, normwise_error

# Worst over `masknorm verify --thorough` on 2026-11-21 (torch 2.13 CPU): forward 3.4, gradient 3.9.
FORWARD_BOUND = 6.0
GRADIENT_BOUND = 8.0
POLICIES = ("normalize", "keep", "zero")
DTYPES = (torch.float64, torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Family:
    """A normalization family: how to build x, its mask and affine for a batch size."""

    name: str
    shape: Tuple[int, ...]
    mask_shape: Tuple[int, ...]
    dims: Tuple[int, ...]
    param_shape: Tuple[int, ...]
    center: bool = True
    correction: int = 0


FAMILIES = (
    Family("layer", (3, 5, 16), (3, 5, 1), (2,), (16,)),
    Family("rms", (3, 5, 16), (3, 5, 1), (2,), (16,), center=False),
    Family("batch", (4, 3, 12), (4, 1, 12), (0, 2), (3, 1)),
    Family("group", (2, 2, 3, 10), (2, 1, 1, 10), (2, 3), (1, 3, 1)),
    Family("instance", (2, 3, 12), (2, 1, 12), (2,), (3, 1)),
    Family("batch-unbiased", (4, 3, 12), (4, 3, 12), (0, 2), (3, 1), correction=1),
)


@dataclass
class Row:
    case: str
    forward: float
    gradient: float
    skipped: str = ""  # why the case did not run on the chosen backend

    @property
    def passed(self) -> bool:
        return bool(self.skipped) or (self.forward <= FORWARD_BOUND and self.gradient <= GRADIENT_BOUND)

    @property
    def result(self) -> str:
        return f"skipped: {self.skipped}" if self.skipped else "pass" if self.passed else "FAIL"


def _inputs(family: Family, seed: int, dtype: torch.dtype):
    """Seeded x (offset, so kappa > 1), mask, weight, bias, upstream gradient; garbage at padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(family.shape, generator=gen, dtype=torch.float64) * 3 + 10 * torch.rand((), generator=gen, dtype=torch.float64)
    mask = torch.rand(family.mask_shape, generator=gen) > 0.3
    padded = ~mask.expand(family.shape)
    x = x.to(dtype).masked_fill(padded, float("nan"))
    x[..., 0] = torch.where(padded[..., 0], torch.tensor(float("inf"), dtype=dtype), x[..., 0])
    weight = (torch.rand(family.param_shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(family.param_shape, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(family.shape, generator=gen, dtype=torch.float64).to(dtype).masked_fill(padded, 0)
    return x, mask, weight, bias, grad


def check_case(family: Family, masked: str, dtype: torch.dtype, seed: int, backend: str = "auto") -> Row:
    """Forward and VJP errors of one case in units of u*kappa, or a skipped row where backend is
    "triton" and the kernels do not take the case's layout."""
    x, mask, weight, bias, grad = _inputs(family, seed, dtype)
    name = f"{family.name:<15} {masked:<9} {str(dtype).removeprefix('torch.'):<8} {seed}"
    if backend == "triton" and (reason := fast_backend.unsupported(x, mask, weight, bias, family.dims)):
        return Row(name, float("nan"), float("nan"), skipped=reason)
    kw = dict(correction=family.correction, eps=1e-5, center=family.center, masked=masked)
    xr = x.detach().clone().requires_grad_()
    wr = weight.detach().clone().requires_grad_()
    br = bias.detach().clone().requires_grad_()
    out = masked_norm(xr, mask, family.dims, weight=wr, bias=br, backend=backend, **kw)
    gx, gw, gb = torch.autograd.grad(out, (xr, wr, br), grad)
    ref = reference_norm(x, mask, family.dims, weight=weight, bias=bias, **kw)
    rgx, rgw, rgb = vjp(grad, x, mask, family.dims, weight=weight, bias=bias, **kw)
    kap = kappa(x, mask, family.dims, correction=family.correction, eps=1e-5, center=family.center)
    fwd_worst = forward_error(
        out.detach().double(), ref, kap, dtype=dtype, weight=weight.expand(x.shape), bias=bias.expand(x.shape)
    )
    u = unit_roundoff(dtype)
    grad_x = normwise_error(gx.double(), rgx, np.abs(rgx), u * kap, family.dims)
    params = [
        normwise_error(got.double(), want, np.abs(want), u * float(kap.max()), tuple(range(want.ndim)))
        for got, want in ((gw, rgw), (gb, rgb))
    ]
    return Row(name, fwd_worst, max(grad_x, *params))


def run(thorough: bool, progress: Callable[[str], None], backend: str = "auto") -> List[Row]:
    """Every family x policy x dtype, one seed (five with --thorough); float16 too on triton."""
    seeds = range(5) if thorough else range(1)
    dtypes = DTYPES + ((torch.float16,) if backend == "triton" else ())
    cases = [(f, p, d, s) for f in FAMILIES for p in POLICIES for d in dtypes for s in seeds]
    rows = []
    for i, (family, masked, dtype, seed) in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {family.name} {masked} {dtype} seed {seed}")
        rows.append(check_case(family, masked, dtype, seed, backend))
    return rows


def worst_per_dtype(rows: Sequence[Row]) -> List[str]:
    """One line per dtype: the worst forward and gradient errors over the family rows that ran."""
    lines = []
    for dtype in dict.fromkeys(row.case.split()[2] for row in rows):
        ran = [row for row in rows if row.case.split()[2] == dtype and not row.skipped]
        if ran:
            lines.append(f"  {dtype:<9} forward {max(r.forward for r in ran):.3g}, gradient "
                         f"{max(r.gradient for r in ran):.3g} u*kappa over {len(ran)} cases")
    return lines
