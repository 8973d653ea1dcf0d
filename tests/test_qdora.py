"""DoRA on 4-bit layers (QDoRA: PEFT's use_dora on a bitsandbytes NF4 Linear4bit).

- the norms from the codes: NF4Weight.dequantize_rows decodes row ranges bit for bit as
  dequantize() does; the norm of W0 + s·B·A from row chunks equals the decoded sum's, and a step
  allocates no (out, in) tensor beyond the forward's own decode;
- the layer: a new QDoRA layer is its 4-bit base exactly, then forward and the gradients of x, A, B
  and the magnitude equal the float64 reference over the decoded weight (both dropout forms, with
  one given mask), on the torch path and, under the interpreter, the kernels (the 4-bit LoRA passes
  with the scale composed around them); merge / unmerge / merge_and_unload;
- against PEFT's QDoRA on a bitsandbytes tiny Llama: logits and the A, B and magnitude gradients,
  and adapters saved by one loaded by the other.
"""
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fast
from helpers import assert_close
from lora_fast import dora, nf4, qlora, reference
from lora_fast.tolerances import bound, rel_err
from test_qlora import TARGETS, _bnb_llama, tokens

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(7, 74), (5, 64), (9, 96), (3, 130), (1, 2)])
def test_dequantize_rows_is_dequantize_bit_for_bit(shape, double_quant):
    q = nf4.quantize_nf4(torch.randn(*shape, generator=torch.Generator().manual_seed(1)), double_quant=double_quant)
    full = q.dequantize(torch.float32)
    out = shape[0]
    for start, stop in [(0, out), (0, 1), (out - 1, out), (1, max(1, out - 1)), (0, 0), (out, out)]:
        got = q.dequantize_rows(start, stop, torch.float32)
        assert got.shape == (stop - start, shape[1]) and torch.equal(got, full[start:stop]), (start, stop)
    for bad in [(-1, 1), (2, 1), (0, out + 1), (0.0, 1)]:
        with pytest.raises(ValueError, match="start, stop"):
            q.dequantize_rows(*bad)


def _layer(out=48, inp=64, r=3, bias=True, dropout=0.0, form="peft", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    base = qlora.Linear4bit.from_linear(nn.Linear(inp, out, bias=bias), double_quant=True, compute_dtype=dtype)
    layer = qlora.LoRALinear4bit.from_4bit(base, r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=True,
                                           dora_dropout=form)
    return base, layer


def test_a_new_qdora_layer_is_its_4bit_base_and_the_magnitude_the_decoded_row_norms():
    base, layer = _layer()
    x = torch.randn(5, 64)
    assert layer.use_dora and layer.lora_magnitude_vector.shape == (48,)
    w = layer.dense_weight(torch.float32).double()
    assert_close("magnitude", layer.lora_magnitude_vector, torch.linalg.vector_norm(w, dim=1), torch.float32)
    with torch.no_grad():
        assert_close("y", layer(x), base(x), torch.float32)


def _randomize(layer, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.out_features, generator=g))


def test_the_norms_from_row_chunks_equal_the_decoded_sum_s(monkeypatch):
    _, layer = _layer(out=50, inp=66)
    _randomize(layer)
    monkeypatch.setattr(dora, "_CHUNK_ELEMENTS", 66 * 7)   # several row chunks, a short last one
    w = layer.dense_weight(torch.float32).double()
    want = torch.linalg.vector_norm(w + layer.scaling * layer.lora_B.double() @ layer.lora_A.double(), dim=1)
    assert_close("norm", layer.dora_norm(), want, torch.float32)
    assert_close("base_sq", layer.dora_base_sq(), torch.linalg.vector_norm(w, dim=1).square(), torch.float32)


