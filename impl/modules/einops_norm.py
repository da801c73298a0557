"""MaskedNorm: masked normalization over axes named einops-style, with parameters over named axes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from masknorm.functional import masked_norm
from masknorm.modules._masks import valid_mask
from masknorm._contract import broadcasts_onto, check_correction, check_eps, check_flag, check_mask_tensor, check_policy
from masknorm.modules._pattern import Layout, check_sizes, parse_axes, parse_pattern, resolve


class MaskedNorm(nn.Module):
    """y = gamma (x - mu_V)/sqrt(var_V + eps) + beta, statistics over the axes `reduce` of `pattern`.

    pattern names x's axes ("b n d"; "(g c)" splits a dimension, "..." stands for any number of them);
    reduce: the axes a group spans; features: the axes gamma/beta vary along (default: reduce),
    parameter shape = their sizes in the order written (give them as keyword sizes: d=1024).
    Examples: MaskedNorm("b n d", "d", d=1024) is layer norm; MaskedNorm("b h n d", "d", "h d", h=16, d=64)
    has per-head statistics and parameters; MaskedNorm("b c t", "b t", "c", c=C) is batch norm without
    running statistics; MaskedNorm("b (g c) t", "c t", "g c", g=G, c=C // G) is group norm.

    Mask: either over the pattern's axes that are not features, in pattern order, each of its size or 1
    ("b n d" with features "d": mask (b, n); "b c t" with features "c": mask (b, t)), or any bool
    mask of x's rank that broadcasts to x. The first reading wins when both fit.
    Masked-out positions follow `masked` ("normalize", "keep" x, "zero"); a group with no valid
    position passes x through (0 under "zero").
    """

    def __init__(self, pattern: str, reduce: str, features: Optional[str] = None, *, eps: float = 1e-5,
                 correction: int = 0, center: bool = True, affine: bool = True, bias: bool = True,
                 masked: str = "normalize", device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, **sizes: int) -> None:
        super().__init__()
        check_eps("MaskedNorm", eps)  # what masked_norm would refuse at the first call, refused here
        check_correction("MaskedNorm", correction)
        check_flag("MaskedNorm", "center", center)
        self.pattern = parse_pattern(pattern)
        self.reduce = parse_axes(reduce, self.pattern, "reduce")
        if not self.reduce:
            raise ValueError(f"reduce={reduce!r} names no axis; name the axes a group spans, e.g. reduce='d'")
        self.features = self.reduce if features is None else parse_axes(features, self.pattern, "features")
        self.sizes = check_sizes(self.pattern, sizes)
        missing = [a for a in self.features if a not in self.sizes]
        if affine and missing:
            raise ValueError(f"feature axis {missing[0]!r} has no size: pass {missing[0]}=... so the parameters can be made")
        self.eps, self.correction, self.center, self.affine = eps, correction, center, affine
        self.masked = check_policy(masked)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        if affine:
            shape, factory = tuple(self.sizes[a] for a in self.features), {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.empty(shape, **factory))
            self.bias = nn.Parameter(torch.empty(shape, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """gamma = 1, beta = 0."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        sizes = "".join(f", {k}={v}" for k, v in self.sizes.items())
        return (f"{self.pattern.text!r}, reduce={' '.join(self.reduce)!r}, features={' '.join(self.features)!r}{sizes}, "
                f"eps={self.eps}, correction={self.correction}, center={self.center}, affine={self.affine}, "
                f"bias={self.bias is not None}, masked={self.masked!r}")

    def _param(self, p: Optional[torch.Tensor], layout: Layout) -> Optional[torch.Tensor]:
        """A parameter (features order) as a tensor that broadcasts onto the split layout."""
        if p is None:
            return None
        pos = layout.positions(self.features)
        order = sorted(range(len(pos)), key=pos.__getitem__)
        shape = [s if n in self.features else 1 for n, s in zip(layout.names, layout.shape)]
        return p.permute(order).reshape(shape)

    def _mask(self, mask: Optional[torch.Tensor], x: torch.Tensor, layout: Layout) -> Optional[torch.Tensor]:
        """The mask in the split layout, from either convention (see the class docstring)."""
        if mask is None:
            return None
        check_mask_tensor(mask)
        kept = [j for j, n in enumerate(layout.names) if n not in self.features]
        kept_shape = tuple(layout.shape[j] for j in kept)
        if mask.dim() == len(kept) and broadcasts_onto(mask.shape, kept_shape):
            shape = [1] * len(layout.names)
            for j, s in zip(kept, mask.shape):
                shape[j] = s
            return mask.reshape(shape)
        if mask.dim() == x.dim() and broadcasts_onto(mask.shape, x.shape):
            return mask.reshape([s for m, part in zip(mask.shape, layout.split) for s in (part if m != 1 else (1,) * len(part))])
        kept_names = " ".join(layout.names[j] for j in kept)
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} fits no convention for x of shape {tuple(x.shape)}: expected the "
            f"axes not in features ({kept_names}) = {kept_shape}, or a mask of x's rank that broadcasts to x"
        )

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = valid_mask(mask, padding_mask)
        layout = resolve(self.pattern, x.shape, self.sizes)
        out = masked_norm(
            x.reshape(layout.shape), self._mask(mask, x, layout), layout.positions(self.reduce),
            correction=self.correction, eps=self.eps, center=self.center, weight=self._param(self.weight, layout),
            bias=self._param(self.bias, layout), masked=self.masked,
        )
        return out.reshape(x.shape)

