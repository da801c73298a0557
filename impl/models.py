"""masknorm.convert: turn a model's torch norms into their masked twins, in place.

    model = masknorm.convert(model)            # then: with masknorm.padding(lengths=...): model(x)

Each module whose type is exactly one of torch's nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
nn.BatchNorm1d/2d/3d, nn.InstanceNorm1d/2d/3d becomes its masknorm twin by changing its class: the
twin subclasses the torch layer and adds only `masked = "normalize"`, so parameters, buffers,
device, dtype, training mode, hooks, identity (optimizer references) and state_dict keys are the
module's own, and a stock state_dict loads strictly both ways. Subclasses with their own forward are
left alone. Outside a padding block a converted norm computes what the torch layer computed.

Every nn.Conv1d, nn.Conv2d, nn.MaxPool1d/2d, nn.AvgPool1d/2d (subclasses included) gets two hooks
(masknorm/_lengths.py): inside a block they carry the lengths to the new time resolution and, with
convolutions=True, zero (max pooling: -inf) the padded positions they read.
"""

from __future__ import annotations

from typing import Dict, Type

from torch import nn

from masknorm import _lengths
from masknorm._padding import label
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


def convert(model: nn.Module, *, convolutions: bool = True) -> nn.Module:
    """Replace, in place, every torch norm in `model` (itself included) by its masked twin; track the
    lengths through its convolutions and pooling, zeroing their padded inputs if `convolutions`. Returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
            module.masked = "normalize"
        if isinstance(module, (*TWINS.values(), *_lengths.TRACKED)):
            module._masknorm_name = label(name, module)
        if isinstance(module, _lengths.TRACKED):
            _lengths.track(module, convolutions)
    return model
