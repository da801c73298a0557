"""Callables on numpy, JAX and Keras arrays are checked on their own arrays, gradients by their own
autodiff, with no adapter: numpy always; JAX and Keras 3 when installed (.ci/run installs Keras)."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

from masknorm.testing import Semantics, check

EPS = 1e-5
EXAMPLES = 10


def numpy_norm(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked layer norm in numpy: statistics of the valid values; an empty group passes through."""
    k = mask.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        mu = np.where(mask, x, 0).sum(-1, keepdims=True) / np.maximum(k, 1)
        var = (np.where(mask, x - mu, 0) ** 2).sum(-1, keepdims=True) / np.maximum(k, 1)
        return np.where(k > 0, (x - mu) / np.sqrt(var + EPS), x).astype(x.dtype)


def numpy_zero_filled(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The classic bug: zero-filled padding counted in the statistics."""
    filled = np.where(mask, x, 0)
    with np.errstate(over="ignore", invalid="ignore"):  # the oracle's extreme values overflow the bug's arithmetic
        return ((x - filled.mean(-1, keepdims=True)) / np.sqrt(filled.var(-1, keepdims=True) + EPS)).astype(x.dtype)


def test_numpy_is_detected_and_conforms_without_gradients():
    report = check(numpy_norm, Semantics(-1, eps=EPS), grad=True, examples=EXAMPLES)
    assert report.conforms, report
    assert "framework=numpy" in report.setup
    skipped = {p.name: p.reason for p in report.properties if p.status == "skipped"}
    assert skipped["gradient vs reference"] == "numpy has no autodiff"


def test_a_numpy_bug_fails_with_a_numpy_reproduction():
    report = check(numpy_zero_filled, Semantics(-1, eps=EPS), dtype="float32", examples=EXAMPLES)
    failure = next(p for p in report.failed if p.name == "forward vs reference")
    assert "np.array(" in failure.reproduction and "torch" not in failure.reproduction
    namespace = {"__name__": "repro"}
    code = failure.reproduction.replace(f"from {__name__} import numpy_zero_filled as fn", "")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, dict(namespace, fn=numpy_zero_filled))  # noqa: S102 - the report's own code


def test_numpy_has_no_bfloat16():
    with pytest.raises(ValueError, match="bfloat16 is not available in numpy"):
        check(numpy_norm, Semantics(-1), framework_name="numpy", dtype="bfloat16")


def test_jax_gradients_by_jax_vjp():
    jnp = pytest.importorskip("jax.numpy")

    def safe(x, mask):
        """Masked layer norm, 0 at padding, padding replaced before any arithmetic (a `where` on
        the result alone would let NaN padding into the gradient: 0 * NaN)."""
        k = mask.sum(-1, keepdims=True)
        xs = jnp.where(mask, x, 0)
        mu = xs.sum(-1, keepdims=True) / jnp.maximum(k, 1)
        var = (jnp.where(mask, xs - mu, 0) ** 2).sum(-1, keepdims=True) / jnp.maximum(k, 1)
        return jnp.where(mask, (xs - mu) / jnp.sqrt(var + EPS), 0)

    def multiplied(x, mask):
        """Padding removed by multiplication: NaN * 0 is NaN, in the output and the gradient."""
        k = mask.sum(-1, keepdims=True)
        mu = (x * mask).sum(-1, keepdims=True) / jnp.maximum(k, 1)
        var = (((x - mu) * mask) ** 2).sum(-1, keepdims=True) / jnp.maximum(k, 1)
        return jnp.where(mask, (x - mu) / jnp.sqrt(var + EPS), 0)

    options = dict(grad=True, ndim=2, sides=(2, 3), examples=EXAMPLES)  # one shape: JAX compiles per shape
    semantics = Semantics(-1, eps=EPS, masked="zero")
    report = check(safe, semantics, **options)
    assert report.conforms, report
    assert "framework=jax" in report.setup and "dtype=float64" in report.setup
    bad = check(multiplied, semantics, **options)
    assert "gradient padding garbage" in {p.name for p in bad.failed}
    assert "jax.vjp" in next(p for p in bad.failed if p.name == "gradient padding garbage").reproduction


def test_jax_is_jitted_on_few_shapes_and_runs_op_by_op_when_it_cannot_be_traced():
    """JAX compiles per shape: a check draws only the bucket shapes and calls fn under jax.jit; a
    fn that needs concrete values (a Python branch on the mask) runs op by op, and the report says so."""
    jnp = pytest.importorskip("jax.numpy")
    from masknorm.reference.oracle.strategies import bucket_shapes

    shapes, traced = set(), []

    def rms(x, mask):
        shapes.add(tuple(x.shape))
        traced.append(not isinstance(x, np.ndarray) and type(x).__name__ != "ArrayImpl")
        k = jnp.maximum(mask.sum(-1, keepdims=True), 1)
        return jnp.where(mask, x, 0) / jnp.sqrt((jnp.where(mask, x, 0) ** 2).sum(-1, keepdims=True) / k + EPS)

    def branchy(x, mask):
        if not bool(mask.any()):
            return x
        return rms(x, mask)

    options = dict(ndim=2, dtype="float32", examples=EXAMPLES)
    semantics = Semantics(-1, eps=EPS, center=False, degenerate="nan")
    jitted = check(rms, semantics, framework_name="jax", **options)
    assert "framework=jax (jax.jit)" in jitted.setup and "shapes=buckets" in jitted.setup
    assert shapes <= set(bucket_shapes(2, (1,))) and any(traced)
    eager = check(branchy, semantics, framework_name="jax", **options)
    assert "op by op after jax.jit failed on" in eager.setup


def test_keras_layer_on_its_torch_backend():
    if os.environ.get("KERAS_BACKEND", "torch") != "torch":
        pytest.skip("Keras is configured for another backend")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")

    def layer_norm(x):
        return keras.layers.LayerNormalization(epsilon=EPS, center=False, scale=False)(x)

    report = check(
        layer_norm, Semantics(-1, eps=EPS), mask=False, grad=True, dtype="float32", framework_name="keras",
        ndim=2, sides=(2, (2, 4)), examples=EXAMPLES,
    )
    assert report.conforms, report
    assert "framework=keras (torch backend)" in report.setup

    def eps_outside(x):  # a bug for the claim below: (x - mu) / (sigma + eps), written in keras.ops
        mu = keras.ops.mean(x, axis=-1, keepdims=True)
        return (x - mu) / (keras.ops.std(x, axis=-1, keepdims=True) + EPS)

    bad = check(eps_outside, Semantics(-1, eps=EPS), mask=False, dtype="float32", framework_name="keras", examples=EXAMPLES)
    code = bad.failed[0].reproduction
    assert code.startswith('import os\nos.environ.setdefault("KERAS_BACKEND", "torch")')
    compile(code, "reproduction", "exec")


KERAS_ON_JAX = """
import keras
from masknorm.testing import Semantics, check

assert keras.backend.backend() == "jax"

def layer_norm(x):
    return keras.layers.LayerNormalization(epsilon=1e-5, center=False, scale=False)(x)

def eps_outside(x):  # a bug for the claim below: (x - mu) / (sigma + eps), written in keras.ops
    mu = keras.ops.mean(x, axis=-1, keepdims=True)
    return (x - mu) / (keras.ops.std(x, axis=-1, keepdims=True) + 1e-5)

options = dict(mask=False, grad=True, dtype="float32", framework_name="keras", ndim=2, sides=(2, (2, 4)), examples=8)
for jit in (True, False):
    report = check(layer_norm, Semantics(-1, eps=1e-5), jit=jit, **options)
    assert report.conforms, report
    assert ("framework=keras (jax backend, jax.jit)" if jit else "framework=keras (jax backend, op by op)") in report.setup
bad = check(eps_outside, Semantics(-1, eps=1e-5), **options)
assert {p.name for p in bad.failed} == {"forward vs reference", "gradient vs reference"}, bad
assert "jax.vjp" in next(p for p in bad.failed if p.name == "gradient vs reference").reproduction
"""


@pytest.mark.slow
def test_keras_layer_on_its_jax_backend():
    """Keras picks its backend when first imported, so this runs in a process of its own. Skipped
    where Keras or JAX is missing (CI installs Keras on the torch backend and no JAX)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("keras") is None or importlib.util.find_spec("jax") is None:
        pytest.skip("needs keras and jax")
    env = dict(os.environ, KERAS_BACKEND="jax")
    done = subprocess.run([sys.executable, "-c", KERAS_ON_JAX], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_conformance_script_writes_a_row_per_peer(tmp_path, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "conformance.py"
    conformance = runpy.run_path(str(script), run_name="conformance")
    out_file = tmp_path / "table.md"
    assert conformance["main"](["--only", "masknorm.masked_norm", "--examples", "3", "--output", str(out_file)]) == 0
    table = capsys.readouterr().out
    assert "| masknorm.masked_norm |" in table and "| conforms |" in table
    assert out_file.read_text().startswith("| implementation |")
