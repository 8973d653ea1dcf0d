"""lora_fast.convert against the real implementations: loralib's own layers (microsoft/LoRA) and
the book's LinearWithLoRA (re-implemented below, the oracle) give the same logits and the same
adapter gradients as lora_fast after conversion, PEFT loads what to_peft writes, and every refused
input leaves the model and the files as they were."""
import copy
import inspect
import math
import re

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import convert
from helpers import assert_close, fail_on_call
from tiny_models import tiny_gpt2, tiny_llama, token_batch

F64 = torch.float64


def loralib():
    return pytest.importorskip("loralib")


# --- the "LLMs from scratch" oracle -------------------------------------------------------------
# S. Raschka, "Build a Large Language Model (From Scratch)", appendix E
# (github.com/rasbt/LLMs-from-scratch, appendix-E/01_main-chapter-code/appendix-E.ipynb). The
# book's printed forward is alpha * (x @ A @ B); the repository's since September 2025 (#823)
# divides by rank.

class LoRALayer(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha, convention):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha, self.rank, self.convention = alpha, rank, convention

    def forward(self, x):
        scale = self.alpha if self.convention == "alpha" else self.alpha / self.rank
        return scale * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha, convention):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, convention)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha, convention):
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha, convention))
        else:
            replace_linear_with_lora(module, rank, alpha, convention)


# --- models -------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Odd sizes, nested names (block.0, block.2), one layer without bias."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(37, 29)
        self.block = nn.Sequential(nn.Linear(29, 23), nn.Tanh(), nn.Linear(23, 29, bias=False))
        self.down = nn.Linear(29, 11)

    def forward(self, x):
        return self.down(torch.tanh(self.block(torch.tanh(self.up(x)))))


