"""A conformer block (Gulati et al. 2020) for `masknorm bench`: one real-model step, built twice,
with masknorm's masked norms or with torch's layers, from one definition.

    x = x + 1/2 FFN(x);  x = x + MHSA(LN(x));  x = x + Conv(x);  x = x + 1/2 FFN(x);  y = LN(x)
    FFN:  LN, Linear(d, 4d), SiLU, Linear(4d, d)
    Conv: LN, pointwise conv (d -> 2d), GLU, depthwise conv (kernel k), BatchNorm, SiLU, pointwise conv

Padding: a (B, T) bool mask (True = valid); attention ignores padded keys in both versions, and the
masknorm version also leaves the padding out of every norm's statistics (layer norms by token,
the batch norm by (sample, time)).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from masknorm.modules import MaskedBatchNorm1d, MaskedLayerNorm


class _Norm(nn.Module):
    """A norm that takes the token mask (masknorm) or ignores it (torch's layer)."""

    def __init__(self, norm: nn.Module, masked: bool):
        super().__init__()
        self.norm, self.masked = norm, masked

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norm(x, mask) if self.masked else self.norm(x)


class _FeedForward(nn.Module):
    def __init__(self, d: int, masked: bool):
        super().__init__()
        self.norm = _Norm(MaskedLayerNorm(d) if masked else nn.LayerNorm(d), masked)
        self.net = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x, mask))


class _Convolution(nn.Module):
    def __init__(self, d: int, kernel: int, masked: bool):
        super().__init__()
        self.norm = _Norm(MaskedLayerNorm(d) if masked else nn.LayerNorm(d), masked)
        self.pointwise_in = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.batch_norm = _Norm(MaskedBatchNorm1d(d) if masked else nn.BatchNorm1d(d), masked)
        self.pointwise_out = nn.Conv1d(d, d, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x, mask).transpose(1, 2)  # (B, d, T)
        h = nn.functional.glu(self.pointwise_in(h), dim=1)
        h = self.batch_norm(self.depthwise(h), mask)
        return self.pointwise_out(nn.functional.silu(h)).transpose(1, 2)


class ConformerBlock(nn.Module):
    """One conformer block over (B, T, d) with a (B, T) validity mask; `masked` selects masknorm's
    norms (True) or torch's (False)."""

    def __init__(self, d: int = 256, heads: int = 4, kernel: int = 31, masked: bool = True):
        super().__init__()
        self.ff1, self.ff2 = _FeedForward(d, masked), _FeedForward(d, masked)
        self.attn_norm = _Norm(MaskedLayerNorm(d) if masked else nn.LayerNorm(d), masked)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.conv = _Convolution(d, kernel, masked)
        self.out_norm = _Norm(MaskedLayerNorm(d) if masked else nn.LayerNorm(d), masked)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x, mask)
        h = self.attn_norm(x, mask)
        x = x + self.attn(h, h, h, key_padding_mask=None if mask is None else ~mask, need_weights=False)[0]
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x, mask)
        return self.out_norm(x, mask)
