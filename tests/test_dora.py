"""DoRA (lora_fast.dora, issue 18): the functional form on both backends against the float64
reference (its gradients by float64 autograd of PEFT's formula), the row norms without an
(out, in) temporary and their fallback where the three-term sum cancels, the layer (init equal to
the base, merge / unmerge, state dict, errors), and the real PEFT (use_dora=True) on tiny Llama and
GPT-2 models: logits, the gradients of A, B and the magnitude, dropout on one given mask, and
adapters saved by one loaded by the other."""
import copy
import json
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fast
from helpers import KERNEL_DTYPES, assert_close
from lora_fast import dora, dropout, reference
from lora_fast.module import LoRALinear
from lora_fast.tolerances import rel_err
from tiny_models import MODELS, token_batch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
BACKENDS = [("torch", torch.float64), ("torch", torch.float32)] + (
    [("triton", d) for d in KERNEL_DTYPES] if INTERPRETED else [])

# (lead shape of x, K, N, r): odd sizes, one row, no rows, 3-D
SHAPES = [((7,), 37, 29, 4), ((1,), 64, 33, 1), ((0,), 16, 9, 2), ((2, 3), 45, 17, 3)]


def _inputs(lead, K, N, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    lora_A = (torch.randn(r, K, generator=g) * K ** -0.5).to(dtype)
    lora_B = (torch.randn(N, r, generator=g) * 0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    magnitude = (torch.linalg.vector_norm(w.double(), dim=1) * (1 + 0.2 * torch.rand(N, generator=g, dtype=torch.float64))
                 ).to(dtype)
    return x, w, lora_A, lora_B, bias, magnitude


def _seed_of_next_call(seed):
    """The dropout seed dora_linear draws first after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


@pytest.mark.parametrize("form", ["peft", "lora"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x{}_K{}_N{}_r{}".format(*s))
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda v: str(v))
def test_forward_and_every_gradient_match_the_float64_reference(backend, dtype, shape, p, form):
    lead, K, N, r = shape
    x, w, lora_A, lora_B, bias, m = _inputs(lead, K, N, r, dtype)
    x = x.requires_grad_()
    leaves = [lora_A.requires_grad_(), lora_B.requires_grad_(), m.requires_grad_(), bias.requires_grad_()]
    seed = _seed_of_next_call(7) if p > 0 else None
    torch.manual_seed(7)
    y = dora.dora_linear(x, w, lora_A, lora_B, m, bias, scaling=0.75, dropout_p=p, training=True,
                         backend=backend, dropout=form)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(dy)
    y_ref, grads = reference.dora_linear_ref(x, w, lora_A, lora_B, m, bias, 0.75, dropout_p=p, seed=seed,
                                             dropout=form, grad_out=dy)
    if y.numel() == 0:
        assert y.shape == y_ref.shape and x.grad.shape == x.shape
        return
    assert_close("y", y, y_ref, dtype)
    for name, got in zip(["x", "lora_A", "lora_B", "magnitude", "bias"], [x.grad] + [t.grad for t in leaves]):
        assert_close(f"d{name}", got, grads[name], dtype)


def test_dropout_forms_differ_exactly_where_dropout_applies():
    x, w, lora_A, lora_B, bias, m = _inputs((9,), 24, 11, 3, torch.float64)
    out = {}
    for form in ("peft", "lora"):
        for p, training in ((0.3, True), (0.3, False)):
            torch.manual_seed(1)
            out[form, training] = dora.dora_linear(x, w, lora_A, lora_B, m, bias, scaling=2.0, dropout_p=p,
                                                   training=training, backend="torch", dropout=form)
    assert torch.equal(out["peft", False], out["lora", False])          # eval: no dropout, one function
    assert (out["peft", True] - out["lora", True]).abs().max() > 1e-3   # training: PEFT's second product


def test_gradcheck_on_the_torch_path():
    x, w, lora_A, lora_B, bias, m = _inputs((5,), 7, 6, 2, torch.float64)
    norm = dora.weight_norm(w, lora_A, lora_B, 1.5)   # fixed: the norm is a constant to gradients
    seed = torch.tensor([12345], dtype=torch.int64)
    for form in ("peft", "lora"):
        def f(x, a, b, m, bias):
            return dora.DoRALinearFunction.apply(x, w, bias, a, b, m, norm, 1.5, "torch", 0.4, seed, form == "peft")
        args = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, m, bias)]
        assert torch.autograd.gradcheck(f, args)


# --- the row norms ---------------------------------------------------------------------------------

def test_weight_norm_equals_the_norm_of_the_sum(monkeypatch):
    monkeypatch.setattr(dora, "_CHUNK_ELEMENTS", 70 * 8)   # several row chunks
    for dtype in (torch.float32, torch.float64):
        _, w, lora_A, lora_B, _, _ = _inputs((1,), 70, 41, 5, dtype)
        ref = (w.double() + 3.0 * lora_B.double() @ lora_A.double()).norm(dim=1)
        for how in (dora.weight_norm, dora.weight_norm_direct):
            got = how(w, lora_A, lora_B, 3.0)
            assert got.dtype == dora.compute_dtype(dtype)
            assert_close(how.__name__, got, ref, dtype)


def test_cancelling_rows_are_computed_directly():
    """An adapter that cancels row 0 of W0 to 1e-4 of its norm: the three-term sum loses ~8 digits
    there (fp32), the direct row does not. With the fallback switched off the same input is far off:
    the test would see a broken fallback."""
    g = torch.Generator().manual_seed(4)
    K, N, r, s = 64, 8, 2, 1.0
    w = torch.randn(N, K, generator=g)
    lora_A = torch.randn(r, K, generator=g)
    lora_B = torch.zeros(N, r)
    # s·B_0·A = −w_0 + 1e-4·w_0 projected onto A's rows: choose w_0 in A's row space first
    w[0] = torch.tensor([0.7, -0.3]) @ lora_A
    lora_B[0] = -(1 - 1e-4) * torch.tensor([0.7, -0.3])
    lora_B[1:] = torch.randn(N - 1, r, generator=g) * 0.1
    ref = (w.double() + s * lora_B.double() @ lora_A.double()).norm(dim=1)
    got = dora.weight_norm(w, lora_A, lora_B, s)
    assert abs(got[0].item() - ref[0].item()) <= 1e-3 * ref[0].item()
    assert_close("norm", got, ref, torch.float32)
    old = dora.NORM_CANCELLATION
    try:
        dora.NORM_CANCELLATION = float("inf")   # never fall back (but for a non-positive sum)
        unguarded = dora.weight_norm(w, lora_A, lora_B, s)
    finally:
        dora.NORM_CANCELLATION = old
    assert abs(unguarded[0].item() - ref[0].item()) > 1e-2 * ref[0].item()


class _NewStorages(TorchDispatchMode):
    """The largest tensor any op allocates (outputs that are not views of an input)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _largest_allocation(step):
    with _NewStorages() as probe:
        step()
    return probe.largest


def test_a_training_step_allocates_no_out_by_in_tensor_and_peft_does():
    torch.manual_seed(0)
    M, K, N = 4, 512, 384
    base = nn.Linear(K, N)
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=8, use_dora=True)
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(M, K)
    weight_bytes = K * N * 4

    def step():
        ours(x).sum().backward()
    largest = _largest_allocation(step)
    assert largest < weight_bytes / 8, f"{largest} B allocated at once: an (out, in)-sized temporary"

    peft = pytest.importorskip("peft")

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = copy.deepcopy(base)

        def forward(self, x):
            return self.lin(x)
    theirs = peft.get_peft_model(One(), peft.LoraConfig(r=8, target_modules=["lin"], use_dora=True))
    assert _largest_allocation(lambda: theirs(x).sum().backward()) >= weight_bytes   # the probe sees it


# --- the layer ---------------------------------------------------------------------------------------

def test_a_new_dora_layer_is_its_base_linear_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(19, 13)
    layer = LoRALinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=8, use_dora=True)
    x = torch.randn(3, 2, 19)
    assert torch.equal(layer.lora_magnitude_vector.detach(), base.weight.detach().norm(dim=1))
    assert_close("init", layer(x), base(x).detach(), torch.float32)
    assert sorted(layer.state_dict()) == ["bias", "lora_A", "lora_B", "lora_magnitude_vector", "weight"]
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B",
                                                                          "lora_magnitude_vector"}
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 13))
    y = layer(x)
    ref = reference.dora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                                    layer.bias, layer.scaling)
    assert_close("y", y, ref, torch.float32)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert_close("merged", layer(x), ref, torch.float32)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    plain = copy.deepcopy(layer).to_base()
    assert type(plain) is nn.Linear
    assert_close("to_base", plain(x), ref, torch.float32)


