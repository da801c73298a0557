"""The fused CPU kernel of padded-token layer norm (kernels/token_layer_norm.cpp), built on first use.

torch's own kernels need extra passes for padding (see _token_path); this one normalizes a valid
row, copies a padded one and sums the weight and bias gradients over valid rows, in one pass over
memory each way. torch.utils.cpp_extension compiles it the first time a CPU layer norm needs it
(about 10 s, with a C++ compiler, ninja and setuptools: the `fast` extra) and caches the build,
one per instruction set (torch's CPU capability). If it cannot be built, masknorm warns once and
uses torch's kernels.

MASKNORM_KERNELS=0 turns the kernel off; MASKNORM_KERNELS=1 makes a failed build an error.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

_SOURCES = sorted((Path(__file__).parent / "kernels").glob("*.cpp"))  # one extension of every kernel
_ISA_FLAGS = {  # by torch.backends.cpu.get_cpu_capability(): what the compiler may assume
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
}


class _State:
    lock = threading.Lock()
    ops: Optional[object] = None
    tried = False
    why_not = ""
    enabled = os.environ.get("MASKNORM_KERNELS", "auto") != "0"


def _build() -> object:
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    load(
        name=f"masknorm_kernels_{capability.lower()}",
        sources=[str(source) for source in _SOURCES],
        extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(capability, [])],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    return torch.ops.masknorm


def token_ops() -> Optional[object]:
    """torch.ops.masknorm (token_layer_norm and its backward) when the kernel is on and built, else None."""
    if not _State.enabled:
        return None
    if not _State.tried:
        with _State.lock:
            if not _State.tried:
                try:
                    _State.ops = _build()
                except Exception as error:  # no compiler, no ninja, a failed build: torch's kernels do the work
                    if os.environ.get("MASKNORM_KERNELS") == "1":
                        raise
                    _State.why_not = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
                    warnings.warn(f"masknorm: the fused CPU layer-norm kernel could not be built ({_State.why_not}); "
                                  "using torch's kernels", RuntimeWarning, stacklevel=3)
                _State.tried = True
    return _State.ops


@contextlib.contextmanager
def kernels(enabled: bool) -> Iterator[None]:
    """Within the block, use the fused kernel (if it builds) or torch's kernels only."""
    before = _State.enabled
    _State.enabled = enabled
    try:
        yield
    finally:
        _State.enabled = before


def describe() -> str:
    """One line for command-line headers: whether the fused kernel is in use."""
    if not _State.enabled:
        return "fused CPU kernel: off (MASKNORM_KERNELS=0), torch's kernels"
    if token_ops() is None:
        return f"fused CPU kernel: unavailable ({_State.why_not}), torch's kernels"
    return f"fused CPU kernel: on ({torch.backends.cpu.get_cpu_capability()})"