LORALIB_TARGETS = ["up", "block.2"]


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _fill(*params, seed=3):
    """Random nonzero factors (B starts at zero in every implementation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)


def with_loralib(model, names, r=3, lora_alpha=5, fan_in_fan_out=False):
    """A copy of `model` whose `names` are lora.Linear over the same base weights, factors random."""
    lora = loralib()
    model = copy.deepcopy(model)
    for name in names:
        old = model.get_submodule(name)
        weight = old.weight   # a Conv1D's is (in, out), what fan_in_fan_out=True holds
        in_f, out_f = weight.shape if fan_in_fan_out else weight.shape[::-1]
        new = lora.Linear(in_f, out_f, r=r, lora_alpha=lora_alpha, merge_weights=False,
                          fan_in_fan_out=fan_in_fan_out, bias=old.bias is not None, dtype=F64)
        with torch.no_grad():
            new.weight.copy_(weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        _fill(new.lora_A, new.lora_B)
        _replace(model, name, new)
    return model


def with_scratch(model, rank, alpha, convention):
    model = copy.deepcopy(model)
    replace_linear_with_lora(model, rank, alpha, convention)
    model.double()
    _fill(*[p for name, p in model.named_parameters() if ".lora." in name])
    return model


def factors(model, kind):
    """The adapter parameters, in module order: (lora_A, lora_B) per layer."""
    out = []
    for m in model.modules():
        if kind == "scratch" and isinstance(m, LoRALayer):
            out += [m.A, m.B]
        elif kind != "scratch" and hasattr(m, "lora_A") and isinstance(m.lora_A, nn.Parameter):
            out += [m.lora_A, m.lora_B]
    return out


def logits_and_grads(model, x, params):
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), params)
    return out.detach(), grads


def assert_same_model_output(ours, theirs, x, kind):
    out, grads = logits_and_grads(ours, x, factors(ours, "lora_fast"))
    ref, ref_grads = logits_and_grads(theirs, x, factors(theirs, kind))
    assert_close("logits", out, ref, F64)
    assert len(grads) == len(ref_grads) > 0
    for i, (g, ref_g) in enumerate(zip(grads, ref_grads)):
        assert_close(f"grad {i}", g, ref_g.t() if kind == "scratch" else ref_g, F64)


def x_mlp():
    return torch.randn(5, 37, generator=torch.Generator().manual_seed(1), dtype=F64)


# --- loralib ------------------------------------------------------------------------------------

@pytest.mark.parametrize("into", ["injected", "rslora", "plain"])
def test_loralib_logits_and_grads(into):
    lora = loralib()
    plain = MLP().double()
    theirs = with_loralib(plain, LORALIB_TARGETS)
    state_dict = lora.lora_state_dict(theirs)
    assert sorted(state_dict) == ["block.2.lora_A", "block.2.lora_B", "up.lora_A", "up.lora_B"]
    if into == "injected":
        lora_fast.inject(plain, r=3, lora_alpha=5, target_modules=LORALIB_TARGETS)
    elif into == "rslora":   # the same scaling, 5 / 3, as lora_alpha / √r: taken, the layers' kept
        lora_fast.inject(plain, r=3, lora_alpha=5 / math.sqrt(3), use_rslora=True,
                         target_modules=LORALIB_TARGETS)
    names = convert.load(plain, state_dict, format="loralib", lora_alpha=5)
    assert sorted(names) == sorted(LORALIB_TARGETS)
    assert sorted(lora_fast.lora_layers(plain)) == sorted(LORALIB_TARGETS)
    settings = [layer.adapter_settings["default"] for layer in lora_fast.lora_layers(plain).values()]
    assert [s.scaling for s in settings] == pytest.approx([5 / 3] * 2, rel=1e-15)
    assert [s.use_rslora for s in settings] == [into == "rslora"] * 2
    assert_same_model_output(plain, theirs, x_mlp(), "loralib")


def test_loralib_on_a_tiny_llama():
    lora = loralib()
    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    plain = tiny_llama().double()
    theirs = with_loralib(plain, targets, r=4, lora_alpha=8)
    lora_fast.inject(plain, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    convert.load(plain, lora.lora_state_dict(theirs), format="loralib", lora_alpha=8)
    ids = token_batch()
    assert_close("logits", plain(ids).logits, theirs(ids).logits, F64)


# --- LLMs from scratch --------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", ["alpha", "alpha/rank"])
def test_scratch_logits_and_grads(scaling):
    rank, alpha = 4, 1.5
    theirs = with_scratch(MLP(), rank, alpha, scaling)
    adapter, base = convert.split(theirs.state_dict(), "scratch")
    plain = MLP(seed=1).double()   # other base weights: the checkpoint's must come in through split
    plain.load_state_dict(base)
    lora_alpha = alpha * rank if scaling == "alpha" else alpha
    lora_fast.inject(plain, r=rank, lora_alpha=lora_alpha, target_modules="all-linear")
    convert.load(plain, adapter, format="scratch", alpha=alpha, scaling=scaling)
    assert_same_model_output(plain, theirs, x_mlp(), "scratch")


def test_split_renames_only_the_lora_layers_base():
    model = nn.Module()
    model.head = nn.Module()
    model.head.linear = nn.Linear(3, 2)   # a module named "linear" that is no LinearWithLoRA
    model.proj = nn.Linear(3, 3)
    model.proj = LinearWithLoRA(model.proj, 1, 1.0, "alpha")
    adapter, base = convert.split(model.state_dict(), "scratch")
    assert sorted(adapter) == ["proj.lora.A", "proj.lora.B"]
    assert sorted(base) == ["head.linear.bias", "head.linear.weight", "proj.bias", "proj.weight"]
    assert torch.equal(base["proj.weight"], model.proj.linear.weight)


# --- PEFT's format ------------------------------------------------------------------------------

def _scratch_case():
    theirs = with_scratch(MLP(), 2, 3.0, "alpha")
    adapter, base = convert.split(theirs.state_dict(), "scratch")
    plain = MLP().double()
    plain.load_state_dict(base)
    return plain, theirs, adapter, {"alpha": 3.0, "scaling": "alpha"}, x_mlp()


def _loralib_case():
    plain = MLP().double()
    theirs = with_loralib(plain, LORALIB_TARGETS)
    return plain, theirs, loralib().lora_state_dict(theirs), {"lora_alpha": 5}, x_mlp()


def _gpt2_case():
    # loralib's fan_in_fan_out layer over GPT-2's Conv1D weights (in, out)
    plain = tiny_gpt2().double()
    targets = [f"transformer.h.{i}.mlp.c_fc" for i in range(2)]
    theirs = with_loralib(plain, targets, r=2, lora_alpha=3, fan_in_fan_out=True)
    return plain, theirs, loralib().lora_state_dict(theirs), {"lora_alpha": 3}, token_batch()


def _output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("case", [_loralib_case, _scratch_case, _gpt2_case],
                         ids=["loralib", "scratch", "gpt2-conv1d"])
def test_to_peft_loads_in_peft_and_lora_fast(case, tmp_path):
    from peft import PeftModel
    plain, theirs, state_dict, kwargs, x = case()
    fmt = "scratch" if "scaling" in kwargs else "loralib"
    before = copy.deepcopy(plain.state_dict())
    assert convert.to_peft(plain, state_dict, tmp_path / "adapter", fmt, **kwargs) == tmp_path / "adapter"
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())   # not changed
    assert not lora_fast.lora_layers(plain)
    with torch.no_grad():
        ref = _output(theirs, x)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "adapter").eval()
        assert_close("PEFT logits", _output(peft_model, x), ref, F64)
        ours = copy.deepcopy(plain)
        lora_fast.load_adapter(ours, tmp_path / "adapter")
        assert_close("lora_fast logits", _output(ours, x), ref, F64)


# --- refused inputs -----------------------------------------------------------------------------

def snapshot(model):
    """Everything a load could change: every tensor (bit for bit), requires_grad, module types,
    the records inject writes."""
    return ([(k, v.detach().clone(), getattr(v, "requires_grad", None))
             for k, v in model.state_dict(keep_vars=True).items()],
            [(name, type(m)) for name, m in model.named_modules()],
            copy.deepcopy(model.__dict__.get("lora_fast_adapters")))


def assert_unchanged(model, before):
    after = snapshot(model)
    assert [(k, flag) for k, _, flag in after[0]] == [(k, flag) for k, _, flag in before[0]]
    for (k, v, _), (_, w, _) in zip(after[0], before[0]):
        assert v.dtype == w.dtype and torch.equal(v, w), k
    assert after[1:] == before[1:]


def _lib_sd(**kw):
    return loralib().lora_state_dict(with_loralib(MLP().double(), LORALIB_TARGETS, **kw))


def _scratch_sd():
    return convert.split(with_scratch(MLP(), 2, 1.0, "alpha").state_dict(), "scratch")[0]


def _edit(sd, **changes):
    sd = dict(sd)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    return sd


def _merged_linear_case(enable):
    """A fused qkv projection (out = 3 · 10), loralib's MergedLinear on it."""
    lora = loralib()
    model = nn.Module()
    model.qkv = nn.Linear(37, 30)
    theirs = nn.Module()
    theirs.qkv = lora.MergedLinear(37, 30, r=2, lora_alpha=4, enable_lora=enable)
    return model, lora.lora_state_dict(theirs)


