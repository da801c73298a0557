"""The segment convention (segments=True, `--segments`): graph libraries' norms take the valid
positions as a node list and a batch vector, fn(x_nodes, batch); the oracle gathers and scatters.
A hand-written segment norm conforms or fails as it should, its reproduction runs from anywhere,
bad set-ups are refused by name, and PyTorch Geometric's norms are checked without an adapter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from masknorm.testing import CallError, Semantics, check

EPS = 1e-5
GRAPHS = dict(ndim=3, mask_dims=(0, 1), segments=True, grad=True, examples=30)
SEGMENT_NORM = textwrap.dedent(
    '''
    import math

    import torch


    def graph_layer_norm(x, batch, eps_outside=False):
        """Per graph over its nodes and channels, as PyG's LayerNorm(mode="graph"), by index_add."""
        graphs = int(batch.max()) + 1 if batch.numel() else 0
        count = torch.zeros(graphs, dtype=x.dtype).index_add_(0, batch, torch.ones_like(batch, dtype=x.dtype))
        per_node = math.prod(x.shape[1:])
        count = (count * per_node).clamp(min=1)
        mean = torch.zeros(graphs, dtype=x.dtype).index_add(0, batch, x.reshape(len(x), per_node).sum(-1)) / count
        centered = x - mean[batch].reshape(-1, *[1] * (x.dim() - 1))
        var = torch.zeros(graphs, dtype=x.dtype).index_add(0, batch, (centered**2).reshape(len(x), per_node).sum(-1)) / count
        scale = var.sqrt() + 1e-5 if eps_outside else (var + 1e-5).sqrt()
        return centered / scale[batch].reshape(-1, *[1] * (x.dim() - 1))


    def eps_outside(x, batch):
        return graph_layer_norm(x, batch, eps_outside=True)
    '''
)


@pytest.fixture
def norms(tmp_path, monkeypatch):
    (tmp_path / "segment_norms_i27.py").write_text(SEGMENT_NORM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "segment_norms_i27", raising=False)
    import segment_norms_i27

    return segment_norms_i27


def test_a_segment_norm_conforms_and_a_wrong_claim_fails(norms):
    claim = Semantics((1, 2), eps=EPS, masked="keep")
    report = check(norms.graph_layer_norm, claim, **GRAPHS)
    assert report.conforms, report
    assert "segments: fn(x_nodes, batch)" in report.setup
    assert {p.name: p.status for p in report.properties}["padding garbage"] == "skipped"
    wrong = check(norms.eps_outside, claim, **GRAPHS)
    assert {p.name for p in wrong.failed} >= {"forward vs reference", "gradient vs reference"}
    # claimed, it conforms forward (its gradient on a constant graph is NaN: sqrt's derivative at 0)
    right = check(norms.eps_outside, Semantics((1, 2), eps=EPS, masked="keep", eps_outside=True), **GRAPHS)
    assert [p.name for p in right.failed] == ["gradient vs reference"], right


def test_a_segment_reproduction_runs_from_another_folder(norms, tmp_path_factory):
    report = check(norms.eps_outside, Semantics((1, 2), eps=EPS, masked="keep"), **GRAPHS)
    forward = next(p for p in report.failed if p.name == "forward vs reference")
    gradient = next(p for p in report.failed if p.name == "gradient vs reference")
    assert "x_nodes = x[mask]" in forward.reproduction and "out = fn(x_nodes, batch)" in forward.reproduction
    assert "backward(grad_out[mask])" in gradient.reproduction
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for code in (forward.reproduction, gradient.reproduction):
        (elsewhere / "repro.py").write_text(code)
        done = subprocess.run([sys.executable, "repro.py"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "tensor(" in done.stdout


@pytest.mark.parametrize(
    "options, claim, text",
    [
        (dict(mask_dims=(0, 1)), dict(masked="normalize"), "claim masked='keep'"),
        (dict(mask_dims=(1,)), dict(), "must be x's leading axes"),
        (dict(mask_dims=None), dict(), "needs a mask and mask_dims"),
        (dict(mask_dims=(0, 1), framework_name="numpy"), dict(), "only torch callables"),
    ],
)
def test_bad_segment_set_ups_are_refused_by_name(norms, options, claim, text):
    with pytest.raises(ValueError, match=text):
        check(norms.graph_layer_norm, Semantics((1, 2), **dict(dict(masked="keep"), **claim)), ndim=3, segments=True,
              examples=1, **options)


def test_a_wrong_output_shape_is_said():
    with pytest.raises(CallError, match=r"fn\(x_nodes, batch\) on torch x .* returned \(1, 3\) for x_nodes of shape \(9, 3\)"):
        check(lambda x, batch: x[:1], Semantics(1, masked="keep"), ndim=3, mask_dims=(0, 1), segments=True, examples=3)


@pytest.mark.skipif(importlib.util.find_spec("torch_geometric") is None, reason="needs torch_geometric")
@pytest.mark.parametrize(
    "name, claim, conforms",
    [
        ("layer_graph", dict(dim=(1, 2)), True),
        ("layer_graph_no_batch", dict(dim=(1, 2)), False),  # divides by sigma + eps there
        ("layer_graph_no_batch", dict(dim=(1, 2), eps_outside=True), True),
        ("layer_node", dict(dim=2), True),
        ("instance", dict(dim=1), True),
        ("graph", dict(dim=1), True),
    ],
)
def test_pytorch_geometric_norms_without_an_adapter(name, claim, conforms):
    import torch_geometric.nn as gnn

    def make(x):
        return {
            "layer_graph": lambda: gnn.LayerNorm(x.shape[-1], eps=EPS, affine=False, mode="graph"),
            "layer_graph_no_batch": lambda: gnn.LayerNorm(x.shape[-1], eps=EPS, affine=False, mode="graph"),
            "layer_node": lambda: gnn.LayerNorm(x.shape[-1], eps=EPS, affine=False, mode="node"),
            "instance": lambda: gnn.InstanceNorm(x.shape[-1], eps=EPS),
            "graph": lambda: gnn.GraphNorm(x.shape[-1], eps=EPS),
        }[name]()

    def fn(x, batch):
        return make(x)(x) if name.endswith("no_batch") else make(x)(x, batch)

    sides = (1, None, None) if name.endswith("no_batch") else None
    report = check(fn, Semantics(eps=EPS, masked="keep", **claim), dtype="float32", min_valid=1, sides=sides,
                   **dict(GRAPHS, examples=20))
    assert report.conforms == conforms, report
