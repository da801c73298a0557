"""The oracle on every peer installed, each with its documented semantics: the conformance table.

    python examples/conformance.py [--examples N] [--only SUBSTRING ...] [--output FILE]

Each peer is called on its own arrays (torch, JAX, Keras tensors): what is written here is only
which layer, with which documented options (no affine, the given eps), and the semantics its
documentation claims. A peer that is not installed is listed as such. JAX peers run under jax.jit
on 3 shapes per rank (the oracle's defaults for JAX, which compiles per shape). The table
(markdown, seconds as wall and process CPU time) goes to stdout, or to FILE with the counterexample
of each failure; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("KERAS_BACKEND", "torch")

EPS = 1e-5


@dataclass
class Peer:
    """One implementation: `make` returns fn (imports its library); `semantics` is what its
    documentation says; `options` go to check()."""

    name: str
    package: str
    make: Callable[[], Callable[..., Any]]
    semantics: Dict[str, Any]
    options: Dict[str, Any] = field(default_factory=dict)


# ---- torch ---------------------------------------------------------------------------------------


def torch_layer_norm():
    import torch.nn.functional as F

    return lambda x: F.layer_norm(x, x.shape[-1:], eps=EPS)


def torch_rms_norm():
    import torch.nn.functional as F

    return lambda x: F.rms_norm(x, x.shape[-1:], eps=EPS)


def torch_group_norm():
    import torch.nn.functional as F

    # x (N, G, C/G, L) as (N, C, L) with G groups: reduces axes (2, 3)
    return lambda x: F.group_norm(x.reshape(x.shape[0], -1, x.shape[-1]), x.shape[1], eps=EPS).reshape(x.shape)


def torch_batch_norm():
    import torch.nn.functional as F

    return lambda x: F.batch_norm(x, None, None, training=True, eps=EPS)


def torch_instance_norm():
    import torch.nn.functional as F

    return lambda x: F.instance_norm(x, eps=EPS)


# ---- Flax (JAX arrays) ---------------------------------------------------------------------------


def flax_linen(cls_name: str, **kw):
    def make():
        import flax.linen as nn
        import jax

        module = getattr(nn, cls_name)(epsilon=EPS, use_scale=False, **kw)

        def fn(x, mask):
            variables = module.init(jax.random.key(0), x, mask=mask)
            out = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
            return out[0] if isinstance(out, tuple) else out

        return fn

    return make


def flax_linen_group_norm(**kw):
    def make():
        import flax.linen as nn

        def fn(x, mask):
            # x (N, L, G, C/G) as channels-last (N, L, C) with G groups: reduces axes (1, 3)
            n, length, groups, per = x.shape
            module = nn.GroupNorm(num_groups=groups, epsilon=EPS, use_bias=False, use_scale=False, **kw)
            flat, m = x.reshape(n, length, groups * per), mask.reshape(n, length, groups * per)
            return module.apply({}, flat, mask=m).reshape(x.shape)

        return fn

    return make


def flax_nnx_layer_norm(**kw):
    def make():
        from flax import nnx

        def fn(x, mask):
            layer = nnx.LayerNorm(x.shape[-1], epsilon=EPS, use_bias=False, use_scale=False, rngs=nnx.Rngs(0), **kw)
            return layer(x, mask=mask)

        return fn

    return make


# ---- Keras 3 (on its torch backend: torch tensors) -------------------------------------------------


def keras_layer(cls_name: str, **kw):
    def make():
        import keras

        return lambda x: getattr(keras.layers, cls_name)(epsilon=EPS, **kw)(x)

    return make


def keras_group_norm():
    import keras

    def fn(x):
        n, length, groups, per = x.shape
        layer = keras.layers.GroupNormalization(groups=groups, epsilon=EPS, center=False, scale=False)
        return layer(x.reshape(n, length, groups * per)).reshape(x.shape)

    return fn


def keras_batch_norm():
    import keras

    def fn(x, mask):
        layer = keras.layers.BatchNormalization(epsilon=EPS, center=False, scale=False)
        return layer(x, training=True, mask=mask)

    return fn


# ---- PyTorch Geometric (node lists and a batch vector: the oracle's segment convention) -------------


def pyg_norm(cls_name: str, batch: bool = True, **kw):
    """A PyG norm called as fn(x_nodes, batch) (x_nodes (M, C)); without its batch vector when not
    `batch` (then checked on one graph)."""

    def make():
        import torch_geometric.nn as gnn

        def fn(x, graph_ids):
            layer = getattr(gnn, cls_name)(x.shape[-1], eps=EPS, **kw)
            return layer(x, graph_ids) if batch else layer(x)

        return fn

    return make


# ---- einorm, the seed, masknorm ---------------------------------------------------------------------


def einorm_layer():
    from einorm import Einorm

    return lambda x: Einorm("a b c", "c", c=x.shape[-1], eps=EPS)(x)


def seed_rows():
    from masked_norm.functional import masked_norm

    return masked_norm


def masknorm_layer():
    import masknorm

    return lambda x, mask: masknorm.masked_norm(x, mask, -1, eps=EPS)


PLAIN = dict(mask=False, grad=True, dtype="float32")
MASKED = dict(grad=True, dtype="float32")
# x (B, N, C): B graphs of up to N nodes, each with at least one node; fn(x_nodes, batch)
GRAPHS = dict(MASKED, ndim=3, mask_dims=(0, 1), segments=True, min_valid=1)
PEERS: List[Peer] = [
    Peer("torch F.layer_norm", "torch", torch_layer_norm, dict(dim=-1), PLAIN),
    Peer("torch F.rms_norm", "torch", torch_rms_norm, dict(dim=-1, center=False), PLAIN),
    Peer("torch F.group_norm", "torch", torch_group_norm, dict(dim=(2, 3)), dict(PLAIN, ndim=4, min_group_size=2)),
    Peer("torch F.batch_norm", "torch", torch_batch_norm, dict(dim=(0, 2)), dict(PLAIN, ndim=3, min_group_size=2)),
    Peer("torch F.instance_norm", "torch", torch_instance_norm, dict(dim=2), dict(PLAIN, ndim=3, min_group_size=2)),
    Peer("Flax linen LayerNorm", "flax", flax_linen("LayerNorm", use_bias=False), dict(dim=-1), MASKED),
    Peer(
        "Flax linen LayerNorm(use_fast_variance=False)", "flax",
        flax_linen("LayerNorm", use_bias=False, use_fast_variance=False),
        dict(dim=-1, degenerate="nan"), MASKED,
    ),
    Peer("Flax linen RMSNorm", "flax", flax_linen("RMSNorm"), dict(dim=-1, center=False, degenerate="nan"), MASKED),
    Peer(
        "Flax linen GroupNorm(use_fast_variance=False)", "flax", flax_linen_group_norm(use_fast_variance=False),
        dict(dim=(1, 3), degenerate="nan"), dict(MASKED, ndim=4),
    ),
    Peer(
        "Flax linen BatchNorm(use_fast_variance=False)", "flax",
        flax_linen("BatchNorm", use_bias=False, use_running_average=False, use_fast_variance=False),
        dict(dim=(0, 1), degenerate="nan"), dict(MASKED, ndim=3),
    ),
    Peer("Flax nnx LayerNorm", "flax", flax_nnx_layer_norm(), dict(dim=-1), MASKED),
    Peer(
        "Flax nnx LayerNorm(use_fast_variance=False)", "flax", flax_nnx_layer_norm(use_fast_variance=False),
        dict(dim=-1, degenerate="nan"), MASKED,
    ),
    Peer("Keras LayerNormalization", "keras", keras_layer("LayerNormalization", center=False, scale=False), dict(dim=-1), PLAIN),
    Peer("Keras RMSNormalization", "keras", keras_layer("RMSNormalization"), dict(dim=-1, center=False), PLAIN),
    Peer("Keras GroupNormalization", "keras", keras_group_norm, dict(dim=(1, 3)), dict(PLAIN, ndim=4)),
    Peer(
        "Keras BatchNormalization(mask=)", "keras", keras_batch_norm, dict(dim=(0, 1)),
        dict(MASKED, ndim=3, mask_dims=(0, 1), squeeze_mask=True, sides=(None, None, (2, 4))),
    ),
    Peer("PyG LayerNorm(mode='graph')", "torch_geometric", pyg_norm("LayerNorm", affine=False, mode="graph"),
         dict(dim=(1, 2), masked="keep"), GRAPHS),
    Peer("PyG LayerNorm(mode='graph'), no batch vector", "torch_geometric",
         pyg_norm("LayerNorm", batch=False, affine=False, mode="graph"),
         dict(dim=(1, 2), masked="keep"), dict(GRAPHS, sides=(1, None, None))),
    Peer("PyG LayerNorm(mode='node')", "torch_geometric", pyg_norm("LayerNorm", affine=False, mode="node"),
         dict(dim=2, masked="keep"), GRAPHS),
    Peer("PyG InstanceNorm", "torch_geometric", pyg_norm("InstanceNorm"), dict(dim=1, masked="keep"), GRAPHS),
    Peer("PyG GraphNorm", "torch_geometric", pyg_norm("GraphNorm"), dict(dim=1, masked="keep"), GRAPHS),
    Peer("einorm Einorm('a b c', 'c')", "einorm", einorm_layer, dict(dim=-1), dict(PLAIN, ndim=3)),
    Peer(
        "algmarques/masked_norm (the seed), rows", "masked-norm", seed_rows,
        dict(dim=-1, correction=1, eps=0.0, masked="keep"),
        dict(MASKED, ndim=2, mask_dims=(0,), squeeze_mask=True),
    ),
    Peer("masknorm.masked_norm", "masknorm", masknorm_layer, dict(dim=-1), MASKED),
]


def version(package: str) -> Optional[str]:
    """The installed version of `package`, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(semantics: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in semantics.items())


