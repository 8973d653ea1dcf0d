"""Adapter files (issue 14): nothing silently wrong, and a failed call leaves the model and the files
as they were. save_adapter is atomic; load_adapter checks everything before it changes the model,
refuses PEFT features it does not implement, malformed configs and tensors, naming the file and key."""
import copy
import dataclasses
import json
import math
import os
import stat
import warnings

import pytest
import torch

import lora_fast
from lora_fast import adapter_config, adapters
from helpers import fail_on_call
from tiny_models import tiny_gpt2, tiny_llama, token_batch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def injected(seed=0, r=4, lora_alpha=8, dtype=torch.float32, model=None, **kw):
    """A tiny Llama with LoRA on TARGETS and random (seeded) A and B."""
    model = tiny_llama() if model is None else model
    model = model.to(dtype)
    lora_fast.inject(model, r=r, lora_alpha=lora_alpha, target_modules=TARGETS,
                     adapter_dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(model).values():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)
    return model


def saved(tmp_path, name="adapter", **kw):
    model = injected(**kw)
    lora_fast.save_adapter(model, tmp_path / name)
    return model, tmp_path / name


def logits(model, seed=1):
    with torch.no_grad():
        return model(token_batch(seed=seed)).logits


def snapshot(model):
    """Everything a failed load must leave as it was."""
    return {"modules": {n: type(m) for n, m in model.named_modules()},
            "state": {n: p.detach().clone() for n, p in model.state_dict().items()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "config": copy.deepcopy(model.__dict__.get("lora_fast_config")),
            "merged": {n: l.merged for n, l in lora_fast.lora_layers(model).items()}}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"], "modules replaced"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad changed"
    assert after["config"] == before["config"], "lora_fast_config changed"
    assert after["merged"] == before["merged"], "merged state changed"
    for key in ("state", "params"):
        assert after[key].keys() == before[key].keys()
        for n, t in after[key].items():
            assert torch.equal(t, before[key][n]), f"{n} changed"


def edited(tmp_path, source, name, config_changes=None, tensors=None, raw_config=None):
    """A copy of adapter directory `source` with its config and/or tensors changed."""
    d = tmp_path / name
    d.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (d / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(config))
    t = load_file(source / "adapter_model.safetensors")
    if tensors is not None:
        t = {k: v.contiguous() for k, v in tensors(t).items()}
    save_file(t, d / "adapter_model.safetensors")
    return d


def files_in(path):
    return sorted(p.name for p in path.iterdir())


# --- item 6: save_adapter is atomic -------------------------------------------------------------

def test_save_failing_while_writing_weights_leaves_the_previous_adapter(tmp_path, monkeypatch):
    old, path = saved(tmp_path, seed=0, lora_alpha=8)
    expected = logits(old)
    new = injected(seed=1, lora_alpha=16)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lora_fast.save_adapter(new, path)
    monkeypatch.undo()
    assert files_in(path) == ["adapter_config.json", "adapter_model.safetensors"], "temporaries left"
    fresh = tiny_llama()
    lora_fast.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), expected)
    assert json.loads((path / "adapter_config.json").read_text())["lora_alpha"] == 8


@pytest.mark.parametrize("failing_replace", [1, 2])
def test_save_failing_while_moving_files_into_place_leaves_the_previous_adapter(
        tmp_path, monkeypatch, failing_replace):
    old, path = saved(tmp_path, seed=0, lora_alpha=8)
    expected = logits(old)
    before = {name: (path / name).read_bytes() for name in files_in(path)}
    new = injected(seed=1, lora_alpha=16)
    fail_on_call(monkeypatch, os, "replace", failing_replace, OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):
        lora_fast.save_adapter(new, path)
    monkeypatch.undo()
    assert files_in(path) == sorted(before), "temporaries or backups left"
    assert all((path / name).read_bytes() == data for name, data in before.items())
    fresh = tiny_llama()
    lora_fast.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), expected)


def test_save_failing_into_an_empty_directory_leaves_nothing(tmp_path, monkeypatch):
    fail_on_call(monkeypatch, os, "replace", 2, OSError(5, "Input/output error"))
    with pytest.raises(OSError):
        lora_fast.save_adapter(injected(), tmp_path / "adapter")
    assert files_in(tmp_path / "adapter") == []


