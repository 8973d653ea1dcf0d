"""lora_fast against the real PEFT package on tiny Llama- and GPT-2-architecture transformers models
(built from configs, random weights): the same layers are selected, outputs and every adapter
gradient agree, and adapters move both ways between PEFT's save_pretrained/from_pretrained and
lora_fast's save_adapter/load_adapter."""
import copy
import json

import pytest
import torch

import lora_fast
from helpers import assert_close
from tiny_models import MODELS, token_batch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

# (model, target_modules, exclude_modules): PEFT's three target forms, Conv1D included.
CASES = [
    ("llama", ["q_proj", "v_proj"], None),
    ("llama", r"model\.layers\.\d+\.mlp\.(up|down)_proj", None),
    ("llama", "all-linear", ["o_proj"]),
    ("gpt2", ["c_attn", "c_proj"], None),
    ("gpt2", "all-linear", None),
]
CASE_IDS = ["llama-list", "llama-regex", "llama-all-linear-exclude", "gpt2-conv1d", "gpt2-all-linear"]


def peft_config(targets, exclude, r=4, alpha=8, conv1d=False, **kw):
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, exclude_modules=exclude,
                           fan_in_fan_out=conv1d, **kw)


def peft_lora_names(peft_model):
    prefix = "base_model.model."
    return sorted(name[len(prefix):] for name, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


def randomize_peft_adapters(peft_model, seed=3):
    """PEFT initializes B to zero; give every adapter weight random values so outputs and the
    gradient of A depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_grads(peft_model):
    out = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:   # base_model.model.<path>.lora_A.default.weight -> <path>.lora_A
            path = name[len("base_model.model."):].replace(".default.weight", "")
            out[path] = p.grad
    return out


def ours_grads(model):
    return {f"{n}.{part}": getattr(layer, part).grad
            for n, layer in lora_fast.lora_layers(model).items() for part in ("lora_A", "lora_B")}


def loss_of(logits, seed=5):
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (logits * w).sum()


@pytest.mark.parametrize("arch,targets,exclude", CASES, ids=CASE_IDS)
def test_inject_matches_peft_outputs_and_gradients(arch, targets, exclude, tmp_path):
    base = MODELS[arch]()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    peft_model = peft.get_peft_model(theirs, peft_config(targets, exclude, conv1d=arch == "gpt2"))
    names = lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=targets, exclude_modules=exclude)
    assert sorted(names) == peft_lora_names(peft_model)
    assert lora_fast.trainable_parameters(ours) == tuple(peft_model.get_nb_trainable_parameters())

    randomize_peft_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert sorted(lora_fast.load_adapter(ours, tmp_path)) == sorted(names)

    ids = token_batch()
    ref = peft_model(ids).logits
    out = ours(ids).logits
    with torch.no_grad():
        plain = base(ids).logits
    assert (ref - plain).abs().max() > 1e-2, "the adapters must change the output for this test to mean anything"
    assert_close("logits", out, ref, torch.float32)
    loss_of(ref).backward()
    loss_of(out).backward()
    theirs_g, ours_g = peft_grads(peft_model), ours_grads(ours)
    assert sorted(theirs_g) == sorted(ours_g)
    for key in ours_g:
        assert ours_g[key].abs().max() > 0, f"{key}: zero gradient"
        assert_close(f"grad {key}", ours_g[key], theirs_g[key], torch.float32)


@pytest.mark.parametrize("arch,targets,exclude", CASES, ids=CASE_IDS)
def test_peft_loads_what_we_save(arch, targets, exclude, tmp_path):
    base = MODELS[arch]()
    ours = copy.deepcopy(base)
    lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=targets, exclude_modules=exclude,
                     lora_dropout=0.05)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(ours).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    lora_fast.save_adapter(ours, tmp_path, base_model_name_or_path="tiny-" + arch)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    known = set(peft.LoraConfig().to_dict())
    assert set(config) <= known, f"keys PEFT does not know: {set(config) - known}"
    assert config["base_model_name_or_path"] == "tiny-" + arch
    assert config["fan_in_fan_out"] == (arch == "gpt2")

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert peft_lora_names(peft_model) == sorted(lora_fast.lora_layers(ours))
    assert peft_model.peft_config["default"].lora_dropout == 0.05
    ids = token_batch(seed=2)
    with torch.no_grad():
        assert_close("logits", ours(ids).logits, peft_model(ids).logits, torch.float32)
    # and the tensors themselves, bit for bit
    theirs = {k: v for k, v in peft.get_peft_model_state_dict(peft_model).items()}
    for name, layer in lora_fast.lora_layers(ours).items():
        assert torch.equal(theirs[f"base_model.model.{name}.lora_A.weight"], layer.lora_A)
        assert torch.equal(theirs[f"base_model.model.{name}.lora_B.weight"], layer.lora_B)


def test_disable_adapters_matches_peft(tmp_path):
    base = MODELS["llama"]()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config(["q_proj", "down_proj"], None))
    randomize_peft_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    lora_fast.load_adapter(ours, tmp_path)
    ids = token_batch()
    with torch.no_grad(), peft_model.disable_adapter(), lora_fast.disable_adapters(ours):
        off_theirs, off_ours = peft_model(ids).logits, ours(ids).logits
    with torch.no_grad():
        on_ours = ours(ids).logits
        plain = base(ids).logits
    assert torch.equal(off_ours, plain)          # exactly the base model's computation
    assert_close("disabled logits", off_ours, off_theirs, torch.float32)
    assert (on_ours - plain).abs().max() > 1e-2  # and the adapters are back on after the block


def test_merge_and_unload_matches_peft(tmp_path):
    base = MODELS["gpt2"]()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config(["c_attn", "c_fc"], None, conv1d=True))
    randomize_peft_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    lora_fast.load_adapter(ours, tmp_path)
    ids = token_batch()
    with torch.no_grad():
        theirs = peft_model.merge_and_unload()(ids).logits
        merged = lora_fast.merge_and_unload(ours)
        assert not lora_fast.lora_layers(merged)
        assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert merged.transformer.h[0].attn.c_attn.weight.shape == (40, 120)   # (in, out) again
        assert_close("merged logits", merged(ids).logits, theirs, torch.float32)