def verdict(report: Any, semantics: Any) -> str:
    """conforms (with the documented difference in degenerate groups), or the failed properties."""
    if report.conforms:
        return "conforms" + ("" if semantics.degenerate == "passthrough" else f" (degenerate: {semantics.degenerate})")
    return "fails: " + "; ".join(f"{p.name} ({p.reason})" for p in report.failed)


def worst(report: Any) -> str:
    values = [p.worst for p in report.properties if p.worst is not None and p.status != "skipped"]
    return "-" if not values else f"{max(values):.3g}"


def run(peer: Peer, examples: int) -> Dict[str, Any]:
    """Check one peer; its row of the table and the failures' counterexamples."""
    from masknorm.testing import CallError, Semantics, check

    row = dict(name=peer.name, version=version(peer.package), claimed=describe(peer.semantics), failures=[])
    if row["version"] is None:
        return dict(row, verdict="not installed", worst="-", seconds=0.0, cpu=0.0)
    start, cpu = time.perf_counter(), time.process_time()
    semantics = Semantics(**peer.semantics)
    try:
        report = check(peer.make(), semantics, examples=examples, name=peer.name, **peer.options)
    except (CallError, ImportError, TypeError, ValueError) as err:
        return dict(row, verdict=f"cannot check: {err}", worst="-", seconds=time.perf_counter() - start,
                    cpu=time.process_time() - cpu)
    row.update(verdict=verdict(report, semantics), worst=worst(report), seconds=time.perf_counter() - start,
               cpu=time.process_time() - cpu)
    row["setup"] = report.setup
    row["failures"] = [(p.name, p.reason, p.reproduction, p.worst_reason) for p in report.failed]
    return row


