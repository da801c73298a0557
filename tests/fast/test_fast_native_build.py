"""The fused kernels' build (impl/fast/native.py, impl/fast/kernel_cache.py): what MASKNORM_KERNELS means, one
keyed build of every kernels/*.cpp, recovery from a build killed while it held the lock, a read-only
cache, and a failed build's one-line warning at the user's call."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from masknorm import masked_norm
from masknorm.fast import kernel_cache, native


def _python(code, env, timeout):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("raw, mode", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("0", "off"), ("false", "off"),
                                       ("OFF", "off"), ("no", "off"), ("1", "required"), ("true", "required"),
                                       ("On", "required"), ("yes", "required")])
def test_masknorm_kernels_values(raw, mode, monkeypatch):
    if raw is None:
        monkeypatch.delenv("MASKNORM_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MASKNORM_KERNELS", raw)
    assert native.mode() == mode


@pytest.mark.parametrize("raw", ["2", "maybe", "fast"])
def test_masknorm_kernels_rejects_other_values(raw, monkeypatch):
    monkeypatch.setenv("MASKNORM_KERNELS", raw)
    with pytest.raises(ValueError, match=f"MASKNORM_KERNELS must be .*got '{raw}'"):
        native.mode()


@pytest.mark.parametrize("raw", ["false", "off", "no"])
def test_masknorm_kernels_off_does_not_build(raw, monkeypatch):
    monkeypatch.setenv("MASKNORM_KERNELS", raw)
    monkeypatch.setattr(native._State, "tried", False)
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("built although MASKNORM_KERNELS is off"))
    assert native.ops() is None
    assert native.describe().startswith("fused CPU kernel: off")


@pytest.fixture
def failing_build(monkeypatch):
    """A build, not yet tried, that fails as torch's does when the compiler stops; counts its calls."""
    calls = []

    def build():
        calls.append(1)
        raise RuntimeError("Error building extension 'masknorm_kernels': [1/2] c++ -MMD -MF x.o.d -O3 -c x.cpp\n"
                           "FAILED: x.o\nc++ -MMD -MF x.o.d -O3 -c x.cpp\n"
                           "x.cpp:3:10: fatal error: omp.h: No such file or directory\ncompilation terminated.")

    monkeypatch.setattr(native, "_build", build)
    monkeypatch.setattr(native._State, "tried", False)
    monkeypatch.setattr(native._State, "ops", None)
    monkeypatch.setattr(native._State, "enabled", None)
    monkeypatch.delenv("MASKNORM_KERNELS", raising=False)
    return calls


def test_required_kernel_raises_the_build_error_on_every_call(failing_build, monkeypatch):
    """MASKNORM_KERNELS=1: the second call raises the same error as the first (it once raised OSError)."""
    monkeypatch.setenv("MASKNORM_KERNELS", "1")
    x, mask = torch.randn(3, 4), torch.tensor([[True], [False], [True]])
    for _ in range(2):
        with pytest.raises(RuntimeError, match="could not be built .*omp.h: No such file or directory"):
            masked_norm(x, mask, -1)
    assert len(failing_build) == 1


def test_the_fallback_warning_is_one_line_naming_the_compiler_error_at_the_users_call(failing_build):
    x, mask = torch.randn(3, 4), torch.tensor([[True], [False], [True]])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        masked_norm(x, mask, -1)
    (warning,) = [w for w in seen if "fused CPU kernel" in str(w.message)]
    message = str(warning.message)
    assert "\n" not in message
    assert "RuntimeError: x.cpp:3:10: fatal error: omp.h: No such file or directory" in message
    assert Path(warning.filename) == Path(__file__)


