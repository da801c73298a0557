"""masknorm.padding: hand a model's padding to every masknorm norm inside it.

    with masknorm.padding(lengths=lengths):        # or mask=(B, T) bool, True = valid
        out = model(x, attention_mask=am)

Inside the block a masknorm norm called without a mask takes the block's: it finds its input's
batch axis (size B) and time axis (a size the block knows) and builds the (B, ..., T, ...) mask from
the lengths at that resolution. The block knows the input's T, and every length derived since by a
tracked convolution or pooling layer (masknorm.convert installs the tracking, masknorm/_lengths.py):

    L_out = floor((L + p_left + p_right - d (k - 1) - 1) / s) + 1,   lengths_out = clamp(same on lengths, 0, L_out)

A norm that finds no such axis, or more than one, raises (naming the module and the shapes);
`.at(norm, fn)` states a norm's mask, `.add(lengths=..., size=...)` a resolution the tracking cannot
see (a custom subsampling layer). Outside any block nothing changes.

Carrier (docs/DECISIONS.md item 2): a threading.local stack of frames, one per entered block, so
two threads running one model with different padding never see each other's, and torch.compile
traces it without graph breaks. Gradient checkpointing recomputes the forward outside the block:
pass `context_fn=masknorm.checkpoint_context` (use_reentrant=False) to re-enter it there.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

_local = threading.local()

MaskFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


class Resolution:
    """The padding at one time resolution: lengths (B,) when the valid frames are a prefix, and the (B, T) mask.

    `key` names the derivation (equal keys give equal lengths, also when a checkpoint recomputes them);
    `lengths is None` means the mask is not a prefix mask, so nothing can be derived from it;
    `mask is None` means two derivations disagreed on this size (`why` says which).
    """

    __slots__ = ("lengths", "mask", "why", "key")

    def __init__(self, lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor], why: str,
                 key: Hashable = None) -> None:
        self.lengths, self.mask, self.why, self.key = lengths, mask, why, key if key is not None else why


def prefix_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) bool: position t < lengths[b]."""
    return torch.arange(size, device=lengths.device) < lengths[:, None]


class Frame:
    """One entered block: the batch size, the resolutions by size, the stated norm masks."""

    def __init__(self, batch: int, resolutions: Dict[int, Resolution], rules: Dict[int, MaskFn]) -> None:
        self.batch, self.resolutions, self.rules = batch, dict(resolutions), rules
        self.pending: Dict[int, Tuple[int, int, Optional[torch.Tensor], Hashable]] = {}

    def record(self, size: int, lengths: Optional[torch.Tensor], key: Hashable, source: str) -> None:
        """Learn the resolution `size` from a derivation; a second, different derivation makes it ambiguous."""
        known = self.resolutions.get(size)
        if known is not None and (known.key == key or known.mask is None):
            return
        if known is not None:
            self.resolutions[size] = Resolution(None, None, f"{known.why} and {source} both give length {size}", key)
        elif lengths is None:
            self.resolutions[size] = Resolution(None, None, f"{source} derives it from a mask that is not a prefix", key)
        else:
            self.resolutions[size] = Resolution(lengths, prefix_mask(lengths, size), source, key)


def current() -> Optional[Frame]:
    """The innermost padding block entered in this thread, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def _push(frame: Frame) -> None:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(frame)


@contextmanager
def _entered(frame: Frame) -> Iterator[Frame]:
    _push(frame)
    try:
        yield frame
    finally:
        _local.stack.pop()


def _is_prefix(mask: torch.Tensor, lengths: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return bool(torch.equal(mask, prefix_mask(lengths, mask.shape[1])))


def _check_lengths(lengths: object, name: str) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.dtype.is_floating_point \
            or lengths.dtype == torch.bool or lengths.is_complex():
        kind = f"a tensor of shape {tuple(lengths.shape)} and dtype {lengths.dtype}" \
            if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise TypeError(f"{name} must be an integer tensor of shape (B,), got {kind}")
    return lengths


def _check_mask(mask: object, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        kind = f"a tensor of shape {tuple(mask.shape)} and dtype {mask.dtype}" \
            if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor of shape (B, T), True = valid (an int attention mask: "
                        f".bool()), got {kind}")
    return mask


def _resolution(lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor], size: Optional[int],
                source: str) -> Tuple[int, int, Resolution]:
    """(B, T, Resolution) from exactly one of lengths (with size, default lengths.max()) or mask."""
    if (lengths is None) == (mask is None):
        raise ValueError("give exactly one of lengths= and mask=")
    if mask is not None:
        mask = _check_mask(mask, "mask")
        if size is not None and size != mask.shape[1]:
            raise ValueError(f"size={size} differs from mask of shape {tuple(mask.shape)}")
        sums = mask.sum(1)
        return mask.shape[0], mask.shape[1], Resolution(sums if _is_prefix(mask, sums) else None, mask, source)
    lengths = _check_lengths(lengths, "lengths")
    if size is None:
        size = int(lengths.max()) if lengths.numel() else 0
    if lengths.numel() and not torch.compiler.is_compiling() and (int(lengths.min()) < 0 or int(lengths.max()) > size):
        raise ValueError(f"lengths must lie in [0, {size}], got min {int(lengths.min())} max {int(lengths.max())}")
    return lengths.shape[0], size, Resolution(lengths, prefix_mask(lengths, size), source)


class Padding:
    """The context manager `masknorm.padding(...)` returns; see the module docstring."""

    def __init__(self, lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor], size: Optional[int]) -> None:
        self.batch, t, res = _resolution(lengths, mask, size, "the block's input")
        self.resolutions: Dict[int, Resolution] = {t: res}
        self.rules: Dict[int, MaskFn] = {}
        self._frames: List[Frame] = []

    def at(self, norm: nn.Module, mask_fn: MaskFn) -> "Padding":
        """State `norm`'s mask: mask_fn(x) -> the mask its forward takes for input x (None = all valid)."""
        if not isinstance(norm, nn.Module) or not callable(mask_fn):
            raise TypeError(f"at(norm, mask_fn) takes a module and a callable, got {type(norm).__name__}, "
                            f"{type(mask_fn).__name__}")
        self.rules[id(norm)] = mask_fn
        return self

    def add(self, *, lengths: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
            size: Optional[int] = None) -> "Padding":
        """State the padding at another time resolution (lengths with its padded size, or a (B, T) mask)."""
        batch, t, res = _resolution(lengths, mask, size, f"a resolution stated by add() ({id(self)})")
        if batch != self.batch:
            raise ValueError(f"add(): batch {batch} differs from the block's batch {self.batch}")
        self.resolutions[t] = res
        for frame in self._frames:
            frame.resolutions[t] = res
        return self

    def __enter__(self) -> "Padding":
        frame = Frame(self.batch, self.resolutions, self.rules)
        self._frames.append(frame)
        _push(frame)
        return self

    def __exit__(self, *exc: object) -> None:
        self._frames.remove(_local.stack.pop())


