"""What users of PEFT and loralib train besides the LoRA weights, against the real packages on tiny
models: bias modes ("none" / "all" / "lora_only"), modules trained whole (modules_to_save, PEFT's
classification heads and its "all-linear" rule for them), PEFT's default target modules, and
loralib's merge_weights (merged in eval mode, unmerged in train mode)."""
import importlib
import json
import warnings

import pytest
import torch

import lora_fast
inject_module = importlib.import_module("lora_fast.inject")   # lora_fast.inject is the function
from tiny_models import tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_classifier(seed=0, labels=3):
    config = tiny_llama().config
    config.num_labels, config.pad_token_id = labels, 0
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(config).eval()


def perturb_trainable(model, seed=5):
    """Every trainable tensor moved off its initial value (lora_B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def trainable_names(model, prefix=""):
    return sorted(n[len(prefix):] for n, p in model.named_parameters() if p.requires_grad)


def peft_trainable(peft_model):
    """PEFT's trainable names in the bare model's naming (no wrapper levels, no adapter name)."""
    out = []
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            n = n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            out.append(n.replace(".base_layer", "").replace(".default.weight", "").replace(".default", ""))
    return sorted(out)


# --- bias modes --------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_train_what_peft_trains_and_move_both_ways(bias, tmp_path):
    ours = tiny_gpt2()
    lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=["c_attn"], bias=bias)
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                              bias=bias, fan_in_fan_out=True))
    assert trainable_names(ours) == peft_trainable(theirs)
    perturb_trainable(ours)
    x = token_batch()
    lora_fast.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["bias"] == bias
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, rtol=0, atol=1e-5)
    # PEFT's file back into a fresh model: the same logits, the same parameters trainable
    loaded.save_pretrained(tmp_path / "peft")
    back = tiny_gpt2()
    lora_fast.load_adapter(back, tmp_path / "peft")
    torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=0, atol=1e-5)
    assert trainable_names(back) == trainable_names(ours)
    assert back.lora_fast_config["bias"] == bias


def test_trained_biases_get_gradients_and_frozen_ones_none():
    model = tiny_gpt2()
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only")
    model(token_batch()).logits.square().mean().backward()
    attn = model.transformer.h[0].attn
    assert attn.c_attn.bias.grad is not None and attn.c_attn.bias.grad.abs().sum() > 0
    assert attn.c_proj.bias.grad is None and model.transformer.ln_f.bias.grad is None


def test_mark_only_lora_as_trainable_takes_loralibs_bias_modes():
    model = tiny_gpt2()
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["c_attn"])
    lora_fast.mark_only_lora_as_trainable(model, bias="lora_only")
    assert sorted(n for n in trainable_names(model) if "bias" in n) == \
        [f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)]
    assert model.lora_fast_config["bias"] == "lora_only"   # what save_adapter then writes
    lora_fast.mark_only_lora_as_trainable(model, bias="all")
    assert {n for n, _ in model.named_parameters() if "bias" in n} <= set(trainable_names(model))
    lora_fast.mark_only_lora_as_trainable(model, bias="none")
    assert not [n for n in trainable_names(model) if "bias" in n]
    with pytest.raises(ValueError, match="bias: expected one of"):
        lora_fast.mark_only_lora_as_trainable(model, bias="lora")


def test_bias_modes_match_loralib():
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(loralib.Linear(9, 7, r=2), torch.nn.Linear(7, 5), loralib.Linear(5, 3, r=2))
    ours = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    lora_fast.inject(ours, r=2, lora_alpha=1, target_modules=["0", "2"])
    for bias in ("none", "all", "lora_only"):
        loralib.mark_only_lora_as_trainable(theirs, bias=bias)
        lora_fast.mark_only_lora_as_trainable(ours, bias=bias)
        assert trainable_names(ours) == trainable_names(theirs), bias


# --- modules_to_save and classification heads --------------------------------------------------

def test_all_linear_on_a_classifier_trains_the_head_whole_as_peft(tmp_path):
    ours = tiny_classifier()
    names = lora_fast.inject(ours, r=4, lora_alpha=8, target_modules="all-linear")
    theirs = peft.get_peft_model(tiny_classifier(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                    task_type="SEQ_CLS"))
    assert "score" not in names
    assert trainable_names(ours) == peft_trainable(theirs)
    assert lora_fast.trainable_parameters(ours).trainable == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours.lora_fast_config["modules_to_save"] == ["score"]
    perturb_trainable(ours)
    x = token_batch()
    lora_fast.save_adapter(ours, tmp_path / "ours")
    assert "base_model.model.score.weight" in _file_keys(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_classifier(), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, rtol=0, atol=1e-5)


def test_peft_classifier_adapter_loads_with_its_head(tmp_path):
    theirs = peft.get_peft_model(tiny_classifier(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                    task_type="SEQ_CLS"))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)   # its config lists both "classifier" and "score"
    ours = tiny_classifier()
    lora_fast.load_adapter(ours, tmp_path)
    x = token_batch()
    theirs.eval()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-5)
    assert ours.score.weight.requires_grad
    assert not torch.equal(ours.score.weight, tiny_classifier().score.weight)


def test_modules_to_save_on_a_causal_model_both_ways(tmp_path):
    ours = tiny_llama()
    lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert ours.lm_head.weight.requires_grad
    perturb_trainable(ours)
    lora_fast.save_adapter(ours, tmp_path / "ours")
    x = token_batch()
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, rtol=0, atol=1e-5)
    back = tiny_llama()
    lora_fast.load_adapter(back, tmp_path / "ours")
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight)
    torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=0, atol=0)


def test_modules_to_save_refusals():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="modules_to_save: 'no_such' matches no module"):
        lora_fast.inject(model, r=2, target_modules=["q_proj"], modules_to_save=["no_such"])
    with pytest.raises(ValueError, match="also a LoRA target"):
        lora_fast.inject(model, r=2, target_modules=["q_proj"], modules_to_save=["self_attn"])
    with pytest.raises(ValueError, match="modules_to_save: expected None or a list"):
        lora_fast.inject(model, r=2, target_modules=["q_proj"], modules_to_save="lm_head")
    assert not lora_fast.lora_layers(model)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_second_adapter_refused_where_base_parameters_are_trained(tmp_path):
    model = tiny_classifier()
    lora_fast.inject(model, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="trains base parameters"):
        lora_fast.add_adapter(model, "other", r=2)
    lora_fast.save_adapter(model, tmp_path)   # its head (score) saved with it
    plain = tiny_classifier()
    lora_fast.inject(plain, r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")   # no head trained
    with pytest.raises(ValueError, match="trains base parameters"):
        lora_fast.load_adapter(plain, tmp_path, adapter_name="other")
    assert lora_fast.adapter_names(plain) == ["default"]


def test_failed_load_leaves_trained_base_parameters_as_they_were(tmp_path, monkeypatch):
    from lora_fast import adapters
    source = tiny_llama()
    lora_fast.inject(source, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    perturb_trainable(source)
    lora_fast.save_adapter(source, tmp_path)
    model = tiny_llama()
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    head = model.lm_head.weight.clone()
    copy_base = adapters._copy_base

    def copy_then_fail(base, tensors):   # the values copied, then an error: all must be put back
        copy_base(base, tensors)
        assert not torch.equal(model.lm_head.weight, head)
        raise RuntimeError("copy failed")
    monkeypatch.setattr(adapters, "_copy_base", copy_then_fail)
    with pytest.raises(RuntimeError, match="copy failed"):
        lora_fast.load_adapter(model, tmp_path)
    assert torch.equal(model.lm_head.weight, head)


def test_file_missing_the_head_is_refused(tmp_path):
    source = tiny_llama()
    lora_fast.inject(source, r=4, lora_alpha=8, target_modules=["q_proj"])
    lora_fast.save_adapter(source, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(KeyError, match="lm_head.weight"):
        lora_fast.load_adapter(model, tmp_path)
    assert not lora_fast.lora_layers(model)


def test_disable_adapters_warns_that_trained_base_parameters_stay():
    model = tiny_gpt2()
    lora_fast.inject(model, r=2, target_modules=["c_attn"], bias="all")
    with pytest.warns(UserWarning, match="keep their trained values"):
        with lora_fast.disable_adapters(model):
            pass
    plain = tiny_gpt2()
    lora_fast.inject(plain, r=2, target_modules=["c_attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lora_fast.disable_adapters(plain):
            pass


# --- default targets ---------------------------------------------------------------------------

@pytest.mark.parametrize("make, expected", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_default_targets_are_peft_s(make, expected):
    ours, base = make(), make()
    names = lora_fast.inject(ours, r=2)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=8,
                                                       fan_in_fan_out=make is tiny_gpt2))
    prefix = "base_model.model."
    assert names == sorted(n[len(prefix):] for n, m in theirs.named_modules()
                           if isinstance(m, peft.tuners.lora.LoraLayer))
    assert {n.rsplit(".", 1)[-1] for n in names} == set(expected)


def test_default_targets_without_peft_use_the_table(monkeypatch):
    monkeypatch.setattr(inject_module, "_peft_default_targets", lambda: None)
    assert inject_module.default_targets(tiny_llama()) == ["q_proj", "v_proj"]
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=20))
    names = lora_fast.inject(bert, r=2)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"query", "value"}


def test_no_default_targets_names_the_architecture():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"Sequential \(no config.model_type\) has none.*llama"):
        lora_fast.inject(model, r=2)
    assert isinstance(model[0], torch.nn.Linear) and not isinstance(model[0], lora_fast.LoRALinear)


# --- loralib's merge_weights -------------------------------------------------------------------

def test_merge_weights_merges_in_eval_and_unmerges_exactly_in_train():
    model = tiny_llama().train()
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], merge_weights=True)
    perturb_trainable(model)
    layers = list(lora_fast.lora_layers(model).values())
    w0 = [layer.weight.clone() for layer in layers]
    x = token_batch()
    train_out = model(x).logits
    model.eval()
    assert all(layer.merged for layer in layers)
    torch.testing.assert_close(model(x).logits, train_out, rtol=0, atol=1e-5)
    model.train()
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(layers, w0))


def test_merge_weights_matches_loralib():
    loralib = pytest.importorskip("loralib")
    torch.manual_seed(0)
    theirs = loralib.Linear(11, 7, r=3, lora_alpha=6, merge_weights=True)
    with torch.no_grad():
        theirs.lora_B.normal_()
    ours = lora_fast.LoRALinear(11, 7, r=3, lora_alpha=6)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A)
        ours.lora_B.copy_(theirs.lora_B)
    ours.merge_weights = True
    x = torch.randn(5, 11)
    for mode in (False, True, False):
        theirs.train(mode)
        ours.train(mode)
        assert ours.merged == (not mode) == theirs.merged
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="merge_weights: expected a bool"):
        ours.merge_weights = 1


def _file_keys(folder):
    from safetensors import safe_open
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_saved_full_names_reload_the_same_layers_when_one_is_anothers_suffix(tmp_path):
    """exclude_modules / "all-linear" save the full names; "fc" is also the dotted suffix of
    "sub.fc", which PEFT's list matching would select on reload: an exact regex is saved instead."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.sub, self.out = torch.nn.Linear(5, 5), torch.nn.Sequential(), torch.nn.Linear(5, 3)
            self.sub.fc = torch.nn.Linear(5, 5)

        def forward(self, x):
            return self.out(self.sub.fc(self.fc(x)))
    torch.manual_seed(0)
    model = Net()
    names = lora_fast.inject(model, r=2, target_modules="all-linear", exclude_modules=["sub.fc", "out"])
    assert names == ["fc"]
    perturb_trainable(model)
    lora_fast.save_adapter(model, tmp_path)
    fresh = Net()
    fresh.load_state_dict(model.state_dict(), strict=False)
    assert lora_fast.load_adapter(fresh, tmp_path) == ["fc"]
    x = torch.randn(4, 5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    theirs = Net()
    theirs.load_state_dict(model.state_dict(), strict=False)
    loaded = peft.PeftModel.from_pretrained(theirs, tmp_path)
    assert sorted(n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)) == ["fc"]


