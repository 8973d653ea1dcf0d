"""Several named adapters on one model against the real PEFT, on tiny Llama- and GPT-2-architecture
models built from configs: add / set / delete, each adapter's logits equal PEFT's, PEFT's on-disk
layout (default at the root, the others in subfolders) both ways, hot swap into a torch.compile'd
model without a recompile, and refusals that leave the model and the files as they were."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import lora_fast
from lora_fast import LoRALinear, adapters
from lora_fast.named_adapters import adapter_layers
from helpers import assert_close, fail_on_call
from tiny_models import MODELS, tiny_llama, token_batch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

# name -> LoRA settings; ranks, alphas, rslora and targets all differ (b and c share layers with
# default, and c has layers no other adapter has).
SPECS = {
    "llama": {
        "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=8, lora_alpha=4, target_modules=["k_proj", "v_proj", "down_proj"]),
        "c": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["up_proj", "o_proj"]),
    },
    "gpt2": {
        "default": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        "b": dict(r=6, lora_alpha=12, target_modules=["c_attn", "c_fc"]),
        "c": dict(r=2, lora_alpha=1, use_rslora=True, target_modules=["c_proj"]),
    },
}


def randomize(model, seed=0):
    """Random A and B for every adapter of every layer (a new adapter's B is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(model).values():
            for name in layer.adapter_settings:
                for p in layer.adapter_weights(name):
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)
    return model


def ours_with(arch="llama", names=("default", "b", "c"), seed=0, base=None):
    model = copy.deepcopy(base) if base is not None else MODELS[arch]()
    specs = SPECS[arch]
    lora_fast.inject(model, adapter_name=names[0], **specs[names[0]])
    for name in names[1:]:
        lora_fast.add_adapter(model, name, **specs[name])
    return randomize(model, seed)


