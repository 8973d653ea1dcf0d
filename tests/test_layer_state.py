"""One consistent layer state: what forward computes, what the state dict holds and what loading
does, for every combination of merged / disabled, Conv1D-made layers, tied and parametrized
weights, float64, and the hyper-parameters' types (issue 14, items 2-5, 9, 12, 14)."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lora_fast
from helpers import assert_close
from lora_fast import LoRALinear
from lora_fast.reference import lora_linear_ref
from tiny_models import tiny_gpt2, tiny_llama, token_batch


def _random_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / math.sqrt(layer.in_features))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) / math.sqrt(layer.r))
    return model


def _injected_llama():
    model = tiny_llama()
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules="all-linear")
    return _random_adapters(model)


def _layer(seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    layer = LoRALinear(24, 16, r=4, lora_alpha=8, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=dtype))
    return layer


# --- item 2: GPT-2 Conv1D layers keep the base model's state-dict layout ------------------------

def test_injected_gpt2_state_dict_keeps_the_conv1d_layout():
    plain = tiny_gpt2()
    model = tiny_gpt2()
    lora_fast.inject(model, r=4, target_modules=["c_attn", "c_proj"])
    injected = model.state_dict()
    for key, value in plain.state_dict().items():
        assert injected[key].shape == value.shape, key
        assert torch.equal(injected[key], value), f"{key} saved in another layout"


def test_plain_gpt2_state_dict_loads_into_an_injected_model_and_back():
    source = tiny_gpt2(seed=5)   # other weights than the model it is loaded into
    model = tiny_gpt2(seed=0)
    lora_fast.inject(model, r=4, target_modules=["c_attn", "c_proj"])   # c_proj is square: 40x40
    _random_adapters(model)
    result = model.load_state_dict(source.state_dict(), strict=False)
    assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys)
    ids = token_batch()
    with torch.no_grad(), lora_fast.disable_adapters(model):
        assert torch.equal(model(ids).logits, source(ids).logits)   # not transposed, silently

    plain = tiny_gpt2(seed=9)
    lora_state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(lora_state)   # strict: same keys, same shapes
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, source(ids).logits)


# --- item 3: merged state ------------------------------------------------------------------------

def test_state_dict_of_a_merged_layer_loads_into_a_fresh_layer_once():
    layer = _layer()
    x = torch.randn(5, 24)
    expected = layer(x)
    layer.merge()
    state = layer.state_dict()
    fresh = LoRALinear(24, 16, r=4, lora_alpha=8)
    fresh.load_state_dict(state)
    assert_close("y", fresh(x), expected, torch.float32)   # the delta counted once, not twice
    layer.unmerge()
    assert torch.equal(state["weight"], layer.weight)


def test_load_state_dict_into_a_merged_layer_is_what_forward_uses():
    source = _layer(seed=7)
    layer = _layer(seed=0)
    layer.merge()
    layer.load_state_dict(source.state_dict())
    assert layer.merged
    x = torch.randn(3, 24)
    assert_close("y", layer(x), source(x), torch.float32)
    layer.unmerge()
    assert torch.equal(layer.weight, source.weight)   # unmerge keeps what was loaded
    assert torch.equal(layer.lora_B, source.lora_B)


def test_disable_adapters_on_a_merged_model_is_the_base_model():
    model = _injected_llama()
    ids = token_batch()
    with torch.no_grad():
        base = tiny_llama()(ids).logits
        lora_fast.merge(model)
        with lora_fast.disable_adapters(model):
            assert torch.equal(model(ids).logits, base)
        adapted = model(ids).logits
        lora_fast.unmerge(model)
        assert_close("adapted", adapted, model(ids).logits, torch.float32)
    assert not torch.allclose(adapted, base)


def test_every_state_of_one_layer():
    layer = _layer()
    x = torch.randn(4, 24, dtype=torch.float64).float()
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    adapted = lora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, layer.scaling)
    for merged in (False, True):
        if merged:
            layer.merge()
        layer.adapter_enabled = False
        assert torch.equal(layer(x), base), f"disabled, merged={merged}"
        layer.adapter_enabled = True
        assert_close(f"enabled, merged={merged}", layer(x), adapted, torch.float32)
    with pytest.raises(RuntimeError, match="merged"):
        layer.reset_lora_parameters()


# --- item 4: tied weights ------------------------------------------------------------------------

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight


def test_tied_weights_are_refused_at_merge_and_nothing_changes():
    model = Tied()
    lora_fast.inject(model, r=2, target_modules=["a", "b"])
    _random_adapters(model)
    weight = model.a.weight.detach().clone()
    with pytest.raises(RuntimeError, match="tied"):
        lora_fast.merge(model)
    assert not model.a.merged and not model.b.merged
    assert torch.equal(model.a.weight, weight)
    with pytest.raises(RuntimeError, match="tied"):
        lora_fast.merge_and_unload(model)
    assert isinstance(model.a, LoRALinear) and torch.equal(model.a.weight, weight)
    model.a.merge()   # one layer at a time: the second is refused
    with pytest.raises(RuntimeError, match="shares its memory"):
        model.b.merge()
    model.a.unmerge()
    assert torch.equal(model.a.weight, weight)


def test_a_head_tied_to_the_embedding_is_refused():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    lora_fast.inject(model, r=2, target_modules=["lm_head"])
    _random_adapters(model)
    embedding = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(RuntimeError, match="embed_tokens"):
        lora_fast.merge(model)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


# --- item 5: parametrized weights ----------------------------------------------------------------

class Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_parametrized_weight_is_refused_at_merge():
    layer = _layer()
    parametrize.register_parametrization(layer, "weight", Scale())
    x = torch.randn(3, 24)
    before = layer(x)
    with pytest.raises(RuntimeError, match="parametrization"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer(x), before)


# --- item 9: float64 -----------------------------------------------------------------------------

def test_float64_merge_folds_in_float64():
    layer = _layer(dtype=torch.float64)
    exact = layer.weight + layer.scaling * (layer.lora_B @ layer.lora_A)
    layer.merge()
    assert torch.equal(layer.weight, exact)
    model = Tied().double()
    del model.b
    lora_fast.inject(model, r=3, target_modules=["a"])
    _random_adapters(model)
    a = model.a
    exact = a.weight + a.scaling * (a.lora_B @ a.lora_A)
    lora_fast.merge_and_unload(model)
    assert torch.equal(model.a.weight, exact)


# --- item 12: merge(model) never stops half-way --------------------------------------------------

def test_merge_model_refused_or_failing_leaves_no_layer_merged(monkeypatch):
    model = _injected_llama()
    layers = list(lora_fast.lora_layers(model).values())
    weights = [layer.weight.detach().clone() for layer in layers]
    layers[-1].merge()   # the last is merged already: refused before any other merges
    with pytest.raises(RuntimeError, match="already merged"):
        lora_fast.merge(model)
    assert [layer.merged for layer in layers] == [False] * (len(layers) - 1) + [True]
    layers[-1].unmerge()

    calls = []
    original = LoRALinear._fold_adapter_into_weight

    def fails_third(self):
        calls.append(self)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        original(self)

    monkeypatch.setattr(LoRALinear, "_fold_adapter_into_weight", fails_third)
    with pytest.raises(torch.OutOfMemoryError):
        lora_fast.merge(model)
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(layers, weights))


def test_unmerge_model_with_a_layer_not_merged_changes_nothing():
    model = _injected_llama()
    layers = list(lora_fast.lora_layers(model).values())
    layers[0].merge()
    with pytest.raises(RuntimeError, match="not merged"):
        lora_fast.unmerge(model)
    assert layers[0].merged


# --- item 14: hyper-parameters as plain Python numbers, bad ones refused ---------------------------

def test_numpy_hyper_parameters_are_stored_as_python_numbers(tmp_path):
    model = tiny_llama()
    lora_fast.inject(model, r=np.int64(4), lora_alpha=np.float32(8.0), lora_dropout=np.float64(0.1),
                     use_rslora=np.bool_(False), target_modules=["q_proj"])
    config = model.lora_fast_config
    assert type(config["r"]) is int and type(config["lora_alpha"]) is float
    assert type(config["lora_dropout"]) is float and type(config["use_rslora"]) is bool
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer.r) is int and type(layer.lora_alpha) is float and type(layer.scaling) is float
    lora_fast.save_adapter(model, tmp_path / "adapter")   # JSON-serialisable
    fresh = tiny_llama()
    lora_fast.load_adapter(fresh, tmp_path / "adapter")
    assert fresh.model.layers[0].self_attn.q_proj.r == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"lora_alpha": math.inf}, "lora_alpha"),
    ({"lora_alpha": math.nan}, "lora_alpha"),
    ({"lora_alpha": 10**400}, "lora_alpha"),
    ({"use_rslora": "no"}, "use_rslora"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"adapter_dtype": torch.int64}, "adapter_dtype"),
    ({"r": 2**62}, "r: expected a positive integer"),
    ({"r": 4.0}, "r: expected a positive integer"),
])
def test_bad_hyper_parameters_are_refused_before_anything_changes(kwargs, match):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lora_fast.inject(model, **{"r": 4, "target_modules": ["q_proj"], **kwargs})
    assert not lora_fast.lora_layers(model)
    assert not hasattr(model, "lora_fast_config")
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())   # nothing frozen either
    layer_kwargs = {k: v for k, v in kwargs.items() if k != "adapter_dtype"}
    if layer_kwargs:
        with pytest.raises(ValueError, match=match):
            LoRALinear(8, 8, **{"r": 4, **layer_kwargs})
    with pytest.raises(ValueError, match=match):
        LoRALinear.from_linear(nn.Linear(8, 8), **{"r": 4, **kwargs})


def test_a_merged_layer_moves_and_casts_with_its_kept_base_weight():
    layer = _layer()
    x = torch.randn(3, 24, dtype=torch.float64)
    base = torch.nn.functional.linear(x, layer.weight.double(), layer.bias.double())
    layer.merge()
    layer.double()
    layer.adapter_enabled = False
    assert torch.equal(layer(x), base)   # the kept W0 was cast with the layer
    layer.adapter_enabled = True
    layer.unmerge()
    assert torch.equal(torch.nn.functional.linear(x, layer.weight, layer.bias), base)
    assert "_original_weight" not in layer.state_dict()


def test_state_dict_of_an_injected_gpt2_saved_before_version_2_loads_as_it_was_saved():
    """Before LoRALinear._version 2 a Conv1D-made layer saved its weight as (out, in); such a
    state dict (torch.save keeps the version) loads untransposed, square c_proj included."""
    source = tiny_gpt2(seed=5)
    lora_fast.inject(source, r=4, target_modules=["c_attn", "c_proj"])
    _random_adapters(source)
    old = source.state_dict()
    for name, layer in lora_fast.lora_layers(source).items():
        old[f"{name}.weight"] = layer.weight.detach().clone()   # (out, in), as the old layer saved it
        old._metadata[name]["version"] = 1
    model = tiny_gpt2(seed=0)
    lora_fast.inject(model, r=4, target_modules=["c_attn", "c_proj"])
    model.load_state_dict(old)
    for name, layer in lora_fast.lora_layers(model).items():
        assert torch.equal(layer.weight, lora_fast.lora_layers(source)[name].weight), name


def test_a_conv1d_weight_of_the_wrong_shape_is_refused_with_the_layout_named():
    model = tiny_gpt2()
    lora_fast.inject(model, r=4, target_modules=["c_attn"])
    state = model.state_dict()
    key = "transformer.h.0.attn.c_attn.weight"
    state[key] = state[key].t().contiguous()   # (out, in): not Conv1D's layout
    with pytest.raises(RuntimeError, match=r"Conv1D's \(in, out\) = \(40, 120\) layout"):
        model.load_state_dict(state)


def test_assign_into_a_merged_layer_never_folds_into_the_callers_tensor():
    layer = _layer()
    layer.merge()
    source = {k: v.clone() for k, v in _layer(seed=7).state_dict().items()}
    kept = source["weight"].clone()
    layer.load_state_dict(source, assign=True)
    assert torch.equal(source["weight"], kept)
    layer.unmerge()
    assert torch.equal(layer.weight, kept)


@pytest.mark.parametrize("weight_dtype, adapter_dtype", [(torch.float64, torch.float32),
                                                         (torch.bfloat16, torch.float16),
                                                         (torch.float32, torch.float16)])
def test_an_adapter_dtype_the_layers_cannot_run_is_refused_before_anything_changes(weight_dtype, adapter_dtype):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(weight_dtype)
    with pytest.raises(ValueError, match=r"adapter_dtype: .* cannot run with a .* weight for '0'"):
        lora_fast.inject(model, r=2, target_modules=["0", "1"], adapter_dtype=adapter_dtype)
    assert not lora_fast.lora_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="adapter_dtype"):
        LoRALinear.from_linear(model[0], r=2, adapter_dtype=adapter_dtype)


class TwoTargets(nn.Module):
    def __init__(self, second):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = second


def _int8_linear():
    layer = nn.Linear(8, 6)
    layer.weight = nn.Parameter(torch.zeros(6, 8, dtype=torch.int8), requires_grad=False)
    return layer


@pytest.mark.parametrize("second, match", [
    (lambda: torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 6)), "'b': its weight is computed by a parametrization"),
    (_int8_linear, "'b': has a torch.int8 weight; LoRA here needs a floating base weight"),
], ids=["weight_norm", "int8"])
def test_a_target_lora_cannot_wrap_is_refused_before_any_layer_changes(second, match):
    model = TwoTargets(second())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=match):
        lora_fast.inject(model, r=2, lora_alpha=4, target_modules=["a", "b"])
    assert not lora_fast.lora_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags   # a not frozen
