"""The portability subset: what CI runs on the oldest supported torch and on the newest release
besides the pinned one (`python -m pytest -m portability`; .ci/run).

Every family (each module, and the functional form with an elementwise mask) in one model,
compiled with aot_eager and inductor, static and dynamic shapes, float32/float64/bfloat16 (bfloat16
dynamic on aot_eager only), in training and eval: outputs, every gradient and the running statistics equal eager mode's. A
compiled gradient of exactly zero (torch 2.11, pytorch/pytorch#180642) fails here, as does an
inductor crash on a fake kernel whose strides differ from the real output's (float64 batch norm,
a time-first (T, B, D) input).
"""

import copy

import pytest
import torch

import masknorm

pytestmark = pytest.mark.portability

C = 4


class AllFamilies(torch.nn.Module):
    """x (B, C, T) with mask (B, T) through every family; the token norms see x time-first,
    (T, B, C), a transposed view as torchaudio's Conformer makes."""

    def __init__(self):
        super().__init__()
        self.batch = masknorm.MaskedBatchNorm1d(C)
        self.group = masknorm.MaskedGroupNorm(2, C, masked="keep")
        self.instance = masknorm.MaskedInstanceNorm1d(C, affine=True, track_running_stats=True)
        self.layer = masknorm.MaskedLayerNorm(C)
        self.rms = masknorm.MaskedRMSNorm(C, masked="zero")
        self.heads = masknorm.MaskedNorm("b t (h d)", reduce="d", features="h d", h=2, d=C // 2)
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, C))

    def forward(self, xs, mask, elementwise):
        time_first = mask.t()
        outs = [self.batch(xs[0], mask), self.group(xs[1], mask), self.instance(xs[2], mask),
                self.layer(xs[3].permute(2, 0, 1), time_first), self.rms(xs[4].permute(2, 0, 1), time_first),
                self.heads(xs[5].transpose(1, 2), mask)]
        outs.append(masknorm.masked_norm(xs[6], elementwise, dim=1, weight=self.weight[:, None]))
        return outs


def _inputs(dtype, b, t, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(b, C, t, generator=gen) * 3 + 1).to(dtype) for _ in range(7)]
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[:, 0] = True
    return xs, mask, torch.rand(b, C, t, generator=gen) > 0.3


def _run(model, xs, mask, elementwise, seed):
    """Every output, the gradients of x and of every parameter for a random upstream gradient,
    and every buffer after the call."""
    xs = [x.clone().requires_grad_(True) for x in xs]
    outs = model(xs, mask, elementwise)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, [*xs, *params])
    return [o.detach() for o in outs] + list(grads) + [b.clone() for b in model.buffers()]


TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-5, atol=2e-5),
             torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Both backends on every dtype, static and dynamic, but bfloat16 dynamic on inductor (a C++ build per
# graph, about a minute each here; bfloat16 is static on inductor, dynamic on aot_eager).
SETTINGS = [(dtype, backend, dynamic) for backend in ("aot_eager", "inductor")
            for dtype in (torch.float32, torch.float64, torch.bfloat16) for dynamic in (False, True)
            if not (backend == "inductor" and dtype == torch.bfloat16 and dynamic)]


@pytest.mark.parametrize("dtype, backend, dynamic", SETTINGS,
                         ids=[f"{str(d).removeprefix('torch.')}-{b}-{'dynamic' if y else 'static'}" for d, b, y in SETTINGS])
def test_every_family_compiled_equals_eager(dtype, backend, dynamic):
    eager = AllFamilies().to(dtype)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, dynamic=dynamic)
    for step, (training, b, t) in enumerate([(True, 3, 7), (True, 4, 9), (False, 2, 5)]):
        eager.train(training)
        compiled_model.train(training)
        inputs = _inputs(dtype, b, t, step)
        got, want = _run(compiled, *inputs, step), _run(eager, *inputs, step)
        assert len(got) == len(want)
        for i, (a, e) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, e, **TOLERANCE[dtype], msg=lambda m: f"result {i}, step {step}: {m}")
    grads = got[7:7 + 7 + len(list(eager.parameters()))]
    assert all(g.abs().sum() > 0 for g in grads), "a compiled gradient is exactly zero"


