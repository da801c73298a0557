"""The eager fast paths' own machinery: the fused CPU kernel of the padded-token path (it must be
built where the suite runs, must not depend on the thread count, and must give way to torch's
kernels when it cannot be built); on torch's kernels, the padded rows (a few runs of rows are
copied as slices, many as an index: both must touch exactly the padded rows and give the same
bits); and the batch-norm path's per-channel redo (a channel its fused kernels cannot do exactly
is redone alone, leaving every other channel's bits as they were)."""

import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import masknorm.reference as ref
from masknorm import masked_norm
from masknorm.fast import native
from masknorm.fast.per_channel import _statistics
from masknorm.fast.padded_rows import PaddedRows


def _output_and_grads(x, mask, dim, weight, bias, g, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = masked_norm(leaves[0], mask, dim, weight=leaves[1], bias=leaves[2], **kwargs)
    return (out, *torch.autograd.grad(out, leaves, g))


def _token_case(rows=700, n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen)
    mask = (torch.rand(rows, 1, generator=gen) > 0.3)
    weight, bias, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen), torch.randn(rows, n, generator=gen)
    return x, mask, -1, weight, bias, g


def test_the_fused_kernel_is_built():
    """The suite's fused-kernel cases must not silently run on torch's kernels."""
    assert native.ops() is not None, native.describe()
    assert native.describe().startswith("fused CPU kernel: on")


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_the_fused_kernel_does_not_depend_on_the_thread_count(masked):
    """Weight and bias gradients are summed per block of rows, then across blocks: the same bits
    with one thread as with four."""
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 4):
            torch.set_num_threads(t)
            runs.append(_output_and_grads(*_token_case(), masked=masked))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_strided_inputs_give_the_bits_of_contiguous_ones():
    """A transposed x, a strided weight and a stride-0 upstream gradient (from .sum()) give the fused
    kernel's bits for contiguous copies of the same values."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 5, generator=gen).transpose(1, 2)
    mask = torch.rand(6, 5, 1, generator=gen) > 0.4
    weight, bias = torch.randn(16, generator=gen)[::2], torch.randn(8, generator=gen)

    def run(x, weight):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]  # detach keeps the strides
        out = masked_norm(leaves[0], mask, -1, weight=leaves[1], bias=leaves[2])
        out.sum().backward()
        return (out, *(t.grad for t in leaves))

    assert not x.is_contiguous() and not weight.is_contiguous()
    for a, b in zip(run(x, weight), run(x.contiguous(), weight.contiguous())):
        assert torch.equal(a, b)


@pytest.fixture
def no_compiler(monkeypatch):
    """The fused kernel's build, not yet tried, fails as it does without a C++ compiler."""
    def build():
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(native, "_build", build)
    monkeypatch.setattr(native._State, "tried", False)
    monkeypatch.setattr(native._State, "ops", None)
    monkeypatch.delenv("MASKNORM_KERNELS", raising=False)


