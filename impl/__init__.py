"""masknorm: masked normalization for PyTorch (layer, RMS, batch, group, instance).

Statistics ignore the positions where `mask` is False:

    mu = (1/k) sum_V x,  sigma^2 = (1/(k-c)) sum_V (x-mu)^2,  y = gamma (x-mu)/sqrt(sigma^2+eps) + beta

Importing masknorm imports torch only; the verification side (masknorm.spec, .reference,
.proofs) needs the `verify` extras.
"""

__version__ = "0.1.0"

from masknorm import modules
from masknorm.models.padding_context import checkpoint_context, padding
from masknorm._weight_norm import weight_norm
from masknorm.functional import masked_norm
from masknorm.models.conversion import convert
from masknorm.modules import (
    MaskedBatchNorm1d,
    MaskedBatchNorm2d,
    MaskedBatchNorm3d,
    MaskedGroupNorm,
    MaskedInstanceNorm1d,
    MaskedInstanceNorm2d,
    MaskedInstanceNorm3d,
    MaskedLayerNorm,
    MaskedNorm,
    MaskedRMSNorm,
    MaskedSyncBatchNorm,
)

__all__ = ["masked_norm", "weight_norm", "convert", "padding", "checkpoint_context", *modules.__all__]
