"""QLoRA (lora_fast.qlora): a 4-bit NF4 base under LoRA adapters, on the torch path.

- quantize(): every linear but the head becomes a Linear4bit holding bitsandbytes' bytes (the
  bytes themselves: tests/test_nf4.py); its forward is the decoded weight's linear.
- inject() on a quantized model and on a bitsandbytes-loaded one (its Params4bit shared, bytes
  unchanged by training): at init the output is the 4-bit base's exactly; forward and every
  adapter gradient equal a 16-bit LoRALinear over the decoded weight, and the float64 reference.
- the decoded weight is not kept for backward (saved-tensor hooks count what a step keeps).
- against PEFT's QLoRA (prepare_model_for_kbit_training + get_peft_model on the same bitsandbytes
  model): logits and A/B gradients to the fp32 bound; adapters saved by one load in the other.
- merge/unmerge exact (the codes are never touched), merge_and_unload to a 16-bit linear or a
  re-quantised Linear4bit; named adapters and mixed batches on 4-bit layers; refusals.

bitsandbytes' CPU kernels: in_features are multiples of 64 here (its CPU dequantisation is wrong
otherwise), and support_avx512bf16_for_cpu is switched off on its modules (an eval-mode forward on
AVX512-BF16 CPUs repacks the weight in place).
"""
import copy

import pytest
import torch
from torch import nn

import lora_fast
from helpers import row_by_row
from lora_fast import named_adapters, nf4, qlora, reference
from lora_fast.mixed import batch_adapters
from lora_fast.tolerances import bound, rel_err


def tiny_llama_64(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tokens(batch=2, length=9, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(model).values():
            for name in layer.adapter_settings:
                for p in layer.adapter_weights(name):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))


def _dense_twin(model):
    """The model with every 4-bit layer replaced by a 16-bit LoRALinear over its decoded weight and
    the same adapters (the reference for the 4-bit layers: the same passes on a dense weight)."""
    twin = copy.deepcopy(model)
    for name, layer in list(lora_fast.lora_layers(twin).items()):
        if isinstance(layer, qlora.LoRALinear4bit):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(layer.dense_weight(torch.float32))
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            dense = lora_fast.LoRALinear.from_linear(linear, r=layer.r, lora_alpha=layer.lora_alpha,
                                                     lora_dropout=layer.lora_dropout)
            with torch.no_grad():
                dense.lora_A.copy_(layer.lora_A)
                dense.lora_B.copy_(layer.lora_B)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, dense)
    return twin


def test_quantize_replaces_every_linear_but_the_head():
    model = tiny_llama_64()
    x = tokens()
    names = qlora.quantize(model)
    assert names and all(isinstance(model.get_submodule(n), qlora.Linear4bit) for n in names)
    assert type(model.lm_head) is nn.Linear
    assert len(names) == sum(1 for _, m in tiny_llama_64().named_modules() if type(m) is nn.Linear) - 1
    # the forward is the decoded weight's linear, exactly
    layer = model.get_submodule(names[0])
    h = torch.randn(5, layer.in_features)
    assert torch.equal(layer(h), h @ layer.dequantize(torch.float32).t())
    assert torch.isfinite(model(x).logits).all()


def test_quantize_skips_and_refuses_changing_nothing():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, err, match in [({"quant_type": "fp4"}, ValueError, "quant_type"),
                               ({"double_quant": 1}, TypeError, "double_quant"),
                               ({"compute_dtype": torch.int8}, ValueError, "compute_dtype"),
                               ({"skip_modules": [3]}, TypeError, "skip_modules")]:
        with pytest.raises(err, match=match):
            qlora.quantize(model, **kwargs)
    with pytest.raises(TypeError, match="model"):
        qlora.quantize("model")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert qlora.quantize(model, skip_modules=["2"]) == ["0", "4"]   # no head on a Sequential
    assert type(model[2]) is nn.Linear


