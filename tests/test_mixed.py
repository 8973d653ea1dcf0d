"""Mixed batches (lora_fast.batch_adapters): each row with its own adapter, against a float64
per-row reference, against separate per-adapter runs (outputs, gradients, an optimizer step), and
against PEFT's mixed-batch inference (adapter_names=) on tiny Llama and GPT-2 models."""
import copy

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import named_adapters, reference, torch_path
from lora_fast.dropout import keep_mask
from lora_fast.mixed import batch_adapters
from lora_fast.tolerances import bound, rel_err

from helpers import row_by_row
from tiny_models import MODELS, token_batch


def _randomize(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(model).values():
            for name in layer.adapter_settings:
                a, b = layer.adapter_weights(name)
                a.copy_(torch.randn(a.shape, generator=gen, dtype=torch.float64) * 0.3)
                b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * 0.3)


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 13), nn.ReLU(), nn.Linear(13, 7), nn.ReLU(),
                          nn.Linear(7, 5)).to(dtype)
    lora_fast.inject(model, r=2, lora_alpha=4, target_modules=["0", "2"])
    named_adapters.add_adapter(model, "b", r=5, lora_alpha=3, target_modules=["0", "4"])
    named_adapters.add_adapter(model, "c", r=1, lora_alpha=2, use_rslora=True)   # "0", "2"
    _randomize(model)
    return model


NAME_SETS = {
    "interleaved": ["b", None, "default", "c", "b", "c", "default"],
    "grouped": ["default", "default", "b", "b", "b", "c", None],
    "one_adapter": ["c"] * 5,
    "one_row": ["b"],
    "all_base": [None, None, None],
    "every_row_different": ["c", "b", None, "default"],
}


@pytest.mark.parametrize("names", NAME_SETS.values(), ids=NAME_SETS.keys())
@pytest.mark.parametrize("shape", [(), (4,)], ids=["2d", "3d"])
def test_mixed_batch_equals_each_row_alone(names, shape):
    model = _mlp()
    x = torch.randn(len(names), *shape, 9, dtype=torch.float64)
    with batch_adapters(model, names):
        y = model(x)
    ref = row_by_row(model, x, names)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= bound(torch.float64)


def test_layer_reference_per_row():
    """One layer against reference.mixed_lora_linear_ref, strided x, adapters of ranks 1..64."""
    torch.manual_seed(1)
    layer = lora_fast.LoRALinear(33, 17, r=1, lora_alpha=2, dtype=torch.float64)
    for i, r in enumerate((64, 7, 16)):
        layer.add_adapter(f"a{i}", r=r, lora_alpha=r + 1)
    model = nn.Sequential(layer)
    _randomize(model)
    names = ["a0", "default", None, "a2", "a1", "a0", "a2", "a2", "default", "a1", "a1"]
    x = torch.randn(33, len(names), dtype=torch.float64).t()   # non-contiguous rows
    with batch_adapters(model, names):
        y = model(x)
    adapters = {n: (*layer.adapter_weights(n), s.scaling) for n, s in layer.adapter_settings.items()}
    ref = reference.mixed_lora_linear_ref(x, layer.weight, layer.bias, adapters, names)
    assert rel_err(y, ref) <= bound(torch.float64)


