"""masknorm's reference as the oracle for torch.nn.utils.parametrizations.weight_norm.

Run: python examples/torch_weight_norm.py. For rows whose entries are of order `scale`, it sets g
and v explicitly (so torch's own g = ||v|| at registration plays no part), takes w and the gradients
of g and v through torch's parametrization, and prints the errors against the 50-digit reference
in units of u (masknorm.testing.weight_norm_errors); masknorm.weight_norm beside it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Tuple

import torch
from torch.nn.utils import parametrizations

import masknorm
from masknorm.testing import weight_norm_errors

Register = Callable[[torch.nn.Module], torch.nn.Module]


def weight_and_gradients(register: Register, v: torch.Tensor, g: torch.Tensor,
                         grad_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, grad_v, grad_g) through the parametrization `register` installs, at the given g and v."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(v.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's weight_norm warns about torch.jit.script
        register(module)
    g_param, v_param = module.parametrizations.weight.original0, module.parametrizations.weight.original1
    with torch.no_grad():
        g_param.copy_(g)
        v_param.copy_(v)
    w = module.weight
    grad_g, grad_v = torch.autograd.grad(w, (g_param, v_param), grad_w)
    return w.detach(), grad_v, grad_g


def errors(register: Register, scale: float, dtype: torch.dtype, seed: int = 0) -> Tuple[float, float]:
    """(forward, gradient) errors in u of one (4, 7) weight whose entries are of order scale."""
    gen = torch.Generator().manual_seed(seed)
    v = (torch.randn(4, 7, generator=gen, dtype=torch.float64) * scale).to(dtype)
    g = (torch.rand(4, 1, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    grad_w = torch.randn(4, 7, generator=gen, dtype=torch.float64).to(dtype)
    w, grad_v, grad_g = weight_and_gradients(register, v, g, grad_w)
    return weight_norm_errors(w, grad_v, grad_g, v, g, grad_w, dtype=dtype)


IMPLEMENTATIONS = {"torch": parametrizations.weight_norm, "masknorm": masknorm.weight_norm}
CASES = [(torch.float64, s) for s in (1.0, 1e200, 1e-200)] + [
    (torch.float32, s) for s in (1.0, 1e19, 1e20, 1e-20, 1e-25)] + [(torch.bfloat16, s) for s in (1.0, 1e20, 1e-25)]


def main() -> None:
    print(f"{'dtype':<9} {'entries':>8}  " + "  ".join(f"{name + ' fwd / grad (u)':>26}" for name in IMPLEMENTATIONS))
    for dtype, scale in CASES:
        cells = []
        for register in IMPLEMENTATIONS.values():
            forward, gradient = errors(register, scale, dtype)
            cells.append(f"{forward:>12.3g} / {gradient:<11.3g}")
        print(f"{str(dtype).removeprefix('torch.'):<9} {scale:>8.0e}  " + "  ".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