@pytest.mark.parametrize("double_quant", [True, False])
def test_inject_on_a_quantized_model_trains_like_the_dense_twin(double_quant):
    model = _mlp()
    qlora.quantize(model, double_quant=double_quant)
    base = copy.deepcopy(model)
    x = torch.randn(7, 3, 64)
    names = lora_fast.inject(model, r=4, lora_alpha=8, target_modules="all-linear")
    assert names == ["0", "2", "4"] and all(isinstance(model[int(n)], qlora.LoRALinear4bit) for n in names)
    assert torch.equal(model(x), base(x))                    # B = 0: the 4-bit base exactly
    _randomize_adapters(model)
    twin = _dense_twin(model)
    model.train(), twin.train()
    for m in (model, twin):
        m(x).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 6
    for n, p in twin.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[n], p.grad), n
    codes = [model[i].weight.clone() for i in (0, 2, 4)]
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(model[i].weight, c) for i, c in zip((0, 2, 4), codes))


def test_layer_against_the_float64_reference():
    layer = qlora.LoRALinear4bit.from_4bit(qlora.Linear4bit.from_linear(nn.Linear(64, 40)), r=5, lora_alpha=3)
    _randomize_adapters(nn.ModuleDict({"l": layer}))
    x = torch.randn(11, 64, requires_grad=True)
    y = layer(x)
    w = layer.dense_weight(torch.float64)
    ref = reference.lora_linear_ref(x.double(), w, layer.lora_A.double(), layer.lora_B.double(),
                                    layer.bias.double(), scaling=layer.scaling)
    assert rel_err(y, ref) <= bound(torch.float32)


def test_the_decoded_weight_is_not_kept_for_backward():
    layer = qlora.LoRALinear4bit.from_4bit(qlora.Linear4bit.from_linear(nn.Linear(64, 96)), r=4)
    x = torch.randn(5, 64, requires_grad=True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (96, 64) not in shapes and shapes, shapes
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None


def test_merge_unmerge_and_merge_and_unload():
    model = _mlp()
    qlora.quantize(model)
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["0", "2"])
    _randomize_adapters(model)
    x = torch.randn(6, 64)
    y = model(x)
    codes = model[0].weight.clone()
    lora_fast.merge(model)
    assert model[0].merged and rel_err(model(x), y) <= bound(torch.float32)
    lora_fast.unmerge(model)
    assert torch.equal(model(x), y) and torch.equal(model[0].weight, codes)
    dense = copy.deepcopy(model)
    layer = model[0]
    expect = (layer.dense_weight(torch.float32)
              + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()).to(torch.float32)
    lora_fast.merge_and_unload(dense)
    assert type(dense[0]) is nn.Linear and torch.equal(dense[0].weight, expect)
    assert rel_err(dense(x), y) <= bound(torch.float32)
    requant = copy.deepcopy(model)
    lora_fast.merge_and_unload(requant, requantize=True)
    assert isinstance(requant[0], qlora.Linear4bit)
    assert torch.equal(requant[0].weight, nf4.quantize_nf4(expect).packed)
    with pytest.raises(TypeError, match="requantize"):
        lora_fast.merge_and_unload(copy.deepcopy(model), requantize="yes")


def test_named_adapters_and_mixed_batches_on_4bit_layers():
    model = _mlp()
    qlora.quantize(model)
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["0", "2"])
    named_adapters.add_adapter(model, "b", r=2, lora_alpha=4)
    _randomize_adapters(model)
    x = torch.randn(4, 64)
    names = ["b", None, "default", "b"]
    with torch.no_grad(), batch_adapters(model, names):
        mixed = model(x)
    assert rel_err(mixed, row_by_row(model, x, names)) <= bound(torch.float32)


def test_inject_refuses_a_non_nf4_bitsandbytes_layer_changing_nothing():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="fp4", compute_dtype=torch.float32))
    model[0].support_avx512bf16_for_cpu = False
    model[0].weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="fp4").to("cpu")
    with pytest.raises(TypeError, match="'0'.*nf4"):
        lora_fast.inject(model, r=2, target_modules=["0"])
    assert not lora_fast.lora_layers(model)


