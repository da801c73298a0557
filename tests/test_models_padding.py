"""masknorm.convert and masknorm.padding on small torch models: types, state, masks through strided layers,
errors, threads, checkpointing, compile; and the padding-invariance check finding the leaks it should."""

import threading

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils.checkpoint import checkpoint

import masknorm
from masknorm.invariance import check_padding_invariance


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


def test_layers_that_cannot_be_made_invariant_raise_inside_a_block():
    for layer in (nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), nn.MaxPool1d(2, ceil_mode=True),
                  nn.AvgPool1d(3, padding=1, count_include_pad=False)):
        model = masknorm.convert(nn.Sequential(layer))
        model(X)
        with masknorm.padding(lengths=LENGTHS), pytest.raises(ValueError, match="cannot be made padding-invariant"):
            model(X)


def test_two_threads_one_model_different_padding():
    model = masknorm.convert(toy()).double().eval()
    x = X.double()
    cases = [LENGTHS, torch.tensor([9, 23, 12])]
    expected = []
    for lengths in cases:
        with masknorm.padding(lengths=lengths):
            expected.append(model(x))
    wrong = []

    def worker(i):
        for _ in range(30):
            with masknorm.padding(lengths=cases[i]):
                if not torch.equal(model(x), expected[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


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
    from masknorm.cli import main

    assert main(["invariance", "test_models_padding:toy_case", "--modes", "eval"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["invariance", "test_models_padding:toy_case", "--convert"]) == 0
    assert "toy after masknorm.convert: PASS" in capsys.readouterr().out
    assert main(["invariance", "test_models_padding:nothing"]) == 2
    assert main(["invariance", "test_models_padding:toy_case", "--modes", "test"]) == 2
