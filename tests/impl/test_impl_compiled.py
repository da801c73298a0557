"""masknorm under torch.compile with dynamic shapes (dynamic=True, and mark_dynamic), judged by the
mpmath reference with the accuracy bounds of test_impl_accuracy.py, plus the regressions that
once gave silently wrong results there.

Compiling costs seconds per graph, so these properties draw an eighth of the profile's examples.
Dynamo's recompile limit is raised and made an error, so a test can never pass by quietly falling
back to eager mode.
"""

import copy
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import masknorm
from masknorm.fast import native
from support.module_cases import MODULES, inputs
from support.strategies import cases, channels, like, padded_tokens
from support.bounds import FORWARD_BOUND, VJP_AFFINE_BOUND, VJP_X_BOUND, forward_error, vjp_errors

COMPILED_EXAMPLES = max(4, settings.default.max_examples // 8)


pytestmark = pytest.mark.usefixtures("compile_strictly")


def _compiled(**options):
    return torch.compile(masknorm.masked_norm, backend="aot_eager", **options)


def _marked(case):
    """The case with every axis of size >= 2 marked dynamic, on x and wherever mask, weight and
    bias have the same size on the same (right-aligned) axis: a size shared with a static tensor
    would be specialized, which mark_dynamic forbids."""
    marked = {}
    for name in ("x", "mask", "weight", "bias"):
        t = getattr(case, name)
        if t is None:
            continue
        t = t.clone()
        offset = case.x.dim() - t.dim()
        for i, size in enumerate(t.shape):
            if size >= 2 and size == case.x.shape[i + offset]:
                torch._dynamo.mark_dynamic(t, i)
        marked[name] = t
    return replace(case, **marked)


layouts = pytest.mark.parametrize("layout", [cases, padded_tokens, channels], ids=["cases", "padded-tokens", "channels"])
dtypes = pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))


@layouts
@dtypes
@settings(max_examples=COMPILED_EXAMPLES)
@given(data=st.data())
def test_compiled_dynamic_within_bounds(layout, dtype, data):
    """torch.compile(dynamic=True): output and VJP within the eager bounds of the reference."""
    if layout is not cases and dtype not in (torch.float64, torch.float32):
        return
    case = replace(data.draw(layout(dtype)), call=_compiled(dynamic=True))
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)


@layouts
@settings(max_examples=COMPILED_EXAMPLES)
@given(data=st.data())
def test_mark_dynamic_within_bounds(layout, data):
    """torch.compile with every axis of size >= 2 marked dynamic: no ConstraintViolationError (no
    marked size specialized), output and VJP within the eager bounds of the reference."""
    case = _marked(replace(data.draw(layout(torch.float32)), call=_compiled()))
    assert forward_error(case) <= FORWARD_BOUND[torch.float32]
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[torch.float32] and max(ew, eb) <= VJP_AFFINE_BOUND[torch.float32], (ex, ew, eb)


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_compiled_dynamic_equal_eager_across_lengths(name):
    """Each module compiled with dynamic=True gives eager's outputs, gradients and running statistics
    in train and eval, for two batch sizes and lengths through the same graph (the case of the
    issue: MaskedLayerNorm(8) on (4, 8) was off by 2.05 here)."""
    gen = torch.Generator().manual_seed(0)
    make, layout = MODULES[name]
    eager = make()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, dynamic=True, backend="aot_eager")
    for training, (b, t) in ((True, (4, 6)), (True, (5, 9)), (False, (4, 6)), (False, (7, 11))):
        eager.train(training)
        compiled_module.train(training)
        x, mask = inputs(layout, b, t, gen)
        results = []
        for module in (compiled, eager):
            xr = x.clone().requires_grad_()
            out = module(xr, mask)
            grads = torch.autograd.grad(out, [xr, *module.parameters()], torch.ones_like(out))
            results.append([out.detach(), *grads, *[b.clone() for b in module.buffers()]])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)


def test_a_graph_break_before_the_call_keeps_dim_exact():
    """A graph break in the caller hands `dim` to the resumed frame as a symbolic int under
    dynamic=True; before the fix, masked_norm then reduced the wrong axis (errors of 2.4 and 631)."""

    def f(x, m, d):
        torch._dynamo.graph_break()
        return masknorm.masked_norm(x, m, d)

    gen = torch.Generator().manual_seed(1)
    x, m = torch.randn(4, 6, 8, generator=gen), torch.rand(4, 6, 1, generator=gen) > 0.3
    compiled = torch.compile(f, dynamic=True, backend="eager")
    for d in (-1, 1):
        torch.testing.assert_close(compiled(x, m, d), f(x, m, d))


_FIRST_CALL_COMPILED = """
import sys, torch, warnings
warnings.filterwarnings("ignore")
import masknorm
x, mask = torch.randn(2, 8, 6, requires_grad=True), torch.rand(2, 6) > 0.3
module, t = {"layer": (masknorm.MaskedLayerNorm(8), x.transpose(1, 2)), "group": (masknorm.MaskedGroupNorm(2, 8), x),
             "instance": (masknorm.MaskedInstanceNorm1d(8), x), "batch": (masknorm.MaskedBatchNorm1d(8), x)}[sys.argv[1]]
print(torch._dynamo.explain(lambda t: module(t, mask))(t).graph_break_count)
"""


@pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")
@pytest.mark.parametrize("family", ["layer", "group", "instance", "batch"])
def test_a_module_compiled_before_any_eager_call_traces_in_one_graph(family):
    """The modules' lanes ask lanes_may_run() before native.lanes(): a first call under torch.compile in a fresh
    process traced into the kernels' first load (a lock dynamo cannot enter: a graph break in the lane)."""
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED, family], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0"


def test_inductor_compiles_rms_with_zero_policy_on_any_cpu(tmp_path, monkeypatch):
    """Inductor's C++ build of the power-of-two scale: frexp's int32 exponent clamp did not compile
    on AVX2 CPUs (torch 2.13, 'no matching function for call to maximum(VectorizedN<int, 2>&, ...)');
    the reproducer that failed, with symbolic sizes too."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 10, dtype=torch.float64, generator=gen)
    mask = torch.rand(4, 1, 10, generator=gen) > 0.3

    def f(x):
        return masknorm.masked_norm(x, mask, (0, 2), center=False, masked="zero")

    out = torch.compile(f, fullgraph=True, dynamic=True)(x)
    torch.testing.assert_close(out, f(x), rtol=4 * 2.0**-52, atol=4 * 2.0**-52)
