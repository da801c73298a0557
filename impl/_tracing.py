"""Which tracer, if any, is running masknorm's Python code."""

import torch
from torch._subclasses.fake_tensor import is_fake


def exporting() -> bool:
    """True under torch.export (and the ONNX exporter built on it), False under plain torch.compile.

    Reads the flag torch.compiler.is_exporting() returns: traced by Dynamo, torch 2.11 answers
    is_exporting() with True under every torch.compile, where the flag itself is False."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def tracing() -> bool:
    """True under torch.compile or torch.export: sizes may be symbolic and data cannot be read."""
    return torch.compiler.is_compiling() or exporting()


def eager_on_data(x: torch.Tensor) -> bool:
    """True where the fast paths may run: eager mode (not traced by torch.compile/export, no
    torch.func transform) on a tensor with data (not meta, not fake). Their safety checks are
    host syncs, which tracers cannot follow and meta/fake tensors cannot answer."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or x.is_meta
        or (_maybe_fake(x) and is_fake(x))
    )


def _maybe_fake(x: torch.Tensor) -> bool:
    """False only where is_fake(x) is False: a plain tensor that wraps nothing (FakeTensor and the
    wrappers is_fake looks into are subclasses, functional tensors or functorch wrappers)."""
    return (
        type(x) is not torch.Tensor
        or torch._is_functional_tensor(x)
        or torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def lanes_may_run() -> bool:
    """What a C++ lane (fast/kernels/lanes.cpp) cannot see for itself, which eager_on_data also asks: not
    traced by torch.compile/export, no torch.func transform, no forward-mode AD level open (a call
    may carry tangents, which the lanes' operators have no formula for), and no TorchFunctionMode active
    (the route's torch calls reach it; a lane's one C++ call would not). The lanes check the tensors."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch.autograd.forward_ad._current_level >= 0 or torch._C._is_torch_function_mode_enabled())