def test_the_cached_base_norms_follow_the_weight():
    layer = LoRALinear(12, 7, r=2, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)   # a new W0 (its version changes): the cached ‖w_j‖² must not be used
    ref = reference.dora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                                    layer.bias, layer.scaling)
    assert_close("y", layer(x), ref, torch.float32)


def test_bad_dora_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="use_dora"):
        LoRALinear(4, 3, use_dora="yes")
    with pytest.raises(ValueError, match="dora_dropout"):
        LoRALinear(4, 3, use_dora=True, dora_dropout="both")
    x, w, lora_A, lora_B, bias, m = _inputs((3,), 8, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="magnitude"):
        dora.dora_linear(x, w, lora_A, lora_B, m[:4], bias)
    with pytest.raises(ValueError, match="dropout"):
        dora.dora_linear(x, w, lora_A, lora_B, m, bias, dropout="all")
    model = nn.Sequential(nn.Linear(8, 8))
    lora_fast.inject(model, r=2, target_modules=["0"], use_dora=True)
    lora_fast.add_adapter(model, "other", r=2, target_modules=["0"])
    with pytest.raises(ValueError, match="DoRA"):
        with lora_fast.batch_adapters(model, ["default", "other"]):
            pass


def test_dora_adapters_round_trip_through_save_and_load(tmp_path):
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 5))
    lora_fast.inject(model, r=3, target_modules=["0", "2"], use_dora=True)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(model).values():
            layer.lora_B.normal_()
            layer.lora_magnitude_vector.mul_(1.3)
    lora_fast.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    fresh = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 5))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k}, strict=False)
    lora_fast.load_adapter(fresh, tmp_path)
    x = torch.randn(4, 10)
    assert torch.equal(fresh(x), model(x))
    # a plain LoRA model's adapter of that name cannot take it
    plain = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 5))
    lora_fast.inject(plain, r=3, target_modules=["0", "2"])
    snapshot = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match="use_dora"):
        lora_fast.load_adapter(plain, tmp_path)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in snapshot.items())


