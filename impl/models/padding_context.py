"""masknorm.padding: hand a model's padding to every masknorm norm inside it.

    with masknorm.padding(lengths=lengths):        # or mask=(B, T) bool, True = valid,
        out = model(x, attention_mask=am)          # or padding_mask=(B, T) bool, True = padding

Inside the block a masknorm norm called without a mask takes the block's: it finds its input's
batch axis (size B) and time axis (a size the block knows) and builds the (B, ..., T, ...) mask from
the lengths at that resolution. The block knows the input's T, and every length derived since by a
tracked convolution or pooling layer (masknorm.convert installs the tracking, masknorm/models/length_tracking.py):

    L_out = floor((L + p_left + p_right - d (k - 1) - 1) / s) + 1,   lengths_out = clamp(same on lengths, 0, L_out)

A norm that finds no such axis, or more than one, raises (naming the module and the shapes);
`.at(norm, fn)` states a norm's mask, `.add(lengths=..., size=...)` a resolution the tracking cannot
see (a custom subsampling layer). Outside any block nothing changes; `padding()` with no argument states
that nothing is padded. A norm of a converted model called in training mode with no padding at all (no
mask, no block, no padding_from) warns once per process: it computes torch's statistics, padding included.

Sizes are compared, never used as keys, and B and T are read off the block's tensors, which are marked
maybe-dynamic: under torch.compile a new batch size or length reuses the graph (symbolic sizes), and
torch.export can trace a block entered inside the exported forward with a `Dim` on T. A block entered
outside an exported function (its lengths would become constants) and a norm exported with no block (the
program would ignore one at run time) raise.

Carrier (docs/DECISIONS.md item 2): a threading.local stack of frames, one per entered block, so
two threads running one model with different padding never see each other's, and torch.compile
traces it without graph breaks. Gradient checkpointing recomputes the forward outside the block:
pass `context_fn=masknorm.checkpoint_context` (use_reentrant=False) to re-enter it there.
"""

from __future__ import annotations

import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from masknorm._contract import check_lengths, check_time_mask
from masknorm._tracing import exporting, tracing

_local = threading.local()

MaskFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


class Resolution:
    """The padding at one time resolution: lengths (B,) when the valid frames are a prefix, and the (B, T) mask.

    `key` names the derivation (equal keys give equal lengths, also when a checkpoint recomputes them);
    `lengths is None` means the mask is not a prefix mask, so nothing can be derived from it;
    `mask is None` means two derivations disagreed on this size (`why` says which).
    The size T is read off the mask where there is one, so that under torch.compile it is the mask's
    (symbolic) size, never a Python int frozen into the graph.
    """

    __slots__ = ("lengths", "mask", "why", "key", "_size")

    def __init__(self, lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor], why: str,
                 key: Hashable = None, size: Optional[int] = None) -> None:
        self.lengths, self.mask, self.why, self.key = lengths, mask, why, key if key is not None else why
        self._size = size

    @property
    def size(self) -> int:
        return self.mask.shape[1] if self.mask is not None else self._size


def prefix_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) bool: position t < lengths[b]."""
    return torch.arange(size, device=lengths.device) < lengths[:, None]


class Frame:
    """One entered block: its own resolution (the block's input), those derived or stated since, the
    stated norm masks. Resolutions are found by comparing sizes (==), never by hashing them: a size
    may be symbolic (torch.compile with dynamic shapes, torch.export)."""

    def __init__(self, block: Resolution, resolutions: Sequence[Resolution], rules: Dict[int, MaskFn],
                 traced: bool) -> None:
        self.block, self.resolutions, self.rules, self.traced = block, list(resolutions), rules, traced
        self.pending: Dict[int, Tuple[int, int, Optional[torch.Tensor], Hashable]] = {}

    @property
    def batch(self) -> int:
        """B, read off the block's tensors (symbolic under a tracer)."""
        return self.block.mask.shape[0]

    def resolution(self, size: int) -> Optional[Resolution]:
        """The resolution of time size `size`, or None."""
        for res in self.resolutions:
            if res.size == size:
                return res
        return None

    def state(self, res: Resolution) -> None:
        """Add or replace the resolution of res.size."""
        self.resolutions = [r for r in self.resolutions if r.size != res.size] + [res]

    def record(self, size: int, lengths: Optional[torch.Tensor], key: Hashable, source: str) -> None:
        """Learn the resolution `size` from a derivation; a second, different derivation makes it ambiguous."""
        known = self.resolution(size)
        if known is not None and (known.key == key or known.mask is None):
            return
        if known is not None:
            self.state(Resolution(None, None, f"{known.why} and {source} both give length {size}", key, size))
        elif lengths is None:
            self.state(Resolution(None, None, f"{source} derives it from a mask that is not a prefix", key, size))
        else:
            self.state(Resolution(lengths, prefix_mask(lengths, size), source, key))


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


def _resolution(lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor], size: Optional[int],
                source: str) -> Resolution:
    """The Resolution of exactly one of lengths (with size, default lengths.max()) or mask."""
    if (lengths is None) == (mask is None):
        raise ValueError("give exactly one of lengths=, mask= and padding_mask=")
    if mask is not None:
        mask = check_time_mask(mask, "mask")
        if size is not None and size != mask.shape[1]:
            raise ValueError(f"size={size} differs from mask of shape {tuple(mask.shape)}")
        sums = mask.sum(1)
        return Resolution(sums if _is_prefix(mask, sums) else None, mask, source)
    lengths = check_lengths(lengths, "lengths")
    if size is None and tracing():
        raise ValueError("padding(lengths=...) inside torch.compile or torch.export needs size= (the padded "
                         "length, e.g. x.shape[-1]): lengths.max() is data the tracer cannot read")
    if size is None:
        size = int(lengths.max()) if lengths.numel() else 0
    if lengths.numel() and not tracing() and (int(lengths.min()) < 0 or int(lengths.max()) > size):
        raise ValueError(f"lengths must lie in [0, {size}], got min {int(lengths.min())} max {int(lengths.max())}")
    return Resolution(lengths, prefix_mask(lengths, size), source)


