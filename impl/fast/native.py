"""The fused CPU kernels (kernels/*.cpp, one library), built on first use or by `masknorm build`.

torch's own kernels need extra passes for padding (see fast.padded_rows); the token layer-norm kernel
normalizes a valid row, copies a padded one and sums the weight and bias gradients over valid rows,
in one pass over memory each way. torch.utils.cpp_extension compiles every kernels/*.cpp into one
library the first time a CPU layer norm needs it (with a C++ compiler, ninja and setuptools: the
`fast` extra), announcing it on stderr; `masknorm build` does it ahead of time (a container image's
build step). _kernel_cache says where the build is kept and how a killed build is recovered from.
If it cannot be built, masknorm warns once, naming the cause, and uses torch's kernels.

MASKNORM_KERNELS: unset/auto (build if possible), 0/false/off/no (torch's kernels only),
1/true/on/yes (a failed build is an error, on every call). Anything else is a ValueError.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

from masknorm._autograd import compute_dtype
from masknorm.fast import kernel_cache

# The first build of the kernel sources on this project's machine kind, `masknorm build` into an empty cache
# (docs/performance.md): 35.5-35.9 s wall idle (AVX-512, four sources since lanes.cpp), 75-83 s wall shared with
# two other jobs' builds and tests; 62 s of CPU.
BUILD_IDLE_S, BUILD_SHARED_S, BUILD_CPU_S = 36, 90, 62
_OFF, _ON = {"0", "false", "off", "no"}, {"1", "true", "on", "yes"}


class _State:
    lock = threading.Lock()
    ops: Optional[object] = None
    lanes: Optional[object] = None  # kernels/lanes.cpp's functions, loaded with ops
    tried = False
    why_not = ""
    error: Optional[BaseException] = None
    enabled: Optional[bool] = None  # None: as MASKNORM_KERNELS says; kernels() overrides it


def mode() -> str:
    """MASKNORM_KERNELS read as "off", "auto" or "required" (read on every call; each raw value parsed once)."""
    raw = _ENVIRON.get(_KEY, "") if _ENVIRON is not None else os.environ.get("MASKNORM_KERNELS", "")
    parsed = _MODES.get(raw)
    if parsed is None:
        parsed = _MODES[raw] = _parse_mode(os.environ.get("MASKNORM_KERNELS", ""))
    return parsed


_MODES: dict = {}  # raw MASKNORM_KERNELS -> mode(): a dict lookup instead of strip/lower/set tests per call
# os.environ's own store (CPython: a dict of encoded names and values, which os.environ's writes update) and
# the encoded name: a dict read per call, where os.environ.get raises and catches a KeyError inside when the
# variable is unset (0.6 µs, on every norm call).
_ENVIRON = getattr(os.environ, "_data", None)
_KEY = os.environ.encodekey("MASKNORM_KERNELS") if _ENVIRON is not None else None


def _parse_mode(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in _OFF:
        return "off"
    if value in _ON:
        return "required"
    raise ValueError(f"MASKNORM_KERNELS must be auto, one of {sorted(_ON)} (a failed build is an error) or one of "
                     f"{sorted(_OFF)} (torch's kernels only); got {raw!r}")


def _wanted() -> str:
    """mode(), unless kernels() overrides it."""
    if _State.enabled is None:
        return mode()
    return "auto" if _State.enabled else "off"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def announce() -> None:
    say(f"masknorm: building masknorm's CPU kernel, once: about {BUILD_IDLE_S} s on an idle 2-core machine, "
        f"{BUILD_SHARED_S} s on a shared one ({BUILD_CPU_S} s of CPU), a line every 10 s; into "
        f"{kernel_cache.library().parent}; `masknorm build` does it ahead of time")


def _build() -> object:
    library = kernel_cache.obtain(announce, say)
    _register_fakes()
    _State.lanes = _load_lanes(library)
    return torch.ops.masknorm


def _load_lanes(library: Path) -> object:
    """The module object of kernels/lanes.cpp's functions (its C entry point, called with the GIL held)."""
    entry = ctypes.PyDLL(str(library)).masknorm_lanes
    entry.restype = ctypes.py_object
    return entry()


