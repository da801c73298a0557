"""The public API of algmarques/masked_norm, built on masknorm's core: a user changes only the import.

    y = (x - mean_row) / sqrt(var_row)   per selected, non-constant row; var with divisor n - 1, no eps

What was inferred from that library's README, code and tests (version 2025.7):
- masked_norm(inpt, mask=None) normalizes along the last axis. `mask` selects whole rows: its shape
  is a prefix of inpt.shape[:-1] (usually exactly inpt.shape[:-1]); unselected rows and constant
  rows pass through unchanged (masknorm: masked="keep", eps=0, correction=1). The upstream code
  computes its statistics over every row and ORs the mask with "variance != 0"; its README and
  tests say the mask selects and constant rows pass, and that is what is implemented here.
- affine_masked_norm(inpt, mask, weight, bias): weight/bias have the mask's shape (inpt.shape[:-1]
  without a mask): one scale and shift per row, applied to every row, passed-through ones included.
- batched_* normalize along the first axis instead (upstream: move axis 0 last, normalize, move
  back): the mask's shape is a prefix of inpt.shape[1:], and so are weight/bias (inpt.shape[1:]
  without a mask).
- MaskedNorm(batched=False) is stateless; LazyAffineMaskedNorm(batched=False) makes weight = 1 and
  bias = 0 of the mask's shape (else inpt.shape[:-1], batched: inpt.shape[1:]) at its first call.
Differences: a row of one element passes through (upstream: NaN from the n - 1 divisor); float8
inputs are refused (the core computes in float16/bfloat16/float32/float64); errors are ValueError
or TypeError with masknorm's messages.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn import Module
from torch.nn.init import ones_, zeros_
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from masknorm import functional


def _row_shape(inpt: torch.Tensor, batched: bool) -> torch.Size:
    """The shape that indexes rows: inpt.shape[:-1], or inpt.shape[1:] when normalizing along axis 0."""
    return inpt.shape[1:] if batched else inpt.shape[:-1]


def _spread(t: torch.Tensor, inpt: torch.Tensor, batched: bool) -> torch.Tensor:
    """A row-indexed tensor (shape a prefix of the row shape) reshaped to broadcast onto inpt."""
    lead = (1,) if batched else ()
    return t.reshape(lead + tuple(t.shape) + (1,) * (inpt.dim() - len(lead) - t.dim()))


def _check_rows(name: str, t: torch.Tensor, inpt: torch.Tensor, batched: bool, exact: bool = False) -> None:
    """ValueError unless t's shape is a prefix of the row shape (the whole row shape when `exact`)."""
    rows = tuple(_row_shape(inpt, batched))
    shape = tuple(t.shape)
    if shape != rows[: len(shape)] or (exact and shape != rows):
        where = "inpt.shape[1:]" if batched else "inpt.shape[:-1]"
        raise ValueError(f"'{name}' of shape {shape} must match {where} = {rows}{'' if exact else ' (or a prefix of it)'}")


def _norm(inpt: torch.Tensor, mask: Optional[torch.Tensor], batched: bool) -> torch.Tensor:
    if not isinstance(inpt, torch.Tensor) or inpt.dim() < 1:
        raise ValueError("'inpt' must be a tensor with at least one dimension")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("'mask' must be a tensor of bool dtype")
        _check_rows("mask", mask, inpt, batched)
        mask = _spread(mask, inpt, batched)
    return functional.masked_norm(inpt, mask, 0 if batched else -1, correction=1, eps=0.0, masked="keep")


def _affine(inpt: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
            batched: bool) -> torch.Tensor:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if mask is None:
            _check_rows(name, t, inpt, batched, exact=True)
        elif tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"'{name}' of shape {tuple(t.shape)} must have the same shape as 'mask' {tuple(mask.shape)}")
    out = _norm(inpt, mask, batched) * _spread(weight, inpt, batched)
    return out if bias is None else out + _spread(bias, inpt, batched)


def masked_norm(inpt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (x - mean)/sqrt(var) along the last axis for selected non-constant rows (var divisor n - 1); other rows pass."""
    return _norm(inpt, mask, batched=False)


def affine_masked_norm(inpt: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = weight_row * masked_norm(inpt, mask) + bias_row, applied to every row."""
    return _affine(inpt, mask, weight, bias, batched=False)


def batched_masked_norm(inpt: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """masked_norm along the first axis: y = (x - mean_0)/sqrt(var_0) per selected non-constant column."""
    return _norm(inpt, mask, batched=True)


def batched_affine_masked_norm(inpt: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = weight * batched_masked_norm(inpt, mask) + bias, weight/bias indexed like inpt.shape[1:]."""
    return _affine(inpt, mask, weight, bias, batched=True)


class MaskedNorm(Module):
    """Stateless masked_norm (batched=True: batched_masked_norm) as a module."""

    def __init__(self, batched: Optional[bool] = False, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batched = bool(batched)

    def forward(self, inpt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _norm(inpt, mask, self.batched)

    def extra_repr(self) -> str:
        return f"batched={self.batched}"


class LazyMaskedNorm(LazyModuleMixin, MaskedNorm):
    """MaskedNorm as a lazy module with nothing to initialize (upstream keeps it as a base class)."""

    def initialize_parameters(self, inpt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Nothing to shape."""


class LazyAffineMaskedNorm(LazyMaskedNorm):
    """y = weight_row * masked_norm(x, mask) + bias_row with weight = 1, bias = 0 shaped at the first call."""

    weight: UninitializedParameter
    bias: UninitializedParameter

    def __init__(self, batched: Optional[bool] = False, *args: Any, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, **kwargs: Any) -> None:
        super().__init__(batched, *args, **kwargs)
        self.weight = UninitializedParameter(device=device, dtype=dtype)
        self.bias = UninitializedParameter(device=device, dtype=dtype)

    def initialize_parameters(self, inpt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """weight = 1 and bias = 0 of the mask's shape (without a mask: the row shape)."""
        if self.has_uninitialized_params():
            shape = _row_shape(inpt, self.batched) if mask is None else mask.shape
            with torch.no_grad():
                self.weight.materialize(shape)
                self.bias.materialize(shape)
                ones_(self.weight)
                zeros_(self.bias)

    def forward(self, inpt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Called as layer.forward(x) (the seed's own tests do), torch's lazy pre-forward hook does not run.
        self.initialize_parameters(inpt, mask)
        return _affine(inpt, mask, self.weight, self.bias, self.batched)
