"""The oracle's bias test (masknorm.reference.oracle.bias): a systematic error of a few u, which
passes the worst-case bound, fails "systematic error" with its estimated size; conforming peers do
not (the figures over the conformance table's peers: docs/SYSTEMATIC_ERROR.md)."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import masknorm
from masknorm.reference.oracle.bias import allowance, group_samples
from masknorm.reference.oracle.properties import expected
from masknorm.testing import MaskedInput, Semantics, check

SCRIPT = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "systematic_error.py"), run_name="bias")
EPS = 1e-5
U32 = 2.0**-24
BATCH = dict(dtype="float32", ndim=3, mask_dims=(0, 1), squeeze_mask=True, sides=(None, None, (2, 4)), examples=100)


def results(report):
    return {p.name: p for p in report.properties}


def test_group_samples_read_a_scale_and_a_mean_error_off_by_hand():
    x = torch.tensor([[1000.0, 1001.0, 1003.0], [5.0, -1.0, 2.0]], dtype=torch.float32)
    inp = MaskedInput(x, torch.ones(2, 3, dtype=torch.bool), (1,))
    sem = Semantics(-1, eps=0.0)
    ref = expected(inp, sem)
    mean_over_s = (x.double().mean(-1, keepdim=True) / x.double().std(-1, correction=0, keepdim=True)).numpy()
    got = ref.y * (1 + 3 * U32) - mean_over_s * (-2 * U32)  # scale 3 u too large, mean 2 u too small
    rows = group_samples(got, ref, x, np.ones((2, 3), bool), (1,), 0, True)
    np.testing.assert_allclose(rows[:, 0], 3.0, rtol=1e-6)
    np.testing.assert_allclose(rows[:, 2], -2.0, rtol=1e-6)
    assert rows[0, 3] > 0.99 and rows[0, 1] < 1e-5  # a far-off mean: m is weighed, a hardly
    assert list(rows[:, 4]) == [3, 3]


def test_the_allowance_is_honest_rounding_of_a_count_s_constants():
    assert allowance(1, 0, torch.float32) == 1.0 and allowance(4, 0, torch.float32) == 1.0  # 1/k exact
    assert allowance(15, 0, torch.float32) == pytest.approx(1.0 + 0.88, abs=0.01)  # fl(1/15) is 0.88 u off
    assert allowance(2, 1, torch.float64) == 1.0 and allowance(None, 0, torch.float32) == 2.0


def test_a_bias_within_the_bound_fails_only_the_bias_test_with_its_size():
    """Variance over (k + 2e-6) in float32: the output is 2e-6/(2k) = 16.8/k u too large, within the
    worst-case bound (64 u*kappa) and right on constant groups; the bias test finds it (with seed 2:
    in the other seeds of docs/SYSTEMATIC_ERROR.md the estimate is as large, on too few groups)."""
    report = check(SCRIPT["variance_over_count_plus"](2e-6), Semantics(-1, eps=EPS), dtype="float32", examples=100, seed=2)
    assert [p.name for p in report.failed] == ["systematic error"], report
    found = estimates_of(report)
    assert 1.0 < found[("output scale", None)]["value"] < 17.0
    assert found[("output scale", None)]["flagged"] and not found[("subtracted mean", None)]["flagged"]
    assert found[("output scale", 2)]["value"] == pytest.approx(16.8 / 2, rel=0.35)
    assert results(report)["systematic error"].reason.startswith("systematic error: output scale +")


def estimates_of(report):
    """The systematic-error estimates by (statistic, valid count; None: every group)."""
    return {(e["what"], e["count"]): e for e in results(report)["systematic error"].estimates}


def test_keras_arithmetic_with_several_channels_is_found_as_a_divisor():
    """Keras BatchNormalization(mask=)'s count + 1e-7 in float32 (1 + 2^-23 at count 1): with seed 1
    the forward error stays within the bound (it does not in the other seeds of
    docs/SYSTEMATIC_ERROR.md); the mean at k=1 is off by about 1.5-2 u, read back as a divisor
    offset near 1e-7."""
    report = check(SCRIPT["keras_arithmetic"], Semantics((0, 1), eps=EPS), seed=1, **BATCH)
    props = results(report)
    assert props["forward vs reference"].status == "pass"
    reason = props["systematic error"].reason
    assert props["systematic error"].status == "fail" and "subtracted mean at k=1" in reason, report
    delta = float(reason.split("as a divisor k ")[1].split()[0])
    assert 5e-8 < delta < 1.3e-7


def test_keras_batch_normalization_with_a_mask_fails_the_bias_test():
    if os.environ.get("KERAS_BACKEND", "torch") != "torch":
        pytest.skip("Keras is configured for another backend")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")

    def batch_norm(x, mask):
        return keras.layers.BatchNormalization(epsilon=EPS, center=False, scale=False)(x, training=True, mask=mask)

    report = check(batch_norm, Semantics((0, 1), eps=EPS), framework_name="keras", seed=1, **BATCH)
    assert "subtracted mean at k=1" in results(report)["systematic error"].reason


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "fn, semantics, options",
    [
        (lambda x: F.layer_norm(x, x.shape[-1:], eps=EPS), Semantics(-1, eps=EPS), dict(mask=False)),
        (lambda x: F.instance_norm(x, eps=EPS), Semantics(2, eps=EPS), dict(mask=False, ndim=3, min_group_size=2)),
        (lambda x, m: masknorm.masked_norm(x, m, -1, eps=EPS), Semantics(-1, eps=EPS), dict()),
    ],
    ids=["F.layer_norm", "F.instance_norm", "masked_norm"],
)
def test_conforming_peers_pass_the_bias_test(fn, semantics, options, dtype):
    """No false alarm (F.instance_norm in float64 has a mean off by 0.19 u at 6.6 standard errors
    with seed 3: below the allowance, so not a bias)."""
    report = check(fn, semantics, dtype=dtype, examples=100, seed=3 if dtype == "float64" else None, **options)
    assert report.conforms, report


def test_extreme_magnitudes_skip_the_bias_test():
    report = check(lambda x, m: masknorm.masked_norm(x, m, -1, eps=0.0), Semantics(-1, eps=0.0), extreme=True, examples=5)
    assert results(report)["systematic error"].status == "skipped"
