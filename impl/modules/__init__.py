"""Drop-in masked versions of torch's normalization layers, and MaskedNorm over einops-style axes.

Every module is a thin preset over masknorm.masked_norm; forward(x, mask=None) with mask=None
equals the torch module it replaces, and state_dicts load both ways.
"""

from masknorm.modules.batch import MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedBatchNorm3d
from masknorm.modules.einops_norm import MaskedNorm
from masknorm.modules.group import MaskedGroupNorm
from masknorm.modules.instance import MaskedInstanceNorm1d, MaskedInstanceNorm2d, MaskedInstanceNorm3d
from masknorm.modules.layer import MaskedLayerNorm, MaskedRMSNorm
from masknorm.modules.sync_batch import MaskedSyncBatchNorm

__all__ = [
    "MaskedLayerNorm",
    "MaskedRMSNorm",
    "MaskedBatchNorm1d",
    "MaskedBatchNorm2d",
    "MaskedBatchNorm3d",
    "MaskedSyncBatchNorm",
    "MaskedGroupNorm",
    "MaskedInstanceNorm1d",
    "MaskedInstanceNorm2d",
    "MaskedInstanceNorm3d",
    "MaskedNorm",
]
