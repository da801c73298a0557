"""masknorm.reference: high-precision (mpmath) evaluation of masked normalization, the oracle.

Every input converts to its exact value, the definition (forward) and the spec's generated closed
forms (vjp, jvp) are evaluated at `dps` digits, and each result is rounded once to float64. Errors
of a candidate are measured in units of u * kappa, kappa = (|mu| + sigma)/s per group
(see masknorm.reference.error). WeightNorm: `weight_norm`, `weight_norm_vjp`, `weight_norm_jvp`.
"""

from .derivatives import jvp, vjp
from .error import error_in_ukappa, kappa, max_error_in_ukappa, unit_roundoff
from .forward import masked_norm
from .merge import merge, moments
from .weight_norm import weight_norm, weight_norm_errors, weight_norm_jvp, weight_norm_vjp

__all__ = ["masked_norm", "vjp", "jvp", "merge", "moments", "kappa", "unit_roundoff", "error_in_ukappa",
           "max_error_in_ukappa", "weight_norm", "weight_norm_vjp", "weight_norm_jvp", "weight_norm_errors"]
