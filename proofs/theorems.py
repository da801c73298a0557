"""The theorems `masknorm prove` confirms, in the issue's order, and how one is proved: every
residual its check returns (for each variant it is stated for) reduces to exactly 0. A check that
raises is a failed proof, never a skipped one. EXPANDED are the explicit-n confirmations of
theorems 11 and 12 kept beside their generic proofs (`masknorm prove --expanded`)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from masknorm.proofs import derivatives, inference, invariance, merge, moments, structure, weight_norm
from masknorm.proofs.residual import Residuals, vanishes

CENTERED = ({"center": True},)
BOTH = ({"center": True}, {"center": False})
MERGES = ({"processes": 2, "rule": merge.shifted}, {"processes": 2, "rule": merge.pairwise},
          {"processes": 3, "rule": merge.shifted}, {"processes": 3, "rule": merge.pairwise})


@dataclass(frozen=True)
class Theorem:
    """A check and the keyword sets (variants) it is run with; its docstring states it."""

    check: Callable[..., Residuals]
    variants: tuple[dict[str, Any], ...] = ({},)

    @property
    def name(self) -> str:
        return self.check.__name__

    @property
    def statement(self) -> str:
        return (self.check.__doc__ or "").strip().splitlines()[0]

    @property
    def scope(self) -> str:
        """The docstring's paragraph that starts with "Scope:", joined into one line."""
        lines = [line.strip() for line in (self.check.__doc__ or "").splitlines()]
        start = next((number for number, line in enumerate(lines) if line.startswith("Scope:")), len(lines))
        paragraph = itertools.takewhile(bool, lines[start:])
        return " ".join(paragraph).removeprefix("Scope:").strip()

    def residuals(self) -> Residuals:
        """Every residual of every variant, reduced."""
        return tuple(r for keywords in self.variants for r in self.check(**keywords))


THEOREMS = (
    Theorem(invariance.shift_invariance, CENTERED),
    Theorem(invariance.scale_invariance, BOTH),
    Theorem(moments.output_moments, BOTH),
    Theorem(invariance.padding_invariance, BOTH),
    Theorem(derivatives.closed_form_derivatives, BOTH),
    Theorem(derivatives.adjointness, BOTH),
    Theorem(derivatives.gradient_orthogonality, BOTH),
    Theorem(moments.idempotence, BOTH),
    Theorem(inference.inference_is_affine),
    Theorem(moments.degenerate_passthrough, BOTH),
    Theorem(structure.permutation_equivariance, BOTH),
    Theorem(structure.valid_values_alone, BOTH),
    Theorem(weight_norm.weight_norm_closed_forms),
    Theorem(weight_norm.weight_norm_scale_invariance),
    Theorem(weight_norm.weight_norm_row_norm),
    Theorem(weight_norm.weight_norm_vjp_orthogonality),
    Theorem(merge.parallel_merge, MERGES),
)
EXPANDED = (
    Theorem(structure.permutation_equivariance_expanded, BOTH),
    Theorem(structure.valid_values_alone_expanded, BOTH),
)


@dataclass(frozen=True)
class Outcome:
    """The result of proving one theorem (detail: the first non-zero residual or the error)."""

    theorem: Theorem
    status: Literal["proved", "failed"]
    seconds: float
    detail: str = field(default="")

    def as_json(self) -> dict[str, Any]:
        return {"name": self.theorem.name, "statement": self.theorem.statement, "scope": self.theorem.scope,
                "status": self.status, "seconds": round(self.seconds, 3)}


def prove(theorem: Theorem) -> Outcome:
    """Run the theorem's checks: proved when every residual is exactly 0."""
    start = time.perf_counter()
    try:
        residuals = theorem.residuals()
    except Exception as error:  # a check that cannot run has not proved anything
        return Outcome(theorem, "failed", time.perf_counter() - start, f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - start
    if not residuals:
        return Outcome(theorem, "failed", seconds, "the check returned no residual")
    if vanishes(residuals):
        return Outcome(theorem, "proved", seconds)
    return Outcome(theorem, "failed", seconds, f"residual {next(r for r in residuals if r != 0)}")