def _register_fakes() -> None:
    """Fake (meta) kernels of the operators that eager code calls directly (padded_rows_norm,
    per_channel_norm and their backwards, masked_channels_norm): output shapes and dtypes from the inputs' alone,
    so that opcheck and tracers can reason about them. padded_rows_norm normalizes over x's last ndims axes,
    statistics in the computation type; per_channel_norm over every axis but 1, statistics in x's dtype, keepdim
    shape; masked_channels_norm returns y, (B, groups) statistics in the computation type, the groups' states (int8)
    and a count of flagged groups."""

    def keepdim(x, ndims):
        return (*x.shape[: x.dim() - ndims], *[1] * ndims)

    @torch.library.register_fake("masknorm::padded_rows_norm")
    def _forward(x, mask, weight, bias, ndims, eps, center, zero):
        stats = compute_dtype(x.dtype)
        return (x.new_empty(x.shape), x.new_empty(keepdim(x, ndims), dtype=stats),
                x.new_empty(keepdim(x, ndims), dtype=stats), x.new_empty((), dtype=torch.long))

    @torch.library.register_fake("masknorm::padded_rows_norm_backward")
    def _backward(dy, x, mask, mean, rstd, weight, ndims, center, zero):
        nshape = x.shape[x.dim() - ndims:]
        return x.new_empty(x.shape), x.new_empty(nshape), x.new_empty(nshape)

    @torch.library.register_fake("masknorm::masked_channels_norm")
    def _channels(x, mask, weight, bias, groups, eps, policy):
        stats = compute_dtype(x.dtype)
        per_group = (x.shape[0], groups)
        return (x.new_empty(x.shape), x.new_empty(per_group, dtype=stats), x.new_empty(per_group, dtype=stats),
                x.new_empty(per_group, dtype=torch.int8), x.new_empty((), dtype=torch.long))

    @torch.library.register_fake("masknorm::per_channel_norm")
    def _per_channel(x, mask, weight, bias, correction, eps, masked):
        keep = [1] * x.dim()
        keep[1] = x.shape[1]
        return (x.new_empty(x.shape), *(x.new_empty(keep) for _ in range(6)), x.new_empty(keep, dtype=torch.bool),
                x.new_empty((), dtype=torch.long))

    @torch.library.register_fake("masknorm::per_channel_norm_backward")
    def _per_channel_backward(g, x, mask, weight, shift, inv_s, skip, correction, masked):
        return (x.new_empty(x.shape), x.new_empty(x.shape[1]), x.new_empty(x.shape[1]),
                x.new_empty((), dtype=torch.long))


def cause(error: BaseException) -> str:
    """One line naming why a build failed: the compiler's error line, not the ninja command's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for pattern in (r"\berror\b:", r"not found|No such file|Permission denied|cannot|ninja"):
        found = next((line for line in lines if re.search(pattern, line, re.IGNORECASE)), None)
        if found:
            return f"{type(error).__name__}: {found}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel for the first caller outside masknorm and torch: the user's call."""
    skip = (str(Path(__file__).parents[1]), str(Path(torch.__file__).parent), contextlib.__file__)
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _required_error() -> RuntimeError:
    error = RuntimeError(f"masknorm: the fused CPU kernel could not be built ({_State.why_not}) and "
                         "MASKNORM_KERNELS requires it")
    error.__cause__ = _State.error
    return error


def ops() -> Optional[object]:
    """torch.ops.masknorm (every fused kernel: padded rows, masked positions, masked rows) when the kernels are on
    and built, else None."""
    wanted = _wanted()
    if wanted == "off":
        return None
    if not _State.tried:
        with _State.lock:
            if not _State.tried:
                try:
                    _State.ops = _build()
                except Exception as error:  # no compiler, no ninja, a failed build: torch's kernels do the work
                    _State.why_not, _State.error = cause(error), error
                    if wanted != "required":
                        warnings.warn(f"masknorm: the fused CPU kernel could not be built ({_State.why_not}); "
                                      "using torch's kernels", RuntimeWarning, stacklevel=_user_stacklevel())
                _State.tried = True
    if _State.ops is None and wanted == "required":
        raise _required_error()
    return _State.ops


def lanes() -> Optional[object]:
    """The modules' lanes (kernels/lanes.cpp: padded_rows, masked_channels) where ops() is not None, else None."""
    return None if ops() is None else _State.lanes


def available() -> bool:
    """ops() is not None; torch.compile calls it eagerly and takes the answer as a constant
    (a build or a lock is nothing a tracer can follow)."""
    return ops() is not None


# What torch.compiler.assume_constant_result(available) sets, without its import of torch._dynamo
# (and sympy) at `import masknorm`: measured 3 s -> 7 s. tests/fast/test_fast_ops.py checks that the
# public decorator still marks a function this way and nothing more.
available._dynamo_marked_constant = True


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
    if _wanted() == "off":
        return "fused CPU kernel: off (MASKNORM_KERNELS), torch's kernels"
    if ops() is None:
        return f"fused CPU kernel: unavailable ({_State.why_not}), torch's kernels"
    return f"fused CPU kernel: on ({torch.backends.cpu.get_cpu_capability()})"
