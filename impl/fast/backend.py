"""The backend choice of masked_norm: "auto", "torch" or "triton", without importing triton.

"torch": the CPU fast paths and the general path (torch's kernels), as before Triton existed here.
"triton": the Triton kernels (masknorm.fast.triton_padded_rows, masknorm.fast.triton_groups); a call
they cannot run raises (a ValueError naming what is unsupported, an ImportError without triton),
never falls back.
"auto": "torch", for now: the Triton kernels have run only under Triton's interpreter, never on a
GPU, and a default must not be code that has never run where it would run. Once they are tested
on a GPU, "auto" is meant to pick them for eager CUDA calls whose layout they take.

The kernels' layouts, any correction, eps, policy and floating dtype:
- padded tokens (triton_padded_rows): layer or RMS norm over the trailing axes, a mask constant along
  them (one flag per row), weight and bias varying along the normalized axes only, rows of at
  most MAX_D values;
- strided groups (triton_groups, masknorm.fast.group_views): group/instance norm with one mask flag
  per (sample, position), layer/RMS norm with a mask that varies inside the rows (or rows wider
  than MAX_D), and batch norm over every axis but axis 1 with any mask and per-channel weight and
  bias, which also gives the batch's per-channel mean, unbiased variance and count.
Other reductions (axes neither trailing nor every axis but 1) and parameters that vary along
axes the view keeps apart from the groups are unsupported.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch

from masknorm.fast import group_views

BACKENDS = ("auto", "torch", "triton")
MAX_D = 65536  # masknorm.fast.triton_padded_rows.MAX_D (kept here so that checking needs no triton)


def check_backend(backend: str) -> None:
    """ValueError unless backend is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def installed() -> bool:
    """True when triton can be imported (asked of the import system; triton is not imported)."""
    return importlib.util.find_spec("triton") is not None


def plan(x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
         bias: Optional[torch.Tensor], dims: Sequence[int]) -> Union[str, group_views.GroupView, None]:
    """The kernels that run this call (the mask of x's rank): None for the padded-token kernels, a
    GroupView for the group kernels, or a string saying why neither can (x on its device, its layout)."""
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "x is on the CPU: Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    if x.device.type not in ("cpu", "cuda"):
        return f"x is on {x.device}: the kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)"
    if _padded_tokens(x, mask, weight, bias, dims):
        return None
    return group_views.view_for(x, mask, weight, bias, dims)


def unsupported(x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], dims: Sequence[int]) -> Optional[str]:
    """Why the Triton kernels cannot run this call, or None if they can. The mask is of x's rank."""
    how = plan(x, mask, weight, bias, dims)
    return how if isinstance(how, str) else None


def _padded_tokens(x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], dims: Sequence[int]) -> bool:
    """True for the padded-token kernels' layout: trailing axes, one mask flag per row, weight and
    bias varying along the normalized axes only, rows of at most MAX_D values."""
    nd, ndims = x.dim(), len(dims)
    return (
        tuple(dims) == tuple(range(nd - ndims, nd))
        and (mask is None or all(mask.shape[d] == 1 for d in dims))
        and all(t is None or all(s == 1 for s in t.shape[: max(0, t.dim() - ndims)]) for t in (weight, bias))
        and math.prod(x.shape[nd - ndims:]) <= MAX_D
    )


def wanted(backend: str, traced: bool) -> bool:
    """True when the call should run on the Triton kernels (then run() checks the layout): only when
    forced, backend "triton" ("auto" is "torch" until the kernels have run on a GPU). `traced`: under
    torch.compile/export, a torch.func transform, or on a tensor without data."""
    if backend == "triton":
        if traced:
            raise ValueError("backend='triton' runs in eager mode on tensors with data; under torch.compile, "
                             "torch.export or torch.func use backend='auto'")
        return True
    return False


def run(x, mask, weight, bias, dims: Sequence[int], correction: int, eps: float, center: bool,
        masked: str) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """(the output, the batch's per-group (mean, unbiased variance, count) or None) from the Triton
    kernels; ValueError naming what they do not take, ImportError without triton."""
    how = plan(x, mask, weight, bias, dims)
    if isinstance(how, str):
        raise ValueError(f"backend='triton' cannot run this call: {how}")
    if not installed():
        raise ImportError("backend='triton' needs triton, the gpu extra (from a checkout: pip install '.[gpu]')")
    from masknorm.fast import triton_groups, triton_padded_rows

    if x.device.type == "cpu" and not triton_padded_rows.interpreted():
        raise ValueError("backend='triton' on CPU tensors: TRITON_INTERPRET=1 was set after masknorm's Triton "
                         "kernels were defined; set it before the first call")
    if how is not None:
        out, *moments = triton_groups.TritonGroupNormFunction.apply(x, mask, weight, bias, how, correction, eps,
                                                                    center, masked)
        return out, tuple(moments)
    ndims = len(dims)
    keepdim = (*x.shape[: x.dim() - ndims], *[1] * ndims)
    valid = torch.ones(keepdim, dtype=torch.bool, device=x.device) if mask is None else mask.expand(keepdim)
    return triton_padded_rows.TritonPaddedRowsFunction.apply(x, valid, mask, weight, bias, ndims, correction, eps,
                                                             center, masked), None
