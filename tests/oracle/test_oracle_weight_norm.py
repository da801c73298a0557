"""The reference as the oracle for torch's own weight_norm (examples/torch_weight_norm.py): no false
alarm on ordinary rows, and what it finds on rows near overflow/underflow and on zero rows, as the
README reports. If torch changes, these tests say the README's finding is out of date."""

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrizations

import masknorm
from masknorm.reference import verify, verify_weight_norm

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torch_weight_norm.py"
SPEC = importlib.util.spec_from_file_location("torch_weight_norm_example", EXAMPLE)
example = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(example)
BOUND = 8.0  # tests/impl/test_impl_weight_norm.py: masknorm measures at most 3.1 u


def torch_weight_norm(module, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script deprecation inside torch's weight_norm
        return parametrizations.weight_norm(module, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_no_false_alarm_on_ordinary_rows(dtype):
    forward, gradient = example.errors(parametrizations.weight_norm, 1.0, dtype)
    assert forward <= BOUND and gradient <= BOUND


@pytest.mark.parametrize("scale", [1e20, 1e-20, 1e-25])
def test_masknorm_passes_where_torch_is_flagged_in_float32(scale):
    ours = example.errors(masknorm.weight_norm, scale, torch.float32)
    theirs = example.errors(parametrizations.weight_norm, scale, torch.float32)
    assert max(ours) <= BOUND
    assert max(theirs) > 1e3 * BOUND


def test_torch_float32_rows_of_1e20_give_zero_weights_silently():
    v = torch.tensor([[1e20, 2e20, -2e20]])  # ||v|| = 3e20, but its squares overflow float32
    w, grad_v, grad_g = example.weight_and_gradients(parametrizations.weight_norm, v, torch.ones(1, 1),
                                                     torch.tensor([[1.0, 0.0, 0.0]]))
    assert w.tolist() == [[0.0, 0.0, 0.0]] and grad_g.item() == 0.0  # reference: w = [1/3, 2/3, -2/3], grad_g = 1/3


def test_torch_float32_rows_of_1e25_give_inf_weights_and_nan_gradients():
    v = torch.tensor([[1e-25, 2e-25, -2e-25]])  # squares underflow: ||v|| computed as 0
    w, grad_v, _ = example.weight_and_gradients(parametrizations.weight_norm, v, torch.ones(1, 1),
                                                torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.isinf(w).all() and torch.isnan(grad_v).all()


def test_torch_zero_rows_give_nan_and_registration_sets_g_from_overflowing_norms():
    w, grad_v, _ = example.weight_and_gradients(parametrizations.weight_norm, torch.zeros(1, 2), torch.ones(1, 1),
                                                torch.ones(1, 2))
    assert torch.isnan(w).all() and torch.isnan(grad_v).all()
    module = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[3e20, 4e20], [3e-25, 4e-25]]))
    torch_weight_norm(module)
    assert module.parametrizations.weight.original0.flatten().tolist() == [math.inf, 0.0]
    assert torch.isnan(module.weight).all()


def test_torch_dim_minus_one_is_the_whole_tensor_not_the_last_axis():
    module = torch.nn.Linear(3, 2)
    torch_weight_norm(module, dim=-1)
    assert module.parametrizations.weight.original0.shape == ()
    ours = masknorm.weight_norm(torch.nn.Linear(3, 2), dim=-1)
    assert ours.parametrizations.weight.original0.shape == (1, 3)


def test_verify_rows_pass_masknorm_and_fail_torchs_weight_norm(monkeypatch):
    _, forward, gradient = verify_weight_norm.check_case(torch.float32, 0)
    assert forward <= verify.FORWARD_BOUND and gradient <= verify.GRADIENT_BOUND
    monkeypatch.setattr(verify_weight_norm.masknorm, "weight_norm", lambda module, mask: torch_weight_norm(module))
    _, forward, gradient = verify_weight_norm.check_case(torch.float32, 0)
    assert forward > verify.FORWARD_BOUND and gradient > verify.GRADIENT_BOUND
