"""masknorm.proofs: the properties of masked normalization and WeightNorm, confirmed symbolically with sympy.

Each theorem is one function returning residuals that reduce to exactly 0 (`residual.reduce`),
with a parameter for its claim so that a perturbed statement can be checked to fail:
`invariance` (shift, scale, padding), `moments` (output moments, idempotence, degenerate groups),
`derivatives` (committed closed forms, adjointness, orthogonality), `inference` (eval batch norm),
`structure` (permutations, masked = valid values alone: generic n, and explicit expansion),
`weight_norm` (its closed forms, scale invariance, row norm, VJP orthogonality). `theorems` lists
them and proves one; `cli` is `masknorm prove`. Importing this package imports no sympy.
"""