# --- found by a hostile review: PEFT's own files and rules, tied weights ------------------------

def tiny_bert_classifier(seed=0):
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=40, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_roberta_classifier(seed=0):
    config = transformers.RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=40, max_position_embeddings=70, num_labels=3)
    torch.manual_seed(seed)
    return transformers.RobertaForSequenceClassification(config).eval()


def test_peft_bias_all_classifier_file_loads(tmp_path):
    """PEFT's bias="all" file also holds its wrapper's classifier.modules_to_save.bias and
    classifier.original_module.bias: the trained copy is classifier.bias, the original dropped."""
    theirs = peft.get_peft_model(tiny_bert_classifier(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                                         bias="all", task_type="SEQ_CLS"))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    assert any(".original_module." in k for k in _file_keys(tmp_path))
    ours = tiny_bert_classifier()
    lora_fast.load_adapter(ours, tmp_path)
    x = token_batch()
    theirs.eval()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-5)
    assert trainable_names(ours) == peft_trainable(theirs)


def test_roberta_head_with_linears_inside_is_trained_whole_both_ways(tmp_path):
    ours = tiny_roberta_classifier()
    names = lora_fast.inject(ours, r=4, lora_alpha=8, target_modules="all-linear")
    theirs = peft.get_peft_model(tiny_roberta_classifier(), peft.LoraConfig(r=4, lora_alpha=8,
                                                                            target_modules="all-linear",
                                                                            task_type="SEQ_CLS"))
    assert not [n for n in names if n.startswith("classifier")]
    assert trainable_names(ours) == peft_trainable(theirs)
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)   # its target_modules list classifier.dense / out_proj
    back = tiny_roberta_classifier()
    lora_fast.load_adapter(back, tmp_path)
    x = token_batch()
    theirs.eval()
    torch.testing.assert_close(back(x).logits, theirs(x).logits, rtol=0, atol=1e-5)


