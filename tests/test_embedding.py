"""LoRA on embeddings (lora_fast.embedding.LoRAEmbedding): against a float64 formula, loralib's
lora.Embedding and the real peft (trainable counts, logits, gradients, files both ways, merge)."""
import warnings

import pytest
import torch
from torch import nn

import lora_fast
from helpers import assert_close
from lora_fast.embedding import LoRAEmbedding
from tiny_models import tiny_gpt2, tiny_llama, token_batch


def randomized(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_forward_and_gradients_match_float64(dtype, padding_idx):
    torch.manual_seed(0)
    base = nn.Embedding(37, 11, padding_idx=padding_idx, dtype=dtype)
    layer = randomized(LoRAEmbedding.from_embedding(base, r=3, lora_alpha=5))
    ids = torch.randint(0, 37, (2, 5, 7))   # 3-D ids
    ids[0, 0, :3] = 3
    y = layer(ids)
    A, B, E = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.weight))
    ref = E[ids] + (5 / 3) * A.t()[ids] @ B.t()
    assert_close("y", y, ref, dtype)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(dtype))
    (ref * dy).sum().backward()
    gA = A.grad.clone()
    if padding_idx is not None:   # F.embedding gives the padding row no gradient, as in PEFT
        gA[:, padding_idx] = 0
        assert layer.lora_A.grad[:, padding_idx].abs().max() == 0
    assert_close("dA", layer.lora_A.grad, gA, dtype)
    assert_close("dB", layer.lora_B.grad, B.grad, dtype)
    assert layer.weight.grad is None


def test_new_layer_computes_the_embedding_and_keeps_its_layout():
    base = nn.Embedding(19, 6)
    ids = torch.randint(0, 19, (4, 3))
    expected = base(ids)
    layer = LoRAEmbedding.from_embedding(base, r=2)
    assert isinstance(layer, nn.Embedding) and layer.weight is base.weight
    assert torch.equal(layer(ids), expected)   # A zeros, B normal: PEFT's init
    assert layer.lora_A.abs().max() == 0 and layer.lora_B.abs().max() > 0
    assert tuple(layer.state_dict()["weight"].shape) == (19, 6)


def test_empty_and_single_ids():
    layer = randomized(LoRAEmbedding.from_embedding(nn.Embedding(9, 4), r=2))
    assert layer(torch.zeros(0, dtype=torch.long)).shape == (0, 4)
    assert layer(torch.tensor(5)).shape == (4,)


def test_matches_loralib_embedding():
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    theirs = loralib.Embedding(23, 7, r=3, lora_alpha=6, merge_weights=True)
    with torch.no_grad():
        theirs.lora_A.normal_()
        theirs.lora_B.normal_()
    ours = LoRAEmbedding.from_embedding(nn.Embedding(23, 7), r=3, lora_alpha=6)
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
        ours.lora_A.copy_(theirs.lora_A)
        ours.lora_B.copy_(theirs.lora_B)
    ours.merge_weights = True
    ids = torch.randint(0, 23, (3, 4))
    for mode in (True, False, True):
        theirs.train(mode)
        ours.train(mode)
        torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-6, atol=1e-6)
    assert ours.merged is False


@pytest.mark.parametrize("make, targets", [(tiny_llama, ["embed_tokens", "q_proj"]), (tiny_gpt2, ["wte", "c_attn"])])
def test_against_peft_counts_logits_gradients_and_files(make, targets, tmp_path):
    peft = pytest.importorskip("peft")
    ours = make()
    lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=targets)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         fan_in_fan_out=make is tiny_gpt2))
    assert lora_fast.trainable_parameters(ours).trainable == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    emb = ours.get_input_embeddings()
    assert isinstance(emb, LoRAEmbedding)
    for layer in lora_fast.lora_layers(ours).values():
        randomized(layer)
    lora_fast.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours", is_trainable=True)
    x = token_batch()
    ours(x).logits.square().mean().backward()
    loaded(x).logits.square().mean().backward()
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, rtol=0, atol=1e-5)
    peft_emb = loaded.get_input_embeddings()
    torch.testing.assert_close(peft_emb.lora_embedding_A["default"].grad, emb.lora_A.grad)
    torch.testing.assert_close(peft_emb.lora_embedding_B["default"].grad, emb.lora_B.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.save_pretrained(tmp_path / "peft")   # an untied embedding's base weight too
    if make is tiny_llama:
        from safetensors import safe_open
        with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
            assert any(k.endswith(".base_layer.weight") for k in f.keys())
    back = make()
    lora_fast.load_adapter(back, tmp_path / "peft")
    torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=0, atol=0)


