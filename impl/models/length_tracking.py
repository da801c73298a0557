"""Lengths through torch's convolution and pooling layers, and their padded inputs zeroed, inside a padding block.

A tracked layer (nn.Conv1d, nn.Conv2d, nn.MaxPool1d/2d, nn.AvgPool1d/2d and their subclasses) with
input (B, C, *spatial) whose one spatial axis has a size the block knows (its time axis):

- before: when its window along time is wider than 1 (d (k - 1) > 0), the padded positions are set to
  what a sequence alone would be padded with: 0 for convolutions (padding_mode "zeros") and average
  pooling, -inf for max pooling, so valid outputs read exactly what they read alone;
- after: the output's time size and the lengths there are recorded, by torch's own arithmetic
  (p = p_left + p_right, pooling pads p/2 on each side), for L = T (checked against the output) and
  for the lengths (clamped to [0, L_out]):
      L_out = floor((L + p - d (k - 1) - 1) / s) + 1
      ceil_mode: L_out = floor((L + p - d (k - 1) - 1 + s - 1) / s) + 1, minus 1 if (L_out - 1) s >= L + p/2
  (the last window must start inside the sequence or its left padding);
- average pooling whose divisor depends on where the sequence ends (ceil_mode's last window, or
  count_include_pad=False with padding) has its outputs rescaled by divisor(T) / divisor(L) per
  window, so a sequence's last windows divide by the count they have alone (where its input is zeroed).

Verified at each layer of a converted model (not in the invariance check's observation of a stock
model, `tracked`, which must report a leak rather than stop at it): a layer whose window reads neighbours (or subsamples) along its spatial axes and
whose input has the block's batch but no axis of a size the block knows raises, naming the layer and
the sizes: the time axis changed since the block or the last tracked layer in a way the hooks cannot
see (a functional F.pad, a reshape, a slice), and carrying the lengths on would be wrong. A
convolution with padding_mode other than "zeros" raises when its window along time is wider than 1
(a sequence alone is padded with its own values). A layer whose output size differs from the
arithmetic (a subclass that pads by itself) records nothing, so norms after it raise unless told (`add`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Tuple

import torch
from torch import nn

from masknorm.models.padding_context import Frame, _known, current, label, module_name, time_axis

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


def out_size(n: Any, k: int, s: int, d: int, total: int, ceil: bool) -> Any:
    """torch's output length for input length n (an int, a symbolic size or an integer tensor of lengths)."""
    span = n + total - d * (k - 1) - 1 + (s - 1 if ceil else 0)
    out = (torch.div(span, s, rounding_mode="floor") if isinstance(span, torch.Tensor) else span // s) + 1
    if not ceil:
        return out
    late = (out - 1) * s >= n + total // 2
    return out - late.to(out.dtype) if isinstance(late, torch.Tensor) else out - int(late)


def _divisor(n: Any, start: torch.Tensor, k: int, half: int, include_pad: bool) -> torch.Tensor:
    """torch's average-pooling divisor of the windows starting at `start` over an input of length n."""
    if include_pad:
        return torch.clamp(start + k, max=n + half) - start
    return torch.clamp(start + k, max=n) - torch.clamp(start, min=0)


def _rescale(layer: nn.Module, axis: int, size: int, lengths: torch.Tensor, out: torch.Tensor, k: int, s: int,
             total: int) -> torch.Tensor:
    """out (average pooling over an input of time size `size`) with each window of sequence b divided by
    the count it has alone (input length lengths[b]) instead of the count it has in the batch."""
    half = total // 2
    start = torch.arange(out.shape[axis], device=out.device) * s - half
    alone = _divisor(lengths[:, None], start, k, half, layer.count_include_pad)
    batched = _divisor(size, start, k, half, layer.count_include_pad)
    factor = (batched / torch.clamp(alone, min=1)).to(out.dtype)
    shape = [1] * out.dim()
    shape[0], shape[axis] = factor.shape
    return out * factor.reshape(shape)


def _rescaled(layer: nn.Module, total: int) -> bool:
    """Whether average pooling's divisor depends on where a sequence ends (see the module docstring)."""
    return isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d)) and getattr(layer, "divisor_override", None) is None and \
        (layer.ceil_mode or (not layer.count_include_pad and total > 0))