class ConvBlock(torch.nn.Module):
    """A conformer-like block of torch layers: conv, batch norm, attention, layer norm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(C, C, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(C)
        self.att = torch.nn.MultiheadAttention(C, 2, batch_first=True)
        self.ln = torch.nn.LayerNorm(C)

    def forward(self, x):
        h = self.bn(self.conv(x)).transpose(1, 2)
        return self.ln(h + self.att(h, h, h, need_weights=False)[0])


SIZES = [(2, 11), (3, 12), (4, 13), (2, 14), (5, 15), (3, 16), (2, 17), (6, 18), (3, 19), (4, 20), (2, 21), (3, 22)]


class _Counting:
    """A Dynamo backend that counts the graphs it compiles (with aot_eager)."""

    def __init__(self):
        self.graphs = 0
        self.backend = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def _padded_batch(b, t, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    return torch.randn(b, C, t, generator=gen), lengths


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_converted_model_runs_every_length_on_at_most_two_graphs(how):
    model = masknorm.convert(ConvBlock().double())
    counting = _Counting()
    compiled = torch.compile(copy.deepcopy(model), backend=counting, dynamic=True if how == "dynamic=True" else None)
    with torch._dynamo.config.patch(recompile_limit=len(SIZES) + 1):
        for i, (b, t) in enumerate(SIZES):
            x, lengths = _padded_batch(b, t, i)
            x = x.double()
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(x, 2)
            results = []
            for m in (compiled, model):
                xi = x.clone().requires_grad_(True)
                with masknorm.padding(lengths=lengths, size=t):
                    out = m(xi)
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(i), dtype=out.dtype)
                results.append([out, *torch.autograd.grad(out, [xi, *m.parameters()], g)])
            for a, e in zip(*results):
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    assert counting.graphs <= 2, f"{counting.graphs} graphs for {len(SIZES)} (batch, length) pairs"


class Exported(torch.nn.Module):
    """The recipe for torch.export: the lengths as an input, the block inside forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, lengths):
        with masknorm.padding(lengths=lengths, size=x.shape[-1]):
            return self.inner(x)


def _dynamic_batch_and_length():
    b, t = torch.export.Dim("b", min=2, max=64), torch.export.Dim("t", min=2, max=4096)
    return {"x": {0: b, 2: t}, "lengths": {0: b}}


def _eager(model, x, lengths):
    with masknorm.padding(lengths=lengths, size=x.shape[-1]):
        return model(x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_with_dynamic_batch_and_length_equals_eager(training):
    model = masknorm.convert(ConvBlock().double()).train(training)
    x, lengths = _padded_batch(3, 9, 0)
    program = torch.export.export(Exported(copy.deepcopy(model)), (x.double(), lengths),
                                  dynamic_shapes=_dynamic_batch_and_length())
    for i, (b, t) in enumerate([(2, 5), (4, 17), (5, 30)]):
        x, lengths = _padded_batch(b, t, 10 + i)
        x = x.double()
        torch.testing.assert_close(program.module()(x, lengths), _eager(copy.deepcopy(model), x, lengths),
                                   rtol=1e-10, atol=1e-10)


def test_onnx_with_dynamic_batch_and_length_equals_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = masknorm.convert(ConvBlock()).eval()
    x, lengths = _padded_batch(3, 9, 0)
    program = torch.onnx.export(Exported(model).eval(), (x, lengths), dynamo=True,
                                dynamic_shapes=_dynamic_batch_and_length(), verbose=False)
    path = tmp_path / "block.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i, (b, t) in enumerate([(2, 5), (4, 17), (5, 30)]):
        x, lengths = _padded_batch(b, t, 10 + i)
        (out,) = session.run(None, {"x": x.numpy(), "lengths": lengths.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), _eager(model, x, lengths).detach(), rtol=1e-5, atol=1e-5)


def test_export_inside_an_outer_block_raises_instead_of_freezing_its_lengths():
    model = masknorm.convert(ConvBlock()).eval()
    x, lengths = _padded_batch(3, 9, 0)
    with masknorm.padding(lengths=lengths, size=9), pytest.raises(RuntimeError, match="frozen into the program"):
        torch.export.export(model, (x,))


def test_export_without_a_block_raises_unless_told_the_inputs_are_not_padded():
    model = masknorm.convert(ConvBlock()).eval()
    x, _ = _padded_batch(3, 9, 0)
    with pytest.raises(RuntimeError, match="would ignore any padding at run time"):
        torch.export.export(model, (x,))
    with masknorm.padding():
        program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), ConvBlock().eval()(x))


class TakesLengths(torch.nn.Module):
    """ConvBlock as torchaudio models are called: forward(x, lengths); converted with padding_from="lengths"."""

    def __init__(self):
        super().__init__()
        self.inner = ConvBlock()

    def forward(self, x, lengths):
        return self.inner(x)


