"""What an implementation under test claims to compute: one masked_norm configuration, plus the
conventions real implementations differ in.

    y = (x - mu)/sqrt(sum_V (x - mu)^2/(k - correction) + eps) over `dim` (center=False: mu = 0)
    eps_outside:  y = (x - mu)/(sigma + eps)

Each convention below is a documented difference, not a bug: the reference computes it, so an
implementation that has it conforms, and one that claims it but computes something else fails.

| option | values | who uses it |
|---|---|---|
| `correction` (variance divisor k - c) | 0 (biased), 1 (unbiased) | 0: torch/Flax/Keras norms; 1: algmarques/masked_norm (torch.var), the Annotated Transformer's LayerNorm (x.std) |
| `eps_outside` | False: sqrt(sigma^2 + eps); True: sigma + eps | True: the Annotated Transformer's LayerNorm, `a * (x - mean) / (std + eps) + b` |
| `masked` | "normalize", "keep", "zero" | normalize: Flax, Keras; keep: algmarques/masked_norm; zero: masknorm option |
| `degenerate` (output of a group with no spread, or nu <= 0) | "passthrough" (out = x, masknorm), "zero" (out = beta = 0 at the default initialisation), "nan", "unchecked" | passthrough: masknorm, algmarques/masked_norm; nan: Flax (a mean over no valid value is 0/0) |
| `padding_mask` | False: True = valid; True: True = padding | True: torch's key_padding_mask (nn.MultiheadAttention, nn.TransformerEncoder) |

Whatever `degenerate` says, the degenerate group's output and gradient must leak into no other
group: every other group is still compared with the reference. "unchecked" compares nothing in the
degenerate group itself; "nan" requires NaN at each of its positions (its gradient is not compared);
"zero" requires 0 there, and a zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

from masknorm._contract import check_args

DEGENERATE = ("passthrough", "zero", "nan", "unchecked")


@dataclass(frozen=True)
class Semantics:
    """The claimed operation: reduction axes `dim`, variance divisor k - `correction`, `eps`
    (added under the square root, or to sigma with `eps_outside`), mean subtraction (`center`,
    False = RMS), the output at masked-out positions (`masked`), the output of degenerate groups
    (`degenerate`), and whether the mask marks padding instead of valid positions (`padding_mask`)."""

    dim: Union[int, Tuple[int, ...]] = -1
    correction: int = 0
    eps: float = 1e-5
    center: bool = True
    masked: str = "normalize"
    degenerate: str = "passthrough"
    eps_outside: bool = False
    padding_mask: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dim, Sequence) and not isinstance(self.dim, str):
            object.__setattr__(self, "dim", tuple(self.dim))
        axes = [d for d in ((self.dim,) if isinstance(self.dim, int) else self.dim) if isinstance(d, int)]
        rank = max([d + 1 if d >= 0 else -d for d in axes], default=1)  # the least rank dim fits
        check_args(
            (1,) * rank, None, self.dim, correction=self.correction, eps=self.eps, center=self.center, masked=self.masked
        )
        if self.degenerate not in DEGENERATE:
            raise ValueError(f"degenerate must be one of {DEGENERATE}, got {self.degenerate!r}")
        for name in ("eps_outside", "padding_mask"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def options(self) -> dict:
        """The keyword arguments of masknorm.masked_norm besides x, mask and dim."""
        return dict(correction=self.correction, eps=self.eps, center=self.center, masked=self.masked)

    @property
    def reference_options(self) -> dict:
        """The keyword arguments of the reference (masked_norm, vjp) besides x, mask and dim."""
        return dict(self.options, eps_outside=self.eps_outside)

    def describe(self) -> str:
        """One line: the configuration as keyword arguments (the conventions only when not default)."""
        line = f"dim={self.dim!r}, correction={self.correction}, eps={self.eps!r}, center={self.center}, masked={self.masked!r}"
        extras = [f"{name}={getattr(self, name)!r}" for name, default in (
            ("degenerate", "passthrough"), ("eps_outside", False), ("padding_mask", False)) if getattr(self, name) != default]
        return ", ".join([line] + extras)