def _training_grads(model, x, names, mixed, backend="auto"):
    for p in model.parameters():
        p.grad = None
    target = torch.randn(*x.shape[:-1], 5, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    if mixed:
        with batch_adapters(model, names, backend=backend):
            loss = ((model(x) - target) ** 2).sum()
        loss.backward()   # after the block: the graph holds the adapters it used
    else:
        for name in sorted({n for n in names if n is not None}):
            named_adapters.set_adapter(model, name)
            rows = [i for i, n in enumerate(names) if n == name]
            ((model(x[rows]) - target[rows]) ** 2).sum().backward()
        named_adapters.set_adapter(model, "default")
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_training_gives_each_adapter_its_rows_gradients(dtype):
    model = _mlp(dtype).train()
    names = NAME_SETS["interleaved"]
    x = torch.randn(len(names), 9, dtype=dtype)
    mixed = _training_grads(model, x, names, mixed=True)
    separate = _training_grads(model, x, names, mixed=False)
    assert sorted(mixed) == sorted(separate)
    assert all("lora" in name for name in mixed)   # the base stays frozen
    assert len(mixed) == 12   # default, b and c on two layers each: A and B each
    for name in mixed:
        assert rel_err(mixed[name], separate[name]) <= bound(dtype), name


@pytest.mark.parametrize("tokens", [3, 12], ids=["split_k", "tiled"])   # M = 21 and 84 rows
def test_triton_backend_matches_torch_backend(tokens):
    """The kernels' mixed passes (interpreter, fp32), through the layer, against the torch path:
    output and every adapter's gradients, for decode-size (split-K) and larger (tiled) batches."""
    pytest.importorskip("triton")
    names = NAME_SETS["interleaved"]
    x = torch.randn(len(names), tokens, 9)
    grads, outs = {}, {}
    for backend in ("triton", "torch"):
        model = _mlp(torch.float32).train()
        with torch.no_grad(), batch_adapters(model, names, backend=backend):
            outs[backend] = model(x)
        grads[backend] = _training_grads(model, x, names, mixed=True, backend=backend)
    assert rel_err(outs["triton"], outs["torch"]) <= bound(torch.float32)
    assert sorted(grads["triton"]) == sorted(grads["torch"]) and len(grads["torch"]) == 12
    for name, g in grads["torch"].items():
        assert rel_err(grads["triton"][name], g) <= bound(torch.float32), name


def test_fp32_without_tf32_on_a_gpu_runs_the_grouped_torch_products(monkeypatch):
    """fp32 "ieee" dots on a GPU (no tf32) would be FMA tiles, which cuBLAS's SGEMM outruns: the
    triton backend's mixed passes run the torch path's grouped products there, as the single-adapter
    dispatcher runs cuBLAS (the device test stubbed: this machine has no GPU)."""
    pytest.importorskip("triton")
    from lora_fast import dispatch
    from lora_fast.kernels import multi
    launched = []
    real = multi.launch
    monkeypatch.setattr(multi, "launch", lambda kernel, *a: launched.append(kernel) or real(kernel, *a))
    names = NAME_SETS["interleaved"]
    x = torch.randn(len(names), 12, 9)
    grads = {}
    for ieee in (False, True):
        monkeypatch.setattr(dispatch, "fp32_ieee_gpu", lambda t, ieee=ieee: ieee)
        launched.clear()
        grads[ieee] = _training_grads(_mlp(torch.float32).train(), x, names, mixed=True, backend="triton")
        assert bool(launched) != ieee, f"ieee={ieee}: {len(launched)} kernel launches"
    for name, g in grads[False].items():
        assert rel_err(grads[True][name], g) <= bound(torch.float32), name


def test_optimizer_step_on_all_adapters_equals_separate_steps():
    names = NAME_SETS["interleaved"]
    x = torch.randn(len(names), 9, dtype=torch.float64)
    mixed_model, separate_model = _mlp().train(), _mlp().train()
    for model, mixed in ((mixed_model, True), (separate_model, False)):
        params = [p for n, p in model.named_parameters() if "lora" in n]
        opt = torch.optim.SGD(params, lr=0.05)
        _training_grads(model, x, names, mixed)
        opt.step()
    for (name, p), q in zip(mixed_model.named_parameters(), separate_model.parameters()):
        assert rel_err(p, q) <= bound(torch.float64), name


def test_stacks_built_once_until_a_weight_changes(monkeypatch):
    model = _mlp()
    names = NAME_SETS["interleaved"]
    x = torch.randn(len(names), 9, dtype=torch.float64)
    built = []
    real_zeros = torch.zeros
    from lora_fast import mixed
    monkeypatch.setattr(mixed.torch, "zeros", lambda *a, **k: built.append(a) or real_zeros(*a, **k))
    with batch_adapters(model, names):
        model(x)
        first = len(built)
        model(x)
        assert len(built) == first, "stacks rebuilt for the same weights"
        with torch.no_grad():
            model[0].adapter_weights("b")[1].add_(1.0)   # as an optimizer step would
        y = model(x)
    assert len(built) == first + 2   # layer 0's A and B stacks again
    assert rel_err(y, row_by_row(model, x, names)) <= bound(torch.float64)
    # a setting changed (its scale is part of the cached plan) is seen on the next call
    settings = model[0].adapter_settings
    settings["b"] = settings["b"]._replace(lora_alpha=7.5)
    with batch_adapters(model, names):
        y = model(x)
    assert rel_err(y, row_by_row(model, x, names)) <= bound(torch.float64)


@pytest.mark.parametrize("sorted_rows", [True, False], ids=["grouped", "interleaved"])
def test_torch_path_dropout_per_adapter(sorted_rows):
    """The torch path's mixed pass with a dropout probability per adapter, against float64 rows
    each dropped with the kernels' own mask for its row and its adapter's p."""
    gen = torch.Generator().manual_seed(4)
    M, K, N, R = 9, 11, 6, 4
    ids = torch.tensor([-1, 0, 0, 1, 1, 1, 2, 2, 2] if sorted_rows else [2, 0, 1, -1, 0, 2, 1, 2, 1],
                       dtype=torch.int32)
    perm = None if sorted_rows else torch.argsort(ids, stable=True).to(torch.int32)
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    w = torch.randn(N, K, generator=gen, dtype=torch.float64)
    bias = torch.randn(N, generator=gen, dtype=torch.float64)
    A = torch.randn(3, R, K, generator=gen, dtype=torch.float64)
    B = torch.randn(3, N, R, generator=gen, dtype=torch.float64)
    p = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    scaling = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    scale = scaling / (1 - p)
    seed = torch.tensor([12345], dtype=torch.int64)
    y, xs = torch_path.multi_forward(x, w, bias, A, B, scale, p.float(), seed, ids, perm)
    dy = torch.randn(M, N, generator=gen, dtype=torch.float64)
    dx, da, db = torch_path.multi_backward(dy, x, xs, w, A, B, scale, p.float(), seed, ids, perm)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    rows = []
    for m in range(M):
        a = int(ids[m])
        row = leaves[0][m] @ w.t() + bias
        if a >= 0:
            keep = keep_mask(seed, M, K, float(p[a].float()), impl="torch")[m].double()
            row = row + scale[a] * ((leaves[0][m] * keep) @ leaves[1][a].t()) @ leaves[2][a].t()
        rows.append(row)
    ref = torch.stack(rows)
    ref.backward(dy)
    for name, out, want in (("y", y, ref), ("dx", dx, leaves[0].grad), ("dA", da, leaves[1].grad),
                            ("dB", db, leaves[2].grad)):
        assert rel_err(out, want) <= bound(torch.float64), name


def test_dropout_in_training_is_seeded_and_off_in_eval():
    model = _mlp()
    for layer in lora_fast.lora_layers(model).values():
        for name, s in list(layer.adapter_settings.items()):
            layer.adapter_settings[name] = s._replace(lora_dropout=0.3)
    names = NAME_SETS["interleaved"]
    x = torch.randn(len(names), 9, dtype=torch.float64)
    model.train()
    with torch.no_grad(), batch_adapters(model, names):
        torch.manual_seed(5)
        y1 = model(x)
        torch.manual_seed(5)
        y2 = model(x)
        y3 = model(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    model.eval()
    with batch_adapters(model, names):
        y = model(x)
    assert rel_err(y, row_by_row(model, x, names)) <= bound(torch.float64)


# --- refusals --------------------------------------------------------------------------------------

def test_refusals_change_nothing():
    model = _mlp()
    x = torch.randn(3, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"names: 'nope' not adapters of the model"):
        with batch_adapters(model, ["b", "nope", None]):
            pass
    with pytest.raises(TypeError, match="names: expected a list"):
        with batch_adapters(model, "b"):
            pass
    with batch_adapters(model, ["b", "c"]):
        with pytest.raises(ValueError, match=r"names: has 2 entries, one per batch row"):
            model(x)
        with pytest.raises(RuntimeError, match="inside lora_fast.batch_adapters, rows use other adapters"):
            lora_fast.merge(model)
        with pytest.raises(RuntimeError, match="inside a batch_adapters block already"):
            with batch_adapters(model, ["b", "c"]):
                pass
    assert all(layer.mixed_rows is None and not layer.merged
               for layer in lora_fast.lora_layers(model).values())
    lora_fast.merge(model)
    with pytest.raises(RuntimeError, match="merged into their weight; unmerge"):
        with batch_adapters(model, ["b", "c", None]):
            pass
    lora_fast.unmerge(model)
    assert all(layer.mixed_rows is None for layer in lora_fast.lora_layers(model).values())


def test_rows_of_an_adapter_a_layer_lacks_use_its_base():
    """Adapter b targets layers 0 and 4, not 2: its rows go through layer 2's base linear."""
    model = _mlp()
    x = torch.randn(2, 9, dtype=torch.float64)
    with batch_adapters(model, ["b", "b"]):
        y = model(x)
    named_adapters.set_adapter(model, "b")
    assert model[2].lora_A is None     # layer 2 has no adapter b: its base linear
    assert rel_err(y, model(x)) <= bound(torch.float64)


# --- against PEFT's mixed-batch inference -----------------------------------------------------------

def _peft_pair(arch):
    """(PEFT model with adapters a, b, c of different ranks and targets, lora_fast model with the
    same weights)."""
    from peft import LoraConfig, get_peft_model
    base = MODELS[arch]()
    ours = copy.deepcopy(base)
    targets = {"llama": (["q_proj", "v_proj"], ["q_proj", "o_proj", "down_proj"], ["v_proj"]),
               "gpt2": (["c_attn"], ["c_attn", "c_proj"], ["c_fc"])}[arch]
    specs = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=4), "c": dict(r=2, lora_alpha=3)}
    peft_model = None
    for (name, spec), target in zip(specs.items(), targets):
        config = LoraConfig(target_modules=target, fan_in_fan_out=arch == "gpt2", **spec)
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
            lora_fast.inject(ours, target_modules=target, adapter_name=name, **spec)
        else:
            peft_model.add_adapter(name, config)
            named_adapters.add_adapter(ours, name, target_modules=target, **spec)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module_name, module in peft_model.base_model.model.named_modules():
            if not hasattr(module, "lora_A") or not isinstance(module.lora_A, nn.ModuleDict):
                continue
            layer = ours.get_submodule(module_name)
            for name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                a.copy_(torch.randn(a.shape, generator=gen) * 0.2)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
                ours_a, ours_b = layer.adapter_weights(name)
                ours_a.copy_(a)
                ours_b.copy_(b)
    return peft_model.eval(), ours.eval()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_mixed_batch_matches_peft_adapter_names(arch):
    peft_model, ours = _peft_pair(arch)
    tokens = token_batch(batch=5)
    names = ["b", None, "a", "c", "b"]
    with torch.no_grad():
        want = peft_model(tokens, adapter_names=[n or "__base__" for n in names]).logits
        with batch_adapters(ours, names):
            got = ours(tokens).logits
        for name in ("a", "b", "c"):   # and switching gives PEFT's logits per adapter
            peft_model.set_adapter(name)
            named_adapters.set_adapter(ours, name)
            assert rel_err(ours(tokens).logits, peft_model(tokens).logits) <= bound(torch.float32), name
    assert rel_err(got, want) <= bound(torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    model = _mlp(torch.float32).train()
    x = torch.randn(0, 4, 9, requires_grad=True)
    with batch_adapters(model, [], backend=backend):
        y = model(x)
    assert y.shape == (0, 4, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    # no row names an adapter: none takes part
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" in n)


def test_empty_rows_of_a_named_adapter_layer():
    """M = 0 through the passes themselves (a layer whose adapters are named, no rows)."""
    layer = _mlp(torch.float32)[0]
    ids, perm = torch.zeros(0, dtype=torch.int32), None
    A = torch.randn(2, 3, 9)
    B = torch.randn(2, 13, 3)
    y, xs = torch_path.multi_forward(torch.randn(0, 9), layer.weight, layer.bias, A, B,
                                     torch.ones(2), None, None, ids, perm)
    dx, da, db = torch_path.multi_backward(torch.randn(0, 13), torch.randn(0, 9), xs, layer.weight,
                                           A, B, torch.ones(2), None, None, ids, perm)
    assert y.shape == (0, 13) and xs.shape == (0, 3) and dx.shape == (0, 9)
    assert not da.any() and not db.any() and da.shape == A.shape and db.shape == B.shape