def test_tied_modules_refused_and_model_unchanged():
    model = tiny_gpt2()   # lm_head is tied to transformer.wte
    with pytest.raises(ValueError, match="modules_to_save: 'lm_head' shares a parameter with 'transformer.wte"):
        lora_fast.inject(model, r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    with pytest.raises(RuntimeError, match="merge_weights: layer 'lm_head' has its weight tied"):
        lora_fast.inject(model, r=2, target_modules=["c_attn", "lm_head"], merge_weights=True)
    assert not lora_fast.lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_task_type_is_one_of_peft_s():
    with pytest.raises(ValueError, match="task_type: expected None or one of PEFT's task types"):
        lora_fast.inject(tiny_classifier(), r=2, target_modules=["q_proj"], task_type="seq_cls")


def test_modules_to_save_match_by_string_suffix_as_peft():
    ours = tiny_llama()
    lora_fast.inject(ours, r=2, target_modules=["q_proj"], modules_to_save=["norm"])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                               modules_to_save=["norm"]))
    assert trainable_names(ours) == peft_trainable(theirs)
    assert "model.layers.0.input_layernorm.weight" in trainable_names(ours)


def test_trained_biases_refused_with_several_adapters():
    model = tiny_gpt2()
    lora_fast.inject(model, r=2, target_modules=["c_attn"])
    lora_fast.add_adapter(model, "b", r=2)
    with pytest.raises(ValueError, match="bias: 'all' trains base biases"):
        lora_fast.mark_only_lora_as_trainable(model, bias="all")
    assert not [n for n in trainable_names(model) if "bias" in n]


def test_merge_weights_switches_adapters_in_eval_and_a_refused_flag_stays_off():
    model = tiny_llama()
    lora_fast.inject(model, r=2, target_modules=["q_proj"], merge_weights=True)
    lora_fast.add_adapter(model, "other", r=2)
    perturb_trainable(model)
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.weight.clone()
    model.eval()
    lora_fast.set_adapter(model, "other")   # unmerged, switched, merged again
    assert layer.merged and layer.merged_adapter == "other"
    model.train()
    assert torch.equal(layer.weight, w0)
    from torch.nn.utils import parametrize

    class Same(torch.nn.Module):
        def forward(self, w):
            return w
    plain = lora_fast.LoRALinear(6, 5, r=2).eval()
    parametrize.register_parametrization(plain, "weight", Same())
    with pytest.raises(RuntimeError, match="parametrization"):
        plain.merge_weights = True
    assert plain.merge_weights is False
    plain.eval()   # no merge attempted again


def test_fallback_default_targets_agree_with_peft_s_table():
    table = inject_module._peft_default_targets()
    assert all(table.get(arch) == targets for arch, targets in inject_module.DEFAULT_TARGETS.items())
