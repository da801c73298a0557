"""The per-process moments and their merge (masknorm.modules._merge) against the mpmath reference
(masknorm.reference.moments / .merge), one process, several simulated ones.

Error unit: u of the input dtype times kappa = (|mu*| + sigma*)/sigma*, on the scale sigma*:
    err(mu) = |mu - mu*| / (u (|mu*| + sigma*)),  err(sigma) = |sigma - sigma*| / (u (|mu*| + sigma*))
with sigma = sqrt(M2/k): the eps = 0 forward error unit of the suite, for the statistics themselves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import masknorm.reference as ref
from masknorm.modules._merge import LocalMoments, local_moments, merge_moments

# Worst measured over SEEDS (test_merge_matches_the_reference, 2-core AMD EPYC, torch 2.13 CPU): end to end,
# float32 inputs 3.4e-9 u32*kappa (float64 accumulation), float64 inputs 1.64 (mu) and 1.71 (sigma) u*kappa;
# the merge alone 1.15 (mu) and 1.83 (sigma) u64*kappa. Bounds: about twice the worst.
BOUND = {torch.float32: 1e-8, torch.float64: 4.0}
MERGE_BOUND = 4.0
SEEDS = range(40)


def _processes(seed: int, dtype: torch.dtype):
    """2-4 processes of (B_r, C, L) values with a (B_r, 1, L) mask (some processes all padding), per-channel
    offsets up to 1e4 (kappa up to ~1e4), NaN in the padding."""
    gen = torch.Generator().manual_seed(seed)
    world = int(torch.randint(2, 5, (), generator=gen))
    offset = 10.0 ** torch.randint(-2, 5, (1, 3, 1), generator=gen).double()
    xs, masks = [], []
    for _ in range(world):
        b = int(torch.randint(1, 4, (), generator=gen))
        x = (torch.randn(b, 3, 6, generator=gen, dtype=torch.float64) + offset).to(dtype)
        mask = torch.rand(b, 1, 6, generator=gen) < float(torch.rand((), generator=gen))
        xs.append(torch.where(mask, x, float("nan")))
        masks.append(mask)
    return xs, masks


def _merged(xs, masks):
    local = [local_moments(x, m, (0, 2)) for x, m in zip(xs, masks)]
    stacked = LocalMoments(*(torch.stack(parts) for parts in zip(*local)))
    return stacked, merge_moments(stacked)


def _ukappa(got, want, u: float):
    """(err mu, err sigma) of got = (mu, sigma) against want = (mu*, sigma*), in u (|mu*| + sigma*)."""
    unit = u * (abs(want[0]) + want[1])
    return abs(got[0] - want[0]) / unit, abs(got[1] - want[1]) / unit


def _channel(merged, ch):
    """(k, mu, sigma) of channel ch of merged moments, sigma = sqrt(M2/k) unscaled."""
    k = float(merged.count.reshape(-1)[ch])
    sigma = math.sqrt(float(merged.m2_scaled.reshape(-1)[ch]) / max(k, 1)) / float(merged.inv_scale.reshape(-1)[ch])
    return k, float(merged.mean.reshape(-1)[ch]), sigma


def _errors(stacked, merged, xs, masks, dtype):
    """Per channel: the end-to-end errors (u of dtype) against reference.moments on the valid values,
    and the merge's own errors (u of float64) against reference.merge of its inputs; the worst of each."""
    m2s = (stacked.root_m2 ** 2).numpy()
    counts, means, m2 = ref.merge(stacked.count.numpy(), stacked.mean.numpy(), m2s)
    worst = np.zeros(4)
    for ch in range(xs[0].shape[1]):
        k, mu, sigma = _channel(merged, ch)
        k_ref, mu_ref, m2_ref = ref.moments([x[:, ch][m[:, 0]] for x, m in zip(xs, masks)])
        assert k == k_ref == counts.reshape(-1)[ch]
        if k == 0:
            continue
        end_to_end = _ukappa((mu, sigma), (mu_ref, math.sqrt(m2_ref / k)), ref.unit_roundoff(dtype))
        own = _ukappa((mu, sigma), (means.reshape(-1)[ch], math.sqrt(m2.reshape(-1)[ch] / k)), 2.0**-53)
        worst = np.maximum(worst, end_to_end + own)
    return worst