# --- against the real PEFT ---------------------------------------------------------------------------

def _peft():
    return pytest.importorskip("peft")


def _randomize(peft_model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def _peft_grads(peft_model):
    out = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            out[name[len("base_model.model."):].replace(".default.weight", "").replace(".default", "")] = p.grad
    return out


def _our_grads(model):
    return {f"{n}.{part}": p.grad for n, layer in lora_fast.lora_layers(model).items()
            for part, p in zip(("lora_A", "lora_B", "lora_magnitude_vector"), layer.adapter_parameters())}


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_proj"])])
def test_matches_peft_logits_and_gradients_and_loads_its_adapter(arch, targets, tmp_path):
    peft = _peft()
    pytest.importorskip("transformers")
    base = MODELS[arch]()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    peft_model = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             use_dora=True, fan_in_fan_out=arch == "gpt2"))
    names = lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    assert lora_fast.trainable_parameters(ours) == tuple(peft_model.get_nb_trainable_parameters())
    for name, layer in lora_fast.lora_layers(ours).items():   # the same initial magnitude
        theirs_m = peft_model.get_submodule(f"base_model.model.{name}").lora_magnitude_vector["default"].weight
        assert_close(f"{name} magnitude", layer.lora_magnitude_vector, theirs_m.detach(), torch.float32)
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert sorted(lora_fast.load_adapter(ours, tmp_path)) == sorted(names)
    ids = token_batch()
    ref, out = peft_model(ids).logits, ours(ids).logits
    with torch.no_grad():
        assert (ref - base(ids).logits).abs().max() > 1e-2
    assert_close("logits", out, ref, torch.float32)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (ref * w).sum().backward()
    (out * w).sum().backward()
    theirs_g, ours_g = _peft_grads(peft_model), _our_grads(ours)
    assert sorted(theirs_g) == sorted(ours_g)
    for key in ours_g:
        assert ours_g[key].abs().max() > 0, key
        assert_close(f"grad {key}", ours_g[key], theirs_g[key], torch.float32)


def test_peft_loads_what_we_save_and_merges_as_we_do(tmp_path):
    peft = _peft()
    pytest.importorskip("transformers")
    base = MODELS["llama"]()
    ours = copy.deepcopy(base)
    lora_fast.inject(ours, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(ours).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))
    lora_fast.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) <= set(peft.LoraConfig().to_dict()) and config["use_dora"] is True
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = token_batch(seed=2)
    with torch.no_grad():
        assert_close("logits", ours(ids).logits, peft_model(ids).logits, torch.float32)
        state = peft.get_peft_model_state_dict(peft_model)
        for name, layer in lora_fast.lora_layers(ours).items():
            assert torch.equal(state[f"base_model.model.{name}.lora_magnitude_vector"], layer.lora_magnitude_vector)
        merged_ours = lora_fast.merge_and_unload(copy.deepcopy(ours))
        merged_theirs = peft_model.merge_and_unload()
        assert_close("merged logits", merged_ours(ids).logits, merged_theirs(ids).logits, torch.float32)


