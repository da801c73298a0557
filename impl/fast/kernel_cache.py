"""Where the fused CPU kernels' build lives, and how concurrent, killed and read-only builds are handled.

One build holds every `kernels/*.cpp` (each registers its operators with TORCH_LIBRARY_FRAGMENT or
TORCH_LIBRARY(masknorm, ...) in exactly one file). It is keyed by sha256 over the sources and the
headers they include, kernels/*.h (names and bytes), torch's version, torch's CPU capability, the compiler flags and the Python version, and lives in

    <root>/masknorm-<key>/masknorm_kernels.so

with root = $MASKNORM_KERNEL_CACHE, else $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions.
Another venv or checkout with the same sources and torch therefore reuses the build.

- The library is compiled in a private temporary folder and moved into place with os.replace, so a
  library present is complete: loading it takes no lock and writes nothing (a read-only cache works).
- A build holds `masknorm-<key>.lock`, created exclusively, holding the builder's pid, host and start
  time. A waiter removes a lock whose process is gone (same host) and builds; a lock held longer than
  the timeout ($MASKNORM_BUILD_TIMEOUT seconds, default 600) makes it give up with a message naming
  the lock to delete. Two waiters that both remove one stale lock may build twice, side by side;
  each result is complete, and the second replaces the first atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import torch

from masknorm._heartbeat import EVERY_S, Heartbeat

NAME = "masknorm_kernels"
KERNELS = Path(__file__).parent / "kernels"
_ISA_FLAGS = {  # by torch.backends.cpu.get_cpu_capability(): what the compiler may assume
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"],
}
_POLL_S = 0.2


class BuildTimeout(RuntimeError):
    """Another process has held the build lock longer than the timeout."""


def sources() -> List[Path]:
    """Every C++ source of the fused kernels, in a fixed order."""
    return sorted(KERNELS.glob("*.cpp"))


def headers() -> List[Path]:
    """The headers the sources include (kernels/*.h), in a fixed order: they key the build too."""
    return sorted(KERNELS.glob("*.h"))


def cflags() -> List[str]:
    """The compiler flags for this machine's torch CPU capability."""
    return ["-O3", "-fopenmp", "-fno-trapping-math", *_ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


def key() -> str:
    """sha256 (first 16 hex digits) of what the built library depends on."""
    digest = hashlib.sha256()
    for source in (*sources(), *headers()):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    digest.update(repr((torch.__version__, torch.backends.cpu.get_cpu_capability(), cflags(),
                        sys.version_info[:2], sys.platform)).encode())
    return digest.hexdigest()[:16]


def root() -> Path:
    """The folder that holds every masknorm build."""
    env = os.environ.get("MASKNORM_KERNEL_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "torch_extensions"


def library() -> Path:
    """Where this machine's build of the current sources is (or will be)."""
    return root() / f"masknorm-{key()}" / f"{NAME}.so"


def timeout_s() -> float:
    """$MASKNORM_BUILD_TIMEOUT (seconds), default 600: how long a build lock may be held."""
    raw = os.environ.get("MASKNORM_BUILD_TIMEOUT", "600")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MASKNORM_BUILD_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"MASKNORM_BUILD_TIMEOUT must be positive, got {raw!r}")
    return value


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _holder(lock: Path) -> dict:
    """The lock's pid, host and start time; a lock cut short while written has only its mtime."""
    try:
        return {"started": lock.stat().st_mtime, **json.loads(lock.read_text())}
    except (OSError, ValueError):
        return {"started": lock.stat().st_mtime} if lock.exists() else {}


def _stale(holder: dict) -> bool:
    """The holder is gone: its process has died on this host, or it never wrote its pid (5 s grace)."""
    if "pid" not in holder:
        return time.time() - holder.get("started", 0) > 5
    return holder.get("host") == socket.gethostname() and not _alive(int(holder["pid"]))


def _try_take(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
    return True


@contextlib.contextmanager
def build_lock(lock: Path, ready: Path, say: Callable[[str], None]) -> Iterator[bool]:
    """Hold `lock`, yielding True, or yield False once `ready` exists (another process built it).

    Waits while a live process holds the lock; removes a stale one; raises BuildTimeout when the
    holder has had it longer than timeout_s().
    """
    limit, said_at = timeout_s(), -EVERY_S
    while not _try_take(lock):
        if ready.exists():
            yield False
            return
        holder = _holder(lock)
        if _stale(holder):
            say(f"masknorm: removing the stale build lock {lock} (process {holder.get('pid', '?')} is gone)")
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            continue
        held = time.time() - holder.get("started", time.time())
        if held > limit:
            raise BuildTimeout(f"process {holder.get('pid', '?')} on {holder.get('host', '?')} has held the build "
                               f"lock for {held:.0f} s (limit {limit:.0f} s, MASKNORM_BUILD_TIMEOUT); if no build "
                               f"is running, delete {lock}")
        if time.monotonic() - said_at >= EVERY_S:
            say(f"masknorm: waiting for process {holder.get('pid', '?')}'s build of the CPU kernel (lock {lock}), "
                f"{held:.0f} s so far")
            said_at = time.monotonic()
        time.sleep(_POLL_S)
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def _remove_dead_builds(folder: Path) -> None:
    """Temporary build folders (build-<pid>-*) left by processes that died."""
    for left in folder.glob("build-*-*"):
        pid = left.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)


def compile_and_load(target: Path, files: Sequence[Path], flags: Sequence[str]) -> None:
    """Compile `files` into `target` (through a private folder, then os.replace) and load it."""
    from torch.utils.cpp_extension import load

    _remove_dead_builds(target.parent)
    scratch = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=target.parent))
    try:
        load(name=NAME, sources=[str(f) for f in files], extra_cflags=list(flags), extra_ldflags=["-fopenmp"],
             build_directory=str(scratch), is_python_module=False)
        (built,) = scratch.glob(f"{NAME}*.so")  # torch names it {NAME}_v1 after other sources in-process
        os.replace(built, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def obtain(announce: Callable[[], None], say: Callable[[str], None],
           compile_: Callable[[Path, Sequence[Path], Sequence[str]], None] = compile_and_load) -> Path:
    """Load the built library into torch.ops, building it first (under the lock) if it is not there."""
    target = library()
    if target.exists():
        torch.ops.load_library(str(target))
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target.parent.with_suffix(".lock"), target, say) as mine:
        if mine and not target.exists():
            announce()
            with Heartbeat(say, "masknorm: building the CPU kernel"):
                compile_(target, sources(), cflags())
            return target
    torch.ops.load_library(str(target))
    return target
