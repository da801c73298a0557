"""`masknorm bench` runs end to end (shrunk): it re-executes itself with the tuned allocator, says
so, and prints one table per case with masknorm, the native kernel and the plain masked norm."""

import subprocess
import sys


def test_bench_runs_shrunk_and_prints_every_case():
    done = subprocess.run(
        [sys.executable, "-m", "masknorm.bench", "--scale", "0.02", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296" in out
    assert out.count("layer norm B=") == 3 and out.count("batch norm B=") == 1 and "MaskedBatchNorm1d(256)" in out
    for name in ("masknorm", "F.layer_norm", "F.batch_norm (train)", "nn.BatchNorm1d (train)", "plain torch (masked)"):
        assert f"  {name} " in out
    assert "sequences padded at the end" in out and "scattered at random" in out
