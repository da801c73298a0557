"""masknorm.reference: high-precision (mpmath) evaluation of masked normalization, the oracle."""
