"""The one dispatch table of masked_norm's fast paths: which path a call takes, and what runs it.

route() picks the path from shapes, dtypes and Python arguments only (torch.compile guards on
them; no data is read), the same answer in eager mode and under torch.compile:

    path               layout                                                  module
    padded_rows        layer/RMS norm over trailing axes, one mask flag per row  fast.padded_rows
    per_channel        batch norm: every axis but axis 1, eps > 0, centered      fast.per_channel
    masked_positions   groups x positions, one flag per (sample, position);      fast.masked_positions
                       elementwise-masked rows

Each path has one implementation per column:

    "eager"     the CPU native kernels on real data in eager mode; their accuracy checks are host
                syncs (inside the kernel where it can count them)
    "compiled"  the registered operators of fast.ops: what torch.compile traces, one opaque call

backend="triton" is not a column: its kernels take layouts and corrections these paths do not
(any correction, strided groups), so fast.backend.plan routes its calls, and a call they cannot
run raises instead of falling back to a row of this table.

An implementation takes (x, mask, weight, bias, args, layout) and returns (out, moments or None).
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch

from masknorm._autograd import forward_ad_active, records_autograd
from masknorm._contract import NormArgs
from masknorm.fast import masked_positions, ops as fast_ops, padded_rows, per_channel

PADDED_ROWS, PER_CHANNEL, MASKED_POSITIONS = "padded_rows", "per_channel", "masked_positions"

Implementation = Callable[..., tuple]


class Route(NamedTuple):
    """The path a call takes, and its (B, G, Cg, L) layout for masked_positions (else None)."""

    path: str
    layout: Optional[masked_positions.Layout] = None


def route(x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
          bias: Optional[torch.Tensor], args: NormArgs) -> Optional[Route]:
    """The fast path for this call, or None for the general path (the mask is of x's rank)."""
    if padded_rows.applies(x, mask, weight, bias, args.dims, args.correction, args.center):
        return Route(PADDED_ROWS)
    if per_channel.applies(x, weight, bias, args.dims, args.eps, args.center):
        return Route(PER_CHANNEL)
    lay = masked_positions.layout(x, mask, weight, bias, args.dims)
    return None if lay is None else Route(MASKED_POSITIONS, lay)


def run(column: str, r: Route, x, mask, weight, bias, args: NormArgs) -> tuple:
    """(out, moments or None) from TABLE[r.path][column]."""
    return TABLE[r.path][column](x, mask, weight, bias, args, r.layout)


def _eager_padded_rows(x, mask, weight, bias, args: NormArgs, _layout) -> tuple:
    kernel = padded_rows.kernel_for(x)
    if kernel is not None and not forward_ad_active():
        out = padded_rows.one_call(kernel, x, mask, weight, bias, len(args.dims), args.eps, args.center, args.masked)
        if out is not None:  # no row redone
            return out, None
    return padded_rows.PaddedRowsFunction.apply(x, mask, weight, bias, len(args.dims), args.eps, args.center,
                                                   args.masked), None


def _eager_per_channel(x, mask, weight, bias, args: NormArgs, _layout) -> tuple:
    if not records_autograd(x, weight, bias):
        return per_channel.forward_only(x, mask, weight, bias, args.dims, args.correction, args.eps, args.masked)
    out, *moments = per_channel.PerChannelFunction.apply(x, mask, weight, bias, args.dims, args.correction,
                                                           args.eps, args.masked)
    return out, tuple(moments)


def _eager_masked_positions(x, mask, weight, bias, args: NormArgs, lay) -> tuple:
    if not records_autograd(x, weight, bias):
        return masked_positions.fused_forward(x, mask, weight, bias, lay, args.correction, args.eps, args.center,
                                        args.masked)[0], None
    return masked_positions.MaskedPositionsFunction.apply(x, mask, weight, bias, lay, args.dims, args.correction, args.eps,
                                              args.center, args.masked), None


def _compiled_padded_rows(x, mask, weight, bias, args: NormArgs, _layout) -> tuple:
    return fast_ops.padded_rows_op(x, mask, weight, bias, len(args.dims), args.eps, args.center,
                                      args.masked)[0], None


def _compiled_per_channel(x, mask, weight, bias, args: NormArgs, _layout) -> tuple:
    out, *moments = fast_ops.per_channel_op(x, mask, weight, bias, args.correction, args.eps, args.masked)[:4]
    return out, tuple(moments)


def _compiled_masked_positions(x, mask, weight, bias, args: NormArgs, lay) -> tuple:
    return fast_ops.masked_positions_op(x, mask, weight, bias, lay.spec(), args.correction, args.eps, args.center,
                               args.masked)[0], None


TABLE: Dict[str, Dict[str, Implementation]] = {
    PADDED_ROWS: {"eager": _eager_padded_rows, "compiled": _compiled_padded_rows},
    PER_CHANNEL: {"eager": _eager_per_channel, "compiled": _compiled_per_channel},
    MASKED_POSITIONS: {"eager": _eager_masked_positions, "compiled": _compiled_masked_positions},
}
