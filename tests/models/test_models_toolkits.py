"""Models of three toolkits besides transformers (tests/support/toolkit_models.py: torchaudio's Conformer, fairseq's
wav2vec 2.0, SpeechBrain's TDNN), converted in one line with padding_from and called as their users call
them, with no masknorm.padding block: valid outputs and parameter gradients equal each sequence's alone
(eval) and do not depend on the padding (train), to 1e-12 in float64; stock, they leak. A model that pads
with F.pad before its convolutions raises instead of leaking. The real torchaudio Conformer and wav2vec2
(group-norm extractor) run the same test where torchaudio is installed (CI's torch 2.11 environment).

    python tests/models/test_models_toolkits.py      # the figures: largest difference per model, stock and converted
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn

import masknorm
from masknorm.models.invariance import check_padding_invariance
from support.toolkit_models import FairseqWav2Vec2, SpeechBrainTDNN, TorchaudioConformer

Call = Callable[[nn.Module, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def conformer_call(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """torchaudio: model(input, lengths) -> (output, lengths)."""
    return model(x, lengths)


def fairseq_call(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """fairseq: model(source, padding_mask=True where padded); the frames' lengths by the conv arithmetic."""
    padding_mask = torch.arange(x.shape[1]) >= lengths[:, None]
    return model(x, padding_mask=padding_mask), model._feat_extract_output_lengths(lengths)


