"""masknorm.reference.oracle: check someone else's normalization against the mpmath reference.

    check(fn, Semantics(...)) -> Report;  pass <=> every property's error <= its bound (u*kappa)

Modules, one job each: `semantics` (what fn claims), `strategies` (hypothesis inputs),
`properties` (one measurement per call), `compare` (error metrics), `run` (the hypothesis runs),
`report` (verdicts and reproductions), `frameworks` (numpy / JAX / Keras / torch arrays and their
autodiff), `cli` (`masknorm check`). Needs the `verify` extras; `import masknorm` never imports it.
"""

from .properties import FORWARD_BOUND, GRADIENT_BOUND
from .report import PropertyResult, Report
from .run import CallError, ConformanceError, assert_conforms, check
from .semantics import Semantics

__all__ = [
    "Semantics",
    "check",
    "assert_conforms",
    "Report",
    "PropertyResult",
    "CallError",
    "ConformanceError",
    "FORWARD_BOUND",
    "GRADIENT_BOUND",
]