@pytest.mark.parametrize("form_matches_peft", [True, False])
def test_dropout_on_one_given_mask_is_peft_formula(form_matches_peft):
    """PEFT's DoRA layer in training with its dropout replaced by our mask (read back from the seed our
    call draws): "peft" is its function, "lora" is not."""
    peft = _peft()
    torch.manual_seed(0)
    K, N, M, p = 24, 10, 6, 0.3

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(K, N)

        def forward(self, x):
            return self.lin(x)
    model = One()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lin"],
                                                                      use_dora=True, lora_dropout=p))
    _randomize(theirs)
    peft_layer = theirs.base_model.model.lin
    layer = LoRALinear.from_linear(copy.deepcopy(model.lin), r=3, lora_alpha=6, lora_dropout=p, use_dora=True,
                                   dora_dropout="peft" if form_matches_peft else "lora")
    with torch.no_grad():
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
        layer.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    layer.train()
    theirs.train()
    x = torch.randn(M, K)
    keep = dropout.keep_mask(_seed_of_next_call(9), M, K, p, dtype=x.dtype)

    class GivenMask(nn.Module):
        def forward(self, t):
            return t * keep / (1 - p)
    peft_layer.lora_dropout["default"] = GivenMask()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(9)
    out = layer(xa)
    ref = theirs(xb)
    if not form_matches_peft:
        assert rel_err(out, ref) > 1e-3
        return
    assert_close("y", out, ref.detach(), torch.float32)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert_close("dx", xa.grad, xb.grad, torch.float32)
    for part, ours_p in zip(("lora_A", "lora_B", "lora_magnitude_vector"), layer.adapter_parameters()):
        theirs_p = getattr(peft_layer, part)["default"].weight
        assert_close(f"d{part}", ours_p.grad, theirs_p.grad, torch.float32)


def test_check_cli_dora_passes_and_fails_a_wrong_implementation(tmp_path, monkeypatch, capsys):
    from lora_fast import check
    args = ["--dora", "--shapes", "9x16x12", "--ranks", "3", "--dtypes", "fp32", "--dropout", "0", "0.2"]
    assert check.main(args + ["--impl", "lora_fast.torch_path"]) == 0
    assert " dm " in capsys.readouterr().out
    # the LoRA passes 0.1% off in the forward: y and the magnitude's gradient (from z) must fail
    (tmp_path / "off_by_a_little.py").write_text(
        "from lora_fast import torch_path\n"
        "def lora_forward(*args, **kw):\n"
        "    y, xs = torch_path.lora_forward(*args, **kw)\n"
        "    return y * 1.001, xs\n"
        "lora_backward = torch_path.lora_backward\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert check.main(args + ["--impl", "off_by_a_little"]) == 1
    out = capsys.readouterr().out
    failed = {line.split()[7] for line in out.splitlines() if line.endswith("FAIL")}
    assert {"y", "dm"} <= failed


def test_torch_func_and_torch_compile_run_the_same_function():
    x, w, lora_A, lora_B, bias, m = _inputs((6,), 20, 9, 3, torch.float64)

    def loss(m, lora_A):
        return dora.dora_linear(x, w, lora_A, lora_B, m, bias, scaling=1.5, backend="torch").square().sum()
    grads = torch.func.grad(loss, argnums=(0, 1))(m, lora_A)
    _, ref = reference.dora_linear_ref(x, w, lora_A, lora_B, m, bias, 1.5,
                                       grad_out=2 * reference.dora_linear_ref(x, w, lora_A, lora_B, m, bias, 1.5))
    assert_close("func dm", grads[0], ref["magnitude"], torch.float64)
    assert_close("func dA", grads[1], ref["lora_A"], torch.float64)

    layer = LoRALinear(20, 9, r=3, use_dora=True, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    eager = layer(x)
    eager.sum().backward()
    want = layer.lora_magnitude_vector.grad.clone()
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    assert_close("compiled y", got, eager.detach(), torch.float64)
    assert_close("compiled dm", layer.lora_magnitude_vector.grad, want, torch.float64)


@pytest.mark.parametrize("form", ["peft", "lora"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_cpp_reference_agrees_with_the_float64_one(form, p):
    from lora_fast import cref
    if not cref.available():
        pytest.skip(f"the C++ reference is not built: {cref.missing_reason()}")
    x, w, lora_A, lora_B, bias, m = _inputs((2, 5), 23, 14, 3, torch.float64)
    seed = torch.tensor([987654321], dtype=torch.int64) if p > 0 else None
    dy = torch.randn(2, 5, 14, dtype=torch.float64)
    y_ref, g_ref = reference.dora_linear_ref(x, w, lora_A, lora_B, m, bias, 0.6, dropout_p=p, seed=seed,
                                             dropout=form, grad_out=dy)
    y = cref.dora_linear_cref(x, w, lora_A, lora_B, m, bias, 0.6, seed=seed, dropout_p=p, dropout=form)
    grads = cref.dora_linear_backward_cref(dy, x, w, lora_A, lora_B, m, 0.6, seed=seed, dropout_p=p, dropout=form)
    assert_close("y", y, y_ref, torch.float64)
    for name in ("x", "lora_A", "lora_B", "magnitude"):
        assert_close(f"d{name}", grads[name], g_ref[name], torch.float64)