def _dynamic(res: Resolution) -> Resolution:
    """res with its tensors' sizes marked maybe-dynamic for torch.compile (where Dynamo is loaded):
    a compiled model then reads B and T off them as symbols, and a new batch size or length reuses
    the graph instead of compiling one per size."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and not tracing():
        for t in (res.lengths, res.mask):
            for axis in range(0 if t is None else t.dim()):
                dynamo.maybe_mark_dynamic(t, axis)
    return res


class Padding:
    """The context manager `masknorm.padding(...)` returns; see the module docstring."""

    def __init__(self, lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor], size: Optional[int],
                 padding_mask: Optional[torch.Tensor] = None) -> None:
        if padding_mask is not None:
            if mask is not None:
                raise ValueError("give mask= (True = valid) or padding_mask= (True = padding), not both")
            mask = ~check_time_mask(padding_mask, "padding_mask", "True = padding")
        unpadded = lengths is None and mask is None and size is None
        self.block = None if unpadded else _dynamic(_resolution(lengths, mask, size, "the block's input"))
        self.added: List[Resolution] = []
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
        if self.block is None:
            raise ValueError("add(): padding() without lengths or mask states that nothing is padded")
        res = _dynamic(_resolution(lengths, mask, size, f"a resolution stated by add() ({id(self)})"))
        if res.mask.shape[0] != self.block.mask.shape[0]:
            raise ValueError(f"add(): batch {res.mask.shape[0]} differs from the block's batch "
                             f"{self.block.mask.shape[0]}")
        self.added.append(res)
        for frame in self._frames:
            frame.state(res)
        return self

    def __enter__(self) -> "Padding":
        frame = Frame(self.block, [r for r in (self.block, *self.added) if r is not None], self.rules, tracing())
        self._frames.append(frame)
        _push(frame)
        return self

    def __exit__(self, *exc: object) -> None:
        self._frames.remove(_local.stack.pop())


def padding(*, lengths: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
            padding_mask: Optional[torch.Tensor] = None, size: Optional[int] = None) -> Padding:
    """Hand the padding of a model's input to the masknorm norms inside: lengths (B,) (padded size `size`,
    default lengths.max()), or a (B, T) bool mask along the input's padded axis in one of two conventions:
    mask= True = valid (transformers' attention_mask.bool()), padding_mask= True = padding (torch's
    key_padding_mask, fairseq's padding_mask). Give one of the three.
    With none, the block states that nothing is padded (the norms see every position as valid):
    what torch.export needs to export a model whose norms take their mask from a block, for
    unpadded inputs."""
    return Padding(lengths, mask, size, padding_mask)


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
    return ", ".join(str(r.size) for r in frame.resolutions) or "none"


def _cannot(module: nn.Module, x: torch.Tensor, frame: Frame, why: str) -> ValueError:
    return ValueError(
        f"masknorm.padding: {module_name(module)} cannot determine its mask: input of shape {tuple(x.shape)}, "
        f"padding of batch {frame.batch} at lengths {_known(frame)}: {why}; state it with "
        f"padding(...).at(module, mask_fn) or add(...) (see masknorm.padding)"
    )


def time_axis(frame: Frame, shape: Sequence[int], candidates: Sequence[int]) -> Tuple[Optional[int], str]:
    """The one candidate axis whose size the frame knows (None if none), or a reason it is ambiguous."""
    hits = [a for a in candidates if frame.resolution(shape[a]) is not None]
    if len(hits) > 1:
        return None, f"axes {hits} all have sizes the block knows"
    return (hits[0] if hits else None), ""


def _mask_for(module: nn.Module, x: torch.Tensor, frame: Frame, axis: int, b_pos: int, t_pos: int,
              rank: int) -> torch.Tensor:
    """The frame's (B, T) mask for x's time axis `axis`, laid out on `rank` axes: B at b_pos, T at t_pos."""
    res = frame.resolution(x.shape[axis])
    if res.mask is None:
        raise _cannot(module, x, frame, f"length {x.shape[axis]} at axis {axis} is ambiguous ({res.why})")
    shape = [1] * rank
    shape[b_pos], shape[t_pos] = frame.batch, x.shape[axis]
    return (res.mask if b_pos < t_pos else res.mask.t()).reshape(shape)


_unpadded_warned = False


def _warn_unpadded(module: nn.Module) -> None:
    """Warn, once per process, that a converted norm trains with no padding information at all."""
    global _unpadded_warned
    if _unpadded_warned:
        return
    _unpadded_warned = True
    warnings.warn(
        f"masknorm: {module_name(module)} (converted by masknorm.convert) runs in training mode with no padding "
        f"information: no mask, no masknorm.padding block, no padding_from; its statistics include any padding, "
        f"as torch's do. Convert with masknorm.convert(model, padding_from='attention_mask') (or the model's "
        f"lengths / padding_mask argument), or call it inside `with masknorm.padding(lengths=..., size=T)` "
        f"(mask=, padding_mask=); `with masknorm.padding():` states that nothing is padded. Warned once.",
        UserWarning, stacklevel=4)


def block_for(module: nn.Module) -> Optional[Frame]:
    """The innermost block, for a norm called without a mask; None where there is none or it states
    no padding. Under torch.export, where the program keeps no link to masknorm.padding, a block
    must be entered inside the exported function: one entered outside would be frozen into the
    program (its lengths as constants), and none at all would make the program ignore any block at
    run time. Both raise. A converted norm in training mode outside any block warns once (in eager
    mode: under torch.compile nothing is warned, so that the graph has no break)."""
    frame = current()
    if frame is None and module.training and getattr(module, "_masknorm_converted", False) and not tracing():
        _warn_unpadded(module)
    if exporting():
        if frame is None:
            raise RuntimeError(
                f"masknorm: {module_name(module)} is exported without a mask and outside masknorm.padding: the "
                f"program would ignore any padding at run time. Enter `with masknorm.padding(lengths=lengths, "
                f"size=x.shape[...])` inside the exported forward, with lengths as an input, or export inside "
                f"`with masknorm.padding():` to state that the program's inputs are not padded")
        if frame.block is not None and not frame.traced:
            raise RuntimeError(
                f"masknorm: {module_name(module)} is exported inside a masknorm.padding block entered outside "
                f"the exported function: its lengths would be frozen into the program as constants. Enter the "
                f"block inside the exported forward, with lengths as an input")
    return None if frame is None or (frame.block is None and not frame.rules) else frame


def token_block_mask(module: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor],
                     n_normalized: int) -> Optional[torch.Tensor]:
    """A token norm's mask (x's leading axes) from the innermost block; `mask` itself when given or outside."""
    frame = None if mask is not None else block_for(module)
    if frame is None:
        return mask
    if id(module) in frame.rules:
        return frame.rules[id(module)](x)
    if frame.block is None:
        return None
    lead = x.dim() - n_normalized
    found = []
    for t in range(lead):
        if frame.resolution(x.shape[t]) is not None:
            found += [(t, b) for b in range(lead) if b != t and x.shape[b] == frame.batch]
    if len(found) == 1:
        t, b = found[0]
        return _mask_for(module, x, frame, t, b, t, lead)
    if not found and lead == 1 and x.shape[0] == frame.batch:
        return None
    why = "several (batch, time) axis pairs fit" if found else \
        f"no axis pair has the batch size and a known length{_SIZE_HINT}"
    raise _cannot(module, x, frame, why)


def channel_block_mask(module: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A channel norm's mask (B, *spatial) for x (B, C, *spatial) from the innermost block, else `mask`."""
    frame = None if mask is not None else block_for(module)
    if frame is None:
        return mask
    if id(module) in frame.rules:
        return frame.rules[id(module)](x)
    if frame.block is None:
        return None
    if x.dim() < 2 or x.shape[0] != frame.batch:
        raise _cannot(module, x, frame, f"axis 0 is not the batch (size {frame.batch})")
    axis, why = time_axis(frame, x.shape, range(2, x.dim()))
    if axis is not None:
        return _mask_for(module, x, frame, axis, 0, axis - 1, x.dim() - 1)
    if x.dim() == 2:
        return None
    raise _cannot(module, x, frame, why or f"no spatial axis has a known length{_SIZE_HINT}")


_SIZE_HINT = (" (padding(lengths=...) without size= knows T = lengths.max(); if the input is padded past its "
              "longest sequence, give size=T)")
