"""inject and the model-level helpers: what is replaced, shared, frozen and refused; merge/unmerge
exactness on whole models; adapter files (round trips and every refusal)."""
import json

import pytest
import torch
from torch import nn

import lora_fast
from helpers import assert_close
from tiny_models import tiny_gpt2, tiny_llama, token_batch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


class Block(nn.Module):
    def __init__(self, width=24):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.mlp(self.q_proj(x) * self.v_proj(x)))


class Net(nn.Module):
    def __init__(self, width=24, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.lm_head = nn.Linear(width, 7)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B.dtype))


def test_inject_replaces_shares_and_freezes():
    torch.manual_seed(0)
    model = Net()
    ptrs = {n: m.weight.data_ptr() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert names == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj"]
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, lora_fast.LoRALinear)
        assert layer.weight.data_ptr() == ptrs[name], "base weight copied"
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, lora_fast.LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}" for n in names for part in ("lora_A", "lora_B")}
    assert lora_fast.trainable_parameters(model).trainable == 4 * (4 * 24 + 24 * 4)
    assert "trainable%" in str(lora_fast.trainable_parameters(model))


def test_all_linear_skips_the_head_and_exclude_applies():
    model = Net()
    names = lora_fast.inject(model, target_modules="all-linear", exclude_modules=r".*\.mlp\.2")
    assert "lm_head" not in names and "blocks.0.mlp.2" not in names
    assert "blocks.1.mlp.0" in names and len(names) == 6
    assert model.lora_fast_config["target_modules"] == sorted(names)


def test_a_layer_reachable_by_two_names_becomes_one_lora_layer():
    model = Net()
    model.blocks[1].q_proj = model.blocks[0].q_proj
    lora_fast.inject(model, target_modules=["q_proj"])
    assert model.blocks[0].q_proj is model.blocks[1].q_proj
    assert isinstance(model.blocks[1].q_proj, lora_fast.LoRALinear)


def test_conv1d_becomes_a_strided_view_with_the_same_function():
    model = tiny_gpt2()
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
    conv = model.transformer.h[0].attn.c_attn
    lora_fast.inject(model, r=4, target_modules=["c_attn"])
    layer = model.transformer.h[0].attn.c_attn
    assert layer.from_conv1d and layer.weight.shape == (120, 40)
    assert layer.weight.data_ptr() == conv.weight.data_ptr() and not layer.weight.is_contiguous()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)   # B = 0: exactly the base model


