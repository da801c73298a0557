"""Every module through torch.export with dynamic batch and length, and through ONNX (dynamo
exporter) run by onnxruntime, in train and eval: the exported program and the ONNX model give the
eager module's outputs on sizes other than the ones traced. onnx, onnxscript and onnxruntime are
test-only dependencies (skipped where absent)."""

import copy

import pytest
import torch
from torch.export import Dim

from support.module_cases import MODULES, inputs


class _WithMask(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x, mask):
        return self.norm(x, mask)


def _inputs(layout, b, t, seed):
    return inputs(layout, b, t, torch.Generator().manual_seed(seed))


def _dynamic_shapes(layout):
    b, t = Dim("b", min=2), Dim("t", min=2)
    return {"x": {0: b, 1 if layout == "BTC" else 2: t}, "mask": {0: b, 1: t}}


def _trained(name):
    make, layout = MODULES[name]
    module = make()
    module.train()
    module(*_inputs(layout, 3, 5, 99))  # running statistics away from their initial values
    return module, layout


cases = pytest.mark.parametrize("name", list(MODULES))
modes = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


@cases
@modes
def test_export_with_dynamic_batch_and_length_equals_eager(name, training):
    module, layout = _trained(name)
    module.train(training)
    program = torch.export.export(_WithMask(copy.deepcopy(module)), _inputs(layout, 4, 6, 0),
                                  dynamic_shapes=_dynamic_shapes(layout))
    for b, t in ((4, 6), (3, 11), (7, 2)):
        x, mask = _inputs(layout, b, t, b * t)
        expected = copy.deepcopy(module)(x, mask)
        torch.testing.assert_close(program.module()(x, mask), expected)


@cases
@modes
def test_onnx_model_in_onnxruntime_equals_eager(name, training, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module, layout = _trained(name)
    module.train(training)
    program = torch.onnx.export(_WithMask(copy.deepcopy(module)), _inputs(layout, 4, 6, 0), dynamo=True,
                                dynamic_shapes=_dynamic_shapes(layout), verbose=False)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, t in ((4, 6), (3, 11), (7, 2)):
        x, mask = _inputs(layout, b, t, b * t)
        expected = copy.deepcopy(module)(x, mask).detach()
        (out,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-5)
