"""The fast paths as registered operators: how torch.compile reaches the fused kernels.

Each fast path is a `torch.library.custom_op` in the masknorm namespace with a fake kernel (output
shapes from input shapes only, symbolic sizes welcome) and a registered autograd formula whose
backward is another custom op. A tracer sees one opaque call; the implementation runs eagerly on
real tensors, so the host-synced range checks (groups redone with the general statistics) stay
inside it. Results are those of the eager fast path, bit for bit: both call the same functions.

    masknorm::masked_positions(x, mask, weight, bias, layout, ...) -> (out, mean, rstd, state)   fast.masked_positions
    masknorm::per_channel(x, mask, weight, bias, ...) -> (out, 3 moments, 5 for backward)  fast.per_channel
    masknorm::padded_rows(x, mask, weight, bias, ndims, ...) -> (out, mean, rstd, redo)  fast.padded_rows (layer, RMS)
    masknorm::<each>_backward(g_out, x, mask, weight, bias, <what the forward saved>, ...) -> (gx, gw, gb)

The backward recomputes the redone groups' general statistics from x (a rare case) rather than
receiving them, so every output has a shape fixed by the inputs' shapes. A parameter gradient
that is not wanted comes back empty. The names differ from the C++ kernels' (masknorm::
masked_positions_norm, rows_norm): a second definition of a name aborts the process when the
kernel library loads. Double backward and forward-mode AD through these operators raise
(no formula is registered for the backward operator, nor a jvp): never a wrong answer.

No `from __future__ import annotations` here: torch 2.4's schema inference reads the annotations
as written and rejects the strings 'Tensor', 'Optional[Tensor]', ...
"""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from masknorm._autograd import compute_dtype
from masknorm.fast import masked_positions, padded_rows, per_channel


def _register(op, backward_op, saved_from: int) -> None:
    """op's autograd formula and backward_op's fake kernel. backward_op takes (g_out, x, mask,
    weight, bias, op's outputs from saved_from on, op's other arguments, want_w, want_b) and returns
    (grad x, grad weight or empty, grad bias or empty); op's outputs after the first are not
    differentiable."""

    def setup_context(ctx, inputs, output) -> None:
        ctx.config = inputs[4:]
        ctx.save_for_backward(*inputs[:4], *output[saved_from:])
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, g_out, *_other_grads):
        x, mask, weight, bias, *saved = ctx.saved_tensors
        want = ctx.needs_input_grad
        gx, gw, gb = backward_op(g_out, x, mask, weight, bias, *saved, *ctx.config, want[2], want[3])
        return ((gx if want[0] else None), None, (gw if want[2] else None), (gb if want[3] else None),
                *(None,) * len(ctx.config))

    op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_fake(_grads_fake)


def _grads_fake(g_out, x, mask, weight, bias, *rest):
    """The backward operators' outputs: grad x, and each parameter's gradient if wanted, else empty."""
    want_w, want_b = rest[-2:]
    return x.new_empty(x.shape), _fake_grad(weight, want_w, x), _fake_grad(bias, want_b, x)


def _fake_grad(param: Optional[Tensor], wanted: bool, x: Tensor) -> Tensor:
    return param.new_empty(param.shape) if wanted and param is not None else x.new_empty(0)


def _own(t: Tensor) -> Tensor:
    """t as an operator output: a contiguous tensor of its own (small tensors: statistics and
    parameter gradients). The fast paths may return views of one tensor (which an operator's outputs
    must not be), expanded statistics (stride 0) or the strides of a transposed x, while the fake
    kernels promise contiguous outputs. The full-size outputs are made contiguous without a copy
    where they are already."""
    return t.clone(memory_format=torch.contiguous_format)


def _or_empty(grad: Optional[Tensor], x: Tensor) -> Tensor:
    """grad as an output of its own (see _own), or empty."""
    return x.new_empty(0) if grad is None else _own(grad)


@torch.library.custom_op("masknorm::masked_positions", mutates_args=())
def masked_positions_op(
    x: Tensor, mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], layout: List[int],
    correction: int, eps: float, center: bool, masked: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """fast.masked_positions's forward on x viewed by Layout(*layout): (out, per-group mean, rstd, state)."""
    lay = masked_positions.of_spec(layout, x.shape)
    out, _, mean, rstd, state, _ = masked_positions.fused_forward(x, mask, weight, bias, lay, correction, eps, center, masked)
    return out.contiguous(), _own(mean), _own(rstd), _own(state)


@masked_positions_op.register_fake
def _masked_positions_fake(x, mask, weight, bias, layout, correction, eps, center, masked):
    B, G, _, _ = masked_positions.of_spec(layout, x.shape).sizes()
    acc = compute_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((B, G), dtype=acc), x.new_empty((B, G), dtype=acc),
            x.new_empty((B, G), dtype=torch.int8))


