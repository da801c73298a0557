"""Calls that masknorm's general route rejects, shared by the modules' lane tests (each lane must raise what the
route raises, before any work)."""

import math

import torch

# The spoilt arguments every lane test checks; spoil() makes them.
CASES = ["int mask", "mask on another device", "int x", "negative eps", "infinite eps", "bad policy",
         "weight of another shape", "weight on another device"]


def spoil(case: str, module: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor):
    """(x, mask) with the argument `case` names spoilt (module's settings and weight in place)."""
    width = module.weight.shape[0]
    if case == "int mask":
        mask = mask.int()
    elif case == "mask on another device":
        mask = mask.to("meta")
    elif case == "int x":
        x = x.int()
    elif case == "negative eps":
        module.eps = -1.0
    elif case == "infinite eps":
        module.eps = math.inf
    elif case == "bad policy":
        module.masked = "drop"
    elif case == "weight of another shape":
        module.weight = torch.nn.Parameter(torch.ones(width + 1))
    elif case == "weight on another device":
        module.weight = torch.nn.Parameter(torch.ones(width, device="meta"))
    return x, mask
