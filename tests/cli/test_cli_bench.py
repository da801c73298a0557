"""`masknorm bench` runs end to end (shrunk): it re-executes itself with the tuned allocator, says
so, and prints one table per case with masknorm, the native kernel and the plain masked norm."""

import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def out() -> str:
    """The output of one shrunk run."""
    done = subprocess.run(
        [sys.executable, "-m", "masknorm_cli.bench", "--scale", "0.02", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bench_runs_shrunk_and_prints_every_case(out):
    assert "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296" in out
    assert out.count("layer norm B=") == 5 and out.count("batch norm B=") == 1 and "MaskedBatchNorm1d(256)" in out
    for name in ("masknorm", "F.layer_norm", "F.batch_norm (train)", "nn.BatchNorm1d (train)", "plain torch (masked)"):
        assert f"  {name} " in out
    assert "sequences padded at the end" in out and "scattered at random" in out


def test_bench_covers_every_family_of_issue_12(out):
    """Group and instance norm over time (float32 and bfloat16), RMS norm with a token mask, a
    bfloat16 layer norm, layer norm with an elementwise mask and a conformer block are timed
    against torch's layers."""
    assert out.count("MaskedGroupNorm(32, 32)") == 2 and out.count("MaskedInstanceNorm1d(32, affine=True)") == 2
    assert "bfloat16" in out and "RMS norm B=" in out and "conformer block" in out and "elementwise mask" in out
    for name in ("GroupNorm", "InstanceNorm1d", "F.rms_norm", "conformer, torch norms"):
        assert f"  {name} " in out
