"""MaskedSyncBatchNorm over gloo, 2 and 3 processes, against MaskedBatchNorm on the concatenated batch
in one process (float64: to rounding level) and against the mpmath reference (float32: within the
suite's u*kappa bounds of tests/impl/test_impl_accuracy.py).

Processes are started once for the module (a module-scoped fixture runs every case in one spawn of 3
gloo processes, the 2-process cases in a subgroup of ranks 0 and 1, bounded by SPAWN_TIMEOUT_S so that
a hang fails instead of blocking CI); the tests then check the results. Parameter gradients are summed over the processes, as DDP's all-reduce does.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
import torch.distributed as dist

import masknorm
import masknorm.reference as ref
from masknorm import MaskedSyncBatchNorm
from masknorm.modules._merge import LocalMoments, local_moments, merge_moments
from masknorm.modules.sync_batch import SyncMaskedNormFunction, group_stats_from
from support.strategies import Case, Scales
from support.sync_workers import PaddedModel, run_module, run_world, single_process_module, train
from support.bounds import FORWARD_BOUND, VJP_AFFINE_BOUND, VJP_X_BOUND

SPAWN_TIMEOUT_S = 240
FLOAT64_TOL = 1e-12  # outputs O(1), gradients O(1/s): about 5000 u of float64


def _x(gen: torch.Generator, batch: int, channels: int, spatial: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    offsets = torch.arange(channels, dtype=torch.float64).reshape((1, channels) + (1,) * len(spatial))
    return (torch.randn((batch, channels, *spatial), generator=gen, dtype=torch.float64) * 2 + 3 * offsets).to(dtype)


def make_case(seed: int, sizes: Sequence[int], channels: int, spatial: Sequence[int], dtype=torch.float64,
              masked: str = "normalize", momentum: Optional[float] = 0.1, affine: bool = True, steps: int = 2,
              only_padding: Sequence[int] = (), nan_padding: Sequence[int] = (), no_mask: Sequence[int] = (),
              all_padding: bool = False, padding_steps: Sequence[int] = ()) -> Dict[str, Any]:
    """Per step and rank: x (B_r, C, *spatial), mask (B_r, *spatial) (None on `no_mask` ranks, all False on
    `only_padding` ranks, on every rank at `padding_steps` and everywhere with all_padding), NaN at the padding of `nan_padding` ranks
    (whose upstream gradient there is 0, as the contract requires), and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    case_steps = []
    for step in range(steps):
        per_rank = []
        for rank, batch in enumerate(sizes):
            x = _x(gen, batch, channels, spatial, dtype)
            mask = torch.rand((batch, *spatial), generator=gen) < 0.7
            if rank in only_padding or all_padding or step in padding_steps:
                mask[:] = False
            grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
            if rank in nan_padding:
                x = torch.where(mask.unsqueeze(1), x, float("nan"))
                grad = torch.where(mask.unsqueeze(1), grad, 0.0)
            per_rank.append({"x": x, "mask": None if rank in no_mask else mask, "grad": grad})
        case_steps.append(per_rank)
    options = dict(num_features=channels, momentum=momentum, affine=affine, masked=masked, dtype=dtype)
    return {"kind": "forward_backward", "options": options, "steps": case_steps,
            "weight": torch.rand(channels, generator=gen, dtype=torch.float64).to(dtype) + 0.5,
            "bias": torch.randn(channels, generator=gen, dtype=torch.float64).to(dtype)}