def table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| implementation | version | claimed semantics | verdict | worst u·κ | seconds (wall, CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['version'] or '-'} | {r['claimed']} | {r['verdict']} | {r['worst']} "
            f"| {r['seconds']:.0f}, {r['cpu']:.0f} |"
        )
    return "\n".join(lines)


# Marks each reproduction for the suite that runs the documentation's Python blocks
# (tests/docs/test_doc_blocks.py): it needs the peer's framework and `fn`.
NOT_RUN = "<!-- not-run: needs the peer installed and `fn`, the callable examples/conformance.py builds for it -->"


def counterexamples(rows: List[Dict[str, Any]]) -> str:
    out = []
    for r in rows:
        for name, reason, code, worst_reason in r["failures"]:
            out += [f"### {r['name']}: {name}", "", f"{reason}" + (f"; worst seen: {worst_reason}" if worst_reason else ""), ""]
            out += [NOT_RUN, "```python", code or "", "```", ""]
    return "\n".join(out)


def parser(doc: str, output: str) -> argparse.ArgumentParser:
    """The options this script and examples/systematic_error.py share: --examples and --output
    (`output` says what is written there); `doc`'s first paragraph is the description."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=100, help="hypothesis examples per property (default 100)")
    p.add_argument("--output", help=f"write {output} (markdown) to this file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = parser(__doc__, "the table and the counterexamples")
    p.add_argument("--only", action="append", help="check only the peers whose name contains this (repeatable)")
    args = p.parse_args(argv)
    rows = []
    for peer in PEERS:
        if args.only and not any(part in peer.name for part in args.only):
            continue
        print(f"checking {peer.name} ...", file=sys.stderr, flush=True)
        rows.append(run(peer, args.examples))
        print(f"  {rows[-1]['verdict'][:200]} ({rows[-1]['seconds']:.0f} s, {rows[-1]['cpu']:.0f} s CPU)", file=sys.stderr, flush=True)
        if args.output:  # after every peer, so that a long run leaves what it has done
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(f"{table(rows)}\n\n## Counterexamples (shrunk)\n\n{counterexamples(rows)}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
