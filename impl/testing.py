"""masknorm.testing: check your own (masked) normalization against masknorm's mpmath reference.

    check(fn, Semantics(dim=-1, ...)) -> Report;  assert_conforms(...) raises with the report
    check_padding_invariance(model, x, lengths, ...) -> InvarianceReport   (a whole model; torch only,
    also importable as masknorm.invariance without the extras)

Re-exports masknorm.reference.oracle and masknorm.reference.strategies (needs the `verify`
extras: mpmath, hypothesis); `import masknorm` alone never imports this module.
"""

from masknorm.invariance import InvarianceReport, check_padding_invariance
from masknorm.reference.oracle import CallError, ConformanceError, assert_conforms, check
from masknorm.reference.oracle_properties import FORWARD_BOUND, GRADIENT_BOUND
from masknorm.reference.oracle_report import PropertyResult, Report
from masknorm.reference.oracle_semantics import Semantics
from masknorm.reference.strategies import (
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

__all__ = [
    "Semantics",
    "check",
    "assert_conforms",
    "check_padding_invariance",
    "InvarianceReport",
    "Report",
    "PropertyResult",
    "CallError",
    "ConformanceError",
    "FORWARD_BOUND",
    "GRADIENT_BOUND",
    "MaskedInput",
    "masked_inputs",
    "mask_shape",
    "values",
    "masks",
    "shapes",
    "garbage_elements",
    "with_garbage",
    "upstream_gradients",
]
