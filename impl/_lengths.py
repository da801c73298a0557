"""Lengths through torch's convolution and pooling layers, and their padded inputs zeroed, inside a padding block.

A tracked layer (nn.Conv1d, nn.Conv2d, nn.MaxPool1d/2d, nn.AvgPool1d/2d and their subclasses) with
input (B, C, *spatial) whose one spatial axis has a size the block knows (its time axis):

- before: when its window along time is wider than 1 (d (k - 1) > 0), the padded positions are set to
  what a sequence alone would be padded with: 0 for convolutions (padding_mode "zeros") and average
  pooling, -inf for max pooling, so valid outputs read exactly what they read alone;
- after: the output's time size and the lengths there are recorded,
      L_out = floor((L + p_left + p_right - d (k - 1) - 1) / s) + 1 for L = T (checked against the output)
      and for the lengths (clamped to [0, L_out]): torch's own arithmetic, which the models use too.

Layers that cannot be made padding-invariant this way raise inside a block when their window along time
is wider than 1: padding_mode other than "zeros", pooling with ceil_mode=True, average pooling with
padding and count_include_pad=False. A layer whose output size differs from the arithmetic (a
subclass that pads by itself) records nothing, so norms after it raise unless told (`add`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Tuple

import torch
from torch import nn

from masknorm._padding import current, label, module_name, time_axis

TRACKED = (nn.Conv1d, nn.Conv2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)


def _at(value: object, i: int, n: int) -> int:
    return value if isinstance(value, int) else tuple(value)[i] if len(tuple(value)) == n else tuple(value)[0]


def window(layer: nn.Module, i: int, n: int) -> Tuple[int, int, int, int]:
    """(kernel, stride, dilation, total padding p_left + p_right) of `layer` along spatial axis i of n."""
    k = _at(layer.kernel_size, i, n)
    stride = getattr(layer, "stride", None)
    s = k if stride is None or stride == () else _at(stride, i, n)
    d = _at(getattr(layer, "dilation", 1), i, n)
    pad = layer.padding
    if pad == "valid":
        total = 0
    elif pad == "same":
        total = d * (k - 1)
    else:
        total = 2 * _at(pad, i, n)
    return k, s, d, total


def _unsupported(layer: nn.Module, total_padding: int) -> str:
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} pads a sequence alone with its own values"
    if getattr(layer, "ceil_mode", False):
        return "ceil_mode=True"
    if isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d)) and not layer.count_include_pad and total_padding:
        return "count_include_pad=False with padding divides by a count that the padding changes"
    return ""


def _fill(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d)) and x.dtype.is_floating_point:
        return torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    return torch.zeros((), dtype=x.dtype, device=x.device)


def before(layer: nn.Module, args: tuple) -> object:
    """Forward pre-hook: find the time axis, zero (or -inf) the padding, note what the output will be."""
    frame = current()
    if frame is None or frame.block is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    n = x.dim() - 2
    if n < 1 or x.shape[0] != frame.batch:
        return None
    axis, why = time_axis(frame, x.shape, range(2, x.dim()))
    if why:
        raise ValueError(f"masknorm.padding: {module_name(layer)} input of "
                         f"shape {tuple(x.shape)}: {why}; cannot tell its time axis")
    if axis is None:
        return None
    k, s, d, total = window(layer, axis - 2, n)
    res = frame.resolution(x.shape[axis])
    reads_neighbours = d * (k - 1) > 0
    unsupported = _unsupported(layer, total) if reads_neighbours else ""
    if unsupported:
        raise ValueError(f"masknorm.padding: {module_name(layer)}: {unsupported}; it cannot be made padding-invariant")
    out_size = (x.shape[axis] + total - d * (k - 1) - 1) // s + 1
    offset = total - d * (k - 1) - 1
    if offset == -1 and s == 1:
        lengths, key = res.lengths, res.key
    else:
        lengths = None if res.lengths is None else \
            torch.clamp(torch.div(res.lengths + offset, s, rounding_mode="floor") + 1, 0, out_size)
        key = (res.key, offset, s)
    frame.pending[id(layer)] = (axis, out_size, lengths, key)
    if not (getattr(layer, "_masknorm_zero", False) and reads_neighbours):
        return None
    if res.mask is None:
        raise ValueError(f"masknorm.padding: {module_name(layer)}: "
                         f"length {x.shape[axis]} is ambiguous ({res.why})")
    shape = [1] * x.dim()
    shape[0], shape[axis] = frame.batch, x.shape[axis]
    return (torch.where(res.mask.reshape(shape), x, _fill(layer, x)),) + tuple(args[1:])


def after(layer: nn.Module, args: tuple, out: object) -> None:
    """Forward hook: record the output's time resolution if its size is what the arithmetic says."""
    frame = current()
    if frame is None:
        return
    note = frame.pending.pop(id(layer), None)
    if note is None or not isinstance(out, torch.Tensor):
        return
    axis, size, lengths, key = note
    if out.dim() > axis and out.shape[axis] == size:
        frame.record(size, lengths, key, module_name(layer))


def track(layer: nn.Module, zero: bool) -> None:
    """Install the two hooks on `layer` once; `zero` decides whether its padded input is zeroed."""
    layer._masknorm_zero = zero
    if getattr(layer, "_masknorm_hooks", None) is None:
        layer._masknorm_hooks = (layer.register_forward_pre_hook(before), layer.register_forward_hook(after))



@contextmanager
def tracked(model: nn.Module) -> Iterator[None]:
    """Track lengths (without zeroing) through the layers of `model` that have no hooks yet, for the block's duration."""
    added = []
    for path, m in model.named_modules():
        if isinstance(m, TRACKED) and getattr(m, "_masknorm_hooks", None) is None:
            m._masknorm_name = getattr(m, "_masknorm_name", None) or label(path, m)
            track(m, False)
            added.append(m)
    try:
        yield
    finally:
        for m in added:
            for handle in m._masknorm_hooks:
                handle.remove()
            del m._masknorm_hooks, m._masknorm_zero
