"""The fast paths under torch.compile (masknorm.fast.ops): a compiled module reaches the eager fast
path's fused computation as one registered operator, with no graph break, and gives eager's
outputs, gradients and running statistics bit for bit (NaN equal to NaN), static and dynamic shapes,
aot_eager and inductor, including groups the kernels flag for the general statistics.

torch.export keeps the general path's aten ops (ONNX has no masknorm operator).
"""

import copy
import functools

import pytest
import torch
from support.bounds import same_bits

import masknorm
from masknorm.fast import masked_positions, native, padded_rows, per_channel
from masknorm.modules import MaskedBatchNorm1d, MaskedGroupNorm, MaskedInstanceNorm1d, MaskedLayerNorm, MaskedRMSNorm

pytestmark = [pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built"),
              pytest.mark.usefixtures("compile_strictly")]

# name -> (module factory, x as (B, T, 4) rather than (B, 4, T), the fast path, its functions that run the
# forward and backward computation, the operator)
FUSED, KERNEL = ("fused_forward", "fused_backward"), ("kernel_forward", "kernel_backward")
MODULES = {
    "group": (lambda: MaskedGroupNorm(2, 4, masked="keep"), False, masked_positions, FUSED, "masked_positions"),
    "instance": (lambda: MaskedInstanceNorm1d(4, affine=True), False, masked_positions, FUSED, "masked_positions"),
    "batch": (lambda: MaskedBatchNorm1d(4, masked="zero"), False, per_channel, KERNEL, "per_channel"),
    "layer": (lambda: MaskedLayerNorm(4), True, padded_rows, FUSED, "padded_rows"),
    "rms": (lambda: MaskedRMSNorm(4), True, padded_rows, FUSED, "padded_rows"),
}


class _Recorder:
    """A Dynamo backend that records the call targets of each graph, then compiles it with `backend`."""

    def __init__(self, backend: str):
        self.backend = torch._dynamo.lookup_backend(backend)
        self.targets = []

    def __call__(self, gm, example_inputs):
        self.targets += [node.target for node in gm.graph.nodes if node.op == "call_function"]
        return self.backend(gm, example_inputs)


def _counting(monkeypatch, module, names):
    """Count the calls of module.<name> for each name (the fast path's eager functions)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _inputs(b: int, t: int, seed: int, huge: bool = False, tokens: bool = False):
    """x (b, 4, t), or (b, t, 4) with tokens, with random lengths (one full sequence); huge: the
    first sample's first channel (token) times 1e30, whose statistics leave the kernels' exact
    range (redone with the general ones)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (b, t, 4) if tokens else (b, 4, t)
    x = torch.randn(shape, generator=gen) + 2
    if huge:
        x[0, 0] *= 1e30
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[-1] = t
    return x, torch.arange(t) < lengths[:, None], torch.randn(shape, generator=gen)


def _run(module, x, mask, grad):
    x = x.clone().requires_grad_()
    out = module(x, mask)
    grads = torch.autograd.grad(out, [x, *module.parameters()], grad)
    return [out.detach(), *grads, *[b.clone() for b in module.buffers()]]


def _module(name: str):
    torch.manual_seed(0)
    module = MODULES[name][0]()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", list(MODULES))
def test_compiled_module_runs_the_fast_path_as_one_operator(name, backend, dynamic, monkeypatch):
    """fullgraph compile; the graph calls the masknorm operator, each compiled step runs the fast
    path's forward and backward once, and outputs, gradients and running statistics equal eager's
    bit for bit, over changing batch sizes and lengths and with an out-of-range group."""
    _, tokens, fast, functions, op = MODULES[name]
    eager = _module(name)
    compiled_module = copy.deepcopy(eager)
    recorder = _Recorder(backend)
    compiled = torch.compile(compiled_module, backend=recorder, fullgraph=True, dynamic=dynamic)
    calls = _counting(monkeypatch, fast, functions)
    for step, (b, t, huge) in enumerate(((3, 7, False), (4, 9, False), (4, 9, True))):
        x, mask, grad = _inputs(b, t, step, huge, tokens)
        compiled_result = _run(compiled, x, mask, grad)
        assert set(calls.values()) == {1}, calls  # the compiled step ran the fast path, forward and backward
        eager_result = _run(eager, x, mask, grad)
        calls.update(dict.fromkeys(calls, 0))
        for a, e in zip(compiled_result, eager_result):
            same_bits(a, e)
    assert getattr(torch.ops.masknorm, op).default in recorder.targets