@torch.library.custom_op("masknorm::masked_positions_backward", mutates_args=())
def masked_positions_backward_op(
    g_out: Tensor, x: Tensor, mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
    rstd: Tensor, state: Tensor, layout: List[int], correction: int, eps: float, center: bool, masked: str,
    want_w: bool, want_b: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """fast.masked_positions's backward: (grad x, grad weight or empty, grad bias or empty)."""
    lay = masked_positions.of_spec(layout, x.shape)
    m2 = lay.mask2(mask)
    redone = masked_positions.redone_stats(x, mask, lay, m2, mean, rstd, state, correction, eps, center)
    bias_shape = None if bias is None else (bias.shape, bias.dtype)
    gx, gw, gb = masked_positions.fused_backward(g_out, x, mask, weight, bias_shape, lay, m2, mean, rstd, state, redone,
                                           correction, center, masked, want_w, want_b)
    return gx.contiguous(), _or_empty(gw, x), _or_empty(gb, x)


_register(masked_positions_op, masked_positions_backward_op, saved_from=1)


@torch.library.custom_op("masknorm::per_channel", mutates_args=())
def per_channel_op(
    x: Tensor, mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], correction: int, eps: float,
    masked: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fast.per_channel's forward: (out, the batch's mean, unbiased variance and count per channel, then
    what the backward needs: var, shift, inv_s, the redone channels (all False if none) and the
    padding bound (0-d float64)); on the kernel that the eager path takes (per_channel_norm) where it
    applies. There the channels the kernel passes through (k - correction <= 0) count as redone, so
    that either backward (kernels() may switch them off in between) takes their general formula, not
    the kernel's placeholder statistics."""
    dims = _channel_dims(x)
    kernel = per_channel.kernel_for(x, mask)
    if kernel is not None:
        out, moments, var, shift, inv_s, redo = per_channel.kernel_forward(kernel, x, mask, weight, bias, dims,
                                                                           correction, eps, masked)
        redo, bound = per_channel.with_passthrough(redo, x, mask, dims, correction, shift.shape), math.inf
    else:
        out, var, st, bound, redo, moments = per_channel.fused_forward(x, mask, weight, bias, dims, correction, eps,
                                                                        masked)
        shift, inv_s = st.shift_scaled, st.inv_s
    redo = torch.zeros(shift.shape, dtype=torch.bool, device=x.device) if redo is None else redo
    return (out.contiguous(), *map(_own, moments), _own(var), _own(shift), _own(inv_s), _own(redo),
            torch.tensor(bound, dtype=torch.float64))


@per_channel_op.register_fake
def _per_channel_fake(x, mask, weight, bias, correction, eps, masked):
    keep = [1] * x.dim()
    keep[1] = x.shape[1]
    per_channel = [x.new_empty(keep) for _ in range(6)]
    return (x.new_empty(x.shape), *per_channel, x.new_empty(keep, dtype=torch.bool),
            x.new_empty((), dtype=torch.float64))


@torch.library.custom_op("masknorm::per_channel_backward", mutates_args=())
def per_channel_backward_op(
    g_out: Tensor, x: Tensor, mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], var: Tensor,
    shift: Tensor, inv_s: Tensor, redo: Tensor, bound: Tensor, correction: int, eps: float, masked: str,
    want_w: bool, want_b: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """fast.per_channel's backward: (grad x, grad weight or empty, grad bias or empty), on the kernels that are on."""
    dims = _channel_dims(x)
    redo = redo if bool(redo.any()) else None
    bias_shape = None if bias is None else (bias.shape, bias.dtype)
    config = (dims, correction, eps, True, masked)
    kernel = per_channel.kernel_for(x, mask)
    if kernel is not None:
        gx, gw, gb = per_channel.kernel_backward(kernel, g_out, x, mask, weight, bias_shape, var, shift, inv_s, redo,
                                                 config, want_w, want_b)
    else:
        st = per_channel.stats_again(x, mask, dims, correction, eps, shift, inv_s, redo)
        gx, gw, gb = per_channel.fused_backward(g_out, x, mask, weight, bias_shape, var, float(bound), st, redo, config,
                                                 want_w, want_b)
    return gx.contiguous(), _or_empty(gw, x), _or_empty(gb, x)


_register(per_channel_op, per_channel_backward_op, saved_from=4)


def _channel_dims(x: Tensor) -> Tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != 1)


@torch.library.custom_op("masknorm::padded_rows", mutates_args=())
def padded_rows_op(
    x: Tensor, mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], ndims: int, eps: float,
    center: bool, masked: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """fast.padded_rows's forward over the last ndims axes: (out, per-group mean, rstd, the redone groups
    (all False if none)), the statistics in keepdim shape and x's computation dtype."""
    out, st, _, _, redo = padded_rows.fused_forward(x, mask, weight, bias, ndims, eps, center, masked)
    redo = torch.zeros_like(st.degenerate) if redo is None else redo
    return out.contiguous(), _own(st.shift_scaled), _own(st.inv_s), _own(redo)


@padded_rows_op.register_fake
def _padded_rows_fake(x, mask, weight, bias, ndims, eps, center, masked):
    keep = (*x.shape[: x.dim() - ndims], *[1] * ndims)
    acc = compute_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty(keep, dtype=acc), x.new_empty(keep, dtype=acc),
            x.new_empty(keep, dtype=torch.bool))


@torch.library.custom_op("masknorm::padded_rows_backward", mutates_args=())
def padded_rows_backward_op(
    g_out: Tensor, x: Tensor, mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
    rstd: Tensor, redo: Tensor, ndims: int, eps: float, center: bool, masked: str, want_w: bool, want_b: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """fast.padded_rows's backward: (grad x, grad weight or empty, grad bias or empty)."""
    redo = redo if bool(redo.any()) else None
    st = padded_rows.stats_again(x, mask, ndims, eps, center, mean, rstd, redo)
    kernel, padded = padded_rows.kernel_and_padding(x, mask, ndims)
    bias_shape = None if bias is None else (bias.shape, bias.dtype)
    gx, gw, gb = padded_rows.fused_backward(g_out, x, mask, weight, bias_shape, st, redo, padded, kernel,
                                           tuple(range(x.dim() - ndims, x.dim())), center, masked,
                                           (True, False, want_w, want_b))
    return gx.contiguous(), _or_empty(gw, x), _or_empty(gb, x)


_register(padded_rows_op, padded_rows_backward_op, saved_from=1)

