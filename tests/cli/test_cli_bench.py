"""`masknorm bench` runs end to end (shrunk): it re-executes itself with the tuned allocator, says
so, and prints one table per case with masknorm, the native kernel and the plain masked norm."""

import os
import subprocess
import sys

import pytest
import torch


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


def test_bandwidth_arithmetic():
    """GB/s = bytes moved / time: a fused fwd+bwd norm of x moves at least 5x its bytes (x read
    twice, y and dx written, dy read): 2^20 bfloat16 values (2 MiB) give 10 MiB, which in 1 ms is
    10.48576 GB/s (10^9 bytes per second)."""
    from masknorm_cli.bench import bandwidth_gb_per_s, least_traffic_bytes

    x = torch.empty(1024, 1024, dtype=torch.bfloat16)
    assert least_traffic_bytes(x) == 5 * 2 * 2**20
    assert bandwidth_gb_per_s(least_traffic_bytes(x), 1.0) == pytest.approx(10.48576)
    assert bandwidth_gb_per_s(3 * 10**9, 1000.0) == pytest.approx(3.0)


def test_gpu_route_runs_the_triton_kernels_and_reports_bandwidth():
    """bench's GPU route (run_case with gpu=True: masknorm with backend="triton" beside the others, and
    GB/s for each) on tiny cases of every kernel layout (padded-token layer and RMS norm, batch norm,
    instance norm over time, layer norm with an elementwise mask), on CPU tensors under Triton's
    interpreter in a fresh process (TRITON_INTERPRET must be set before triton is imported)."""
    pytest.importorskip("triton")
    code = """
import torch
import torch.nn.functional as F
from masknorm_cli.bench import Case, run_case

def case(name, shape, mask_shape, dims, param_shape, native, center=True):
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.ones(param_shape, requires_grad=True), torch.zeros(param_shape, requires_grad=True)
    return Case(name, x, torch.rand(mask_shape) > 0.3, dims, w, b, "native", native, center=center)

for c in (case("layer", (2, 3, 8), (2, 3, 1), (-1,), (8,), lambda t: F.layer_norm(t, (8,))),
          case("rms", (2, 3, 8), (2, 3, 1), (-1,), (8,), lambda t: F.rms_norm(t, (8,)), center=False),
          case("batch", (4, 3, 5), (4, 1, 5), (0, 2), (3, 1), lambda t: F.batch_norm(t, None, None, training=True)),
          case("instance", (2, 3, 6), (2, 1, 6), (2,), (3, 1), F.instance_norm),
          case("elementwise", (2, 3, 8), (2, 3, 8), (-1,), (8,), lambda t: F.layer_norm(t, (8,)))):
    result = run_case(c, 1, 0, gpu=True)
    assert set(result["gb_per_s"]) == {"masknorm", "masknorm, backend triton", "native", "plain torch (masked)"}
    assert all(v > 0 for v in result["gb_per_s"].values()), result
    print(c.name)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["layer", "rms", "batch", "instance", "elementwise"]