def concatenated(case: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each step's data as one process holds it: the ranks' batches concatenated."""
    steps = []
    for per_rank in case["steps"]:
        masks = [torch.ones((s["x"].shape[0], *s["x"].shape[2:]), dtype=torch.bool) if s["mask"] is None
                 else s["mask"] for s in per_rank]
        steps.append({"x": torch.cat([s["x"] for s in per_rank]), "mask": torch.cat(masks),
                      "grad": torch.cat([s["grad"] for s in per_rank])})
    return steps


def single_process(case: Dict[str, Any]) -> Dict[str, Any]:
    """MaskedBatchNorm on the concatenated batch, with the case's parameters."""
    steps = concatenated(case)
    module = single_process_module(steps[0]["x"].dim(), **case["options"])
    if module.weight is not None:
        with torch.no_grad():
            module.weight.copy_(case["weight"])
            module.bias.copy_(case["bias"])
    return run_module(module, steps)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| where b is finite; NaN exactly where b is NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN at other positions than one process has"
    finite = torch.isfinite(b)
    return float((a - b).abs()[finite].max()) if finite.any() else 0.0


def compare(results: List[Dict[str, Any]], expected: Dict[str, Any], sizes: Sequence[int]) -> float:
    """The largest difference between the processes' results and one process's (asserting shapes,
    NaN positions and identical buffers on every rank)."""
    diffs = []
    for key in ("out", "grad_x"):
        for step, want in enumerate(expected[key]):
            for rank, part in enumerate(want.split(list(sizes))):
                diffs.append(_max_diff(results[rank][key][step], part))
    for key in ("grad_weight", "grad_bias"):
        if expected[key] is None:
            assert all(r[key] is None for r in results)
            continue
        diffs.append(_max_diff(sum(r[key] for r in results), expected[key]))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        if expected[key] is None:
            continue
        assert all(torch.equal(r[key], results[0][key]) for r in results), f"{key} differs across ranks"
        diffs.append(_max_diff(results[0][key].to(expected[key].dtype), expected[key]))
    return max(diffs)


def _batch(case_args: Dict[str, Any]) -> Dict[str, Any]:
    return make_case(**case_args)


FLOAT64_CASES = {
    2: {
        "3d": dict(seed=1, sizes=(3, 3), channels=3, spatial=(7,)),
        "2d rows": dict(seed=2, sizes=(5, 4), channels=4, spatial=()),
        "4d uneven": dict(seed=3, sizes=(2, 4), channels=3, spatial=(3, 4)),
        "5d": dict(seed=4, sizes=(2, 1), channels=2, spatial=(2, 3, 2)),
        "rank 0 only padding, NaN in rank 1's": dict(seed=5, sizes=(2, 3), channels=3, spatial=(6,),
                                                      only_padding=(0,), nan_padding=(1,)),
        "keep, NaN padding": dict(seed=6, sizes=(3, 2), channels=3, spatial=(5,), masked="keep", nan_padding=(0,)),
        "zero, no mask on rank 1": dict(seed=7, sizes=(2, 2), channels=3, spatial=(5,), masked="zero", no_mask=(1,)),
        "momentum None, 3 steps": dict(seed=8, sizes=(2, 3), channels=3, spatial=(4,), momentum=None, steps=3),
        "momentum None, an all-padding step": dict(seed=12, sizes=(2, 3), channels=3, spatial=(4,), momentum=None,
                                                   steps=3, padding_steps=(1,)),
        "no affine": dict(seed=9, sizes=(2, 2), channels=2, spatial=(5,), affine=False),
        "no valid position anywhere": dict(seed=10, sizes=(2, 2), channels=2, spatial=(3,), all_padding=True),
        "empty batch on rank 0": dict(seed=11, sizes=(0, 3), channels=2, spatial=(4,)),
    },
    3: {
        "uneven, only padding, NaN": dict(seed=21, sizes=(1, 4, 2), channels=3, spatial=(5,),
                                         only_padding=(2,), nan_padding=(0,)),
        "4d zero": dict(seed=22, sizes=(2, 1, 2), channels=2, spatial=(3, 3), masked="zero"),
        "momentum None": dict(seed=23, sizes=(2, 2, 3), channels=3, spatial=(4,), momentum=None, steps=3),
        "momentum None, an all-padding step": dict(seed=24, sizes=(2, 1, 3), channels=3, spatial=(4,), momentum=None,
                                                   steps=3, padding_steps=(1,)),
    },
}

FLOAT32_CASES = {
    2: {"float32 3d": dict(seed=31, sizes=(3, 2), channels=3, spatial=(9,), dtype=torch.float32, steps=1)},
    3: {"float32 uneven, only padding": dict(seed=32, sizes=(2, 4, 1), channels=3, spatial=(8,),
                                             dtype=torch.float32, only_padding=(2,), steps=1)},
}


def bad_input_cases(world: int) -> Dict[str, Dict[str, Any]]:
    """Processes that disagree: on num_features, and on the `masked` policy."""
    base = make_case(seed=41, sizes=(2,) * world, channels=3, spatial=(4,), steps=1)
    features = dict(base, num_features_per_rank=[3] * (world - 1) + [2])
    features["steps"] = [[dict(s, x=s["x"][:, :n]) for s, n in zip(base["steps"][0], features["num_features_per_rank"])]]
    policies = dict(base, masked_per_rank=["normalize"] * (world - 1) + ["keep"])
    channel_mask = dict(base, steps=[[dict(s) for s in base["steps"][0]]])
    last = channel_mask["steps"][0][-1]
    last["mask"] = last["mask"].unsqueeze(1).expand(-1, 3, -1)  # carries the channel axis: rejected locally
    return {"bad: num_features": features, "bad: masked": policies, "bad: one rank's mask": channel_mask}


def ddp_case(world: int) -> Dict[str, Any]:
    """A padded regression problem split over `world` processes, and the model's initial state."""
    gen = torch.Generator().manual_seed(51)
    torch.manual_seed(51)
    state = PaddedModel(masknorm.MaskedBatchNorm1d(4)).double().state_dict()
    batches = []
    for _ in range(6):
        x = torch.randn(2 * world, 2, 10, generator=gen, dtype=torch.float64)
        lengths = torch.randint(2, 11, (2 * world,), generator=gen)
        mask = torch.arange(10) < lengths[:, None]
        target = x[:, 0] * 2 - x[:, 1] + 0.5
        x = torch.where(mask[:, None], x, 1e3)  # finite garbage: a conv's weight gradient is 0 * padding
        batches.append({"x": x, "mask": mask, "target": target})
    total_valid = [int(b["mask"].sum()) for b in batches]
    split = [[{k: v[2 * r: 2 * r + 2] for k, v in b.items()} for r in range(world)] for b in batches]
    return {"kind": "ddp_training", "state": state, "batches": split, "whole": batches, "valid": total_valid}


def _cases(size: int) -> Dict[str, Dict[str, Any]]:
    cases = {name: make_case(**args) for name, args in {**FLOAT64_CASES[size], **FLOAT32_CASES[size]}.items()}
    cases.update(bad_input_cases(size))
    cases["ddp"] = ddp_case(size)
    base = make_case(seed=61, sizes=(2,) * size, channels=5, spatial=(4,), dtype=torch.float32, steps=1)
    cases["collectives"] = {"kind": "collectives", "channels": 5, "steps": base["steps"][0]}
    return {name: dict(case, world=size) for name, case in cases.items()}


@pytest.fixture(scope="module")
def spawned():
    """Every case of both world sizes, and every rank's results, from one spawn of 3 processes."""
    # 3-process cases first: rank 2 does not wait (within the collective timeout) for the 2-process ones
    cases = {(size, name): case for size in (3, 2) for name, case in _cases(size).items()}
    results = run_world(3, {f"{size}:{name}": case for (size, name), case in cases.items()}, SPAWN_TIMEOUT_S)
    return cases, results


@pytest.fixture(params=[2, 3], ids=lambda w: f"world{w}")
def world(request, spawned):
    """(world size, its cases by name, per rank of that world its results by case name)."""
    size = request.param
    cases, results = spawned
    mine = {name: case for (s, name), case in cases.items() if s == size}
    return size, mine, [{name: r[f"{size}:{name}"] for name in mine} for r in results[:size]]


def _ok(results: List[Dict[str, Any]], name: str) -> List[Dict[str, Any]]:
    per_rank = [r[name] for r in results]
    for r in per_rank:
        assert not (isinstance(r, tuple) and r[0] == "error"), f"{name}: {r}"
    return per_rank


def test_float64_equals_one_process_on_the_concatenated_batch(world):
    """Outputs, input gradients, summed parameter gradients and running statistics (identical on every
    rank) equal MaskedBatchNorm's on the whole batch to rounding level, in every float64 case."""
    size, cases, results = world
    diffs = {}
    for name in FLOAT64_CASES[size]:
        sizes = [s["x"].shape[0] for s in cases[name]["steps"][0]]
        diffs[name] = compare(_ok(results, name), single_process(cases[name]), sizes)
    print(f"world {size}: max abs diff per case {diffs}")
    assert max(diffs.values()) <= FLOAT64_TOL, diffs


def test_momentum_none_averages_the_steps_with_data(world):
    """momentum=None over steps 0 (data), 1 (padding on every rank), 2 (data): the running statistics
    are the plain average of steps 0 and 2's global masked statistics, num_batches_tracked 2."""
    _, cases, results = world
    name = "momentum None, an all-padding step"
    steps = concatenated(cases[name])
    rows = [s["x"].movedim(1, -1)[s["mask"]] for s in (steps[0], steps[2])]  # (k, C) valid values
    for r in _ok(results, name):
        assert r["num_batches_tracked"].item() == 2
        torch.testing.assert_close(r["running_mean"], (rows[0].mean(0) + rows[1].mean(0)) / 2, rtol=1e-14, atol=0)
        torch.testing.assert_close(r["running_var"], (rows[0].var(0) + rows[1].var(0)) / 2, rtol=1e-14, atol=0)


def _float32_errors(case: Dict[str, Any], results: List[Dict[str, Any]]) -> Dict[str, float]:
    """Errors of the processes' float32 results (one step) against the mpmath reference on the
    concatenated batch, in the units of tests/impl/test_impl_accuracy.py (u*kappa forward, u*S gradients)."""
    (data,) = concatenated(case)
    view = (1, case["options"]["num_features"], 1)
    c = Case(data["x"], data["mask"].unsqueeze(1), (0, 2), weight=case["weight"].reshape(view),
             bias=case["bias"].reshape(view))
    scales = Scales(c)
    rx, rw, rb = ref.vjp(data["grad"], c.x, c.mask, c.dim, **c.kwargs)
    out, gx = (torch.cat([r[key][0] for r in results]) for key in ("out", "grad_x"))
    errors = {"forward": ref.max_error_in_ukappa(out, c.reference(), c.kappa(), weight=c.weight, bias=c.bias),
              "grad_x": ref.max_error_in_ukappa(gx, rx, np.ones(()), weight=scales.grad_x(data["grad"]).numpy())}
    for key, want, with_y_hat in (("grad_weight", rw, True), ("grad_bias", rb, False)):
        got = sum(r[key] for r in results).reshape(view)
        scale = scales.grad_affine(data["grad"], view, with_y_hat).numpy()
        errors[key] = ref.max_error_in_ukappa(got, want, np.ones(()), weight=scale)
    return errors


def test_float32_within_the_suite_bounds(world):
    """float32 outputs and gradients within FORWARD_BOUND / VJP_X_BOUND / VJP_AFFINE_BOUND of the
    mpmath reference on the concatenated batch."""
    size, cases, results = world
    for name in FLOAT32_CASES[size]:
        errors = _float32_errors(cases[name], _ok(results, name))
        print(f"world {size}, {name}: errors {errors}")
        assert errors["forward"] <= FORWARD_BOUND[torch.float32], errors
        assert errors["grad_x"] <= VJP_X_BOUND[torch.float32], errors
        assert max(errors["grad_weight"], errors["grad_bias"]) <= VJP_AFFINE_BOUND[torch.float32], errors


def test_disagreeing_processes_raise_together(world):
    """num_features or `masked` differing across processes: a ValueError naming it on every process; a mask
    rejected on one process: its own ValueError there, one naming its rank on the others (not a hang: the
    spawn is bounded by SPAWN_TIMEOUT_S and later cases still ran)."""
    size, _, results = world
    for name, what in (("bad: num_features", "num_features differs"), ("bad: masked", "masked differs")):
        for r in results:
            assert r[name][0] == "error" and r[name][1] == "ValueError" and what in r[name][2], r[name]
    *others, last = [r["bad: one rank's mask"] for r in results]
    assert last[:2] == ("error", "ValueError") and "fits no convention" in last[2], last
    for r in others:
        assert r[:2] == ("error", "ValueError") and f"rank(s) [{size - 1}]" in r[2], r
    assert "losses" in results[0]["ddp"]


def test_ddp_training_matches_one_process(world):
    """A DDP loop over a padded model (garbage in the padding) converted with convert_sync_batchnorm follows
    one process on the whole batch: the same losses and final parameters and buffers."""
    size, cases, results = world
    case = cases["ddp"]
    per_rank = _ok(results, "ddp")
    model = PaddedModel(masknorm.MaskedBatchNorm1d(4)).double()
    model.load_state_dict(case["state"])
    losses = train(model, case["whole"], case["valid"], 1.0)
    assert losses[-1] < 0.5 * losses[0], losses
    np.testing.assert_allclose(per_rank[0]["losses"], losses, rtol=1e-12, atol=0)
    for name, value in model.state_dict().items():
        for r in per_rank:
            torch.testing.assert_close(r["state"][name], value, rtol=1e-11, atol=1e-12, msg=name)


def test_one_all_gather_forward_one_all_reduce_backward(world):
    """Per step (after the first, which also checks num_features): one all_gather of 3C + 2 float64 (k, mean,
    sqrt(M2) per channel, two header entries) and one all_reduce of 2C in x's dtype (float32 here), as
    examples/ddp_sync_batch_norm.py counts them and the README reports."""
    _, _, results = world
    channels = 5
    for sent in _ok(results, "collectives"):
        assert sent == [{"op": "all_gather", "elements": 3 * channels + 2, "bytes": 8 * (3 * channels + 2)},
                        {"op": "all_reduce", "elements": 2 * channels, "bytes": 4 * 2 * channels}], sent


@pytest.mark.parametrize("dtype, scale, eps", [(torch.float32, 1e30, 0.0), (torch.float32, 1e-30, 0.0),
                                               (torch.float32, 1e-30, 1e-5), (torch.float64, 1e200, 0.0),
                                               (torch.float64, 1e-200, 0.0), (torch.float32, 1.0, 0.0)])
def test_merged_statistics_keep_range_and_degenerate_groups(dtype, scale, eps):
    """The synchronized forward on moments merged from three simulated processes (no collective in it):
    values whose squares leave the dtype's range stay finite, a constant channel at eps = 0 passes
    through exactly; the rest within 10 u max|y| of masked_norm on the whole batch (measured: 2.7)."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 3, 5, generator=gen, dtype=torch.float64) * scale).to(dtype)
    x[:, 1] = 0.1
    mask = torch.rand(6, 1, 5, generator=gen) < 0.6
    parts = [local_moments(x[i:i + 2], mask[i:i + 2], (0, 2)) for i in (0, 2, 4)]
    stats = group_stats_from(merge_moments(LocalMoments(*(torch.stack(p) for p in zip(*parts)))), dtype, eps)
    out = SyncMaskedNormFunction.apply(x, mask, None, None, eps, "normalize", None, *stats)
    assert torch.isfinite(out).all()
    if eps == 0:
        assert torch.equal(out[:, 1], x[:, 1])
    kappa = ref.kappa(x, mask, (0, 2), eps=eps)
    err = ref.max_error_in_ukappa(out, ref.masked_norm(x, mask, (0, 2), eps=eps), kappa)
    assert err <= FORWARD_BOUND[dtype], err


def test_convert_keeps_parameters_buffers_and_keys():
    """convert_sync_batchnorm replaces nn.BatchNorm*d, nn.SyncBatchNorm and MaskedBatchNorm*d, sharing
    their parameters and buffers, keeping state_dict keys and the `masked` policy."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.SyncBatchNorm(3, momentum=None),
                                masknorm.MaskedBatchNorm2d(3, masked="zero", affine=False),
                                torch.nn.Sequential(masknorm.MaskedBatchNorm3d(3, eps=1e-3)), torch.nn.LayerNorm(3))
    before = model.state_dict()
    params = [model[0].weight, model[1].bias]
    converted = MaskedSyncBatchNorm.convert_sync_batchnorm(model)
    kinds = [type(m) for m in (converted[0], converted[1], converted[2], converted[3][0])]
    assert kinds == [MaskedSyncBatchNorm] * 4 and type(converted[4]) is torch.nn.LayerNorm
    assert converted[0].weight is params[0] and converted[1].bias is params[1]
    assert converted[1].momentum is None and converted[2].masked == "zero" and converted[3][0].eps == 1e-3
    assert converted[2].weight is None and converted[2].running_mean is not None
    after = converted.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert isinstance(MaskedSyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(2)), MaskedSyncBatchNorm)