def speechbrain_call(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SpeechBrain: model(x, wav_lens) with wav_lens = lengths / T."""
    return model(x, lengths.double() / x.shape[1]), lengths


def _models() -> Dict[str, Tuple[Callable[[], nn.Module], object, Call, Tuple[int, ...], torch.Tensor]]:
    """name -> (make, padding_from, call, input shape (B, T, ...), lengths)."""
    return {
        "torchaudio Conformer (BatchNorm1d)": (TorchaudioConformer, "lengths", conformer_call, (3, 29, 16),
                                               torch.tensor([29, 21, 12])),
        "torchaudio Conformer (GroupNorm)": (lambda: TorchaudioConformer(use_group_norm=True), "lengths",
                                             conformer_call, (3, 29, 16), torch.tensor([29, 21, 12])),
        "fairseq wav2vec 2.0": (FairseqWav2Vec2, "padding_mask", fairseq_call, (3, 300),
                                torch.tensor([300, 231, 160])),
        "SpeechBrain TDNN": (lambda: SpeechBrainTDNN(pad_mode="zeros"), ("wav_lens", "relative_lengths"),
                             speechbrain_call, (3, 40, 12), torch.tensor([40, 31, 17])),
    }


def _valid(y: torch.Tensor, lengths: torch.Tensor) -> List[torch.Tensor]:
    return [y[b, : int(lengths[b])] for b in range(y.shape[0])]


def _run(model: nn.Module, call: Call, x: torch.Tensor, lengths: torch.Tensor,
         weights: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Valid outputs per sequence and the parameter gradients of sum_b <w_b, valid output_b>."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    y, out_lengths = call(model, x, lengths)
    rows = _valid(y, out_lengths)
    loss = sum((w[: r.shape[0]] * r).sum() for w, r in zip(weights, rows))
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [r.detach() for r in rows], [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


def _worst(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    """The largest |a - b| relative to the largest |a| (1 at the least)."""
    scale = max(1.0, max(float(t.abs().max()) for t in a if t.numel()))
    return max(float((p - q).abs().max()) for p, q in zip(a, b) if p.numel()) / scale


def differences(model: nn.Module, call: Call, shape: Tuple[int, ...], lengths: torch.Tensor,
                mode: str) -> Tuple[float, float]:
    """(outputs, gradients): the largest relative difference, eval: batched with garbage in the padding vs
    each sequence alone (gradients: batched vs the sum of the alone ones); train: garbage vs zeros in the
    padding of the same batch. Called with the model's own arguments only: no masknorm.padding block."""
    model = copy.deepcopy(model).double().train(mode == "train")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    valid = (torch.arange(shape[1]) < lengths[:, None]).reshape(shape[:2] + (1,) * (len(shape) - 2))
    zeros = torch.where(valid, x, 0)
    garbage = torch.where(valid, x, 1e3 * torch.randn(shape, generator=gen, dtype=torch.float64))
    weights = [torch.randn((400,) + call(model, x[:1], lengths[:1])[0].shape[2:], generator=gen, dtype=torch.float64)
               for _ in range(shape[0])]
    rows, grads = _run(model, call, garbage, lengths, weights)
    if mode == "train":
        ref_rows, ref_grads = _run(model, call, zeros, lengths, weights)
    else:
        alone = [_run(model, call, x[b:b + 1, : int(lengths[b])], lengths[b:b + 1], weights[b:b + 1])
                 for b in range(shape[0])]
        ref_rows = [r for rows_b, _ in alone for r in rows_b]
        ref_grads = [sum(g) for g in zip(*(grads_b for _, grads_b in alone))]
    return _worst(ref_rows, rows), _worst(ref_grads, grads)


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stock_leaks_and_converted_in_one_line_does_not(name, mode):
    _stock_leaks_converted_does_not(*_models()[name], mode)


def _stock_leaks_converted_does_not(make, padding_from, call, shape, lengths, mode) -> None:
    stock = differences(make(), call, shape, lengths, mode)
    assert max(stock) > 1e-3, stock
    converted = differences(masknorm.convert(make(), padding_from=padding_from), call, shape, lengths, mode)
    assert max(converted) < 1e-12, converted


def test_the_check_names_the_conformer_batch_norm_and_skips_what_the_model_cannot_take():
    """torchaudio's Conformer requires T = the longest length: "padded further" is skipped, with the error."""
    model = TorchaudioConformer()
    x, lengths = torch.randn(3, 29, 16), torch.tensor([29, 21, 12])
    report = check_padding_invariance(model, x, lengths, forward=lambda m, x, mask: m(x, mask.sum(1)))
    further = next(d for d in report.differences if d.scenario.startswith("padded further"))
    assert further.skipped is not None and "skip" in str(report), str(report)
    garbage = next(d for d in report.differences if d.mode == "train" and d.scenario.startswith("garbage"))
    names = [name for name, _ in garbage.modules]
    assert not garbage.ok and "conformer_layers.0.conv.3 (BatchNorm1d)" in names, str(report)
    assert names.index("conformer_layers.0.conv.3 (BatchNorm1d)") < names.index("conformer_layers.1.conv.3 (BatchNorm1d)")
    masknorm.convert(model, padding_from="lengths")
    report = check_padding_invariance(model, x, lengths, forward=lambda m, x, mask: m(x, mask.sum(1)),
                                      scenarios=("batched", "longer", "garbage"))
    assert report.ok and not any(d.skipped for d in report.differences), str(report)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_functional_pad_before_a_convolution_raises_instead_of_leaking(mode):
    make, _, call, shape, lengths = _models()["SpeechBrain TDNN"]
    reflect = masknorm.convert(SpeechBrainTDNN(pad_mode="reflect"), padding_from=("wav_lens", "relative_lengths"))
    with pytest.raises(ValueError, match=r"convs\.0 \(Conv1d\).*\(\d, 12, 44\).*\(40\).*F\.pad"):
        differences(reflect, call, shape, lengths, mode)
    assert max(differences(SpeechBrainTDNN(pad_mode="reflect"), call, shape, lengths, mode)) > 1e-3  # stock: leaks


def main() -> None:
    for name, (make, padding_from, call, shape, lengths) in _models().items():
        for mode in ("train", "eval"):
            stock = differences(make(), call, shape, lengths, mode)
            conv = differences(masknorm.convert(make(), padding_from=padding_from), call, shape, lengths, mode)
            print(f"{name:<36} {mode:<5} stock outputs {stock[0]:.2e} gradients {stock[1]:.2e}   "
                  f"converted outputs {conv[0]:.2e} gradients {conv[1]:.2e}")


if __name__ == "__main__":
    main()


def _torchaudio_models() -> Dict[str, Tuple[Callable[[], nn.Module], object, Call, Tuple[int, ...], torch.Tensor]]:
    """The real torchaudio models (tiny random configs, nothing downloaded): torchaudio's wheels pin one
    torch release, so these run where one matches (CI's torch 2.11 environment installs torchaudio 2.11)."""
    models = pytest.importorskip("torchaudio.models")

    def conformer(group_norm: bool) -> nn.Module:
        torch.manual_seed(0)
        return models.Conformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=3,
                                use_group_norm=group_norm)

    def wav2vec2() -> nn.Module:
        torch.manual_seed(0)
        return models.wav2vec2_model(
            extractor_mode="group_norm", extractor_conv_layer_config=[(8, 10, 5), (8, 3, 2)], extractor_conv_bias=False,
            encoder_embed_dim=16, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=3, encoder_pos_conv_groups=2,
            encoder_num_layers=1, encoder_num_heads=2, encoder_attention_dropout=0.0, encoder_ff_interm_features=32,
            encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
            aux_num_out=None)

    return {
        "torchaudio Conformer (BatchNorm1d)": (lambda: conformer(False), "lengths", conformer_call, (3, 29, 16),
                                               torch.tensor([29, 21, 12])),
        "torchaudio Conformer (GroupNorm)": (lambda: conformer(True), "lengths", conformer_call, (3, 29, 16),
                                             torch.tensor([29, 21, 12])),
        "torchaudio wav2vec2 (group-norm extractor)": (wav2vec2, "lengths", conformer_call, (3, 300),
                                                       torch.tensor([300, 231, 160])),
    }


@pytest.mark.parametrize("name", ["torchaudio Conformer (BatchNorm1d)", "torchaudio Conformer (GroupNorm)",
                                  "torchaudio wav2vec2 (group-norm extractor)"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_real_torchaudio_models_converted_in_one_line(name, mode):
    _stock_leaks_converted_does_not(*_torchaudio_models()[name], mode)