def test_weights_and_config_of_different_saves_are_refused(tmp_path):
    """What a crash between the two renames leaves (new weights beside the old config) is
    detected: the weights record the hyper-parameters they were saved with."""
    _, old = saved(tmp_path, "old", seed=0, lora_alpha=8)
    _, new = saved(tmp_path, "new", seed=1, lora_alpha=16)
    (old / "adapter_model.safetensors").write_bytes((new / "adapter_model.safetensors").read_bytes())
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"says lora_alpha=8 but .*was saved with lora_alpha=16"):
        lora_fast.load_adapter(model, old)
    assert_unchanged(model, before)


def test_saves_into_a_directory_of_peft_legacy_weights_replace_them(tmp_path):
    peft = pytest.importorskip("peft")
    path = tmp_path / "adapter"
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS))
    peft_model.save_pretrained(path, safe_serialization=False)
    assert (path / "adapter_model.bin").exists()
    model = injected(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # README.md and the adapter's files are not foreign
        lora_fast.save_adapter(model, path)
    assert files_in(path) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_llama()
    lora_fast.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), logits(model))


def test_saved_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    _, path = saved(tmp_path)
    for name in files_in(path):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o666 & ~umask, name


# --- item 27: foreign files in the target directory ---------------------------------------------

def test_save_warns_once_about_files_that_are_not_an_adapters(tmp_path):
    path = tmp_path / "out"
    (path / "checkpoint-10").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "README.md").write_text("card")
    with pytest.warns(UserWarning, match="not part of an adapter") as record:
        lora_fast.save_adapter(injected(), path)
    ours = [w for w in record if "not part of an adapter" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "checkpoint-10" in message and "notes.txt" in message and "README.md" not in message
    assert (path / "notes.txt").read_text() == "mine"
    with warnings.catch_warnings():   # saving again over an adapter alone: no warning
        warnings.simplefilter("error")
        lora_fast.save_adapter(injected(), tmp_path / "clean")
        lora_fast.save_adapter(injected(), tmp_path / "clean")


# --- item 7: PEFT features without a lora_fast equivalent, unknown keys ------------------------

def test_a_peft_alora_adapter_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    if "alora_invocation_tokens" not in {f.name for f in dataclasses.fields(peft.LoraConfig)}:
        pytest.skip("the installed peft has no aLoRA")
    config = peft.LoraConfig(r=4, target_modules=TARGETS, alora_invocation_tokens=[5, 7],
                             task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[5, 7\] \(aLoRA"):
        lora_fast.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_a_peft_pissa_adapter_is_refused(tmp_path):
    """PEFT rewrites the base weight when it loads a PiSSA adapter; lora_fast would not."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"):
        lora_fast.load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("changes, match", [
    ({"alora_invocation_tokens": [3]}, "alora_invocation_tokens"),
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"velora_config": {"num_groups": 4}}, "velora_config"),
    ({"monteclora_config": {"num_samples": 2}}, "monteclora_config"),
    ({"kasa_config": {"x": 1}}, "kasa_config"),
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
    ({"use_qalora": True}, "use_qalora"),
    ({"layers_pattern": "layers", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"ensure_weight_tying": True}, "ensure_weight_tying"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"init_lora_weights": "mica"}, "init_lora_weights='mica' is the LoRA variant"),
    ({"init_lora_weights": "something_new"}, "init_lora_weights='something_new'"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_peft_features_lora_fast_does_not_implement_are_refused(tmp_path, changes, match):
    _, good = saved(tmp_path)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lora_fast.load_adapter(model, edited(tmp_path, good, "variant", changes))
    assert_unchanged(model, before)


@pytest.mark.parametrize("changes", [
    {"init_lora_weights": "gaussian"}, {"init_lora_weights": False},
    {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}}, {"loftq_config": {"loftq_bits": 4}},
    {"task_type": "CAUSAL_LM", "inference_mode": True, "revision": "main", "peft_version": "9.9"},
    {"use_dora": False, "rank_pattern": {}, "modules_to_save": None, "arrow_config": None},
], ids=lambda v: "-".join(v))
def test_fields_that_do_not_change_the_computation_are_taken(tmp_path, changes):
    model, good = saved(tmp_path)
    fresh = tiny_llama()
    lora_fast.load_adapter(fresh, edited(tmp_path, good, "harmless", changes))
    assert torch.equal(logits(fresh), logits(model))


def test_unknown_keys_are_refused_by_name(tmp_path):
    _, good = saved(tmp_path)
    with pytest.raises(ValueError, match=r"frobnicate=3 \(not a field of the installed peft's LoraConfig"):
        lora_fast.load_adapter(tiny_llama(), edited(tmp_path, good, "unknown", {"frobnicate": 3}))


@pytest.mark.parametrize("value", [None, False, "", [], {}])
def test_unknown_keys_are_refused_whatever_their_value(tmp_path, value):
    """Not a field of the installed peft's LoraConfig: refused even at an "off" value (PEFT
    writes every field, but lora_fast cannot know what one it does not know computes)."""
    _, good = saved(tmp_path)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="a_field_of_a_newer_peft=.*not a field of the installed peft"):
        lora_fast.load_adapter(model, edited(tmp_path, good, "newer", {"a_field_of_a_newer_peft": value}))
    assert_unchanged(model, before)


def test_every_field_of_the_installed_peft_is_classified():
    """A new PEFT field fails here until adapters.py says how to treat it."""
    peft = pytest.importorskip("peft")
    fields = dataclasses.fields(peft.LoraConfig)
    unclassified = sorted({f.name for f in fields} - adapter_config.CLASSIFIED_FIELDS)
    assert not unclassified, f"classify these LoraConfig fields in lora_fast/adapters.py: {unclassified}"
    variants = {f.name for f in fields if f.metadata.get("is_lora_variant")}
    assert variants <= set(adapter_config._REFUSED_FIELDS) | adapter_config.IMPLEMENTED_VARIANTS, \
        "a PEFT LoRA variant is neither refused nor implemented"
    assert adapter_config.IMPLEMENTED_VARIANTS <= adapter_config._CHECKED_FIELDS
    for f in fields:
        for value in f.metadata.get("lora_variants", ()):
            with pytest.raises(ValueError, match="variant"):
                adapter_config._check_init(value, "config")


def test_a_fan_in_fan_out_that_disagrees_with_the_layers_is_said(tmp_path):
    model, good = saved(tmp_path)
    fresh = tiny_llama()
    with pytest.warns(UserWarning, match="fan_in_fan_out=True.*not transformers Conv1D"):
        lora_fast.load_adapter(fresh, edited(tmp_path, good, "fifo", {"fan_in_fan_out": True}))
    assert torch.equal(logits(fresh), logits(model))
    gpt2 = tiny_gpt2()
    lora_fast.inject(gpt2, r=4, target_modules=["c_attn"])
    lora_fast.save_adapter(gpt2, tmp_path / "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_fast.load_adapter(tiny_gpt2(), tmp_path / "gpt2")


# --- item 9: dtypes -----------------------------------------------------------------------------

def test_a_float32_adapter_loads_into_a_float64_model_as_float64(tmp_path):
    model, path = saved(tmp_path)
    fresh = tiny_llama().double()
    lora_fast.load_adapter(fresh, path)
    layer = fresh.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    ours = lora_fast.lora_state_dict(model)
    assert all(torch.equal(t, ours[k].double()) for k, t in lora_fast.lora_state_dict(fresh).items())
    reference = copy.deepcopy(model).double()
    assert torch.allclose(logits(fresh), logits(reference), rtol=0, atol=1e-12)


@pytest.mark.parametrize("file_dtype, model_dtype, adapter_dtype", [
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),    # master adapters on a half base
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # the exact round trip
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.bfloat16, torch.float32),
])
def test_adapters_load_in_a_dtype_that_runs_and_holds_the_file_exactly(
        tmp_path, file_dtype, model_dtype, adapter_dtype):
    model, path = saved(tmp_path, dtype=file_dtype)
    fresh = tiny_llama().to(model_dtype)
    lora_fast.load_adapter(fresh, path)
    ours = lora_fast.lora_state_dict(model)
    for key, t in lora_fast.lora_state_dict(fresh).items():
        assert t.dtype == adapter_dtype, key
        assert torch.equal(t.to(file_dtype), ours[key]), key
    logits(fresh)   # runs


# --- item 12: validation before any change -----------------------------------------------------

def _wrong_r(t):
    return {k: (v[:2] if ".lora_A." in k else v[:, :2]) for k, v in t.items()}


@pytest.mark.parametrize("case", ["wrong-r-in-file", "missing-key", "wrong-shape", "no-match"])
def test_a_failed_load_leaves_a_plain_model_as_it_was(tmp_path, case):
    model, good = saved(tmp_path)
    variants = {
        "wrong-r-in-file": dict(tensors=_wrong_r),
        "missing-key": dict(tensors=lambda t: dict(list(t.items())[1:])),
        "wrong-shape": dict(tensors=lambda t: {k: (v[:, :-1] if i == len(t) - 1 else v)
                                               for i, (k, v) in enumerate(t.items())}),
        "no-match": dict(config_changes={"target_modules": ["nothing_like_this"]}),
    }
    bad = edited(tmp_path, good, case, **variants[case])
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises((KeyError, ValueError)):
        lora_fast.load_adapter(fresh, bad)
    assert_unchanged(fresh, before)
    lora_fast.load_adapter(fresh, good)   # and the right adapter loads afterwards
    assert torch.equal(logits(fresh), logits(model))


def test_a_load_failing_midway_undoes_the_inject(tmp_path, monkeypatch):
    _, good = saved(tmp_path)
    fresh = tiny_llama()
    before = snapshot(fresh)

    def fails(layers, tensors):
        next(iter(layers.values())).lora_A.data.fill_(7.0)
        raise RuntimeError("out of memory")
    monkeypatch.setattr(adapters, "_copy_into", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        lora_fast.load_adapter(fresh, good)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("merged", [False, True])
def test_a_load_failing_midway_restores_the_adapter_a_model_had(tmp_path, monkeypatch, merged):
    model, first = saved(tmp_path, "first", seed=0)
    _, second = saved(tmp_path, "second", seed=1)
    if merged:
        lora_fast.merge(model)
    before = snapshot(model)
    expected = logits(model)
    real = adapters._copy_into

    def fails(layers, tensors):
        real(layers, tensors)
        raise RuntimeError("late failure")
    monkeypatch.setattr(adapters, "_copy_into", fails)
    with pytest.raises(RuntimeError, match="late failure"):
        lora_fast.load_adapter(model, second)
    assert_unchanged(model, before)
    assert torch.equal(logits(model), expected)


def test_a_refused_tensor_leaves_the_adapter_a_model_had(tmp_path):
    model, good = saved(tmp_path)
    nan = edited(tmp_path, good, "nan", tensors=lambda t: {
        k: (v.masked_fill(torch.zeros_like(v, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True),
                          math.nan) if i == len(t) - 1 else v) for i, (k, v) in enumerate(t.items())})
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        lora_fast.load_adapter(model, nan)
    assert_unchanged(model, before)


# --- item 3: loading into merged layers ---------------------------------------------------------

def test_loading_into_merged_layers_merges_the_new_adapter(tmp_path):
    model, _ = saved(tmp_path, "first", seed=0)
    _, second = saved(tmp_path, "second", seed=1)
    base_weights = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    lora_fast.merge(model)
    lora_fast.load_adapter(model, second)
    assert all(layer.merged for layer in lora_fast.lora_layers(model).values())
    reference = tiny_llama()
    lora_fast.load_adapter(reference, second)
    lora_fast.merge(reference)
    assert torch.equal(logits(model), logits(reference))
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
    lora_fast.unmerge(model)   # the base weight under it is still the original, bit for bit
    for name, layer in lora_fast.lora_layers(model).items():
        assert torch.equal(layer.weight, base_weights[f"{name}.weight"]), name


# --- item 13: a huge r in the config ------------------------------------------------------------

def test_a_huge_r_is_compared_with_the_file_before_anything_is_allocated(tmp_path):
    _, good = saved(tmp_path)
    bad = edited(tmp_path, good, "huge", {"r": 2**40})
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lora_A\.weight in .*adapter_model\.safetensors has shape "
                                         r"\(4, 48\), the model expects \(1099511627776, 48\) "
                                         r"\(r=1099511627776 in .*adapter_config\.json\)"):
        lora_fast.load_adapter(model, bad)
    assert_unchanged(model, before)


# --- item 14: hyper-parameters in a config ------------------------------------------------------

@pytest.mark.parametrize("changes, key", [
    ({"r": True}, "r"), ({"r": 4.0}, "r"), ({"r": "4"}, "r"), ({"r": -4}, "r"),
    ({"lora_alpha": "8"}, "lora_alpha"), ({"lora_alpha": math.inf}, "lora_alpha"),
    ({"lora_alpha": math.nan}, "lora_alpha"), ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_alpha": True}, "lora_alpha"),
    ({"use_rslora": "no"}, "use_rslora"), ({"use_rslora": 1}, "use_rslora"),
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"lora_dropout": True}, "lora_dropout"), ({"lora_dropout": "0.1"}, "lora_dropout"),
    ({"fan_in_fan_out": "false"}, "fan_in_fan_out"),
    ({"target_modules": [1, 2]}, "target_modules"), ({"exclude_modules": "q_proj("}, "exclude_modules"),
], ids=lambda v: repr(v) if isinstance(v, dict) else v)
def test_bad_hyper_parameters_in_a_config_are_refused_naming_file_and_key(tmp_path, changes, key):
    _, good = saved(tmp_path)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {key}"):
        lora_fast.load_adapter(model, edited(tmp_path, good, "bad", changes))
    assert_unchanged(model, before)


# --- item 15: malformed files -------------------------------------------------------------------

@pytest.mark.parametrize("raw, match", [
    ("[1, 2]", "expected a JSON object .* got list"),
    ("null", "expected a JSON object .* got NoneType"),
    ('{"r": 4,', "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
])
def test_a_config_that_is_not_a_json_object_is_refused_naming_the_file(tmp_path, raw, match):
    _, good = saved(tmp_path)
    bad = edited(tmp_path, good, "bad", raw_config=raw)
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {match}"):
        lora_fast.load_adapter(tiny_llama(), bad)


@pytest.mark.parametrize("content, match", [
    ({"base_model.model.x.lora_A.weight": 3}, "expected a dict of str keys to tensors"),
    ([torch.zeros(2)], "expected a dict of tensors, got list"),
])
def test_a_bin_file_holding_non_tensors_is_refused_naming_the_file(tmp_path, content, match):
    _, good = saved(tmp_path)
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save(content, d / "adapter_model.bin")
    with pytest.raises(ValueError, match=rf"adapter_model\.bin: {match}"):
        lora_fast.load_adapter(tiny_llama(), d)


def test_a_corrupt_safetensors_file_is_refused_naming_it(tmp_path):
    _, good = saved(tmp_path)
    (good / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors"):
        lora_fast.load_adapter(tiny_llama(), good)


# --- item 16: tensors that are not adapter weights ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_integer_and_bool_tensors_are_refused(tmp_path, dtype):
    _, good = saved(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    bad = edited(tmp_path, good, "ints", tensors=lambda t: {**t, key: t[key].to(dtype)})
    with pytest.raises(ValueError, match=rf"{key} has dtype {dtype}, expected a floating dtype"):
        lora_fast.load_adapter(tiny_llama(), bad)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_values_are_refused(tmp_path, value):
    _, good = saved(tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"

    def poisoned(t):
        t = dict(t)
        t[key] = t[key].clone()
        t[key][0, 0] = value
        return t
    with pytest.raises(ValueError, match=rf"{key} holds 1 non-finite values"):
        lora_fast.load_adapter(tiny_llama(), edited(tmp_path, good, "nan", tensors=poisoned))


# --- item 22: PEFT's named adapters -------------------------------------------------------------

def test_a_named_peft_adapter_is_pointed_to(tmp_path):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS),
                                     adapter_name="mine")
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"subfolder named after it: .* has adapters in "
                                                r"\['mine'\], pass one of those folders"):
        lora_fast.load_adapter(tiny_llama(), tmp_path)
    assert sorted(lora_fast.load_adapter(tiny_llama(), tmp_path / "mine")) == sorted(
        f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS)


def test_a_file_instead_of_a_directory_is_said(tmp_path):
    _, good = saved(tmp_path)
    with pytest.raises(NotADirectoryError, match="pass the directory"):
        lora_fast.load_adapter(tiny_llama(), good / "adapter_config.json")


# --- what load_adapter records: a PEFT adapter saved again by lora_fast is the same adapter ------

def test_a_peft_adapter_with_exclude_modules_saved_again_selects_the_same_layers(tmp_path):
    """load_adapter keeps what inject recorded (the selected names), not the file's
    target_modules without its exclude_modules, so PEFT reads the re-saved adapter as the same."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], exclude_modules=["o_proj"])
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    names = lora_fast.load_adapter(model, tmp_path / "peft")
    assert all(name.endswith("q_proj") for name in names)
    lora_fast.save_adapter(model, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    theirs = sorted(n[len("base_model.model."):] for n, m in again.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer))
    assert theirs == sorted(names)