@pytest.mark.theorem("parallel_merge")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge_matches_the_reference(dtype):
    """local_moments + merge_moments on 2-4 processes (some all padding, NaN in the padding) give the
    mean and sigma of all valid values within BOUND u kappa (u of the input dtype), and the merge alone
    is within MERGE_BOUND u kappa (u of float64) of the mpmath merge of its own inputs."""
    worst = np.zeros(4)
    for seed in SEEDS:
        xs, masks = _processes(seed, dtype)
        stacked, merged = _merged(xs, masks)
        worst = np.maximum(worst, _errors(stacked, merged, xs, masks, dtype))
    print(f"{dtype}: end to end err(mu) {worst[0]:.3g}, err(sigma) {worst[1]:.3g} u*kappa; "
          f"merge alone err(mu) {worst[2]:.3g}, err(sigma) {worst[3]:.3g} u64*kappa")
    assert max(worst[:2]) <= BOUND[dtype] and max(worst[2:]) <= MERGE_BOUND, worst


def test_equal_values_merge_exactly():
    """Processes whose valid values are all one value (not a sum of powers of two) merge to exactly that
    mean and M2 = 0, so a constant channel stays degenerate at eps = 0."""
    xs = [torch.full((n, 2, 3), 0.1, dtype=torch.float64) for n in (1, 3, 2)]
    masks = [torch.rand(n, 1, 3) < 2 for n in (1, 3, 2)]
    _, merged = _merged(xs, masks)
    assert torch.all(merged.mean == 0.1) and torch.all(merged.m2_scaled == 0)


def test_no_spurious_overflow_or_underflow():
    """float64 values of 1e300 or 1e-300 (squares out of range) merge to their true mean and sigma."""
    for scale in (1e300, 1e-300):
        xs = [torch.tensor([[[1.0, 3.0]]], dtype=torch.float64) * scale,
              torch.tensor([[[5.0, 7.0, 9.0]]], dtype=torch.float64) * scale]
        _, merged = _merged(xs, [None, None])
        sigma = torch.sqrt(merged.m2_scaled / merged.count) / merged.inv_scale
        assert math.isclose(float(merged.mean), 5.0 * scale, rel_tol=1e-15)
        assert math.isclose(float(sigma), math.sqrt(8.0) * scale, rel_tol=1e-15)


def test_processes_without_valid_values_contribute_nothing():
    """k = 0 processes, whatever their entries, leave the others' statistics; none at all gives (0, 0, 0)."""
    real = LocalMoments(torch.tensor([3.0, 0.0]), torch.tensor([2.0, float("nan")]), torch.tensor([1.5, float("inf")]))
    merged = merge_moments(real)
    assert float(merged.count) == 3 and float(merged.mean) == 2.0
    assert float(merged.m2_scaled / merged.inv_scale ** 2) == 2.25
    empty = merge_moments(LocalMoments(torch.zeros(2), torch.zeros(2), torch.zeros(2)))
    assert float(empty.count) == 0 and float(empty.mean) == 0 and float(empty.m2_scaled) == 0


def test_reference_merge_equals_the_reference_moments():
    """The spec's rule evaluated in mpmath on exact per-process moments gives the moments of all values."""
    parts = [np.array([1.0, 2.5, -3.0]), np.array([], dtype=np.float64), np.array([1e3, 1e3 + 1])]
    stats = [ref.moments([p]) for p in parts]
    merged = ref.merge(*(np.array(column) for column in zip(*stats)))
    assert tuple(float(v) for v in merged) == pytest.approx(ref.moments(parts), rel=1e-15)