def peft_with(base, arch="llama", names=("default", "b", "c"), seed=3, specs=None):
    def config(spec):
        return peft.LoraConfig(fan_in_fan_out=arch == "gpt2", **spec)
    specs = specs or SPECS[arch]
    peft_model = peft.get_peft_model(copy.deepcopy(base), config(specs[names[0]]),
                                     adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config(specs[name]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft_model


def logits(model, seed=1):
    with torch.no_grad():
        return model(token_batch(seed=seed)).logits


def snapshot(model):
    """Everything a refused or failed call must leave as it was."""
    layers = lora_fast.lora_layers(model)
    return {"modules": {n: type(m) for n, m in model.named_modules()},
            "state": {n: t.detach().clone() for n, t in model.state_dict().items()},
            "params": {n: p for n, p in model.named_parameters()},   # the very same objects
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "config": copy.deepcopy(model.__dict__.get("lora_fast_config")),
            "adapters": copy.deepcopy(model.__dict__.get("lora_fast_adapters")),
            "layers": {n: (dict(l.adapter_settings), l.active_adapter, l.merged, l.merged_adapter)
                       for n, l in layers.items()}}


def assert_unchanged(model, before):
    after = snapshot(model)
    for key in ("modules", "requires_grad", "config", "adapters", "layers"):
        assert after[key] == before[key], f"{key} changed"
    assert after["state"].keys() == before["state"].keys()
    for n, t in after["state"].items():
        assert torch.equal(t, before["state"][n]), f"{n} changed"
    assert after["params"].keys() == before["params"].keys()
    assert all(after["params"][n] is p for n, p in before["params"].items()), "new Parameters"


def files_of(path):
    """{relative path: bytes} of every file under `path`."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def layers_of(arch, name):
    """Our layer names for SPECS[arch][name] (the same selection PEFT makes)."""
    model = MODELS[arch]()
    return sorted(lora_fast.inject(model, **SPECS[arch][name]))


# --- add / set / delete / names ------------------------------------------------------------------

def test_names_active_adapter_and_requires_grad():
    model = ours_with()
    assert lora_fast.adapter_names(model) == ["default", "b", "c"]
    assert lora_fast.active_adapter(model) == "default"
    for name in ("b", "c", "default"):
        lora_fast.set_adapter(model, name)
        assert lora_fast.active_adapter(model) == name
        assert model.lora_fast_config == model.lora_fast_adapters[name]
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        keys = {f"{layer}.lora_{p}" for layer in adapter_layers(model, name) for p in "AB"}
        assert set(lora_fast.lora_state_dict(model)) == keys
        if name != "default":   # the state-dict keys of an adapter not named "default"
            keys = {k.replace(".lora_", f".lora_adapters.{name}.lora_") for k in keys}
        assert trainable == keys, name
    assert sorted(adapter_layers(model, "c")) == layers_of("llama", "c")


def test_training_updates_the_active_adapter_only():
    model = ours_with().train()
    lora_fast.set_adapter(model, "b")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and all(".lora_adapters.b." in n for n in changed), sorted(changed)[:5]


def test_a_layer_without_the_active_adapter_computes_its_base():
    model = ours_with()
    lora_fast.set_adapter(model, "c")
    q = model.model.layers[0].self_attn.q_proj   # default only
    assert q.settings is None and q.lora_A is None and q.r is None
    x = torch.randn(3, 48)
    assert torch.equal(q(x), F.linear(x, q.weight, q.bias))
    lora_fast.set_adapter(model, "default")
    assert not torch.equal(q(x), F.linear(x, q.weight, q.bias))


def test_merge_unmerge_and_merge_and_unload_act_on_the_active_adapter():
    base = tiny_llama()
    model = ours_with(base=base)
    lora_fast.set_adapter(model, "b")
    expected = logits(model)
    weights = {n: l.weight.clone() for n, l in lora_fast.lora_layers(model).items()}
    lora_fast.merge(model)
    merged = {n for n, l in lora_fast.lora_layers(model).items() if l.merged}
    assert merged == set(adapter_layers(model, "b"))
    assert all(l.merged_adapter == "b" for n, l in lora_fast.lora_layers(model).items() if n in merged)
    assert_close("merged logits", logits(model), expected, torch.float32)
    with pytest.raises(RuntimeError, match="unmerge"):
        lora_fast.set_adapter(model, "c")
    lora_fast.unmerge(model)
    for n, l in lora_fast.lora_layers(model).items():
        assert torch.equal(l.weight, weights[n]), n
    plain = lora_fast.merge_and_unload(model)
    assert not lora_fast.lora_layers(plain) and "lora_fast_adapters" not in plain.__dict__
    assert_close("merge_and_unload logits", logits(plain), expected, torch.float32)
    peft_model = peft_with(base)
    peft_model.set_adapter("b")
    peft_expected = logits(peft_model)
    assert_close("PEFT merge_and_unload", logits(peft_model.merge_and_unload()), peft_expected,
                 torch.float32)


def test_deleting_adapters():
    model = ours_with()
    with pytest.raises(RuntimeError,
                       match=r"'default' is the active adapter; set_adapter\(model, 'b'\)"):
        lora_fast.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="adapter_name: the model has no adapter 'zz'"):
        lora_fast.delete_adapter(model, "zz")
    lora_fast.set_adapter(model, "c")
    lora_fast.delete_adapter(model, "default")
    lora_fast.delete_adapter(model, "b")
    assert lora_fast.adapter_names(model) == ["c"]
    assert not any(".lora_A" in k and "lora_adapters" not in k for k in model.state_dict())
    with pytest.raises(RuntimeError, match="only one"):
        lora_fast.delete_adapter(model, "c")


@pytest.mark.parametrize("bad", [3, None, "", "a.b", "a/b", "../x", "-x", "with space", "keys"])
def test_names_of_the_wrong_kind_are_refused(tmp_path, bad):
    model = ours_with(names=("default",))
    lora_fast.save_adapter(model, tmp_path / "a")
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter_name: expected an adapter name"):
        lora_fast.add_adapter(model, bad, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="adapter_name: (expected an adapter name|the model has "
                                         "no adapter .*; its adapters are)"):
        lora_fast.set_adapter(model, bad)   # named_adapters names the known ones instead
    if bad is not None:   # None means "the active one" / "all" there
        with pytest.raises(ValueError, match="adapter_name: expected an adapter name"):
            lora_fast.load_adapter(model, tmp_path / "a", adapter_name=bad)
        with pytest.raises(ValueError, match="adapter_name: expected an adapter name"):
            lora_fast.save_adapter(model, tmp_path / "b", adapter_name=bad)
        with pytest.raises(ValueError, match="adapter_name: expected an adapter name"):
            lora_fast.lora_state_dict(model, adapter_name=bad)
    assert_unchanged(model, before)
    assert not (tmp_path / "b").exists()


def test_unknown_names_are_refused(tmp_path):
    model = ours_with(names=("default", "b"))
    for call in (lambda: lora_fast.save_adapter(model, tmp_path / "x", adapter_name="c"),
                 lambda: lora_fast.lora_state_dict(model, adapter_name="c"),
                 lambda: lora_fast.set_adapter(model, "c")):
        with pytest.raises(ValueError, match=r"adapter_name: the model has no adapter 'c'; its "
                                             r"adapters are \['default', 'b'\]"):
            call()
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="adapter_name: the model has an adapter 'b' already"):
        lora_fast.add_adapter(model, "b", r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="hotswap: expected True or False"):
        lora_fast.load_adapter(model, tmp_path, hotswap="yes")


# --- PEFT's logits for each adapter, and its layout both ways ----------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_adapter_gives_peft_logits_after_our_save(tmp_path, arch):
    base = MODELS[arch]()
    ours = ours_with(arch, base=base)
    path = lora_fast.save_adapter(ours, tmp_path / "out", base_model_name_or_path="tiny-" + arch)
    assert sorted(files_of(path)) == ["adapter_config.json", "adapter_model.safetensors",
                                      "b/adapter_config.json", "b/adapter_model.safetensors",
                                      "c/adapter_config.json", "c/adapter_model.safetensors"]
    for name, folder in (("default", path), ("b", path / "b"), ("c", path / "c")):
        config = json.loads((folder / "adapter_config.json").read_text())
        spec = SPECS[arch][name]
        assert (config["r"], config["lora_alpha"], config["use_rslora"], config["target_modules"]) == (
            spec["r"], spec["lora_alpha"], spec.get("use_rslora", False), spec["target_modules"])
        keys = set(load_file(folder / "adapter_model.safetensors"))
        assert keys == {f"base_model.model.{n}.lora_{p}.weight"
                        for n in layers_of(arch, name) for p in "AB"}

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name="default")
    theirs.load_adapter(path / "b", adapter_name="b")
    theirs.load_adapter(path / "c", adapter_name="c")
    plain = logits(base)
    for name in ("default", "b", "c", "default"):
        lora_fast.set_adapter(ours, name)
        theirs.set_adapter(name)
        ref = logits(theirs)
        assert (ref - plain).abs().max() > 1e-2, f"{name}: the adapter must change the logits"
        assert_close(f"logits of {name}", logits(ours), ref, torch.float32)
        for key, t in lora_fast.lora_state_dict(ours).items():   # and the tensors, bit for bit
            layer, part = key.rsplit(".", 1)
            found = theirs.get_submodule(f"base_model.model.{layer}.{part}")[name].weight
            assert torch.equal(found, t), key


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_peft_folder_of_three_adapters_loads_and_gives_peft_logits(tmp_path, arch):
    base = MODELS[arch]()
    theirs = peft_with(base, arch)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    assert lora_fast.load_adapters(ours, tmp_path / "peft") == ["default", "b", "c"]
    assert lora_fast.active_adapter(ours) == "default"   # the injected one
    for name in ("default", "b", "c"):
        assert sorted(adapter_layers(ours, name)) == layers_of(arch, name)
        lora_fast.set_adapter(ours, name)
        theirs.set_adapter(name)
        assert_close(f"logits of {name}", logits(ours), logits(theirs), torch.float32)

    # and back: what we save is PEFT's adapters bit for bit
    lora_fast.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    for name in ("b", "c"):
        again.load_adapter(tmp_path / "ours" / name, adapter_name=name)
    for name in ("default", "b", "c"):
        expected = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        found = peft.get_peft_model_state_dict(again, adapter_name=name)
        assert expected.keys() == found.keys()
        assert all(torch.equal(found[k], t) for k, t in expected.items()), name


def test_load_adapter_reads_the_named_subfolder_and_adds_without_activating(tmp_path):
    base = tiny_llama()
    specs = {"x": SPECS["llama"]["default"], "y": SPECS["llama"]["b"]}
    peft_with(base, names=("x", "y"), specs=specs).save_pretrained(tmp_path)   # nothing at the root
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match=r"has adapters in \['x', 'y'\], pass one of those "
                                                r"folders \(or adapter_name="):
        lora_fast.load_adapter(copy.deepcopy(base), tmp_path)
    model = copy.deepcopy(base)
    lora_fast.load_adapter(model, tmp_path, adapter_name="y")
    assert lora_fast.adapter_names(model) == ["y"] and lora_fast.active_adapter(model) == "y"
    expected = logits(model)
    names = lora_fast.load_adapter(model, tmp_path, adapter_name="x")   # added, not active
    assert sorted(names) == layers_of("llama", "default")
    assert lora_fast.adapter_names(model) == ["y", "x"] and lora_fast.active_adapter(model) == "y"
    assert all(not p.requires_grad for layer in adapter_layers(model, "x").values()
               for p in layer.adapter_weights("x"))
    assert torch.equal(logits(model), expected)
    assert lora_fast.load_adapters(copy.deepcopy(base), tmp_path) == ["x", "y"]


def test_round_trip_of_our_layout_is_exact(tmp_path):
    model = ours_with()
    lora_fast.set_adapter(model, "b")
    lora_fast.save_adapter(model, tmp_path / "one")
    fresh = tiny_llama()
    assert lora_fast.load_adapters(fresh, tmp_path / "one") == ["default", "b", "c"]
    for name in ("default", "b", "c"):
        lora_fast.set_adapter(fresh, name)
        lora_fast.set_adapter(model, name)
        before, after = lora_fast.lora_state_dict(model, name), lora_fast.lora_state_dict(fresh, name)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(logits(fresh), logits(model)), name
    assert fresh.lora_fast_adapters == model.lora_fast_adapters
    lora_fast.save_adapter(fresh, tmp_path / "two")
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        if key.endswith(".safetensors"):
            a, b = load_file(tmp_path / "one" / key), load_file(tmp_path / "two" / key)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
        else:
            assert one[key] == two[key], key


def test_one_named_adapter_is_saved_at_the_root_of_the_folder_given(tmp_path):
    model = ours_with()
    lora_fast.save_adapter(model, tmp_path / "c-only", adapter_name="c")
    assert sorted(files_of(tmp_path / "c-only")) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_llama()
    lora_fast.load_adapter(fresh, tmp_path / "c-only", adapter_name="c")
    assert lora_fast.adapter_names(fresh) == ["c"]
    lora_fast.set_adapter(model, "c")
    assert torch.equal(logits(fresh), logits(model))
    # into a model that has it: replaced in place, and the existing check of r/alpha/rslora holds
    other = ours_with(seed=5)
    lora_fast.load_adapter(other, tmp_path / "c-only", adapter_name="c")
    lora_fast.set_adapter(other, "c")
    assert torch.equal(logits(other), logits(model))
    with pytest.raises(ValueError, match=r"has r=8, the adapter r=2 .*adapter_name='b'.*hotswap=True"):
        lora_fast.load_adapter(other, tmp_path / "c-only", adapter_name="b")


# --- hot swap ------------------------------------------------------------------------------------

def file_adapter(tmp_path, name, seed, **spec):
    """A saved one-adapter folder on the llama's q/v layers."""
    model = tiny_llama()
    lora_fast.inject(model, target_modules=["q_proj", "v_proj"], **spec)
    randomize(model, seed)
    return lora_fast.save_adapter(model, tmp_path / name), logits(model)


@pytest.mark.parametrize("slot", ["default", "slot"])
def test_hotswap_into_a_compiled_model_does_not_recompile(tmp_path, slot):
    from torch._dynamo.testing import CompileCounter
    same_rank, same_rank_logits = file_adapter(tmp_path, "same", 1, r=8, lora_alpha=5)
    lower, lower_logits = file_adapter(tmp_path, "lower", 2, r=3, lora_alpha=7, use_rslora=True)
    model = tiny_llama()
    lora_fast.inject(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    if slot == "slot":   # a slot of the largest rank to come, beside another adapter
        lora_fast.add_adapter(model, "slot", r=8, lora_alpha=8)
        lora_fast.set_adapter(model, "slot")
    randomize(model, 0)
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    settings = {n: dict(l.adapter_settings) for n, l in lora_fast.lora_layers(model).items()}
    record = copy.deepcopy(model.lora_fast_adapters)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    before = logits(compiled)
    compiles = counter.frame_count
    assert compiles >= 1

    for path, expected in ((same_rank, same_rank_logits), (lower, lower_logits)):
        lora_fast.load_adapter(compiled, path, adapter_name=slot, hotswap=True)
        out = logits(compiled)
        assert counter.frame_count == compiles, "hot swap recompiled"
        assert_close("compiled logits after hot swap", out, expected, torch.float32)
        assert_close("eager logits after hot swap", logits(model), expected, torch.float32)
        assert not torch.allclose(out, before)
    assert all(p is params[n][0] and p.data_ptr() == params[n][1] for n, p in model.named_parameters())
    assert {n: dict(l.adapter_settings) for n, l in lora_fast.lora_layers(model).items()} == settings
    assert model.lora_fast_adapters == record
    layer = model.model.layers[0].self_attn.q_proj
    lora_A, lora_B = layer.adapter_weights(slot)
    assert torch.equal(lora_A[3:], torch.zeros_like(lora_A[3:]))   # padded rank: zeros
    assert torch.equal(lora_B[:, 3:], torch.zeros_like(lora_B[:, 3:]))

    # what is saved now (the slot's r and alpha, B scaled) is the file's adapter
    lora_fast.save_adapter(model, tmp_path / "swapped", adapter_name=slot)
    again = tiny_llama()
    lora_fast.load_adapter(again, tmp_path / "swapped")
    assert_close("reloaded", logits(again), lower_logits, torch.float32)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "swapped")
    assert_close("PEFT reloaded", logits(theirs), lower_logits, torch.float32)


def test_hotswap_refusals_change_nothing(tmp_path):
    model = ours_with(names=("default", "b"))
    higher, _ = file_adapter(tmp_path, "higher", 1, r=8)
    fits, _ = file_adapter(tmp_path, "fits", 1, r=2)
    other = tiny_llama()
    lora_fast.inject(other, r=2, target_modules=["q_proj"])
    elsewhere = lora_fast.save_adapter(other, tmp_path / "elsewhere")
    files = files_of(tmp_path)
    before = snapshot(model)
    cases = [
        (dict(path=fits, adapter_name="zz"), r"adapter_name: hotswap=True replaces the weights of "
                                             r"an adapter the model has, and it has no adapter 'zz'"),
        (dict(path=higher, adapter_name="default"),
         r"hotswap: the file's r=8 is higher than adapter 'default''s r=4 .*"
         r"add_adapter\(model, 'default', r=8"),
        (dict(path=elsewhere, adapter_name="default"), r"hotswap: .* on other layers than adapter "
                                                       r"'default': 2 of its layers missing"),
        (dict(path=fits, adapter_name="b"), r"hotswap: .* on other layers than adapter 'b'"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            lora_fast.load_adapter(model, hotswap=True, **kwargs)
        assert_unchanged(model, before)
    lora_fast.merge(model)
    merged = snapshot(model)
    with pytest.raises(ValueError,
                       match=r"hotswap: adapter 'default' is merged .*unmerge\(model\) first"):
        lora_fast.load_adapter(model, fits, hotswap=True)
    assert_unchanged(model, merged)
    with pytest.raises(ValueError, match=r"adapter_name: hotswap=True .*\(no LoRA layers\)"):
        lora_fast.load_adapter(tiny_llama(), fits, hotswap=True)
    assert files_of(tmp_path) == files


# --- failures leave the model and the files as they were ----------------------------------------

@pytest.mark.parametrize("how", ["add", "replace", "hotswap", "load_adapters"])
def test_a_load_failing_midway_restores_every_adapter(tmp_path, monkeypatch, how):
    source = ours_with(seed=7)
    lora_fast.save_adapter(source, tmp_path / "src")
    model = ours_with(names=("default", "b"), seed=1)
    lora_fast.set_adapter(model, "b")
    if how == "load_adapters":
        model = ours_with(names=("default",), seed=1)
    files = files_of(tmp_path)
    before = snapshot(model)
    expected = logits(model)
    real = adapters._copy_into
    calls = []

    def fails(layers, incoming):
        real(layers, incoming)
        calls.append(incoming.adapter_name)
        if how != "load_adapters" or len(calls) == 3:   # load_adapters: after the third adapter
            raise RuntimeError("late failure")
    monkeypatch.setattr(adapters, "_copy_into", fails)
    with pytest.raises(RuntimeError, match="late failure"):
        if how == "load_adapters":
            lora_fast.load_adapters(model, tmp_path / "src")
        else:
            name = "c" if how == "add" else "b"
            lora_fast.load_adapter(model, tmp_path / "src" / name, adapter_name=name,
                                   hotswap=how == "hotswap")
    assert calls, "the failure must come after weights were copied in"
    assert_unchanged(model, before)
    assert torch.equal(logits(model), expected)
    assert files_of(tmp_path) == files


def test_load_adapters_refusing_a_later_adapter_leaves_a_plain_model_as_it_was(tmp_path):
    lora_fast.save_adapter(ours_with(), tmp_path / "src")
    (tmp_path / "src" / "c" / "adapter_config.json").write_text('{"r": 4,')
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"c/adapter_config\.json: not valid JSON"):
        lora_fast.load_adapters(model, tmp_path / "src")
    assert_unchanged(model, before)


@pytest.mark.parametrize("failing_write", [1, 2, 3])
def test_a_multi_adapter_save_failing_leaves_every_folder_as_it_was(tmp_path, monkeypatch,
                                                                   failing_write):
    path = tmp_path / "out"
    lora_fast.save_adapter(ours_with(names=("default", "b"), seed=0), path)
    files = files_of(path)
    import safetensors.torch
    fail_on_call(monkeypatch, safetensors.torch, "save_file", failing_write,
                 OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        lora_fast.save_adapter(ours_with(seed=1), path)   # default, b and a new c
    assert files_of(path) == files, "a folder changed, or temporaries were left"
    assert not (path / "c").exists(), "the new subfolder was left behind"


@pytest.mark.parametrize("failing_replace", range(1, 7))
def test_a_multi_adapter_save_failing_while_renaming_leaves_every_folder_whole(
        tmp_path, monkeypatch, failing_replace):
    """3 folders x 2 renames: wherever a rename fails, each folder holds its old adapter or its
    new one, never a mix (and loads)."""
    import os

    def folder_contents(folder):   # safetensors' header order varies: compare tensors, not bytes
        tensors = load_file(folder / "adapter_model.safetensors")
        return (folder / "adapter_config.json").read_text(), {k: t.tolist() for k, t in tensors.items()}

    path = tmp_path / "out"
    old_model = ours_with(seed=0)
    for name in ("default", "b", "c"):   # old configs differ from the new ones too
        lora_fast.set_adapter(old_model, name)
        for layer in adapter_layers(old_model, name).values():
            layer.lora_dropout = 0.1
    lora_fast.save_adapter(old_model, path)
    old = {f: folder_contents(path / f) for f in ("", "b", "c")}
    new_model = ours_with(seed=1)
    lora_fast.save_adapter(new_model, tmp_path / "reference")
    new = {f: folder_contents(tmp_path / "reference" / f) for f in ("", "b", "c")}
    names = sorted(files_of(path))
    fail_on_call(monkeypatch, os, "replace", failing_replace, OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):
        lora_fast.save_adapter(new_model, path)
    monkeypatch.undo()
    assert sorted(files_of(path)) == names, "temporaries or backups left"
    for folder in ("", "b", "c"):
        assert folder_contents(path / folder) in (old[folder], new[folder]), f"{folder!r} mixed"
    assert lora_fast.load_adapters(tiny_llama(), path) == ["default", "b", "c"]


def test_a_refused_save_writes_nothing(tmp_path):
    model = ours_with()
    # layers of one adapter differing in rank (made by hand): PEFT's format cannot say it
    layer = lora_fast.lora_layers(model)["model.layers.1.self_attn.k_proj"]
    layer.lora_adapters["b"].lora_A.data = torch.zeros(3, 48)
    layer.adapter_settings["b"] = layer.adapter_settings["b"]._replace(r=3)
    with pytest.raises(ValueError, match=r"layers of adapter 'b' differ in r \(\[3, 8\]\)"):
        lora_fast.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_saving_into_a_folder_of_other_adapters_warns_only_about_foreign_files(tmp_path):
    import warnings
    path = tmp_path / "out"
    model = ours_with()
    lora_fast.save_adapter(model, path)
    (path / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match=r"1 entries that are not part of an adapter.*notes\.txt"):
        lora_fast.save_adapter(model, path)
    (path / "notes.txt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the subfolders are the model's adapters: no warning
        lora_fast.save_adapter(model, path)
        lora_fast.save_adapter(model, path, adapter_name="default")


def test_lora_linear_by_hand_holds_several_adapters():
    layer = LoRALinear(16, 12, r=4, lora_alpha=8)
    layer.add_adapter("b", r=2, lora_alpha=2)
    assert list(layer.adapter_settings) == ["default", "b"]
    assert layer.active_adapter == "default" and not layer.adapter_weights("b")[0].requires_grad
    layer.set_adapter("b")
    assert layer.r == 2 and layer.lora_A is layer.adapter_weights("b")[0]
    assert layer.lora_A.requires_grad
    assert not layer.adapter_weights("default")[0].requires_grad
