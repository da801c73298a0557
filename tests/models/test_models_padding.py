"""masknorm.convert and masknorm.padding on small torch models: types, state, masks through strided layers,
errors, threads, checkpointing, compile; and the padding-invariance check finding the leaks it should."""

import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils.checkpoint import checkpoint

import masknorm
from masknorm.models.invariance import check_padding_invariance


def toy(channels: int = 10) -> nn.Sequential:
    """Strided conv, batch/group norm over time, a 'same' conv that reads neighbours, pooling, instance norm."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(4, channels, 3, stride=2), nn.BatchNorm1d(channels), nn.GroupNorm(2, channels),
        nn.Conv1d(channels, channels, 5, padding=2), nn.MaxPool1d(3, 2, padding=1),
        nn.InstanceNorm1d(channels, affine=True), nn.AvgPool1d(3, 1, padding=1), nn.GroupNorm(5, channels),
    )


X = torch.randn(3, 4, 23, generator=torch.Generator().manual_seed(1))
LENGTHS = torch.tensor([23, 17, 12])


def test_masked_batch_and_instance_norms_are_torch_types():
    for cls, parents in ((masknorm.MaskedBatchNorm2d, (_BatchNorm, nn.BatchNorm2d)),
                         (masknorm.MaskedInstanceNorm1d, (_InstanceNorm, nn.InstanceNorm1d))):
        assert all(isinstance(cls(4), p) for p in parents)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(masknorm.MaskedBatchNorm1d(4)))
    assert type(synced[0]) is nn.SyncBatchNorm


def test_convert_keeps_parameters_buffers_mode_and_state_dict():
    stock = toy().double().eval()
    params = {n: p for n, p in stock.named_parameters()}
    state = {k: v.clone() for k, v in stock.state_dict().items()}
    converted = masknorm.convert(stock)
    assert converted is stock and not converted.training
    assert [type(m).__name__ for m in converted][1:3] == ["MaskedBatchNorm1d", "MaskedGroupNorm"]
    assert all(p is params[n] and p.dtype == torch.float64 for n, p in converted.named_parameters())
    assert converted.state_dict().keys() == state.keys()
    converted.load_state_dict(state, strict=True)
    toy().load_state_dict(converted.state_dict(), strict=True)


def test_convert_every_torch_norm_and_leave_subclasses():
    class Custom(nn.LayerNorm):
        pass

    norms = [nn.LayerNorm(4), nn.RMSNorm(4), nn.GroupNorm(2, 4), nn.BatchNorm1d(4), nn.BatchNorm2d(4),
             nn.BatchNorm3d(4), nn.InstanceNorm1d(4), nn.InstanceNorm2d(4), nn.InstanceNorm3d(4), Custom(4)]
    model = masknorm.convert(nn.ModuleList(norms))
    assert [type(m).__name__ for m in model] == [
        "MaskedLayerNorm", "MaskedRMSNorm", "MaskedGroupNorm", "MaskedBatchNorm1d", "MaskedBatchNorm2d",
        "MaskedBatchNorm3d", "MaskedInstanceNorm1d", "MaskedInstanceNorm2d", "MaskedInstanceNorm3d", "Custom"]
    with pytest.raises(TypeError, match="nn.Module"):
        masknorm.convert(lambda x: x)


def test_outside_a_block_the_converted_model_computes_what_the_stock_one_did():
    stock, converted = toy(), masknorm.convert(toy())
    for mode in (True, False):
        stock.train(mode), converted.train(mode)
        with warnings.catch_warnings():  # training with no padding information warns (tested on its own)
            warnings.filterwarnings("ignore", "masknorm: .* no padding information", UserWarning)
            torch.testing.assert_close(converted(X), stock(X))


def test_each_norm_gets_the_mask_of_its_own_input_after_strided_layers():
    model = masknorm.convert(toy()).double().eval()
    x = X.double()
    with masknorm.padding(lengths=LENGTHS):
        batched = model(x)
    for b in range(3):
        alone = model(x[b:b + 1, :, : int(LENGTHS[b])])  # outside a block: no padding at all
        assert (batched[b:b + 1, :, : alone.shape[-1]] - alone).abs().max() < 1e-13


def test_stock_fails_the_check_naming_the_norm_and_converted_passes():
    stock = check_padding_invariance(toy(), X, LENGTHS, time_axis=2)
    assert not stock.ok
    eval_rows = [d for d in stock.differences if d.mode == "eval"]
    assert all(not d.ok and d.first_module == "2 (GroupNorm)" for d in eval_rows), str(stock)
    train_rows = [d for d in stock.differences if d.mode == "train"]
    assert train_rows[0].first_module == "1 (BatchNorm1d)", str(stock)
    converted = check_padding_invariance(masknorm.convert(toy()), X, LENGTHS, time_axis=2)
    assert converted.ok, str(converted)
    assert max(max(d.output, d.gradient) for d in converted.differences) < 1e-13
    assert "PASS" in str(converted) and "FAIL" in str(stock)


def test_without_zeroing_the_check_finds_the_convolution_reading_padding():
    report = check_padding_invariance(masknorm.convert(toy(), convolutions=False), X, LENGTHS, time_axis=2)
    garbage = [d for d in report.differences if d.scenario.startswith("garbage")]
    assert garbage and all(d.first_module == "3 (Conv1d)" for d in garbage), str(report)


def test_train_mode_batch_norm_is_padding_invariant_not_batch_invariant():
    model = masknorm.convert(nn.Sequential(nn.Conv1d(4, 5, 1), nn.BatchNorm1d(5))).double().train()
    x = X.double()
    with masknorm.padding(lengths=LENGTHS):
        batched = model(x)
    with masknorm.padding(lengths=LENGTHS[1:2]):
        alone = model(x[1:2, :, :17])
    assert (batched[1:2, :, :17] - alone).abs().max() > 0.1  # the batch-mates are in the statistics, by design
    report = check_padding_invariance(model, X, LENGTHS, time_axis=2, modes=("train",))
    assert report.ok, str(report)


def test_a_norm_that_cannot_find_its_mask_raises_naming_module_and_shapes():
    flat = masknorm.convert(nn.Sequential(nn.Conv1d(4, 6, 1), nn.Flatten(0, 1), nn.LayerNorm(23)))
    with masknorm.padding(lengths=LENGTHS), pytest.raises(ValueError, match=r"2 \(MaskedLayerNorm\).*\(18, 23\)"):
        flat(X)
    square = masknorm.convert(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    with masknorm.padding(lengths=torch.tensor([5, 3])), pytest.raises(ValueError, match=r"axes \[2, 3\]"):
        square(torch.randn(2, 1, 5, 5))


def test_custom_subsampling_is_stated_with_add_and_a_norm_with_at():
    class EveryOther(nn.Module):
        def forward(self, x):
            return x[:, :, ::2]

    model = masknorm.convert(nn.Sequential(EveryOther(), nn.GroupNorm(2, 4)))
    with masknorm.padding(lengths=LENGTHS), pytest.raises(ValueError, match="cannot determine its mask"):
        model(X)
    with masknorm.padding(lengths=LENGTHS).add(lengths=(LENGTHS + 1) // 2, size=12):
        stated = model(X)
    with masknorm.padding(lengths=LENGTHS).at(model[1], lambda x: torch.arange(12) < ((LENGTHS + 1) // 2)[:, None]):
        by_rule = model(X)
    expected = masknorm.MaskedGroupNorm(2, 4)(X[1:2, :, :17:2])
    torch.testing.assert_close(stated[1:2, :, :9], expected)
    torch.testing.assert_close(by_rule, stated)


def test_a_mask_that_is_not_a_prefix_works_at_its_own_resolution_only():
    mask = torch.ones(3, 23, dtype=torch.bool)
    mask[1, :4] = False
    norm_only = masknorm.convert(nn.Sequential(nn.GroupNorm(2, 4)))
    with masknorm.padding(mask=mask):
        out = norm_only(X)
    torch.testing.assert_close(out[1:2, :, 4:], masknorm.MaskedGroupNorm(2, 4)(X[1:2, :, 4:]))
    with masknorm.padding(mask=mask), pytest.raises(ValueError, match="not a prefix"):
        masknorm.convert(toy())(X)


def test_bad_padding_arguments():
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        masknorm.padding(lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor.*\.bool\(\)"):
        masknorm.padding(mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        masknorm.padding(size=3)
    with pytest.raises(ValueError, match="add\\(\\): padding\\(\\) without lengths or mask"):
        masknorm.padding().add(lengths=torch.tensor([1, 2]), size=3)
    with pytest.raises(ValueError, match="lengths must lie in"):
        masknorm.padding(lengths=torch.tensor([4, 2]), size=3)


def test_a_convolution_that_pads_with_its_own_values_raises_inside_a_block():
    model = masknorm.convert(nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")))
    model(X)
    with masknorm.padding(lengths=LENGTHS), pytest.raises(ValueError, match="cannot be made padding-invariant"):
        model(X)


@pytest.mark.parametrize("pool", [
    nn.MaxPool1d(2, ceil_mode=True), nn.MaxPool1d(3, 2, padding=1, ceil_mode=True), nn.AvgPool1d(2, ceil_mode=True),
    nn.AvgPool1d(3, 2, padding=1, ceil_mode=True), nn.AvgPool1d(3, padding=1, count_include_pad=False),
    nn.AvgPool1d(4, 3, padding=2, ceil_mode=True, count_include_pad=False)], ids=repr)
def test_ceil_mode_and_exclusive_average_pooling_equal_each_sequence_alone(pool):
    """Lengths by torch's ceil-mode formula; average pooling's last windows divide by their count alone."""
    model = masknorm.convert(nn.Sequential(pool, nn.GroupNorm(2, 4))).double().eval()
    x = X.double()
    garbage = torch.where(torch.arange(23) < LENGTHS[:, None, None], x, 1e3)
    with masknorm.padding(lengths=LENGTHS):
        batched = model(garbage)
    for b in range(3):
        alone = model(x[b:b + 1, :, : int(LENGTHS[b])])
        assert (batched[b:b + 1, :, : alone.shape[-1]] - alone).abs().max() < 1e-13


@pytest.mark.parametrize("change", ["reflect pad", "zero pad", "slice", "reshape"])
def test_an_unseen_change_of_the_time_axis_before_a_convolution_raises_naming_it(change):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4)

        def forward(self, x):
            if change.endswith("pad"):
                x = torch.nn.functional.pad(x, (1, 1), mode="reflect" if change == "reflect pad" else "constant")
            elif change == "slice":
                x = x[:, :, 1:]
            else:
                x = x.reshape(x.shape[0], 4, 2, -1)[:, :, 0, :]  # (B, 4, 22) -> (B, 4, 11)
            return self.norm(self.conv(x))

    model = masknorm.convert(Encoder())
    with masknorm.padding(lengths=torch.tensor([22, 17, 12]), size=22), \
            pytest.raises(ValueError, match=r"conv \(Conv1d\) reads neighbours.*input of shape \(3, 4, \d+\).*\(22\)"):
        model(X[..., :22])


def test_padding_mask_is_the_inverse_of_mask():
    model = masknorm.convert(toy()).double()
    mask = torch.arange(23) < LENGTHS[:, None]
    with masknorm.padding(mask=mask):
        expected = model(X.double())
    with masknorm.padding(padding_mask=~mask):
        torch.testing.assert_close(model(X.double()), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        masknorm.padding(mask=mask, padding_mask=~mask)
    with pytest.raises(TypeError, match=r"padding_mask must be a bool tensor.*True = padding"):
        masknorm.padding(padding_mask=(~mask).double())


class Conventions(nn.Module):
    """A model taking its padding in any of the four conventions (it ignores them: the hook reads them)."""

    def __init__(self):
        super().__init__()
        self.inner = toy()

    def forward(self, x, attention_mask=None, lengths=None, key_padding_mask=None, wav_lens=None):
        return self.inner(x)


@pytest.mark.parametrize("padding_from, argument", [
    ("attention_mask", lambda m: m.long()), (("attention_mask", "valid_mask"), lambda m: m),
    ("lengths", lambda m: m.sum(1)), ("key_padding_mask", lambda m: ~m),
    (("key_padding_mask", "padding_mask"), lambda m: (~m).int()), ("wav_lens", lambda m: m.sum(1) / 23.0)])
def test_padding_from_each_convention_equals_the_explicit_block(padding_from, argument):
    model = masknorm.convert(Conventions().double(), padding_from=padding_from, time_axis=2)
    mask = torch.arange(23) < LENGTHS[:, None]
    with masknorm.padding(lengths=LENGTHS):
        expected = model(X.double())
    name = padding_from if isinstance(padding_from, str) else padding_from[0]
    torch.testing.assert_close(model(X.double(), **{name: argument(mask)}), expected, rtol=0, atol=0)
    assert masknorm.models.padding_context.current() is None


def test_padding_from_positional_argument_and_none_means_unpadded():
    model = masknorm.convert(Conventions().double().eval(), padding_from="attention_mask", time_axis=2)
    mask = torch.arange(23) < LENGTHS[:, None]
    with masknorm.padding(mask=mask):
        expected = model(X.double())
    torch.testing.assert_close(model(X.double(), mask), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(X.double()), toy().double().eval()(X.double()))  # None: nothing padded
    with masknorm.padding(mask=mask):  # None inside a block: the block applies
        torch.testing.assert_close(model(X.double()), expected, rtol=0, atol=0)


def test_padding_from_wrong_conventions_raise_naming_the_argument():
    mask = torch.arange(23) < LENGTHS[:, None]
    cases = [("attention_mask", dict(attention_mask=mask.float()), TypeError, r"'attention_mask' must be \(B, T\)"),
             ("attention_mask", dict(attention_mask=LENGTHS), TypeError, "convention 'lengths'"),
             ("lengths", dict(lengths=mask), TypeError, r"'lengths' must be \(B,\) integer"),
             ("lengths", dict(lengths=LENGTHS / 23), TypeError, "convention 'relative_lengths'"),
             ("lengths", dict(lengths=LENGTHS + 1), ValueError, r"exceed T = 23.*time_axis=2"),
             ("wav_lens", dict(wav_lens=LENGTHS), TypeError, "convention 'lengths'"),
             ("wav_lens", dict(wav_lens=LENGTHS / 20), ValueError, r"\[0, 1\]")]
    for padding_from, kwargs, error, match in cases:
        model = masknorm.convert(Conventions(), padding_from=padding_from, time_axis=2)
        with pytest.raises(error, match=match):
            model(X, **kwargs)
        assert masknorm.models.padding_context.current() is None and masknorm.models.padding_from._entered() == []
    with pytest.raises(ValueError, match=r"name it: padding_from=\('mask', convention\)"):
        masknorm.convert(Conventions(), padding_from="mask")
    with pytest.raises(ValueError, match="unknown convention 'valid'"):
        masknorm.convert(Conventions(), padding_from=("attention_mask", "valid"))
    with pytest.raises(ValueError, match="has no argument 'src_key_padding_mask'"):
        masknorm.convert(Conventions(), padding_from="src_key_padding_mask")
    lengths_first = masknorm.convert(Conventions(), padding_from="lengths")  # time_axis=1 is the channels here
    with pytest.raises(ValueError, match=r"T = 4, the size of argument 'x' along time_axis=1"):
        lengths_first(X, lengths=LENGTHS)


def test_padding_from_exits_when_the_model_raises_and_nests():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = masknorm.convert(Conventions(), padding_from="lengths", time_axis=2)

        def forward(self, x, lengths):
            seen = masknorm.models.padding_context.current().block.lengths
            inner_out = self.inner(x[:1], lengths=torch.tensor([5]))  # its own block on top, popped after
            assert masknorm.models.padding_context.current().block.lengths is seen
            if lengths[0] == 3:
                raise RuntimeError("model failure")
            return inner_out

    outer = masknorm.convert(Outer(), padding_from="lengths", time_axis=2)
    outer(X, LENGTHS)
    with pytest.raises(RuntimeError, match="model failure"):
        outer(X, torch.tensor([3, 2, 3]))
    with pytest.raises(ValueError, match="lengths must lie in"):  # raised by the hook itself
        outer(X, torch.tensor([-1, 2, 3]))
    assert masknorm.models.padding_context.current() is None and masknorm.models.padding_from._entered() == []
    masknorm.convert(outer)  # padding_from=None removes the hooks
    assert not outer._forward_pre_hooks and not outer._forward_hooks


def test_padding_from_two_threads_one_model():
    model = masknorm.convert(Conventions().double().eval(), padding_from="lengths", time_axis=2)
    cases = [LENGTHS, torch.tensor([9, 23, 12])]
    expected = [model(X.double(), lengths=lengths) for lengths in cases]
    assert two_threads(lambda i: torch.equal(model(X.double(), lengths=cases[i]), expected[i])) == []
    assert not torch.equal(*expected)


def test_a_converted_norm_training_without_padding_warns_once(monkeypatch):
    monkeypatch.setattr(masknorm.models.padding_context, "_unpadded_warned", False)
    model = masknorm.convert(toy())
    with pytest.warns(UserWarning, match=r"1 \(MaskedBatchNorm1d\).*padding_from=.*masknorm.padding\(\)"):
        model(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(X)  # once
        monkeypatch.setattr(masknorm.models.padding_context, "_unpadded_warned", False)
        model.eval()(X)  # eval: inference on unpadded inputs is ordinary
        with masknorm.padding():
            model.train()(X)  # stated: nothing is padded
        masknorm.MaskedBatchNorm1d(10)(torch.randn(3, 10, 5))  # a module built by hand: mask=None is all valid
        torch.compile(model, backend="eager", fullgraph=True)(X)  # no warning, no graph break


def test_two_threads_one_model_different_padding():
    model = masknorm.convert(toy()).double().eval()
    x = X.double()
    cases = [LENGTHS, torch.tensor([9, 23, 12])]
    expected = []
    for lengths in cases:
        with masknorm.padding(lengths=lengths):
            expected.append(model(x))

    def same(i):
        with masknorm.padding(lengths=cases[i]):
            return torch.equal(model(x), expected[i])

    assert two_threads(same) == []


def two_threads(same):
    """Run same(0) in one thread and same(1) in another, 30 times each; the i of every run that returned False."""
    wrong = []

    def worker(i):
        for _ in range(30):
            if not same(i):
                wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wrong


def test_gradient_checkpointing_reenters_the_block():
    model = masknorm.convert(toy()).double()
    x = X.double().requires_grad_(True)

    def grads(use_checkpoint):
        with masknorm.padding(lengths=LENGTHS):
            out = checkpoint(model, x, use_reentrant=False, context_fn=masknorm.checkpoint_context) \
                if use_checkpoint else model(x)
        return torch.autograd.grad(out.sum(), [x, *model.parameters()])

    for a, b in zip(grads(True), grads(False)):
        assert torch.equal(a, b)


def test_compiled_model_in_a_block_has_no_graph_break_and_equals_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = masknorm.convert(toy()).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for lengths in (LENGTHS, torch.tensor([20, 23, 5]), torch.tensor([1, 2, 3])):
        with masknorm.padding(lengths=lengths, size=23):
            torch.testing.assert_close(compiled(X), model(X))
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1  # a new padding of the same size is no recompile


class WithPadding(nn.Module):
    """What torch.export needs: the lengths as an input, the block inside forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with masknorm.padding(lengths=lengths, size=x.shape[-1]):
            return self.inner(x)


