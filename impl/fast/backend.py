"""The backend choice of masked_norm: "auto", "torch" or "triton", without importing triton.

"torch": the CPU fast paths and the general path (torch's kernels), as before Triton existed here.
"triton": the Triton kernels of masknorm.fast.triton_padded_rows; a call they cannot run raises (a
ValueError naming what is unsupported, an ImportError without triton), never falls back.
"auto": "torch", for now: the Triton kernels have run only under Triton's interpreter, never on a
GPU, and a default must not be code that has never run where it would run. Once they are tested
on a GPU, "auto" is meant to pick them for eager CUDA calls whose layout they take.

The kernels' layout: layer or RMS norm over the trailing axes, a mask constant along them (one flag
per row, padded tokens), weight and bias varying along the normalized axes only, rows of at most
MAX_D values; any correction, eps, policy and floating dtype.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Sequence

import torch

BACKENDS = ("auto", "torch", "triton")
MAX_D = 65536  # masknorm.fast.triton_padded_rows.MAX_D (kept here so that checking needs no triton)


def check_backend(backend: str) -> None:
    """ValueError unless backend is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def installed() -> bool:
    """True when triton can be imported (asked of the import system; triton is not imported)."""
    return importlib.util.find_spec("triton") is not None


def unsupported(x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], dims: Sequence[int]) -> Optional[str]:
    """Why the Triton kernels cannot run this call (x on its device, its layout), or None if they can.
    The mask is already of x's rank."""
    nd = x.dim()
    ndims = len(dims)
    if tuple(dims) != tuple(range(nd - ndims, nd)):
        return f"reduces axes {tuple(dims)} of a {nd}-d x: the kernels reduce trailing axes only"
    if mask is not None and any(mask.shape[d] != 1 for d in dims):
        return (f"the mask of shape {tuple(mask.shape)} varies within the normalized axes {tuple(dims)}: the kernels "
                f"take one flag per row (padded tokens)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and any(s != 1 for s in t.shape[: max(0, t.dim() - ndims)]):
            return f"{name} of shape {tuple(t.shape)} varies along axes that are not normalized"
    D = math.prod(x.shape[nd - ndims:])
    if D > MAX_D:
        return f"rows of {D} values: the kernels take at most {MAX_D}"
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "x is on the CPU: Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
    if x.device.type not in ("cpu", "cuda"):
        return f"x is on {x.device}: the kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)"
    return None


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
        masked: str) -> torch.Tensor:
    """The output from the Triton kernels; ValueError naming what they do not take, ImportError
    without triton."""
    reason = unsupported(x, mask, weight, bias, dims)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run this call: {reason}")
    if not installed():
        raise ImportError("backend='triton' needs triton, the gpu extra (from a checkout: pip install '.[gpu]')")
    from masknorm.fast import triton_padded_rows

    if x.device.type == "cpu" and not triton_padded_rows.interpreted():
        raise ValueError("backend='triton' on CPU tensors: TRITON_INTERPRET=1 was set after masknorm's Triton "
                         "kernels were defined; set it before the first call")
    ndims = len(dims)
    keepdim = (*x.shape[: x.dim() - ndims], *[1] * ndims)
    valid = torch.ones(keepdim, dtype=torch.bool, device=x.device) if mask is None else mask.expand(keepdim)
    return triton_padded_rows.TritonPaddedRowsFunction.apply(x, valid, mask, weight, bias, ndims, correction, eps, center,
                                                      masked)