def test_a_failed_build_warns_once_and_torchs_kernels_take_over(no_compiler):
    case = _token_case()
    with pytest.warns(RuntimeWarning, match="no C.. compiler here"):
        first = _output_and_grads(*case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _output_and_grads(*case)
    with native.kernels(False):
        on_torch = _output_and_grads(*case)
    for a, b, c in zip(first, again, on_torch):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert "unavailable (RuntimeError: no C++ compiler here)" in native.describe()


def test_masknorm_kernels_1_makes_a_failed_build_an_error(no_compiler, monkeypatch):
    monkeypatch.setenv("MASKNORM_KERNELS", "1")
    with pytest.raises(RuntimeError, match="no C.. compiler here"):
        masked_norm(*_token_case()[:3])


def _runs(valid):
    """The number of maximal runs of False in `valid`, counted in plain Python."""
    return sum(1 for i, v in enumerate(valid) if not v and (i == 0 or valid[i - 1]))


@given(valid=st.lists(st.booleans(), min_size=1, max_size=300))
def test_padded_rows_touch_exactly_the_padded_rows(valid):
    v = torch.tensor(valid)
    rows = PaddedRows(v)
    assert (rows.runs is not None) == (_runs(valid) <= PaddedRows.MAX_RUNS)
    assert rows.any() == (not all(valid))
    src = torch.arange(3.0 * len(valid)).reshape(-1, 3)
    dst = torch.full_like(src, -1.0)
    rows.copy_(dst, src)
    assert torch.equal(dst, torch.where(v[:, None], -1.0, src))
    rows.zero_(dst)
    assert torch.equal(dst, torch.where(v[:, None], -1.0, torch.zeros_like(dst)))
    assert torch.equal(rows.rows, torch.tensor([i for i, ok in enumerate(valid) if ok], dtype=torch.long))


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_slices_and_index_give_the_same_bits(masked, monkeypatch):
    """Every other token padded (150 runs: the index) against the same call with runs allowed."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 150, 16, generator=gen, dtype=torch.float64)
    mask = (torch.arange(150) % 2 == 0).reshape(1, 150, 1).expand(2, 150, 1)
    weight, bias = torch.randn(16, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def run():
        with native.kernels(False):
            return _output_and_grads(x, mask, -1, weight, bias, g, masked=masked)

    assert PaddedRows(mask.flatten()).runs is None
    by_index = run()
    monkeypatch.setattr(PaddedRows, "MAX_RUNS", 10**9)
    assert PaddedRows(mask.flatten()).runs is not None
    for a, b in zip(run(), by_index):
        assert torch.equal(a, b)


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_a_redone_channel_leaves_the_others_bitwise(masked):
    """Channel 1 scaled by 1e-12 in float32 (its variance, 1e-24, is below the fused kernels' exact
    range) is redone with the general statistics: channels 0 and 2 keep their bits, in the output
    and every gradient, and channel 1 is within the accuracy bound of the reference."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, generator=gen)
    mask = torch.rand(4, 1, 8, generator=gen) > 0.3
    weight, bias = torch.randn(3, 1, generator=gen), torch.randn(3, 1, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    tiny = x.clone()
    tiny[:, 1] *= 1e-12
    assert _statistics(tiny, mask, (0, 2), 0, 1e-30)[3].flatten().tolist() == [False, True, False]
    kwargs = dict(eps=1e-30, masked=masked)
    plain, redone = _output_and_grads(x, mask, (0, 2), weight, bias, g, **kwargs), \
        _output_and_grads(tiny, mask, (0, 2), weight, bias, g, **kwargs)
    for a, b in zip(plain, redone):
        assert torch.equal(a[..., [0, 2], :], b[..., [0, 2], :]) if a.dim() == 3 else torch.equal(a[[0, 2]], b[[0, 2]])
    expected = ref.masked_norm(tiny.double(), mask, (0, 2), weight=weight.double(), bias=bias.double(), **kwargs)
    kappa = ref.kappa(tiny.double(), mask, (0, 2), eps=1e-30)
    assert ref.max_error_in_ukappa(redone[0], torch.from_numpy(expected), kappa, weight=weight.expand_as(x),
                                   bias=bias.expand_as(x).double()) <= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_padded_token_layer_and_rms_norm_take_the_fused_kernel(dtype, center):
    """Layer and RMS norm with token masks, in float32 and (computed in float32) float16/bfloat16,
    run on the fused kernel (one operator call, padded_rows_norm, whose autograd node is C++:
    PaddedRowsNormBackward); with the kernel off, float32 layer norm runs on torch's kernels and the
    others on the general path.
    (Their accuracy: test_impl_accuracy's padded-token layouts.)"""
    x, mask, _, weight, bias, _ = _token_case(rows=40, n=24)
    x, weight, bias = (t.to(dtype) for t in (x, weight, bias))
    assert _path_of(x, mask, weight, bias, center) == "PaddedRowsNormBackward"
    with native.kernels(False):
        assert _path_of(x, mask, weight, bias, center) == (
            "PaddedRowsFunctionBackward" if center and dtype == torch.float32 else "MaskedNormFunctionWithJvpBackward")


def _path_of(x, mask, weight, bias, center) -> str:
    """The name of the autograd node masked_norm's output comes from: the path it took."""
    return masked_norm(x.clone().requires_grad_(), mask, -1, weight=weight, bias=bias, center=center).grad_fn.name()


def test_a_remeasured_channel_leaves_the_others_bitwise():
    """A channel whose first mean is off (here [0, 0, 6.6e-34]: the matrix-product mean rounds away
    from the tiny spread) is measured again around its corrected mean, alone: the other channel's
    output keeps the bits it has when that channel holds zeros. (Found by the groups-independence
    property: the second pass used to run for every channel.)"""
    x = torch.tensor([[[0.0], [0.0]], [[0.0], [0.0]], [[1.0], [6.5792e-34]]])
    x_other = x.clone()
    x_other[:, 1] = 0
    bias = torch.zeros(2, 1)
    out, out_other = (masked_norm(t, None, (0, 2), eps=1e-5, bias=bias) for t in (x, x_other))
    assert torch.equal(out[:, 0], out_other[:, 0])


def test_masknorm_imported_under_another_default_device_runs_the_token_path():
    """The token path's constants are made at import; a default device set then (meta here) must
    not become theirs, or every later CPU call would fail on mixed devices."""
    code = (
        "import torch; torch.set_default_device('meta'); import masknorm; torch.set_default_device('cpu'); "
        "x = torch.randn(2, 4, 8); out = masknorm.MaskedLayerNorm(8)(x, torch.tensor([[1, 1, 1, 0]] * 2).bool()); "
        "assert torch.allclose(out[:, :3], torch.nn.functional.layer_norm(x, (8,))[:, :3], atol=1e-6)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