def test_without_process_group_it_is_masked_batch_norm():
    """No initialized process group (and in eval): exactly MaskedBatchNorm, as torch's SyncBatchNorm
    falls back to its local batch norm; bad shapes raise as MaskedBatchNorm does."""
    gen = torch.Generator().manual_seed(0)
    x, mask = torch.randn(4, 3, 6, generator=gen), torch.rand(4, 6, generator=gen) < 0.6
    sync, local = MaskedSyncBatchNorm(3), masknorm.MaskedBatchNorm1d(3)
    for mode in ("train", "eval"):
        getattr(sync, mode)(), getattr(local, mode)()
        assert torch.equal(sync(x, mask), local(x, mask))
        assert torch.equal(sync.running_var, local.running_var)
    with pytest.raises(ValueError, match="expected 2D or 3D or 4D or 5D input"):
        sync(torch.randn(3))
    with pytest.raises(ValueError, match="num_features=3"):
        sync(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="masked must be one of"):
        MaskedSyncBatchNorm(3, masked="drop")


def test_in_a_group_of_one_process_it_is_masked_batch_norm():
    """An initialized process group of one process: no collective, exactly MaskedBatchNorm (torch's
    SyncBatchNorm also runs its local batch norm when the world size is 1)."""
    gen = torch.Generator().manual_seed(1)
    x, mask = torch.randn(3, 2, 5, 4, generator=gen), torch.rand(3, 5, 4, generator=gen) < 0.6
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sync, local = MaskedSyncBatchNorm(2, momentum=None), masknorm.MaskedBatchNorm2d(2, momentum=None)
        assert torch.equal(sync(x, mask), local(x, mask)) and torch.equal(sync.running_mean, local.running_mean)
    finally:
        dist.destroy_process_group()
