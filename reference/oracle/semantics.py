"""What an implementation under test claims to compute: one masked_norm configuration.

    y = (x - mu)/sqrt(sum_V (x - mu)^2/(k - correction) + eps) over `dim` (center=False: mu = 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

from masknorm._contract import check_args


@dataclass(frozen=True)
class Semantics:
    """The claimed operation: reduction axes `dim`, variance divisor k - `correction`, `eps`, mean
    subtraction (`center`, False = RMS) and the output at masked-out positions (`masked`)."""

    dim: Union[int, Tuple[int, ...]] = -1
    correction: int = 0
    eps: float = 1e-5
    center: bool = True
    masked: str = "normalize"

    def __post_init__(self) -> None:
        if isinstance(self.dim, Sequence) and not isinstance(self.dim, str):
            object.__setattr__(self, "dim", tuple(self.dim))
        axes = [d for d in ((self.dim,) if isinstance(self.dim, int) else self.dim) if isinstance(d, int)]
        rank = max([d + 1 if d >= 0 else -d for d in axes], default=1)  # the least rank dim fits
        check_args(
            (1,) * rank, None, self.dim, correction=self.correction, eps=self.eps, center=self.center, masked=self.masked
        )

    @property
    def options(self) -> dict:
        """The keyword arguments of masknorm.masked_norm (and the reference) besides x, mask and dim."""
        return dict(correction=self.correction, eps=self.eps, center=self.center, masked=self.masked)

    def describe(self) -> str:
        """One line: the configuration as keyword arguments."""
        return f"dim={self.dim!r}, correction={self.correction}, eps={self.eps!r}, center={self.center}, masked={self.masked!r}"