def test_export_with_the_block_inside_forward():
    """In float64, so that eager mode's fused kernels and the exported general path agree to rounding."""
    model = masknorm.convert(toy()).double().eval()
    x = X.double()
    exported = torch.export.export(WithPadding(model), (x, LENGTHS))
    assert not exported.constants
    for lengths in (LENGTHS, torch.tensor([5, 9, 13])):
        with masknorm.padding(lengths=lengths, size=23):
            expected = model(x)
        torch.testing.assert_close(exported.module()(x, lengths), expected, rtol=1e-12, atol=1e-12)


def toy_case():
    """A target for `masknorm invariance test_models_padding:toy_case`."""
    return dict(model=toy(), x=X, lengths=LENGTHS, time_axis=2, name="toy")


def test_command_line_exit_status_and_report(capsys):
    from masknorm_cli import main

    assert main(["invariance", "test_models_padding:toy_case", "--modes", "eval"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["invariance", "test_models_padding:toy_case", "--convert"]) == 0
    assert "toy after masknorm.convert: PASS" in capsys.readouterr().out
    assert main(["invariance", "test_models_padding:nothing"]) == 2
    assert main(["invariance", "test_models_padding:toy_case", "--modes", "test"]) == 2


def test_the_check_lists_every_module_whose_outputs_change_in_model_order():
    report = check_padding_invariance(toy(), X, LENGTHS, time_axis=2, modes=("train",))
    garbage = next(d for d in report.differences if d.scenario.startswith("garbage"))
    names = [name for name, _ in garbage.modules]
    assert names[0] == "model (Sequential)" and garbage.first_module == "1 (BatchNorm1d)", names
    assert names[1:] == ["1 (BatchNorm1d)", "2 (GroupNorm)", "3 (Conv1d)", "4 (MaxPool1d)", "5 (InstanceNorm1d)",
                         "6 (AvgPool1d)", "7 (GroupNorm)"], names  # the stock conv 0 zero-pads: unchanged
    assert all(d > 1e-6 for _, d in garbage.modules)
    assert "modules whose valid outputs change (model order)" in str(report)


def test_the_check_skips_a_scenario_the_model_raises_on_or_runs_the_chosen_ones():
    class Longest(nn.Module):
        """Requires T = the longest length, as torchaudio's Conformer."""

        def __init__(self):
            super().__init__()
            self.inner = masknorm.convert(toy())

        def forward(self, x, mask):
            if mask[:, -1].sum() == 0:
                raise ValueError("padded past the longest sequence")
            return self.inner(x)

    report = check_padding_invariance(Longest(), X, LENGTHS, time_axis=2, forward=lambda m, x, mask: m(x, mask))
    skipped = [d for d in report.differences if d.skipped]
    assert [d.scenario for d in skipped] == ["padded further (+11)"] and report.ok, str(report)
    assert "skip train padded further" in str(report) and "padded past the longest" in str(report)
    chosen = check_padding_invariance(Longest(), X, LENGTHS, time_axis=2, forward=lambda m, x, mask: m(x, mask),
                                      scenarios=("garbage",))
    assert [(d.mode, d.scenario) for d in chosen.differences] == [
        ("train", "garbage in the padding"), ("eval", "garbage in the padding (vs alone)")]
    with pytest.raises(ValueError, match="scenarios must be a non-empty subset"):
        check_padding_invariance(toy(), X, LENGTHS, time_axis=2, scenarios=("padded",))
    nothing = check_padding_invariance(Longest(), X, LENGTHS, time_axis=2, forward=lambda m, x, mask: m(x, mask),
                                       scenarios=("further",), modes=("train",))
    assert not nothing.ok  # nothing compared is no pass


def test_the_check_errors_name_time_axis():
    with pytest.raises(ValueError, match=r"padded along time_axis=1 \(pass time_axis="):
        check_padding_invariance(toy(), X, LENGTHS)
    with pytest.raises(ValueError, match=r"cannot determine its mask.*along time_axis=1: if that is not its time axis"):
        check_padding_invariance(masknorm.convert(nn.GroupNorm(2, 4)), X, torch.tensor([4, 3, 2]), time_axis=1)


def test_the_invariance_command_needs_torch_only(tmp_path):
    """With hypothesis, sympy and mpmath unimportable the command still runs (exit 0 for a converted model)."""
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('hypothesis', 'sympy', 'mpmath'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked)')\n"
        "sys.meta_path.insert(0, Block())\n")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), here]))
    run = subprocess.run([sys.executable, "-m", "masknorm_cli", "invariance", "test_models_padding:toy_case",
                          "--convert", "--modes", "eval", "--scenarios", "batched"],
                         env=env, capture_output=True, text=True, cwd=here, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "toy after masknorm.convert: PASS" in run.stdout
