"""One module of each family with the inputs it takes, for the tests that run modules in other
settings (compiled, exported, ONNX) and compare them with eager mode."""

import torch

import masknorm

# name -> (module factory, layout): "BTC" is x (B, T, 8) with mask (B, T), "BCT" is x (B, 8, T) with mask (B, T)
MODULES = {
    "layer": (lambda: masknorm.MaskedLayerNorm(8), "BTC"),
    "rms-zero": (lambda: masknorm.MaskedRMSNorm(8, masked="zero"), "BTC"),
    "group-keep": (lambda: masknorm.MaskedGroupNorm(2, 8, masked="keep"), "BCT"),
    "batch": (lambda: masknorm.MaskedBatchNorm1d(8), "BCT"),
    "instance": (lambda: masknorm.MaskedInstanceNorm1d(8, affine=True, track_running_stats=True), "BCT"),
    "einops-heads": (lambda: masknorm.MaskedNorm("b t (h d)", reduce="d", features="h d", h=2, d=4), "BTC"),
}


def inputs(layout: str, b: int, t: int, generator: torch.Generator):
    """(x, mask) of batch b and length t in the layout, 30% of the positions padded."""
    x = torch.randn((b, t, 8) if layout == "BTC" else (b, 8, t), generator=generator)
    return x, torch.rand(b, t, generator=generator) > 0.3
