"""masked_norm: the functional core every masknorm layer is a preset of."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from masknorm._autograd import MaskedNormFunction, MaskedNormFunctionWithJvp, affine
from masknorm._contract import FLOATING, check_args, check_tensor
from masknorm._tracing import eager_on_data as _eager_on_data, exporting
from masknorm.fast import backend as fast_backend, dispatch, padded_rows


Moments = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mean, unbiased variance, valid count


def masked_norm(
    x: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    dim: Union[int, Sequence[int]] = -1,
    *,
    correction: int = 0,
    eps: float = 1e-5,
    center: bool = True,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    masked: str = "normalize",
    backend: str = "auto",
) -> torch.Tensor:
    """Normalize x over the axes `dim`, with statistics taken over the positions where `mask` is True.

        y = weight * (x - mu) / sqrt(var + eps) + bias,
        mu = mean_V x (0 if not center),  var = sum_V (x - mu)^2 / (k - correction)

    Args:
        x: floating tensor (float16/bfloat16 accumulate in float32 and return their dtype).
        mask: bool tensor broadcastable to x (True = valid); None = all valid.
        dim: the reduction axes (int or tuple); a group is one index over the other axes.
        correction: c >= 0, the variance divisor is k - c (k = valid positions in the group).
        eps: added to the variance, >= 0.
        center: subtract the mean (layer/batch norm) or not (RMS norm).
        weight: gamma, broadcastable to x without changing its shape.
        bias: beta, broadcastable to x without changing its shape.
        masked: output at masked-out positions: "normalize" (gamma*(x-mu)/s + beta),
            "keep" (x) or "zero" (0).
        backend: "torch" (torch's kernels, and masknorm's fused CPU kernels where they apply),
            "triton" (the Triton kernels: trailing axes with a mask per row, per (sample, position)
            or per element, and batch norm over every axis but 1 with any mask; eager mode; on CPU
            tensors only under TRITON_INTERPRET=1; a call they cannot run raises ValueError saying
            why, see masknorm.fast.backend) or "auto" (default): "torch", never the Triton kernels,
            until they have run on a GPU (they are verified under Triton's interpreter only).

    A degenerate group (k - c <= 0, or eps = 0 and all valid values equal; RMS: all zero)
    passes x through unchanged with no affine (0 at masked-out positions under "zero").
    Values at masked-out positions never affect other positions' outputs or gradients.
    """
    return _normalize(x, mask, dim, correction, eps, center, weight, bias, masked, backend)[0]


def masked_norm_with_moments(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    dim: Union[int, Sequence[int]],
    *,
    eps: float,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    masked: str,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[Moments]]:
    """masked_norm(x, mask, dim, eps=eps, weight=weight, bias=bias, masked=masked, backend=backend), and
    each group's (mean, unbiased variance, valid count) of the valid values (keepdim shape, not
    differentiable) when the batch-norm fast path or the Triton group kernels computed them on their
    way, else None: the masked batch-norm modules keep their running averages with them."""
    return _normalize(x, mask, dim, 0, eps, True, weight, bias, masked, backend)


def _normalize(x, mask, dim, correction, eps, center, weight, bias, masked,
               backend: str = "auto") -> Tuple[torch.Tensor, Optional[Moments]]:
    """Check the arguments (before any work), then dispatch to a fast path or the general one."""
    out = _token_lane(x, mask, dim, correction, eps, center, weight, bias, masked, backend)
    if out is not None:
        return out, None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATING:
        raise TypeError(f"x must be a floating tensor (float16/bfloat16/float32/float64), got dtype {x.dtype}")
    check_tensor("mask", mask, x, boolean=True)
    check_tensor("weight", weight, x)
    check_tensor("bias", bias, x)
    fast_backend.check_backend(backend)
    args = check_args(
        x.shape,
        None if mask is None else mask.shape,
        dim,
        correction=correction,
        eps=eps,
        center=center,
        masked=masked,
        weight_shape=None if weight is None else weight.shape,
        bias_shape=None if bias is None else bias.shape,
    )
    if mask is not None and mask.dim() < x.dim():
        mask = mask.reshape((1,) * (x.dim() - mask.dim()) + tuple(mask.shape))
    if x.numel() == 0:  # no group has a position (or there is no group): nothing to normalize
        return _empty(x, weight, bias), None
    eager = _eager_on_data(x)
    if fast_backend.wanted(backend, traced=not eager):
        return fast_backend.run(x, mask, weight, bias, args.dims, args.correction, args.eps, args.center,
                                args.masked)
    column = "eager" if eager else ("compiled" if _compiling_with_ops(x) else None)
    if column is not None and (route := dispatch.route(x, mask, weight, bias, args)) is not None:
        return dispatch.run(column, route, x, mask, weight, bias, args)
    function = MaskedNormFunction if torch.compiler.is_compiling() else MaskedNormFunctionWithJvp
    out, *_stats = function.apply(
        x, mask, weight, bias, args.dims, args.correction, args.eps, args.center, args.masked
    )
    return out, None


def _token_lane(x, mask, dim, correction, eps, center, weight, bias, masked, backend) -> Optional[torch.Tensor]:
    """The layer modules' lane (fast.padded_rows.eager_call: one kernel call, the route's bits) for a call over x's
    last axis with one mask flag per token, as `masked_norm(x, mask (*x.shape[:-1], 1), -1, ...)` is called by
    hand; None for any other call (the route checks it, raises or runs it): x of rank >= 2, dim -1 (or x.dim() - 1,
    alone or as the one axis of a tuple or list), mask None or (*x.shape[:-1], 1), weight and bias None or
    (x.shape[-1],), correction 0, center a bool, backend "auto" or "torch"; eps, masked and the tensors' types,
    dtypes and devices are the lane's to check."""
    if not (type(x) is torch.Tensor and x.dim() >= 2 and type(correction) is int and correction == 0
            and type(center) is bool and type(backend) is str and backend in ("auto", "torch")):
        return None
    axis = dim[0] if type(dim) in (tuple, list) and len(dim) == 1 else dim
    last = x.dim() - 1
    width = x.shape[last]
    if not (type(axis) is int and axis in (-1, last)
            and all(t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.shape == (width,))
                    for t in (weight, bias))):
        return None
    if mask is not None:
        if not (type(mask) is torch.Tensor and mask.dim() == x.dim() and mask.shape[last] == 1
                and mask.shape[:last] == x.shape[:last]):
            return None
        mask = mask.squeeze(last)
    return padded_rows.eager_call(x, mask, 1, eps, center, weight, bias, masked)


def _compiling_with_ops(x: torch.Tensor) -> bool:
    """True where torch.compile traces (not torch.export: export and ONNX keep the general path's
    aten ops) with no torch.func transform, on CPU: there the fast paths are reached as registered
    operators (fast.ops), which the tracer sees as one opaque call each."""
    return (
        torch.compiler.is_compiling()
        and not exporting()
        and not torch._C._are_functorch_transforms_active()
        and x.device.type == "cpu"
    )


def _empty(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The (empty) output of an empty x, as x passed through; weight and bias get their (zero)
    gradients through an affine map of nothing, as torch's norms give them."""
    return torch.where(torch.zeros_like(x, dtype=torch.bool), affine(x, weight, bias), x)