# --- against bitsandbytes and PEFT ------------------------------------------------------------------

def _bnb_llama(double_quant=True):
    """tiny_llama_64's linears (not the head) as bitsandbytes NF4 Linear4bit, fp32 compute."""
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama_64()
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name != "lm_head":
            layer = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=double_quant,
                                      quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(m.weight.detach().clone(), requires_grad=False,
                                             compress_statistics=double_quant, quant_type="nf4").to("cpu")
            layer.support_avx512bf16_for_cpu = False
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("double_quant", [True, False])
def test_inject_into_a_bitsandbytes_model_matches_peft_qlora(double_quant, tmp_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    ours, theirs = _bnb_llama(double_quant), _bnb_llama(double_quant)
    q = ours.model.layers[0].self_attn.q_proj
    data_ptr, codes = q.weight.data_ptr(), q.weight.detach().clone()
    lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=TARGETS)
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, qlora.LoRALinear4bit) and layer.weight.data_ptr() == data_ptr   # shared
    theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    _randomize_adapters(ours)
    peft_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)}
    for name, layer in lora_fast.lora_layers(ours).items():
        peft = peft_layers[f"base_model.model.{name}"]
        with torch.no_grad():
            peft.lora_A["default"].weight.copy_(layer.lora_A)
            peft.lora_B["default"].weight.copy_(layer.lora_B)
    x = tokens()
    ours.train(), theirs.train()
    out_ours, out_theirs = ours(x).logits, theirs(x).logits
    assert rel_err(out_ours, out_theirs) <= bound(torch.float32)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for name, layer in lora_fast.lora_layers(ours).items():
        peft = peft_layers[f"base_model.model.{name}"]
        assert rel_err(layer.lora_A.grad, peft.lora_A["default"].weight.grad) <= bound(torch.float32), name
        assert rel_err(layer.lora_B.grad, peft.lora_B["default"].weight.grad) <= bound(torch.float32), name
    torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2).step()
    assert torch.equal(ours.model.layers[0].self_attn.q_proj.weight, codes)   # bytes unchanged
    # adapters both ways: ours saved, PEFT's model loads it (and the reverse), the same logits
    lora_fast.save_adapter(ours, tmp_path / "ours")
    from peft import PeftModel
    reloaded = PeftModel.from_pretrained(_bnb_llama(double_quant), tmp_path / "ours").eval()
    ours.eval()
    with torch.no_grad():
        assert rel_err(reloaded(x).logits, ours(x).logits) <= bound(torch.float32)
    theirs.save_pretrained(tmp_path / "theirs")
    back = _bnb_llama(double_quant)
    lora_fast.inject(back, r=4, lora_alpha=8, target_modules=TARGETS)
    lora_fast.load_adapter(back, tmp_path / "theirs")
    theirs.eval()
    with torch.no_grad():
        assert rel_err(back.eval()(x).logits, theirs(x).logits) <= bound(torch.float32)


def test_a_quantized_model_holds_bitsandbytes_bytes_and_runs_like_it():
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(128, 64)
    ours = qlora.Linear4bit.from_linear(linear)
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                      quant_type="nf4").to("cpu")
    theirs.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    theirs.support_avx512bf16_for_cpu = False
    assert torch.equal(ours.weight, theirs.weight.data)
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) <= bound(torch.float32)