BACKENDS = ["torch"] + (["triton"] if INTERPRETED else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,form", [(0.0, "peft"), (0.3, "peft"), (0.3, "lora")])
def test_forward_and_every_gradient_match_the_float64_reference(backend, p, form, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    _, layer = _layer(dropout=p, form=form)
    _randomize(layer)
    layer.train()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    torch.manual_seed(9)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if p > 0 else None
    torch.manual_seed(9)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.backward(dy)
    w = layer.dense_weight(torch.float32)
    y_ref, grads = reference.dora_linear_ref(x.detach(), w, layer.lora_A.detach(), layer.lora_B.detach(),
                                             layer.lora_magnitude_vector.detach(), layer.bias, layer.scaling,
                                             dropout_p=p, seed=seed, dropout=form, grad_out=dy)
    assert_close("y", y, y_ref, torch.float32)
    for name, got in [("x", x.grad), ("lora_A", layer.lora_A.grad), ("lora_B", layer.lora_B.grad),
                      ("magnitude", layer.lora_magnitude_vector.grad)]:
        assert_close(f"d{name}", got, grads[name], torch.float32)
    assert layer.weight.grad is None
    if backend == "triton":   # the 4-bit kernels ran: the layer handed them the codes, not a decoded W0
        from lora_fast import weights
        assert weights.packed_source(layer.kernel_weight(x.detach(), torch.float32)) is not None


def test_the_norms_allocate_no_out_by_in_tensor(monkeypatch):
    """A step's norms (W0's part cached) read the codes a row chunk at a time: no (out, in) float
    tensor is made for them (the torch path's forward decodes W0 for its GEMM, as for QLoRA; the
    kernels decode tiles)."""
    monkeypatch.setattr(dora, "_CHUNK_ELEMENTS", 64 * 8)
    _, layer = _layer(out=48, inp=64)
    _randomize(layer)
    layer.dora_base_sq()   # cached once, before the step

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.full = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.is_floating_point() and tuple(o.shape) in ((48, 64), (64, 48)):
                    self.full += 1
            return out

    mode = Shapes()
    with mode:
        norm = layer.dora_norm()
    assert mode.full == 0 and norm.shape == (48,)


def test_merge_unmerge_and_merge_and_unload():
    base, layer = _layer()
    _randomize(layer)
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = layer(x)
        w = layer.dense_weight(torch.float32).double()
        merged = w + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        merged = merged * (layer.lora_magnitude_vector.double() / torch.linalg.vector_norm(merged, dim=1))[:, None]
        codes = layer.weight.detach().clone()
        layer.merge()
        assert_close("merged y", layer(x), want, torch.float32)
        assert_close("merged weight", layer._original_weight, merged, torch.float32)
        layer.unmerge()
        assert torch.equal(layer(x), want) and torch.equal(layer.weight, codes)
        dense = layer.to_base()
        assert isinstance(dense, nn.Linear)
        assert_close("to_base", dense(x), want, torch.float32)
        requantized = layer.to_base(requantize=True)
        assert isinstance(requantized, qlora.Linear4bit)


def test_inject_on_a_quantized_model_with_use_dora():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))
    lora_fast.quantize(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = model(x)
    lora_fast.inject(model, r=4, target_modules=["0", "2"], use_dora=True)
    layers = lora_fast.lora_layers(model)
    assert set(layers) == {"0", "2"} and all(isinstance(m, qlora.LoRALinear4bit) and m.use_dora
                                             for m in layers.values())
    with torch.no_grad():
        assert_close("y at init", model(x), before, torch.float32)
    model(x).square().mean().backward()
    assert all(m.lora_magnitude_vector.grad is not None for m in layers.values())


def _peft_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)}


@pytest.mark.parametrize("double_quant", [True, False])
def test_matches_peft_qdora_and_adapters_load_both_ways(double_quant, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    ours, theirs = _bnb_llama(double_quant), _bnb_llama(double_quant)
    lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                               use_dora=True))
    peft = _peft_layers(theirs)
    for name, layer in lora_fast.lora_layers(ours).items():
        assert isinstance(layer, qlora.LoRALinear4bit)
        twin = peft[f"base_model.model.{name}"]
        # PEFT's magnitude starts at its own decoded row norms: the same weight, the same norms
        assert rel_err(layer.lora_magnitude_vector, twin.lora_magnitude_vector["default"].weight) <= bound(torch.float32)
        _randomize(layer, seed=len(name))
        with torch.no_grad():
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
            twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    x = tokens()
    ours.train(), theirs.train()
    out_ours, out_theirs = ours(x).logits, theirs(x).logits
    assert rel_err(out_ours, out_theirs) <= bound(torch.float32)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for name, layer in lora_fast.lora_layers(ours).items():
        twin = peft[f"base_model.model.{name}"]
        for ours_p, theirs_p in [(layer.lora_A, twin.lora_A["default"].weight),
                                 (layer.lora_B, twin.lora_B["default"].weight),
                                 (layer.lora_magnitude_vector, twin.lora_magnitude_vector["default"].weight)]:
            assert rel_err(ours_p.grad, theirs_p.grad) <= bound(torch.float32), name
    ours.eval(), theirs.eval()
    lora_fast.save_adapter(ours, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(_bnb_llama(double_quant), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(reloaded(x).logits, ours(x).logits) <= bound(torch.float32)
    theirs.save_pretrained(tmp_path / "theirs")
    back = _bnb_llama(double_quant)
    lora_fast.load_adapter(back, tmp_path / "theirs")
    assert all(isinstance(m, qlora.LoRALinear4bit) and m.use_dora for m in lora_fast.lora_layers(back).values())
    with torch.no_grad():
        assert rel_err(back.eval()(x).logits, theirs(x).logits) <= bound(torch.float32)