def test_padding_from_compiled_runs_every_length_on_a_fixed_number_of_graphs():
    """The hooks that enter and exit the block compile as frames of their own: 4 graphs for 12 (B, T), none per size."""
    model = masknorm.convert(TakesLengths().double(), padding_from="lengths", time_axis=2)
    counting = _Counting()
    compiled = torch.compile(copy.deepcopy(model), backend=counting, dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=len(SIZES) + 1):
        for i, (b, t) in enumerate(SIZES):
            x, lengths = _padded_batch(b, t, i)
            torch.testing.assert_close(compiled(x.double(), lengths), model(x.double(), lengths), rtol=1e-10, atol=1e-10)
    assert counting.graphs <= 4, f"{counting.graphs} graphs for {len(SIZES)} (batch, length) pairs"


def test_padding_from_export_with_dynamic_batch_and_length_equals_eager():
    model = masknorm.convert(TakesLengths().double(), padding_from="lengths", time_axis=2).eval()
    x, lengths = _padded_batch(3, 9, 0)
    program = torch.export.export(model, (x.double(), lengths), dynamic_shapes=_dynamic_batch_and_length())
    for i, (b, t) in enumerate([(2, 5), (4, 17), (5, 30)]):
        x, lengths = _padded_batch(b, t, 10 + i)
        torch.testing.assert_close(program.module()(x.double(), lengths), _eager(model.inner, x.double(), lengths),
                                   rtol=1e-10, atol=1e-10)


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each call of a masknorm:: fast-path operator (fast/ops.py) with its arguments."""

    NAMES = ("masked_positions", "per_channel", "padded_rows")

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "masknorm" and func._schema.name.split("::")[1].removesuffix("_backward") in self.NAMES:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _layouts(x):
    """x (B, C, T) as the memory layouts a caller may hand over: contiguous, transposed, sliced,
    expanded and channels_last (as a 4-D view)."""
    b, c, t = x.shape
    yield "contiguous", x
    yield "transposed", x.transpose(1, 2).contiguous().transpose(1, 2)
    yield "sliced", torch.cat([x, x], 2)[:, :, ::2]
    yield "expanded", x[:1].expand(b, c, t)
    yield "channels_last", x[..., None].contiguous(memory_format=torch.channels_last)[..., 0]


def _operator_calls(monkeypatch, dtype):
    """Every fast-path operator call a forward and backward of each family makes, on each layout,
    routed as torch.compile routes them (functional._normalize's traced branch)."""
    from masknorm import functional
    from masknorm.fast import padded_rows, per_channel

    monkeypatch.setattr(functional, "_eager_on_data", lambda x: False)
    monkeypatch.setattr(padded_rows, "lanes_may_run", lambda: False)  # the token norms' lane to the kernel
    monkeypatch.setattr(per_channel, "lanes_may_run", lambda: False)  # the batch norms' lane to the kernel
    monkeypatch.setattr(functional, "_compiling_with_ops", lambda x: True)
    gen = torch.Generator().manual_seed(0)
    recorder = _Recorder()
    norms = [masknorm.MaskedBatchNorm1d(C), masknorm.MaskedGroupNorm(2, C), masknorm.MaskedLayerNorm(C),
             masknorm.MaskedRMSNorm(C)]
    for name, x in _layouts(torch.randn(3, C, 6, generator=gen).to(dtype)):
        mask = torch.rand(3, 6, generator=gen) > 0.3
        for norm in norms:
            norm = norm.to(dtype)
            token = isinstance(norm, (masknorm.MaskedLayerNorm, masknorm.MaskedRMSNorm))
            xi = (x.permute(2, 0, 1) if token else x).detach().requires_grad_(True)
            with recorder:
                out = norm(xi, mask.t() if token else mask)
                out.backward(torch.ones_like(out))
        with recorder:
            elementwise = masknorm.masked_norm(x, torch.rand(x.shape, generator=gen) > 0.3, dim=1)
    assert elementwise is not None
    return recorder.calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_every_operator_passes_opcheck(monkeypatch, dtype):
    from masknorm.fast import native

    if native.ops() is None:
        pytest.skip("the fused CPU kernels could not be built")
    calls = _operator_calls(monkeypatch, dtype)
    names = [n for n in _Recorder.NAMES if dtype in (torch.float32, torch.float64) or n != "per_channel"]  # BN: 32/64
    assert {func._schema.name for func, _, _ in calls} == {f"masknorm::{n}{s}" for n in names for s in ("", "_backward")}
    for func, args, kwargs in calls:
        args = [a.detach().requires_grad_(a.is_floating_point() and not func._schema.name.endswith("_backward"))
                if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(func, args, kwargs)