def test_transformers_4bit_loading_and_quantize_give_the_same_model(tmp_path):
    """A model loaded with BitsAndBytesConfig (NF4, double quant) holds the bytes quantize() writes
    from the same weights; inject into it trains the adapters and leaves the bytes as they were."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    tiny_llama_64().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32,
                                                  device_map="cpu")
    for m in loaded.modules():
        if qlora.is_bnb_4bit(m):
            m.support_avx512bf16_for_cpu = False
    ours = tiny_llama_64()
    names = qlora.quantize(ours)
    assert names == [n for n, m in loaded.named_modules() if qlora.is_bnb_4bit(m)]
    for name in names:
        assert torch.equal(ours.get_submodule(name).weight, loaded.get_submodule(name).weight.data), name
    x = tokens()
    with torch.no_grad():
        assert torch.equal(ours(x).logits, loaded(x).logits)
    codes = {n: loaded.get_submodule(n).weight.detach().clone() for n in names}
    lora_fast.inject(loaded, r=4, lora_alpha=8, target_modules="all-linear")
    assert set(lora_fast.lora_layers(loaded)) == set(names)
    _randomize_adapters(loaded)
    loaded.train()
    loaded(x).logits.square().mean().backward()
    torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2).step()
    assert all(torch.equal(loaded.get_submodule(n).weight, c) for n, c in codes.items())
    assert lora_fast.trainable_parameters(loaded).trainable == sum(
        p.numel() for layer in lora_fast.lora_layers(loaded).values() for p in (layer.lora_A, layer.lora_B))


@pytest.mark.parametrize("double_quant", [True, False])
def test_the_cpp_reference_decodes_the_same_weight(double_quant):
    from lora_fast import cref
    if not cref.available():
        pytest.skip(cref.missing_reason())
    gen = torch.Generator().manual_seed(5)
    w = nf4.quantize_nf4(torch.randn(70, 96, generator=gen), double_quant=double_quant)
    decoded = cref.dequantize_nf4_cref(w)
    assert decoded.dtype == torch.float64 and torch.equal(decoded, w.dequantize(torch.float32).double())
    x = torch.randn(9, 96, generator=gen, dtype=torch.float64)
    a, b = torch.randn(3, 96, generator=gen, dtype=torch.float64), torch.randn(70, 3, generator=gen, dtype=torch.float64)
    assert rel_err(cref.lora_linear_cref(x, decoded, a, b, scaling=0.5),
                   reference.lora_linear_ref(x, w.dequantize(torch.float64), a, b, scaling=0.5)) <= 1e-12


def test_dtype_casts_move_but_never_round_the_statistics_and_state_dicts_round_trip():
    """model.to(bfloat16) / .half() cast the adapters and bias, not the float32 absmax statistics
    (which would change what the codes decode to); a state dict loads into a fresh quantized model."""
    model = _mlp()
    qlora.quantize(model)
    lora_fast.inject(model, r=2, target_modules="all-linear")
    _randomize_adapters(model)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    decoded = model[0].dense_weight(torch.float32)
    model.to(torch.bfloat16)
    assert all(torch.equal(b, stats[n]) and b.dtype == stats[n].dtype for n, b in model.named_buffers())
    assert torch.equal(model[0].dense_weight(torch.float32), decoded)
    assert model[0].lora_A.dtype == torch.bfloat16 and model(torch.randn(2, 64).bfloat16()).dtype == torch.bfloat16
    model.float()
    fresh = _mlp(seed=1)
    qlora.quantize(fresh)
    lora_fast.inject(fresh, r=2, target_modules="all-linear")
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))


# --- regressions from a hostile review (2026-12-02) ----------------------------------------------------

def _saved_shapes(fn):
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = fn()
    return out, shapes


def test_no_entrance_keeps_a_decoded_weight_for_backward():
    """Autocast, mixed batches and 4-bit linears without an adapter keep the codes, not the
    decoded (out, in) weight, between forward and backward; the gradients are the dense twin's."""
    model = _mlp()
    qlora.quantize(model)
    lora_fast.inject(model, r=2, lora_alpha=4, target_modules=["2"])   # "0" and "4": no adapter
    named_adapters.add_adapter(model, "b", r=3, target_modules=["2"])
    _randomize_adapters(model)
    weights = {(128, 64), (64, 128), (96, 128), (128, 96), (10, 96), (96, 10)}
    x = torch.randn(4, 64, requires_grad=True)
    for entrance in ("plain", "autocast", "mixed", "mixed_base_only"):
        def run():
            if entrance == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x)
            if entrance.startswith("mixed"):   # base-only: no row uses an adapter the layer holds
                names = [None] * 4 if entrance == "mixed_base_only" else ["b", None, "default", "b"]
                with batch_adapters(model, names):
                    return model(x)
            return model(x)
        y, shapes = _saved_shapes(run)
        assert not weights & set(shapes), (entrance, shapes)
        x.grad = None
        y.float().square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), entrance