def test_merge_unmerge_exact_and_merge_and_unload_gives_an_embedding():
    model = tiny_llama()   # untied embeddings
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    layer = randomized(model.get_input_embeddings())
    x = token_batch()
    unmerged, w0 = model(x).logits, layer.weight.clone()
    lora_fast.merge(model)
    assert layer.merged
    torch.testing.assert_close(model(x).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], w0)   # W0 while merged
    with lora_fast.disable_adapters(model):
        base = model(x).logits
    lora_fast.unmerge(model)
    assert torch.equal(layer.weight, w0)
    with lora_fast.disable_adapters(model):
        torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
    lora_fast.merge_and_unload(model)
    assert type(model.get_input_embeddings()) is nn.Embedding
    torch.testing.assert_close(model(x).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_tied_embedding_merge_refused():
    model = tiny_gpt2()   # wte is tied to lm_head
    lora_fast.inject(model, r=2, target_modules=["wte"])
    with pytest.raises(RuntimeError, match="'transformer.wte' has its weight tied to 'lm_head.weight'"):
        lora_fast.merge(model)
    assert not model.transformer.wte.merged


def test_refusals_name_the_layer():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0
    model = nn.Module()
    model.plain, model.scaled, model.renorm = nn.Embedding(5, 3), Scaled(5, 3), nn.Embedding(5, 3, max_norm=1.0)
    with pytest.raises(TypeError, match="'scaled': Scaled computes its own forward"):
        lora_fast.inject(model, r=2, target_modules=["scaled"])
    with pytest.raises(ValueError, match="'renorm': max_norm=1.0"):
        lora_fast.inject(model, r=2, target_modules=["renorm"])
    with pytest.raises(ValueError, match="use_dora: 'plain' is an embedding"):
        lora_fast.inject(model, r=2, target_modules=["plain"], use_dora=True)
    with pytest.raises(ValueError, match="not available on a 4-bit layer or an embedding"):
        lora_fast.inject(model, r=2, target_modules=["plain"], slices={"plain": ((2, 1), (True, False))})
    assert not lora_fast.lora_layers(model)
    lora_fast.inject(model, r=2, target_modules=["plain"])
    with pytest.raises(ValueError, match="LoRAEmbedding layers hold adapters of the batch"):
        with lora_fast.batch_adapters(model, ["default"]):
            pass


def test_all_linear_leaves_embeddings_alone():
    model = tiny_llama()
    names = lora_fast.inject(model, r=2, target_modules="all-linear")
    assert not any("embed" in n for n in names)


def test_sparse_refused_and_a_resize_after_inject_is_caught():
    model = nn.Module()
    model.sparse = nn.Embedding(5, 3, sparse=True)
    with pytest.raises(ValueError, match="'sparse': sparse=True"):
        lora_fast.inject(model, r=2, target_modules=["sparse"])
    llama = tiny_llama()
    lora_fast.inject(llama, r=2, target_modules=["embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama.resize_token_embeddings(120)   # swaps a (120, d) weight into the LoRA layer itself
    with pytest.raises(RuntimeError, match="the weight has 120 rows, its adapters' lora_A \\[97\\] columns"):
        llama(token_batch())
    with pytest.raises(RuntimeError, match="resize_token_embeddings after inject"):
        lora_fast.merge(llama)
    with pytest.raises(RuntimeError, match="resize_token_embeddings after inject"):
        lora_fast.save_adapter(llama, "unused")


def test_peft_base_weight_refused_under_a_second_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with torch.no_grad():
        theirs.get_input_embeddings().base_layer.weight.add_(1.0)   # a retrained / resized base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    model = tiny_llama()
    lora_fast.inject(model, r=2, target_modules=["embed_tokens"])
    weight = model.get_input_embeddings().weight.clone()
    with pytest.raises(ValueError, match="holds the base weight of an embedding .* other adapters \\['default'\\]"):
        lora_fast.load_adapter(model, tmp_path, adapter_name="b")
    assert torch.equal(model.get_input_embeddings().weight, weight)
    assert lora_fast.adapter_names(model) == ["default"]