LIB = {"format": "loralib", "lora_alpha": 5}
SCRATCH = {"format": "scratch", "alpha": 1.0, "scaling": "alpha"}

# (id, model maker ("plain"/"injected"/callable -> (model, sd)), state dict maker, kwargs, match)
ERRORS = [
    ("unknown-format", "plain", _lib_sd, {"format": "peft", "lora_alpha": 5}, r"format: expected one of"),
    ("no-lora_alpha", "plain", _lib_sd, {"format": "loralib"}, r"lora_alpha: required for format='loralib'"),
    ("alpha-for-loralib", "plain", _lib_sd, {"format": "loralib", "alpha": 5},
     r"alpha, scaling: arguments of format='scratch'"),
    ("bad-lora_alpha", "plain", _lib_sd, {"format": "loralib", "lora_alpha": -1},
     r"lora_alpha: expected a positive finite number"),
    ("nan-alpha", "plain", _scratch_sd, {**SCRATCH, "alpha": float("nan")},
     r"alpha: expected a positive finite number"),
    ("no-scaling", "plain", _scratch_sd, {"format": "scratch", "alpha": 1.0}, r"scaling: required"),
    ("bad-scaling", "plain", _scratch_sd, {**SCRATCH, "scaling": "alpha/r"}, r"scaling: required"),
    ("no-alpha", "plain", _scratch_sd, {"format": "scratch", "scaling": "alpha"}, r"alpha: required"),
    ("lora_alpha-for-scratch", "plain", _scratch_sd, {**SCRATCH, "lora_alpha": 2},
     r"lora_alpha: an argument of format='loralib'"),
    ("not-a-mapping", "plain", lambda: [torch.zeros(1)], LIB, r"state_dict: expected a mapping"),
    ("not-a-tensor", "plain", lambda: _edit(_lib_sd(), up__lora_A=[1.0]), LIB,
     r"state_dict: expected str keys and tensor values; not so for 'up.lora_A'"),
    ("empty", "plain", dict, LIB, r"state_dict: holds no loralib LoRA factors"),
    ("base-keys", "plain", lambda: with_loralib(MLP().double(), ["up"]).state_dict(), LIB,
     r"keys are not loralib LoRA factors.*'up.weight'.*convert.split"),
    ("scratch-base-keys", "plain", lambda: with_scratch(MLP(), 2, 1.0, "alpha").state_dict(), SCRATCH,
     r"keys are not scratch LoRA factors.*convert.split"),
    ("lone-factor", "plain", lambda: _edit(_lib_sd(), up__lora_B=None), LIB,
     r"up.lora_A without up.lora_B"),
    ("unknown-layer", "plain", lambda: {k.replace("up.", "upp."): v for k, v in _lib_sd().items()},
     LIB, r"name layers MLP does not have: \['upp.lora_A'\] \(1 in all\)"),
    ("not-a-linear", "plain", lambda: {k.replace("up.", "block.1."): v for k, v in _lib_sd().items()},
     LIB, r"'block.1', a Tanh, expected a linear layer"),
    ("wrong-in", "plain", lambda: _edit(_lib_sd(), up__lora_A=torch.ones(3, 36, dtype=F64)), LIB,
     r"up.lora_A \(3, 36\) and up.lora_B \(29, 3\) do not fit layer 'up' \(37 in, 29 out\): "
     r"expected \(3, 37\) and \(29, 3\)"),
    ("scratch-wrong-out", "plain", lambda: _edit(_scratch_sd(), down__lora__B=torch.ones(2, 12, dtype=F64)),
     SCRATCH, r"down.lora.B \(2, 12\) do not fit layer 'down' \(29 in, 11 out\): expected \(29, 2\) and \(2, 11\)"),
    ("scratch-rank", "plain", lambda: _edit(_scratch_sd(), down__lora__B=torch.ones(3, 11, dtype=F64)),
     SCRATCH, r"expected A \(in, rank\) and B \(rank, out\) of one rank"),
    ("mixed-ranks", "plain", lambda: {**_lib_sd(), "down.lora_A": torch.ones(2, 29, dtype=F64),
                                      "down.lora_B": torch.ones(11, 2, dtype=F64)},
     LIB, r"different ranks"),
    ("non-finite", "plain", lambda: _edit(_lib_sd(), up__lora_B=torch.full((29, 3), math.inf, dtype=F64)),
     LIB, r"up.lora_B holds 87 non-finite values"),
    ("empty-factors", "plain", lambda: _edit(_lib_sd(), up__lora_A=torch.ones(0, 37, dtype=F64),
                                             up__lora_B=torch.ones(29, 0, dtype=F64)),
     LIB, r"up.lora_A has shape \(0, 37\), expected a non-empty matrix"),
    ("integer", "plain", lambda: _edit(_lib_sd(), up__lora_B=torch.ones(29, 3, dtype=torch.int64)),
     LIB, r"up.lora_B has dtype torch.int64, expected a floating dtype"),
    ("merged-linear", lambda: _merged_linear_case([True, False, True]), None, {**LIB, "lora_alpha": 4},
     r"qkv.lora_A has 4 rows but qkv.lora_B 2 columns \(2 enabled slices of rank 2\).*MergedLinear"
     r".*inject\(model, \.\.\., slices="),
    ("merged-linear-one-slice", lambda: _merged_linear_case([False, True, False]), None,
     {**LIB, "lora_alpha": 4}, r"covers 1/3 of the outputs.*MergedLinear.*slices="),
    ("scaling-mismatch", "injected", _lib_sd, {**LIB, "lora_alpha": 6},
     r"lora_alpha: the checkpoint's scaling is 2 \(lora_alpha=6 / r=3\), adapter 'default' of the "
     r"model has 1.66667 \(lora_alpha=5 / r=3.*inject with lora_alpha=6 \(r=3\)"),
    ("rank-mismatch", "injected", lambda: _lib_sd(r=2), {**LIB, "lora_alpha": 5},
     r"the checkpoint's rank is 2, adapter 'default' of the model has r=3.*inject with r=2"),
    ("layers-mismatch", "injected", lambda: _edit(_lib_sd(), up__lora_A=None, up__lora_B=None), LIB,
     r"on other layers than the checkpoint: 1 of its layers have no factors \['up'\]"),
    ("bad-adapter-name", "plain", _lib_sd, {**LIB, "adapter_name": "a.b"}, r"adapter_name: expected"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_refused_inputs_change_nothing(case):
    _, make_model, make_sd, kwargs, match = case
    if callable(make_model):
        model, state_dict = make_model()
    else:
        model, state_dict = MLP().double(), make_sd()
        if make_model == "injected":
            lora_fast.inject(model, r=3, lora_alpha=5, target_modules=LORALIB_TARGETS)
            _fill(*factors(model, "lora_fast"), seed=11)
    kwargs = dict(kwargs)
    fmt = kwargs.pop("format")
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        convert.load(model, state_dict, fmt, **kwargs)
    assert_unchanged(model, before)


def test_a_failure_inside_load_adapter_restores_the_model(monkeypatch):
    from lora_fast import adapters
    model = MLP().double()
    lora_fast.inject(model, r=3, lora_alpha=5, target_modules=LORALIB_TARGETS)
    before = snapshot(model)
    fail_on_call(monkeypatch, adapters, "_copy_into", 1, RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert.load(model, _lib_sd(), "loralib", lora_alpha=5)
    assert_unchanged(model, before)


def test_to_peft_refused_or_failed_leaves_the_files(monkeypatch, tmp_path):
    import safetensors.torch
    plain = MLP().double()
    folder = tmp_path / "adapter"
    convert.to_peft(plain, _lib_sd(), folder, "loralib", lora_alpha=5)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="do not fit"):
        convert.to_peft(plain, _edit(_lib_sd(), up__lora_A=torch.ones(3, 36, dtype=F64)), folder,
                        "loralib", lora_alpha=5)
    fail_on_call(monkeypatch, safetensors.torch, "save_file", 1, OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        convert.to_peft(plain, _lib_sd(), folder, "loralib", lora_alpha=7)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    fail_on_call(monkeypatch, safetensors.torch, "save_file", 1, OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        convert.to_peft(plain, _lib_sd(), tmp_path / "new", "loralib", lora_alpha=5)
    assert not (tmp_path / "new").exists()
    with pytest.raises(NotADirectoryError, match="path: .* is a file"):
        convert.to_peft(plain, _lib_sd(), folder / "adapter_config.json", "loralib", lora_alpha=5)


def test_public_functions_document_their_parameters():
    for fn in (convert.split, convert.load, convert.to_peft):
        doc = inspect.getdoc(fn)
        signature = inspect.signature(fn)
        for name, param in signature.parameters.items():
            assert re.search(rf"(?<![\w.]){name}(?!\w)", doc), f"{fn.__name__}: {name} undocumented"
            assert param.annotation is not inspect.Parameter.empty, f"{fn.__name__}: {name} unhinted"
        assert signature.return_annotation is not inspect.Signature.empty


def test_loralib_embedding_loads_onto_a_lora_embedding():
    lora = loralib()
    torch.manual_seed(0)
    theirs = nn.Module()
    theirs.emb = lora.Embedding(13, 7, r=2, lora_alpha=4)
    with torch.no_grad():
        theirs.emb.lora_A.normal_()
        theirs.emb.lora_B.normal_()
    theirs.train()
    model = nn.Module()
    model.emb = nn.Embedding(13, 7)
    model.emb.weight.data.copy_(theirs.emb.weight)
    assert lora_fast.convert.load(model, lora.lora_state_dict(theirs), format="loralib", lora_alpha=4) == ["emb"]
    assert isinstance(model.emb, lora_fast.embedding.LoRAEmbedding)
    ids = torch.randint(0, 13, (3, 5))
    torch.testing.assert_close(model.emb(ids), theirs.emb(ids), rtol=1e-6, atol=1e-6)