def test_a_real_compiler_error_is_reported_by_its_own_line(tmp_path):
    """torch's build error starts with the ninja command; cause() finds the compiler's line."""
    broken = tmp_path / "broken.cpp"
    broken.write_text('#error "masknorm test: this source does not compile"\n')
    (tmp_path / "out").mkdir()
    with pytest.raises(Exception) as caught:
        kernel_cache.compile_and_load(tmp_path / "out" / "lib.so", [broken], ["-O0"])
    assert str(caught.value).splitlines()[0].startswith("Error building extension")
    line = native.cause(caught.value)
    assert "error: #error" in line and "this source does not compile" in line, line


def test_every_kernel_source_is_built_and_keys_the_cache(tmp_path, monkeypatch):
    """All kernels/*.cpp go into one build; the key follows their bytes and the headers' (kernels/*.h), not the
    checkout's path."""
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        for source in (*kernel_cache.KERNELS.glob("*.cpp"), *kernel_cache.KERNELS.glob("*.h")):
            shutil.copy(source, folder)
        (folder / "zz_added.cpp").write_text("// a second kernel file\n")
    monkeypatch.setattr(kernel_cache, "KERNELS", first)
    key_first = kernel_cache.key()
    assert [p.name for p in kernel_cache.sources()][-1] == "zz_added.cpp"
    monkeypatch.setattr(kernel_cache, "KERNELS", second)
    assert kernel_cache.key() == key_first
    (second / "zz_added.cpp").write_text("// changed\n")
    assert kernel_cache.key() != key_first
    key_second = kernel_cache.key()
    (second / "zz_included.h").write_text("// a header a source includes\n")
    assert kernel_cache.key() != key_second

    built = []
    monkeypatch.setenv("MASKNORM_KERNEL_CACHE", str(tmp_path / "cache"))
    kernel_cache.obtain(lambda: None, lambda line: None,
                         lambda target, files, flags: built.append([f.name for f in files]) or target.touch())
    assert built == [[p.name for p in sorted(second.glob("*.cpp"))]]
    assert kernel_cache.library().is_file()


_HOLD_THE_LOCK = """
import json, os, socket, sys, time
with open(sys.argv[1], "x") as lock:  # what build_lock writes (without importing torch: quick)
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, lock)
print("holding", flush=True)
time.sleep(120)
"""

_BUILD_WITH_A_FAKE_COMPILER = """
import time
from masknorm.fast import kernel_cache as kc
start = time.perf_counter()
kc.obtain(lambda: print("building"), print, lambda target, files, flags: target.touch())
print(f"done in {time.perf_counter() - start:.1f} s", kc.library().is_file())
"""


@pytest.mark.slow  # two subprocesses, one importing torch
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_build_killed_while_holding_the_lock_does_not_block_the_next(how, tmp_path, monkeypatch):
    """The killed builder leaves its lock behind; the next process removes it and builds, within seconds."""
    env = {"MASKNORM_KERNEL_CACHE": str(tmp_path), "MASKNORM_BUILD_TIMEOUT": "600"}
    monkeypatch.setenv("MASKNORM_KERNEL_CACHE", str(tmp_path))
    lock = kernel_cache.library().parent.with_suffix(".lock")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
    finally:
        holder.send_signal(how)
        holder.wait(timeout=30)
    assert lock.exists(), "the killed builder should have left its lock"
    run = _python(_BUILD_WITH_A_FAKE_COMPILER, env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "removing the stale build lock" in run.stdout and "building" in run.stdout
    assert run.stdout.strip().endswith("True")
    assert not list(tmp_path.glob("*.lock"))


def _live_lock(tmp_path, monkeypatch, held_s):
    monkeypatch.setenv("MASKNORM_KERNEL_CACHE", str(tmp_path))
    target = kernel_cache.library()
    target.parent.mkdir(parents=True)
    lock = target.parent.with_suffix(".lock")
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time() - held_s}))
    return lock


