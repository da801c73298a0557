"""masknorm.convert(model, padding_from=...): a converted model takes its padding from its own forward argument.

    model = masknorm.convert(model, padding_from="attention_mask")      # then: model(x, attention_mask=am)

Each call of the model enters a masknorm.padding block built from that argument for the duration of the
call and exits it after, also when the call raises: a forward pre-hook (with kwargs, prepended so that
no other pre-hook can raise before it) on the top model enters it, a forward hook registered with
always_call=True exits it. The blocks live on masknorm.padding's
threading.local stack, so two threads calling one model never see each other's padding, and a model
called inside its own forward (or inside another block) enters its own block on top and leaves the outer
one as it was.

Conventions (each named; what a value must look like is checked, a wrong one raises naming it):

    "valid_mask"        (B, T) bool or integer, True / nonzero = valid   transformers' attention_mask
    "padding_mask"      (B, T) bool or integer, True / nonzero = padding torch's key_padding_mask, fairseq
    "lengths"           (B,) integer, valid frames of each sequence      torchaudio (Conformer, Emformer)
    "relative_lengths"  (B,) floating in [0, 1], lengths / T (rounded)   SpeechBrain's wav_lens

The lengths conventions need the padded size T: it is read off the forward's first argument (the
input) along `time_axis` (default 1: (B, T, ...)). An argument that is None (or absent) states that
nothing is padded, as the models' own conventions say, unless an enclosing block already states the
padding (that block then applies).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from masknorm.models.padding_context import Padding, current
from masknorm._tracing import tracing

CONVENTIONS: Dict[str, str] = {
    "valid_mask": "(B, T) bool or integer, True / nonzero = valid (transformers' attention_mask)",
    "padding_mask": "(B, T) bool or integer, True / nonzero = padding (torch's key_padding_mask, fairseq's "
                    "padding_mask)",
    "lengths": "(B,) integer, the valid frames of each sequence (torchaudio)",
    "relative_lengths": "(B,) floating in [0, 1], each sequence's length as a fraction of T (SpeechBrain's wav_lens)",
}

# Argument names whose convention is recognised without being named.
KNOWN_ARGUMENTS: Dict[str, str] = {
    "attention_mask": "valid_mask",
    "padding_mask": "padding_mask",
    "key_padding_mask": "padding_mask",
    "src_key_padding_mask": "padding_mask",
    "lengths": "lengths",
    "wav_lens": "relative_lengths",
}

PaddingFrom = Union[str, Tuple[str, str]]

_local = threading.local()


def _entered() -> List[Optional[Padding]]:
    entered = getattr(_local, "entered", None)
    if entered is None:
        entered = _local.entered = []
    return entered


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


class FromArgument:
    """The hooks of a model converted with padding_from: which argument, which convention, where T is."""

    def __init__(self, model: nn.Module, padding_from: PaddingFrom, time_axis: int) -> None:
        argument, convention = _parse(padding_from)
        self.argument, self.convention, self.time_axis = argument, convention, time_axis
        params = list(inspect.signature(model.forward).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if argument not in names and not any(p.kind == p.VAR_KEYWORD for p in params):
            raise ValueError(f"padding_from: {type(model).__name__}.forward has no argument {argument!r}; its "
                             f"arguments are {names}")
        self.position = positional.index(argument) if argument in positional else None
        self.input = positional[0] if positional else None

    def _value(self, args: tuple, kwargs: Dict[str, Any], name: Optional[str],
               position: Optional[int]) -> Any:
        if name in kwargs:
            return kwargs[name]
        return args[position] if position is not None and position < len(args) else None

    def _padded_size(self, args: tuple, kwargs: Dict[str, Any]) -> int:
        x = self._value(args, kwargs, self.input, 0)
        if not isinstance(x, torch.Tensor) or not -x.dim() <= self.time_axis < x.dim():
            raise ValueError(f"padding_from=({self.argument!r}, {self.convention!r}) reads the padded size T off "
                             f"the forward's first argument {self.input!r} along time_axis={self.time_axis}, "
                             f"got {_describe(x)}; pass convert(..., time_axis=) or a mask convention")
        return x.shape[self.time_axis]

    def block(self, value: Any, args: tuple, kwargs: Dict[str, Any]) -> Padding:
        """The masknorm.padding block that `value` (the argument) states under the convention."""
        where = f"padding_from=({self.argument!r}, {self.convention!r}): argument {self.argument!r} must be " \
                f"{CONVENTIONS[self.convention]}, got {_describe(value)}"
        if not isinstance(value, torch.Tensor) or value.is_complex():
            raise TypeError(where)
        integer = not value.dtype.is_floating_point
        if self.convention in ("valid_mask", "padding_mask"):
            if value.dim() != 2 or not integer:
                raise TypeError(where + ("; lengths (B,) take the convention 'lengths'" if value.dim() == 1 else ""))
            nonzero = value if value.dtype == torch.bool else value != 0
            return Padding(None, nonzero, None) if self.convention == "valid_mask" else \
                Padding(None, None, None, padding_mask=nonzero)
        size = self._padded_size(args, kwargs)
        if value.dim() != 1 or integer == (self.convention == "relative_lengths") or value.dtype == torch.bool:
            hint = {"lengths": "; fractions of T take the convention 'relative_lengths'",
                    "relative_lengths": "; frame counts take the convention 'lengths'"}[self.convention]
            raise TypeError(where + (hint if value.dim() == 1 and value.dtype != torch.bool else ""))
        if self.convention == "relative_lengths":
            if not tracing() and value.numel() and (float(value.min()) < 0 or float(value.max()) > 1):
                raise ValueError(f"{where} (min {float(value.min()):.3g}, max {float(value.max()):.3g})")
            value = torch.round(value * size).long()
        elif not tracing() and value.numel() and int(value.max()) > size:
            raise ValueError(f"padding_from=({self.argument!r}, {self.convention!r}): lengths up to "
                             f"{int(value.max())} exceed T = {size}, the size of argument {self.input!r} along "
                             f"time_axis={self.time_axis}; pass convert(..., time_axis=) where T is")
        return Padding(value, None, size)

    def enter(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Forward pre-hook: enter the block the argument states (None: nothing padded, unless a block is open)."""
        entered = _entered()
        entered.append(None)  # exit() pops one entry per call, also when this hook raises
        value = self._value(args, kwargs, self.argument, self.position)
        if value is None:
            if current() is not None:
                return
            block = Padding(None, None, None)
        else:
            block = self.block(value, args, kwargs)
        entered[-1] = block.__enter__()

    def exit(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any], out: Any) -> None:
        """Forward hook (always called): exit the block enter() entered for this call."""
        block = _entered().pop()
        if block is not None:
            block.__exit__(None, None, None)