def _unsupported(layer: nn.Module) -> str:
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} pads a sequence alone with its own values"
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
        if getattr(layer, "_masknorm_converted", False):
            _check_unknown_time(layer, x, frame)
        return None
    k, s, d, total = window(layer, axis - 2, n)
    res = frame.resolution(x.shape[axis])
    reads_neighbours = d * (k - 1) > 0
    unsupported = _unsupported(layer) if reads_neighbours else ""
    if unsupported:
        raise ValueError(f"masknorm.padding: {module_name(layer)}: {unsupported}; it cannot be made padding-invariant")
    ceil = bool(getattr(layer, "ceil_mode", False))
    size = out_size(x.shape[axis], k, s, d, total, ceil)
    if total - d * (k - 1) == 0 and s == 1:
        lengths, key = res.lengths, res.key
    else:
        lengths = None if res.lengths is None else \
            torch.clamp(out_size(res.lengths, k, s, d, total, ceil), 0, size)
        key = (res.key, total - d * (k - 1), s, ceil)
    rescale = None
    if getattr(layer, "_masknorm_zero", False) and _rescaled(layer, total):
        if res.lengths is None:
            raise ValueError(f"masknorm.padding: {module_name(layer)}: its divisor depends on where each sequence "
                             f"ends, and the mask at length {x.shape[axis]} is not a prefix ({res.why})")
        rescale = (x.shape[axis], res.lengths, k, s, total)
    frame.pending[id(layer)] = (axis, size, lengths, key, rescale)
    if not (getattr(layer, "_masknorm_zero", False) and reads_neighbours):
        return None
    if res.mask is None:
        raise ValueError(f"masknorm.padding: {module_name(layer)}: "
                         f"length {x.shape[axis]} is ambiguous ({res.why})")
    shape = [1] * x.dim()
    shape[0], shape[axis] = frame.batch, x.shape[axis]
    return (torch.where(res.mask.reshape(shape), x, _fill(layer, x)),) + tuple(args[1:])


def _check_unknown_time(layer: nn.Module, x: torch.Tensor, frame: Frame) -> None:
    """Raise if `layer` reads neighbours or subsamples along a spatial axis of x, none of whose sizes the
    block knows: the time axis changed where no hook could see it (inputs of spatial size 1, a pooled
    vector, pass)."""
    n = x.dim() - 2
    if all(x.shape[2 + i] == 1 for i in range(n)):
        return
    windows = [window(layer, i, n) for i in range(n)]
    if all(d * (k - 1) == 0 and s == 1 for k, s, d, _ in windows):
        return
    raise ValueError(
        f"masknorm.padding: {module_name(layer)} reads neighbours along its spatial axes, but its input of shape "
        f"{tuple(x.shape)} (batch {frame.batch}) has no axis of a length the block knows ({_known(frame)}): the "
        f"time axis changed since the block or the last tracked layer in a way masknorm cannot follow (a "
        f"functional F.pad, a reshape, a slice), so it cannot tell which outputs are valid. Pad with the layer's "
        f"own padding= instead of F.pad (a sequence alone is padded at its own end), or state the new "
        f"resolution with masknorm.padding(...).add(lengths=..., size=...)")


def after(layer: nn.Module, args: tuple, out: object) -> object:
    """Forward hook: record the output's time resolution if its size is what the arithmetic says; rescale
    average pooling whose divisor depends on where each sequence ends."""
    frame = current()
    if frame is None:
        return None
    note = frame.pending.pop(id(layer), None)
    if note is None or not isinstance(out, torch.Tensor):
        return None
    axis, size, lengths, key, rescale = note
    if not (out.dim() > axis and out.shape[axis] == size):
        return None
    frame.record(size, lengths, key, module_name(layer))
    if rescale is None:
        return None
    in_size, in_lengths, k, s, total = rescale
    return _rescale(layer, axis, in_size, in_lengths, out, k, s, total)


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