def test_mixed_rows_reach_an_adapter_on_a_layer_without_the_active_one():
    model = _mlp()
    qlora.quantize(model)
    lora_fast.inject(model, r=2, lora_alpha=4, target_modules=["0"])
    named_adapters.add_adapter(model, "b", r=3, lora_alpha=2, target_modules=["2"])   # no "default" on "2"
    _randomize_adapters(model)
    x = torch.randn(4, 64)
    names = ["default", "b", "b", None]
    with torch.no_grad(), batch_adapters(model, names):
        mixed = model(x)
    assert rel_err(mixed, row_by_row(model, x, names)) <= bound(torch.float32)


def test_loading_into_a_merged_4bit_layer_merges_what_was_loaded():
    src, dst = _mlp(), _mlp()
    for m in (src, dst):
        qlora.quantize(m)
        lora_fast.inject(m, r=2, target_modules=["0"])
    _randomize_adapters(src, seed=1)
    _randomize_adapters(dst, seed=2)
    lora_fast.merge(dst)
    dst.load_state_dict(lora_fast.lora_state_dict(src), strict=False)
    x = torch.randn(3, 64)
    assert dst[0].merged and rel_err(dst(x), src(x)) <= bound(torch.float32)


def test_refusals_of_bad_settings():
    with pytest.raises(ValueError, match="compute_dtype"):
        qlora.Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.int32)
    model = _mlp()
    with pytest.raises(TypeError, match="skip_modules"):
        qlora.quantize(model, skip_modules="2")
    model[2].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2'.*inf or NaN"):
        qlora.quantize(model)
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))


def test_a_failed_requantizing_unload_changes_nothing_and_a_cast_model_unloads():
    model = _mlp()
    qlora.quantize(model)
    lora_fast.inject(model, r=2, target_modules="all-linear")
    _randomize_adapters(model)
    with torch.no_grad():
        model[2].lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="merge_and_unload: layer '2'"):
        lora_fast.merge_and_unload(model, requantize=True)
    assert all(isinstance(model[i], qlora.LoRALinear4bit) for i in (0, 2, 4))
    assert model.lora_fast_config
    with torch.no_grad():
        model[2].lora_B[0, 0] = 0.0
    model.to(torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()
    merged = lora_fast.merge(copy.deepcopy(model))   # the same merged bf16 weights, kept beside the codes
    y = merged(x)
    for requantize in (False, True):
        unloaded = lora_fast.merge_and_unload(copy.deepcopy(model), requantize=requantize)
        out = unloaded(x)
        assert out.dtype == torch.bfloat16
        if requantize:   # NF4 of the same merged bf16 weights
            assert all(torch.equal(unloaded[i].weight, nf4.quantize_nf4(merged[i]._original_weight).packed)
                       for i in (0, 2, 4))
        else:
            assert torch.equal(out, y)


def test_a_bitsandbytes_state_dict_loads_its_statistics_with_its_codes():
    pytest.importorskip("bitsandbytes")
    a, b = _bnb_llama(), _bnb_llama()
    with torch.no_grad():   # another checkpoint for b: its codes and statistics differ from a's
        for m in b.modules():
            if qlora.is_bnb_4bit(m):
                m.weight.quant_state.absmax.copy_(m.weight.quant_state.absmax.flip(0))
    for m in (a, b):
        lora_fast.inject(m, r=2, target_modules=TARGETS)
    x = tokens()
    assert rel_err(a(x).logits, b(x).logits) > 1e-3
    b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    plain = _bnb_llama(double_quant=False)
    lora_fast.inject(plain, r=2, target_modules=TARGETS)
    with pytest.raises(RuntimeError, match="double quant"):
        plain.load_state_dict(a.state_dict())
