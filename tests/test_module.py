"""LoRALinear as a drop-in nn.Linear: construction, from_linear, state dict, merge/unmerge."""
import math

import pytest
import torch
from torch import nn

from helpers import DEVICE, assert_close, make_inputs
from lora_fast import LoRALinear
from lora_fast.reference import lora_linear_ref


def _randomize_adapter(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) / math.sqrt(layer.r))


def test_is_a_linear_with_peft_parameters():
    layer = LoRALinear(20, 12, r=4, lora_alpha=8)
    assert isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert layer.scaling == 2.0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.equal(layer.lora_B, torch.zeros(12, 4))
    bound = 1 / math.sqrt(20)                     # kaiming_uniform(a=√5) bound = 1/√fan_in
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert LoRALinear(20, 12, r=16, lora_alpha=8, use_rslora=True).scaling == 8 / 4
    assert LoRALinear(5, 3, bias=False).bias is None
    assert "r=4" in repr(layer) and "scaling=2" in repr(layer)


def test_from_linear_shares_and_matches():
    torch.manual_seed(0)
    linear = nn.Linear(33, 21)
    layer = LoRALinear.from_linear(linear, r=6, lora_alpha=12)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert layer.lora_A.device == linear.weight.device and layer.lora_A.dtype == linear.weight.dtype
    x = torch.randn(3, 7, 33)
    # lora_B = 0 and the CPU path accumulates x @ Wᵀ onto the bias as F.linear does: bit-equal.
    assert torch.equal(layer(x), linear(x))
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_forward_and_training_step_match_reference():
    torch.manual_seed(1)
    layer = LoRALinear(29, 23, r=5, lora_alpha=10, device=DEVICE)
    _randomize_adapter(layer, 2)
    x = torch.randn(4, 9, 29, device=DEVICE)
    y = layer(x)
    assert_close("y", y, lora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias,
                                         layer.scaling), torch.float32)
    y.square().mean().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_unmerge_round_trip_is_bit_exact(dtype):
    torch.manual_seed(3)
    layer = LoRALinear(64, 48, r=8, lora_alpha=16, dtype=dtype)
    _randomize_adapter(layer, 4)
    original = layer.weight.detach().clone()
    x = torch.randn(5, 64, dtype=dtype)
    with torch.no_grad():
        unmerged_out = layer(x).double()
        layer.merge()
        assert layer.merged
        merged_out = layer(x).double()
    expected = (original.float() + layer.scaling * layer.lora_B.float() @ layer.lora_A.float()).to(dtype)
    assert torch.equal(layer.weight, expected), "merge must round W + s·BA (fp32) once"
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert ((merged_out - unmerged_out).norm() / unmerged_out.norm()) < tol
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original), "unmerge must restore the weight bit for bit"
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_dropout_training_reproducible_eval_is_identity():
    torch.manual_seed(5)
    layer = LoRALinear(16, 8, r=4, lora_dropout=0.5)
    _randomize_adapter(layer, 6)
    x = torch.randn(64, 16)
    layer.eval()
    ref = lora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, layer.scaling)
    assert_close("eval", layer(x), ref, torch.float32)
    layer.train()
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    y2 = layer(x)
    assert torch.equal(y1, y2)
    assert (y1.double() - ref).abs().max() > 1e-3, "dropout had no effect in training mode"


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "r: expected a positive integer"),
    ({"r": 2.5}, "r: expected a positive integer"),
    ({"lora_alpha": 0}, "lora_alpha: expected a positive number"),
    ({"lora_dropout": 1.0}, r"lora_dropout: expected a probability in \[0, 1\)"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
])
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(8, 8, **kwargs)
