"""masknorm.testing: check your own (masked) normalization against masknorm's mpmath reference.

    check(fn, Semantics(dim=-1, ...)) -> Report;  assert_conforms(...) raises with the report
    weight_norm_errors(w, grad_v, grad_g, v, g, grad_w, mask, dim, dtype=...) -> (forward, gradient) in u
    check_padding_invariance(model, x, lengths, ...) -> InvarianceReport   (a whole model; torch only,
    also importable as masknorm.models.invariance without the extras)

Re-exports masknorm.reference.oracle and its strategies (needs the `verify`
extras: mpmath, hypothesis); `import masknorm` alone never imports this module.
"""

from masknorm.models.invariance import InvarianceReport, check_padding_invariance
from masknorm.reference import oracle
from masknorm.reference.oracle import (
    FORWARD_BOUND,
    GRADIENT_BOUND,
    CallError,
    ConformanceError,
    PropertyResult,
    Report,
    Semantics,
    assert_conforms,
    check,
)
from masknorm.reference.oracle.strategies import (
    MaskedInput,
    garbage_elements,
    mask_shape,
    masked_inputs,
    masks,
    shapes,
    upstream_gradients,
    values,
    with_garbage,
)
from masknorm.reference.weight_norm import weight_norm_errors

__all__ = [
    *oracle.__all__,
    "MaskedInput", "masked_inputs", "mask_shape", "values", "masks", "shapes", "garbage_elements", "with_garbage",
    "upstream_gradients", "weight_norm_errors", "check_padding_invariance", "InvarianceReport",
]
