"""Real models (transformers, tiny random configs, no download): the stock encoders fail the
padding-invariance check, which names the leaking norm; converted they pass to rounding in float64."""

import importlib.util
import pathlib

import pytest
import torch

import masknorm
from masknorm.models.invariance import check_padding_invariance

pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "real_models", pathlib.Path(__file__).resolve().parents[2] / "examples" / "real_models.py")
real_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_models)


@pytest.mark.parametrize("make, mode, scenario, leak", [
    (real_models.wav2vec2_conformer, "eval", "batched, zero padding (vs alone)",
     "feature_extractor.conv_layers.0.layer_norm (GroupNorm)"),
    (real_models.parakeet, "train", "padded further (+33)", "layers.0.conv.norm (BatchNorm1d)"),
])
def test_stock_model_fails_and_the_check_names_the_norm(make, mode, scenario, leak):
    report = check_padding_invariance(**make(), modes=(mode,))
    row = next(d for d in report.differences if d.scenario == scenario)
    assert not row.ok and row.output > 0.1 and row.first_module == leak, str(report)


@pytest.mark.parametrize("make", [real_models.wav2vec2_conformer, real_models.parakeet])
def test_converted_model_is_padding_invariant_to_rounding(make):
    case = make()
    stock_state = {k: v.clone() for k, v in case["model"].state_dict().items()}
    masknorm.convert(case["model"])
    case["model"].load_state_dict(stock_state, strict=True)
    make()["model"].load_state_dict(case["model"].state_dict(), strict=True)
    report = check_padding_invariance(**case)
    assert report.ok, str(report)
    assert len(report.differences) == 5
    assert max(max(d.output, d.gradient) for d in report.differences) < 1e-13, str(report)


def test_gradient_checkpointing_of_a_converted_model_with_the_context_fn():
    case = real_models.parakeet()
    model = masknorm.convert(case["model"]).double().train()
    x, mask = case["x"].double(), torch.arange(67) < case["lengths"][:, None]

    def grads():
        with masknorm.padding(mask=mask):
            out = model(x, attention_mask=mask.long()).last_hidden_state
        return torch.autograd.grad(out.sum(), list(model.parameters()))

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": masknorm.checkpoint_context})
    for a, b in zip(grads(), plain):
        assert torch.equal(a, b)