def padding(*, lengths: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
            size: Optional[int] = None) -> Padding:
    """Hand the padding of a model's input to the masknorm norms inside: lengths (B,) (padded size `size`,
    default lengths.max()) or a (B, T) bool mask along the input's padded axis, True = valid."""
    return Padding(lengths, mask, size)


def checkpoint_context() -> Tuple[object, object]:
    """A torch.utils.checkpoint `context_fn`: the recomputation re-enters the block the forward ran in."""
    frame = current()
    return nullcontext(), (nullcontext() if frame is None else _entered(frame))


def label(path: str, module: nn.Module) -> str:
    """How errors and reports name a module: its path in the model and its class."""
    return f"{path or 'model'} ({type(module).__name__})"


def module_name(module: nn.Module) -> str:
    """The name masknorm.convert gave the module (its path in the model), else its class."""
    return getattr(module, "_masknorm_name", None) or type(module).__name__


def _known(frame: Frame) -> str:
    return ", ".join(str(s) for s in sorted(frame.resolutions)) or "none"


def _cannot(module: nn.Module, x: torch.Tensor, frame: Frame, why: str) -> ValueError:
    return ValueError(
        f"masknorm.padding: {module_name(module)} cannot determine its mask: input of shape {tuple(x.shape)}, "
        f"padding of batch {frame.batch} at lengths {_known(frame)}: {why}; state it with "
        f"padding(...).at(module, mask_fn) or add(...) (see masknorm.padding)"
    )


def time_axis(frame: Frame, shape: Sequence[int], candidates: Sequence[int]) -> Tuple[Optional[int], str]:
    """The one candidate axis whose size the frame knows (None if none), or a reason it is ambiguous."""
    hits = [a for a in candidates if shape[a] in frame.resolutions]
    if len(hits) > 1:
        return None, f"axes {hits} all have sizes the block knows"
    return (hits[0] if hits else None), ""


def _mask_for(module: nn.Module, x: torch.Tensor, frame: Frame, axis: int, b_pos: int, t_pos: int,
              rank: int) -> torch.Tensor:
    """The frame's (B, T) mask for x's time axis `axis`, laid out on `rank` axes: B at b_pos, T at t_pos."""
    res = frame.resolutions[x.shape[axis]]
    if res.mask is None:
        raise _cannot(module, x, frame, f"length {x.shape[axis]} at axis {axis} is ambiguous ({res.why})")
    shape = [1] * rank
    shape[b_pos], shape[t_pos] = frame.batch, x.shape[axis]
    return (res.mask if b_pos < t_pos else res.mask.t()).reshape(shape)


def token_block_mask(module: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor],
                     n_normalized: int) -> Optional[torch.Tensor]:
    """A token norm's mask (x's leading axes) from the innermost block; `mask` itself when given or outside."""
    frame = current()
    if mask is not None or frame is None:
        return mask
    if id(module) in frame.rules:
        return frame.rules[id(module)](x)
    lead = x.dim() - n_normalized
    found = []
    for t in range(lead):
        if x.shape[t] in frame.resolutions:
            found += [(t, b) for b in range(lead) if b != t and x.shape[b] == frame.batch]
    if len(found) == 1:
        t, b = found[0]
        return _mask_for(module, x, frame, t, b, t, lead)
    if not found and lead == 1 and x.shape[0] == frame.batch:
        return None
    why = "several (batch, time) axis pairs fit" if found else "no axis pair has the batch size and a known length"
    raise _cannot(module, x, frame, why)


def channel_block_mask(module: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A channel norm's mask (B, *spatial) for x (B, C, *spatial) from the innermost block, else `mask`."""
    frame = current()
    if mask is not None or frame is None:
        return mask
    if id(module) in frame.rules:
        return frame.rules[id(module)](x)
    if x.dim() < 2 or x.shape[0] != frame.batch:
        raise _cannot(module, x, frame, f"axis 0 is not the batch (size {frame.batch})")
    axis, why = time_axis(frame, x.shape, range(2, x.dim()))
    if axis is not None:
        return _mask_for(module, x, frame, axis, 0, axis - 1, x.dim() - 1)
    if x.dim() == 2:
        return None
    raise _cannot(module, x, frame, why or "no spatial axis has a known length")
