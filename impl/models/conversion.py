"""masknorm.convert: turn a model's torch norms into their masked twins, in place.

    model = masknorm.convert(model)            # then: with masknorm.padding(lengths=...): model(x)
    model = masknorm.convert(model, padding_from="attention_mask")      # then: model(x, attention_mask=am)

Each module whose type is exactly one of torch's nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
nn.BatchNorm1d/2d/3d, nn.InstanceNorm1d/2d/3d becomes its masknorm twin by changing its class: the
twin subclasses the torch layer and adds only `masked = "normalize"`, so parameters, buffers,
device, dtype, training mode, hooks, identity (optimizer references) and state_dict keys are the
module's own, and a stock state_dict loads strictly both ways. Subclasses with their own forward are
left alone. Outside a padding block a converted norm computes what the torch layer computed.

Every nn.Conv1d, nn.Conv2d, nn.MaxPool1d/2d, nn.AvgPool1d/2d (subclasses included) gets two hooks
(masknorm/models/length_tracking.py): inside a block they carry the lengths to the new time resolution and, with
convolutions=True, zero (max pooling: -inf) the padded positions they read.

With padding_from, the model takes its padding from its own forward argument (masknorm/models/padding_from.py):
each call enters the masknorm.padding block that the argument states, and leaves it after.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from torch import nn

from masknorm.models import length_tracking, padding_from as _padding_from
from masknorm.models.padding_from import PaddingFrom
from masknorm.models.padding_context import label
from masknorm.modules import (
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    MaskedBatchNorm3d,
    MaskedGroupNorm,
    MaskedInstanceNorm1d,
    MaskedInstanceNorm2d,
    MaskedInstanceNorm3d,
    MaskedLayerNorm,
    MaskedRMSNorm,
)

TWINS: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.LayerNorm: MaskedLayerNorm,
    nn.RMSNorm: MaskedRMSNorm,
    nn.GroupNorm: MaskedGroupNorm,
    nn.BatchNorm1d: MaskedBatchNorm1d,
    nn.BatchNorm2d: MaskedBatchNorm2d,
    nn.BatchNorm3d: MaskedBatchNorm3d,
    nn.InstanceNorm1d: MaskedInstanceNorm1d,
    nn.InstanceNorm2d: MaskedInstanceNorm2d,
    nn.InstanceNorm3d: MaskedInstanceNorm3d,
}


def convert(model: nn.Module, *, convolutions: bool = True, padding_from: Optional[PaddingFrom] = None,
            time_axis: int = 1) -> nn.Module:
    """Replace, in place, every torch norm in `model` (itself included) by its masked twin; track the
    lengths through its convolutions and pooling, zeroing their padded inputs if `convolutions`. Returns model.

    padding_from: the forward argument the model's padding comes from, so that no masknorm.padding block
    is needed around the call. An argument name whose convention is known ("attention_mask": 1/True =
    valid; "padding_mask", "key_padding_mask", "src_key_padding_mask": True = padding; "lengths": (B,)
    frame counts; "wav_lens": (B,) fractions of T), or a pair (argument, convention), convention one of
    "valid_mask", "padding_mask", "lengths", "relative_lengths". With the two lengths conventions, T is
    the size of the forward's first argument along `time_axis`. A value that does not fit its convention
    (a float mask, a (B, T) tensor as lengths) raises naming the argument. None (default) installs
    nothing (and removes what an earlier convert installed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _padding_from.install(model, padding_from, time_axis)
    for name, module in model.named_modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
            module.masked = "normalize"
            module._masknorm_converted = True
        if isinstance(module, (*TWINS.values(), *length_tracking.TRACKED)):
            module._masknorm_name = label(name, module)
        if isinstance(module, length_tracking.TRACKED):
            length_tracking.track(module, convolutions)
            module._masknorm_converted = True
    return model
