"""masknorm.proofs: the properties of masked normalization, confirmed symbolically with sympy."""