def test_inject_refusals():
    model = Net()
    with pytest.raises(ValueError, match="target_modules: 'nothing' matches no linear layer"):
        lora_fast.inject(model, target_modules="nothing")
    with pytest.raises(ValueError, match=r"target_modules: None picks PEFT's default targets.*Net "
                                         r"\(no config.model_type\) has none"):
        lora_fast.inject(model, target_modules=None)   # PEFT's defaults: none for a plain module
    with pytest.raises(ValueError, match="target_modules: expected"):
        lora_fast.inject(model, target_modules=[])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lora_fast.inject(model, target_modules="q_proj(")
    with pytest.raises(TypeError, match=r"not nn.Linear, Conv1D or nn.Embedding: blocks.0.mlp \(Sequential\)"):
        lora_fast.inject(model, target_modules=["mlp"])
    with pytest.raises(ValueError, match="r: expected a positive integer"):
        lora_fast.inject(model, r=0, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        lora_fast.inject("model", target_modules=["q_proj"])
    assert not lora_fast.lora_layers(model), "a refused inject must leave the model untouched"
    lora_fast.inject(model, target_modules=["q_proj"])
    with pytest.raises(RuntimeError, match="already has 2 LoRALinear layers"):
        lora_fast.inject(model, target_modules=["v_proj"])
    for helper in (lora_fast.merge, lora_fast.unmerge, lora_fast.merge_and_unload):
        with pytest.raises(ValueError, match="no LoRALinear layers"):
            helper(Net())


def test_eval_mode_and_half_precision_bases_get_float32_adapters():
    model = Net().to(torch.bfloat16).eval()
    lora_fast.inject(model, target_modules=["q_proj"], lora_dropout=0.1)
    layer = model.blocks[0].q_proj
    assert not layer.training
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    other = Net().to(torch.bfloat16)
    lora_fast.inject(other, target_modules=["q_proj"], adapter_dtype=torch.bfloat16)
    assert other.blocks[0].q_proj.lora_A.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_is_exact_on_a_model(dtype):
    model = tiny_llama().to(dtype)
    lora_fast.inject(model, r=4, lora_alpha=16, target_modules="all-linear", adapter_dtype=dtype)
    randomize_b(model)
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    ids = token_batch()
    with torch.no_grad():
        unmerged = model(ids).logits.double()
        lora_fast.merge(model)
        merged = model(ids).logits.double()
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
    # the state dict holds the unmerged base weights while merged (tests/test_layer_state.py)
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
    if dtype == torch.float32:   # half-precision logits through two layers differ by rounding alone
        assert_close("merged logits", merged, unmerged, dtype)
    with pytest.raises(RuntimeError, match="already merged"):
        lora_fast.merge(model)
    lora_fast.unmerge(model)
    for name, p in model.state_dict().items():
        assert torch.equal(p, weights[name]), f"{name} not restored bit for bit"


def test_merge_delta_is_taken_in_float32_and_rounded_once():
    layer = lora_fast.LoRALinear(64, 48, r=8, lora_alpha=8, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()
    exact = layer.weight.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    layer.merge()
    assert torch.equal(layer.weight, exact.float().to(torch.bfloat16))


def test_merge_and_unload_gives_plain_linears_sharing_storage():
    torch.manual_seed(0)
    model = Net()
    lora_fast.inject(model, target_modules="all-linear")
    randomize_b(model)
    ptr = model.blocks[0].q_proj.weight.data_ptr()
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = model(x)
        unloaded = lora_fast.merge_and_unload(model)
        assert type(unloaded.blocks[0].q_proj) is nn.Linear
        assert unloaded.blocks[0].q_proj.weight.data_ptr() == ptr
        assert not hasattr(unloaded, "lora_fast_config")
        assert_close("unloaded", unloaded(x), expected, torch.float32)


def test_merge_and_unload_through_a_wrapper():
    """The layer names are the bare model's: a DataParallel (or DDP, torch.compile) wrapper is
    looked through, not given new attributes."""
    model = Net()
    lora_fast.inject(model, target_modules=["q_proj"])
    wrapped = nn.DataParallel(model)
    assert lora_fast.merge_and_unload(wrapped) is wrapped
    assert not lora_fast.lora_layers(model) and type(model.blocks[0].q_proj) is nn.Linear


def test_lora_state_dict_and_trainable_flags():
    model = Net()
    names = lora_fast.inject(model, target_modules=["v_proj"])
    randomize_b(model)
    sd = lora_fast.lora_state_dict(model)
    assert sorted(sd) == sorted(f"{n}.{p}" for n in names for p in ("lora_A", "lora_B"))
    other = Net()
    lora_fast.inject(other, target_modules=["v_proj"])
    other.load_state_dict(sd, strict=False)
    assert all(torch.equal(lora_fast.lora_state_dict(other)[k], v) for k, v in sd.items())
    for p in model.parameters():
        p.requires_grad_(True)
    lora_fast.mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_round_trip_is_exact(dtype, tmp_path):
    model = tiny_llama().to(dtype)
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_rslora=True,
                     adapter_dtype=dtype)
    randomize_b(model)
    lora_fast.save_adapter(model, tmp_path)
    fresh = tiny_llama().to(dtype)
    loaded = lora_fast.load_adapter(fresh, tmp_path)
    assert loaded == list(lora_fast.lora_layers(model))
    assert fresh.model.layers[0].self_attn.q_proj.scaling == model.model.layers[0].self_attn.q_proj.scaling
    before, after = lora_fast.lora_state_dict(model), lora_fast.lora_state_dict(fresh)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == dtype for k in before)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_load_adapter_refusals(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny_llama()
    lora_fast.inject(model, r=4, target_modules=["q_proj"])
    good = tmp_path / "good"
    lora_fast.save_adapter(model, good)
    config = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")

    def variant(name, config_changes=None, drop=None, add=None, reshape=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**config, **(config_changes or {})}))
        t = {k: v for k, v in tensors.items() if k != drop}
        if add:
            t[add] = torch.zeros(1)
        if reshape:
            t[reshape] = torch.zeros(3, 3)
        save_file(t, d / "adapter_model.safetensors")
        return d

    key = next(iter(tensors))
    with pytest.raises(KeyError, match=r"missing \['base_model"):
        lora_fast.load_adapter(tiny_llama(), variant("missing", drop=key))
    with pytest.raises(KeyError, match="unexpected"):
        lora_fast.load_adapter(tiny_llama(), variant("extra", add="base_model.model.x.lora_A.weight"))
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), the model expects"):
        lora_fast.load_adapter(tiny_llama(), variant("shape", reshape=key))
    # a DoRA config over LoRA tensors: the magnitudes are missing, and the message says why
    with pytest.raises(ValueError, match=r"missing \['base_model.*lora_magnitude_vector.*use_dora=True"):
        lora_fast.load_adapter(tiny_llama(), variant("dora", {"use_dora": True}))
    with pytest.raises(ValueError, match="rank_pattern"):
        lora_fast.load_adapter(tiny_llama(), variant("pattern", {"rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ValueError, match="peft_type 'IA3', expected 'LORA'"):
        lora_fast.load_adapter(tiny_llama(), variant("ia3", {"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="has lora_alpha=8, the adapter lora_alpha=16"):
        lora_fast.load_adapter(model, variant("alpha", {"lora_alpha": 16}))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lora_fast.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_injected_model_trains_only_the_adapters():
    model = tiny_llama().train()
    lora_fast.inject(model, r=4, target_modules="all-linear", lora_dropout=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(batch=4, length=16)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p.grad is None, name


def test_triton_backend_runs_an_injected_model(monkeypatch):
    """The fused kernels (interpreter on CPU) give the torch backend's logits on a whole model."""
    model = tiny_llama()
    lora_fast.inject(model, r=4, target_modules="all-linear")
    randomize_b(model)
    ids = token_batch(batch=2, length=5)
    with torch.no_grad():
        expected = model(ids).logits
        monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
        assert_close("triton logits", model(ids).logits, expected, torch.float32)