def test_a_lock_held_past_the_timeout_gives_up_naming_the_lock_to_delete(tmp_path, monkeypatch):
    lock = _live_lock(tmp_path, monkeypatch, held_s=5)
    monkeypatch.setenv("MASKNORM_BUILD_TIMEOUT", "2")
    start = time.perf_counter()
    with pytest.raises(kernel_cache.BuildTimeout, match=f"if no build is running, delete {lock}"):
        kernel_cache.obtain(lambda: None, lambda line: None, lambda *a: pytest.fail("built under a live lock"))
    assert time.perf_counter() - start < 2


def test_a_live_lock_is_waited_for_until_the_timeout_then_torchs_kernels_run(tmp_path, monkeypatch, failing_build):
    lock = _live_lock(tmp_path, monkeypatch, held_s=0)
    monkeypatch.setenv("MASKNORM_BUILD_TIMEOUT", "1.5")
    monkeypatch.setattr(native, "_build", lambda: kernel_cache.obtain(lambda: None, lambda line: None) and 0)
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=f"delete {lock}"):
        assert native.ops() is None
    assert 1.0 < time.perf_counter() - start < 10


def test_a_lock_whose_builder_finished_yields_the_built_library(tmp_path, monkeypatch):
    lock = _live_lock(tmp_path, monkeypatch, held_s=0)
    ready = kernel_cache.library()
    ready.touch()
    with kernel_cache.build_lock(lock, ready, lambda line: None) as mine:
        assert mine is False
    assert lock.exists()  # still the other process's


@pytest.mark.slow  # the real build (20-90 s when the cache is cold) and a subprocess
def test_a_kernel_built_into_a_read_only_cache_is_used(tmp_path):
    """The build is loaded as it is: no lock, no write, no rebuild (the cache here is made read-only)."""
    assert native.ops() is not None, native.describe()
    built = kernel_cache.library().parent
    copy = tmp_path / "cache" / built.name
    shutil.copytree(built, copy)
    for path in (copy / f"{kernel_cache.NAME}.so", copy, copy.parent):
        path.chmod(0o555)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        run = _python("from masknorm.fast import native; print(native.describe())",
                      {"MASKNORM_KERNEL_CACHE": str(copy.parent), "MASKNORM_KERNELS": "1"}, timeout=120)
    finally:
        for path in (copy.parent, copy):
            path.chmod(0o755)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("fused CPU kernel: on"), run.stdout
    assert "building" not in run.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_masknorm_build_where_prints_the_keyed_path(tmp_path):
    run = subprocess.run([sys.executable, "-m", "masknorm_cli", "build", "--where"], capture_output=True, text=True,
                         env={**os.environ, "MASKNORM_KERNEL_CACHE": str(tmp_path)}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(tmp_path / f"masknorm-{kernel_cache.key()}" / "masknorm_kernels.so")


def test_masknorm_build_on_a_built_cache_says_so_and_does_nothing(tmp_path, monkeypatch, capsys):
    from masknorm_cli import build

    monkeypatch.setenv("MASKNORM_KERNEL_CACHE", str(tmp_path))
    target = kernel_cache.library()
    target.parent.mkdir(parents=True)
    target.touch()
    monkeypatch.setattr(kernel_cache, "obtain", lambda *a, **k: pytest.fail("built or loaded again"))
    assert build.main([]) == 0
    assert capsys.readouterr().out == f"masknorm build: already built, nothing to do: {target}\n"


def test_a_long_build_says_it_is_still_running(tmp_path, monkeypatch):
    """While the compiler runs, a line every heartbeat period (10 s; 0.01 s here)."""
    from functools import partial

    from masknorm._heartbeat import Heartbeat

    monkeypatch.setenv("MASKNORM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_cache, "Heartbeat", partial(Heartbeat, every=0.01))
    lines = []

    def slow_compiler(target, files, flags):
        deadline = time.monotonic() + 30
        while not any("still running" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
        target.touch()

    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    kernel_cache.obtain(lambda: lines.append("announced"), lines.append, slow_compiler)
    assert lines[0] == "announced"
    assert lines[1].startswith("masknorm: building the CPU kernel: still running, ")
