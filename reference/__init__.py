"""masknorm.reference: high-precision (mpmath) evaluation of masked normalization, the oracle.

Every input converts to its exact value, the definition is evaluated at `dps` digits, and each
result is rounded once to float64.
"""

from .forward import masked_norm

__all__ = ["masked_norm"]