def test_the_huge_case_is_redone():
    """The last step above is the case the kernels cannot do (group and token: rstd 1e-30 < 2^-40;
    batch: a variance of 1e60 overflows float32): the operators flag a group (channel) for the
    general statistics, so the bitwise comparisons above covered the redo."""
    x, mask, _ = _inputs(4, 9, 2, huge=True)
    lay = masked_positions.layout(x, mask[:, None], None, None, (2,))
    state = torch.ops.masknorm.masked_positions(x, mask[:, None], None, None, lay.spec(), 0, 1e-5, True, "keep")[3]
    assert int(state.max()) == 2  # _REDO
    redo = torch.ops.masknorm.per_channel(x, mask[:, None], None, None, 0, 1e-5, "zero")[7]
    assert redo.flatten().tolist() == [True, False, False, False]
    x, mask, _ = _inputs(4, 9, 2, huge=True, tokens=True)
    redo = torch.ops.masknorm.padded_rows(x, mask[..., None], None, None, 1, 1e-5, True, "normalize")[3]
    assert redo.flatten().nonzero().flatten().tolist() == [0]


def test_parameters_of_x_rank():
    """masked_norm with weight and bias of x's rank (their gradients are views of one kernel
    output in eager mode, which an operator must not return): compiled equals eager."""
    gen = torch.Generator().manual_seed(4)
    x, mask, grad = _inputs(3, 7, 4)
    weight, bias = torch.randn(1, 4, 1, generator=gen), torch.randn(1, 4, 1, generator=gen)
    f = functools.partial(masknorm.masked_norm, dim=-1)
    results = []
    for call in (torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True), f):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = call(leaves[0], mask[:, None], weight=leaves[1], bias=leaves[2])
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad)])
    for a, e in zip(*results):
        same_bits(a, e)


def test_export_keeps_the_general_path():
    """torch.export (and so ONNX) traces aten ops only: no masknorm operator in the graph."""
    x, mask, _ = _inputs(3, 7, 0)
    exported = torch.export.export(_module("group"), (x, mask))
    assert not any(str(node.target).startswith("masknorm.") for node in exported.graph.nodes)


def test_double_backward_through_the_compiled_operator_raises():
    """create_graph through a compiled fast path raises rather than return a wrong second derivative."""
    compiled = torch.compile(_module("group"), backend="aot_eager", fullgraph=True)
    x, mask, grad = _inputs(3, 7, 0)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(compiled(x, mask), x, grad, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.pow(2).sum().backward()


def test_available_is_marked_as_the_public_decorator_marks():
    """native.available carries the attributes torch.compiler.assume_constant_result gives a
    function (set by hand so that `import masknorm` does not import torch._dynamo)."""
    def probe() -> bool:
        return True

    torch.compiler.assume_constant_result(probe)
    assert vars(probe) and all(getattr(native.available, k, None) == v for k, v in vars(probe).items())


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_elementwise_mask_runs_the_row_kernel(dynamic):
    """Layer norm with a mask that varies inside the rows and a per-position weight and bias (the
    row layout) compiles to the group operator and equals eager bit for bit, output and gradients."""
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    f = functools.partial(masknorm.masked_norm, dim=-1, weight=weight, bias=bias, masked="zero")
    recorder = _Recorder("aot_eager")
    compiled = torch.compile(f, backend=recorder, fullgraph=True, dynamic=dynamic)
    for b in (3, 5):
        x, g = torch.randn(b, 4, 6, generator=gen), torch.randn(b, 4, 6, generator=gen)
        mask = torch.rand(b, 4, 6, generator=gen) > 0.3
        assert isinstance(masked_positions.layout(x, mask, weight, bias, (2,)), masked_positions.RowLayout)
        results = []
        for call in (compiled, f):
            leaf = x.clone().requires_grad_()
            out = call(leaf, mask)
            results.append((out.detach(), *torch.autograd.grad(out, leaf, g)))
        for a, e in zip(*results):
            same_bits(a, e)
    assert torch.ops.masknorm.masked_positions.default in recorder.targets