def _parse(padding_from: PaddingFrom) -> Tuple[str, str]:
    if isinstance(padding_from, str):
        if padding_from not in KNOWN_ARGUMENTS:
            raise ValueError(f"padding_from={padding_from!r}: no convention is known for an argument of that name; "
                             f"name it: padding_from=({padding_from!r}, convention), convention one of "
                             f"{list(CONVENTIONS)}")
        return padding_from, KNOWN_ARGUMENTS[padding_from]
    if isinstance(padding_from, tuple) and len(padding_from) == 2 and all(isinstance(v, str) for v in padding_from):
        if padding_from[1] not in CONVENTIONS:
            raise ValueError(f"padding_from={padding_from!r}: unknown convention {padding_from[1]!r}; one of "
                             + "; ".join(f"{k!r}: {v}" for k, v in CONVENTIONS.items()))
        return padding_from
    raise TypeError(f"padding_from must be an argument name ({list(KNOWN_ARGUMENTS)}) or a pair (argument, "
                    f"convention), got {padding_from!r}")


def install(model: nn.Module, padding_from: Optional[PaddingFrom], time_axis: int) -> None:
    """Install (or, with None, remove) the padding_from hooks on `model`, replacing any installed before."""
    hooks = FromArgument(model, padding_from, time_axis) if padding_from is not None else None
    for handle in getattr(model, "_masknorm_padding_from", ()):
        handle.remove()
    model._masknorm_padding_from = () if hooks is None else (
        model.register_forward_pre_hook(hooks.enter, with_kwargs=True, prepend=True),
        model.register_forward_hook(hooks.exit, with_kwargs=True, always_call=True))
