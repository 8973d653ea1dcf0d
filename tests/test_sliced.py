"""LoRASlicedLinear: LoRA on chosen output slices of a fused projection. Forward and every gradient
against a float64 per-slice reference (both backends, every enable pattern of three odd slices,
dropout from the kernels' mask), loralib's MergedLinear on the same weights, a GPT-2 Conv1D base,
merge/unmerge, named adapters, B_full round trips and the refusals."""
import itertools
import math

import pytest
import torch
from torch import nn

import lora_fast
from helpers import assert_close
from lora_fast import LoRALinear
from lora_fast.dropout import keep_mask
from lora_fast.sliced import LoRASlicedLinear, block_b, blocks_from_full

SLICES = (5, 3, 7)
ENABLES = [e for e in itertools.product((True, False), repeat=3) if any(e)]   # the 7 non-empty patterns
IN, R, ALPHA = 11, 3, 6


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """The backend LoRALinear.forward's lora_linear call ("auto") resolves to."""
    monkeypatch.setenv("LORA_FAST_BACKEND", request.param)
    return request.param


def sliced_ref(x, weight, bias, lora_A, lora_B, slices, enable, scaling, keep=None, p=0.0):
    """y in plain PyTorch, slice by slice: slice i's rows are x·W_iᵀ + b_i, plus s·d(x)·A_jᵀ·B_jᵀ
    when it is the j-th enabled slice (A_j, B_j its blocks of lora_A's rows and lora_B's rows);
    d(x) = keep ⊙ x / (1 - p). Differentiable: autograd gives the reference gradients."""
    r = lora_A.shape[0] // sum(enable)
    dropped = x if keep is None else x * keep / (1.0 - p)
    outs, row, b_row, j = [], 0, 0, 0
    for n, on in zip(slices, enable):
        y = x @ weight[row:row + n].T + bias[row:row + n]
        if on:
            y = y + scaling * ((dropped @ lora_A[j * r:(j + 1) * r].T) @ lora_B[b_row:b_row + n].T)
            b_row, j = b_row + n, j + 1
        outs.append(y)
        row += n
    return torch.cat(outs, dim=-1)


def _layer(enable, dtype=torch.float32, slices=SLICES, seed=0, **kwargs):
    """A layer with a random base and a random (trained-like, non-zero) adapter."""
    torch.manual_seed(seed)
    layer = LoRASlicedLinear(IN, sum(slices), slices, enable, r=R, lora_alpha=ALPHA, dtype=dtype, **kwargs)
    _randomize(layer, seed)
    return layer


def _randomize(layer, seed, name=None):
    g = torch.Generator().manual_seed(seed + 1)
    lora_A, lora_B = layer.adapter_weights(name)
    with torch.no_grad():
        lora_A.copy_(torch.randn(lora_A.shape, generator=g) / math.sqrt(layer.in_features))
        lora_B.copy_(torch.randn(lora_B.shape, generator=g))


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _check_step(layer, x, keep=None, seed=None):
    """The layer's y and its gradients (x, lora_A, lora_B, bias) against sliced_ref in float64, the
    bound the table's or twice plain PyTorch's error in the layer's dtype. With dropout, the layer's
    forward runs after torch.manual_seed(seed) and `keep` is the mask its draw gives."""
    dtype = layer.weight.dtype
    layer.bias.requires_grad_(True)
    for param in (layer.lora_A, layer.lora_B, layer.bias):
        param.grad = None
    x = _leaf(x)
    if seed is not None:
        torch.manual_seed(seed)
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    y.backward(dy)
    got = {"y": y, "x": x.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad, "bias": layer.bias.grad}

    def reference(as_dtype):
        leaves = {"x": _leaf(x, as_dtype), "lora_A": _leaf(layer.lora_A, as_dtype),
                  "lora_B": _leaf(layer.lora_B, as_dtype), "bias": _leaf(layer.bias, as_dtype)}
        out = sliced_ref(leaves["x"], layer.weight.detach().to(as_dtype), leaves["bias"], leaves["lora_A"],
                         leaves["lora_B"], layer.slices, layer.enable, layer.scaling,
                         None if keep is None else keep.to(as_dtype), layer.lora_dropout)
        out.backward(dy.to(as_dtype))
        return {"y": out, **{k: v.grad for k, v in leaves.items()}}

    ref, baseline = reference(torch.float64), reference(dtype)
    for name, value in got.items():
        assert_close(name, value, ref[name], dtype, baseline=baseline[name])
    return got


@pytest.mark.parametrize("enable", ENABLES, ids=lambda e: "".join("TF"[not on] for on in e))
def test_every_enable_pattern_forward_and_gradients(backend, enable):
    layer = _layer(enable)
    _check_step(layer, torch.randn(9, IN))


@pytest.mark.parametrize("backend_name,dtype", [("torch", torch.float64), ("torch", torch.float16),
                                                ("triton", torch.float16)],
                         ids=["torch-float64", "torch-float16", "triton-float16"])
def test_dtypes_and_3d_input(monkeypatch, backend_name, dtype):
    monkeypatch.setenv("LORA_FAST_BACKEND", backend_name)
    layer = _layer((True, False, True), dtype)
    got = _check_step(layer, torch.randn(2, 5, IN, dtype=dtype))
    assert got["y"].shape == (2, 5, sum(SLICES)) and got["lora_A"].dtype == dtype


def test_one_row(backend):
    _check_step(_layer((False, True, True)), torch.randn(1, IN))


def test_one_launch_per_pass(monkeypatch):
    """The whole fused layer is one Triton launch each way at small M (the rank-k·r adapter's
    in-loop forward and fused backward), as a LoRALinear's is: launches recorded, not run (the
    pattern of tests/test_launches.py)."""
    import lora_fast.kernels.backward as backward_mod
    import lora_fast.kernels.forward as forward_mod
    launched = []

    def recording(kernel, grid, like):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return lambda *args, **kwargs: None
    for module in (forward_mod, backward_mod):
        monkeypatch.setattr(module, "launch", recording)
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("LORA_FAST_DISPATCH", "heuristic")
    layer = _layer((True, False, True))
    y = layer(torch.randn(9, IN, requires_grad=True))
    assert launched == ["_lora_forward_kernel"]
    y.backward(torch.ones_like(y))
    assert launched == ["_lora_forward_kernel", "_lora_backward_kernel"]


def test_empty_batch(backend):
    layer = _layer((True, False, True))
    y = layer(torch.randn(0, 4, IN, requires_grad=True))
    assert y.shape == (0, 4, sum(SLICES))
    y.sum().backward()
    assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))
    assert torch.equal(layer.lora_B.grad, torch.zeros_like(layer.lora_B))


def test_dropout_one_mask_for_every_slice(backend):
    """Training with dropout: the reference applies the kernels' mask for the seed lora_linear draws
    after torch.manual_seed(11) (the layer draws nothing else first), one mask on x for all slices."""
    p = 0.3
    layer = _layer((True, False, True), lora_dropout=p).train()
    x = torch.randn(3, 4, IN)
    torch.manual_seed(11)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)   # lora_linear's draw
    keep = keep_mask(seed, 12, IN, p, dtype=torch.float64, impl="torch").reshape(x.shape)
    _check_step(layer, x, keep=keep, seed=11)
    layer.eval()   # no dropout in eval mode
    _check_step(layer, x)


@pytest.mark.parametrize("backend_name,dtype", [("torch", torch.float64), ("triton", torch.float32)],
                         ids=["torch-float64", "triton-float32"])
def test_matches_loralib_merged_linear(monkeypatch, backend_name, dtype):
    """loralib's MergedLinear (equal slices: out % len(enable_lora) == 0) with the same weights copied
    in as they are (its lora_A stacks the enabled slices' A_i, its lora_B their B_i by rows, which its
    grouped conv1d pairs group by group): forward, gradients of x, lora_A, lora_B, and the merged
    weight (its eval() with merge_weights=True against merge()), loralib in float64 as the reference."""
    loralib = pytest.importorskip("loralib")
    monkeypatch.setenv("LORA_FAST_BACKEND", backend_name)
    K, N, r, alpha, enable = 37, 3 * 29, 3, 6, (True, False, True)
    torch.manual_seed(3)
    theirs = loralib.MergedLinear(K, N, r=r, lora_alpha=alpha, enable_lora=list(enable),
                                  merge_weights=True, dtype=torch.float64)
    with torch.no_grad():
        theirs.lora_A.normal_(0, K ** -0.5)
        theirs.lora_B.normal_()
    ours = LoRASlicedLinear(K, N, (29, 29, 29), enable, r=r, lora_alpha=alpha, dtype=dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "lora_A", "lora_B"):
            getattr(ours, name).copy_(getattr(theirs, name))
    assert ours.lora_A.shape == theirs.lora_A.shape and ours.lora_B.shape == theirs.lora_B.shape
    x = torch.randn(2, 13, K, dtype=torch.float64)
    dy = torch.randn(2, 13, N, dtype=torch.float64)
    x_theirs, x_ours = _leaf(x), _leaf(x, dtype)
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    y_theirs.backward(dy)
    y_ours.backward(dy.to(dtype))
    assert_close("y", y_ours, y_theirs, dtype)
    assert_close("grad x", x_ours.grad, x_theirs.grad, dtype)
    assert_close("grad lora_A", ours.lora_A.grad, theirs.lora_A.grad, dtype)
    assert_close("grad lora_B", ours.lora_B.grad, theirs.lora_B.grad, dtype)
    theirs.eval()   # loralib merges here
    ours.merge()
    assert_close("merged weight", ours.weight, theirs.weight, dtype)


def test_initialised_as_loralib_and_computes_the_base():
    layer = LoRASlicedLinear(40, 15, SLICES, (True, False, True), r=4)
    bound = 1 / math.sqrt(40)      # kaiming_uniform(a=√5) over (k·r, in): 1/√in, each A_i's own
    assert layer.lora_A.shape == (8, 40) and layer.lora_B.shape == (12, 4)
    assert 0.5 * bound < layer.lora_A.abs().max() <= bound
    assert torch.equal(layer.lora_B, torch.zeros(12, 4))
    x = torch.randn(6, 40)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert isinstance(layer, LoRALinear) and "slices=(5, 3, 7), enable=(True, False, True)" in repr(layer)


def test_conv1d_base_gpt2_shaped(backend):
    """GPT-2's c_attn as a tiny Conv1D (8 → 3·8, q and v): the weight is the Conv1D's storage seen
    (out, in), the state dict keeps Conv1D's layout, to_base gives a Conv1D with the merge."""
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(4)
    conv = Conv1D(3 * 8, 8)
    x = torch.randn(2, 3, 8)
    layer = LoRASlicedLinear.from_linear(conv, slices=(8, 8, 8), enable=(True, False, True), r=2,
                                         lora_alpha=4, lora_dropout=0.05)
    assert layer.weight.data_ptr() == conv.weight.data_ptr() and layer.from_conv1d
    assert torch.allclose(layer(x), conv(x), atol=1e-6)
    _randomize(layer, 4)
    assert layer.state_dict()["weight"].shape == (8, 24)
    y = _check_step(layer.eval(), x)["y"]
    base = layer.to_base()
    assert isinstance(base, Conv1D)
    assert_close("to_base", base(x), y, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_unmerge_exact(dtype):
    """merge folds s·B_full·A in float32, rounded once: a disabled slice's rows stay bit for bit, an
    enabled one's are W_i + s·B_i·A_i; unmerge restores the weight bit for bit."""
    layer = _layer((True, False, True), dtype)
    original = layer.weight.detach().clone()
    x = torch.randn(5, IN, dtype=dtype)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    A, B = layer.lora_A.float(), layer.lora_B.float()
    expected = original.float().clone()
    expected[0:5] += layer.scaling * B[0:5] @ A[0:R]
    expected[8:15] += layer.scaling * B[5:12] @ A[R:2 * R]
    assert torch.equal(layer.weight[5:8], original[5:8]), "a disabled slice's rows must not change"
    assert_close("merged weight", layer.weight, expected, dtype)
    assert_close("merged forward", merged, unmerged, dtype)
    layer.unmerge()
    assert torch.equal(layer.weight, original), "unmerge must restore the weight bit for bit"


def test_model_level_merge_and_trainable_see_it():
    model = nn.Sequential(_layer((True, True, False)), nn.ReLU())
    assert list(lora_fast.lora_layers(model)) == ["0"]
    x = torch.randn(4, IN)
    with torch.no_grad():
        before = model(x)
        lora_fast.merge(model)
        assert model[0].merged
        assert_close("merged model", model(x), before, torch.float32)
        lora_fast.unmerge(model)
        with lora_fast.disable_adapters(model):
            assert torch.equal(model(x), torch.relu(nn.functional.linear(x, model[0].weight, model[0].bias)))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B"}


def test_named_adapter_has_the_slices_and_its_own_rank(backend):
    layer = _layer((False, True, True))
    layer.add_adapter("other", r=2, lora_alpha=4)
    lora_A, lora_B = layer.adapter_weights("other")
    assert lora_A.shape == (4, IN) and lora_B.shape == (10, 2) and not lora_A.requires_grad
    assert layer.full_lora_B("other").shape == (15, 4)
    _randomize(layer, 9, "other")
    layer.set_adapter("other")
    _check_step(layer, torch.randn(7, IN))
    with pytest.raises(ValueError, match="adapter_name: this layer has no adapter 'none'"):
        layer.full_lora_B("none")


def test_block_b_and_blocks_from_full_round_trip():
    enable = (True, False, True)
    lora_B = torch.randn(12, R)
    B_full = block_b(lora_B, SLICES, enable)
    expected = torch.zeros(15, 2 * R)
    expected[0:5, 0:R], expected[8:15, R:2 * R] = lora_B[0:5], lora_B[5:12]
    assert torch.equal(B_full, expected)
    assert torch.equal(blocks_from_full(B_full, SLICES, enable, R), lora_B)
    layer = _layer(enable)   # a rank-k·r LoRALinear adapter (PEFT's format) computes the same
    x = torch.randn(3, IN)
    with torch.no_grad():
        full = lora_fast.lora_linear(x, layer.weight, layer.lora_A, layer.full_lora_B(), layer.bias,
                                     scaling=layer.scaling)
        assert_close("B_full adapter", full, layer(x), torch.float32)
    B_full[6, 1] = 1e-30
    with pytest.raises(ValueError, match="B_full: 1 non-zero entries outside the per-slice blocks"):
        blocks_from_full(B_full, SLICES, enable, R)
    with pytest.raises(ValueError, match=r"B_full: expected shape \(15, 4\)"):
        blocks_from_full(B_full, SLICES, enable, 2)


@pytest.mark.parametrize("slices,enable,match", [
    (15, (True,), "slices: expected a non-empty sequence of positive integers"),
    ((), (), "slices: expected a non-empty"),
    ((5, 0, 10), (True, False, True), "slices: expected"),
    ((5, 3.0, 7), (True, False, True), "slices: expected"),
    ((5, True, 9), (True, False, True), "slices: expected"),
    ((5, 3, 6), (True, False, True), r"slices: \(5, 3, 6\) sum to 14, expected out_features = 15"),
    (SLICES, (True, False), "enable: has 2 entries, expected 3"),
    (SLICES, (1, 0, 1), "enable: expected a sequence of True/False"),
    (SLICES, "TFT", "enable: expected a sequence"),
    (SLICES, (False, False, False), "enable: no slice enabled"),
])
def test_bad_layouts_are_refused(slices, enable, match):
    with pytest.raises(ValueError, match=match):
        LoRASlicedLinear(IN, 15, slices, enable)
    with pytest.raises(ValueError, match=match):
        LoRASlicedLinear.from_linear(nn.Linear(IN, 15), slices, enable)


def test_other_refusals():
    with pytest.raises(TypeError, match="linear: expected an nn.Linear or a transformers Conv1D"):
        LoRASlicedLinear.from_linear(nn.Conv1d(3, 3, 1), (3,), (True,))
    with pytest.raises(ValueError, match="r: expected a positive integer"):
        LoRASlicedLinear.from_linear(nn.Linear(IN, 15), SLICES, (True, False, True), r=0)
    layer = _layer((True, False, True))
    assert not layer.supports_dora
    with pytest.raises(ValueError, match="use_dora: DoRA is not available on LoRASlicedLinear"):
        layer.add_adapter("dora", use_dora=True)
    assert list(layer.adapter_settings) == ["default"]
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match="use_dora: '0' is a LoRASlicedLinear"):
        lora_fast.add_adapter(model, "dora", use_dora=True, target_modules=["0"])
    with pytest.raises(ValueError, match="names: 1 LoRASlicedLinear layers"):
        with lora_fast.batch_adapters(model, ["default", "default"]):
            pass


# --- whole models: inject, adapters in PEFT's format, refusals --------------------------------

class FusedQKV(nn.Module):
    """A Llama-3-shaped fused projection (GQA: k and v narrower than q), tiny."""

    def __init__(self, hidden=24, kv=8):
        super().__init__()
        self.qkv_proj = nn.Linear(hidden, hidden + 2 * kv)
        self.o_proj = nn.Linear(hidden + 2 * kv, hidden)

    def forward(self, x):
        return self.o_proj(self.qkv_proj(x))


def _randomize_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_fast.lora_layers(model).values():
            for name in layer.adapter_settings:
                B = layer.adapter_weights(name)[1]
                B.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype))


def test_inject_one_line_each_for_c_attn_and_qkv_proj():
    from tiny_models import tiny_gpt2, token_batch
    gpt2 = tiny_gpt2()
    lora_fast.inject(gpt2, r=2, target_modules=["c_attn"], slices={"c_attn": ((40,) * 3, (True, False, True))})
    fused = FusedQKV()
    lora_fast.inject(fused, r=2, target_modules=["qkv_proj"], slices={"qkv_proj": ((24, 8, 8), (True, False, True))})
    for model, n_in, sizes in ((gpt2, 40, (40, 40)), (fused, 24, (24, 8))):
        layers = [l for l in lora_fast.lora_layers(model).values()]
        assert all(isinstance(l, LoRASlicedLinear) for l in layers)
        assert all(l.lora_A.shape == (4, n_in) and l.lora_B.shape == (sum(sizes), 2) for l in layers)
    _randomize_b(gpt2)
    gpt2(token_batch()).logits.square().mean().backward()
    layer = gpt2.transformer.h[0].attn.c_attn
    assert layer.lora_B.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("enable", [(True, False, True), (True, True, True)])
def test_adapters_move_both_ways_with_peft(tmp_path, enable):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = FusedQKV()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora_fast.inject(model, r=3, lora_alpha=6, target_modules=["qkv_proj", "o_proj"],
                     slices={"qkv_proj": ((24, 8, 8), enable)})
    _randomize_b(model)
    x = torch.randn(5, 24)
    ref = model(x)
    lora_fast.save_adapter(model, tmp_path)

    def fresh():
        plain = FusedQKV()
        plain.load_state_dict(base_state)
        return plain
    with pytest.warns(UserWarning, match="lora_fast_slices"):   # PEFT ignores our key, saying so
        theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path)
    torch.testing.assert_close(theirs(x), ref)   # fp32: PEFT takes the products in another order
    ours = fresh()
    lora_fast.load_adapter(ours, tmp_path)
    layer, source = ours.qkv_proj, model.qkv_proj
    assert isinstance(layer, LoRASlicedLinear) and (layer.slices, layer.enable) == (source.slices, source.enable)
    assert torch.equal(layer.lora_A, source.lora_A) and torch.equal(layer.lora_B, source.lora_B)
    torch.testing.assert_close(ours(x), ref, rtol=0, atol=0)
    # into the same model again (the existing adapter's weights replaced)
    lora_fast.load_adapter(ours, tmp_path)
    assert torch.equal(ours.qkv_proj.lora_B, source.lora_B)


def test_named_adapters_on_sliced_layers_round_trip(tmp_path):
    model = FusedQKV()
    lora_fast.inject(model, r=2, target_modules=["qkv_proj"], slices={"qkv_proj": ((24, 8, 8), (False, True, True))})
    lora_fast.add_adapter(model, "other", r=3)
    _randomize_b(model)
    lora_fast.save_adapter(model, tmp_path)
    back = FusedQKV()
    back.load_state_dict(model.state_dict(), strict=False)
    assert lora_fast.load_adapters(back, tmp_path) == ["default", "other"]
    for name in ("default", "other"):
        for a, b in zip(back.qkv_proj.adapter_weights(name), model.qkv_proj.adapter_weights(name)):
            assert torch.equal(a, b)


def test_file_refusals_leave_the_model_as_it_was(tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    model = FusedQKV()
    lora_fast.inject(model, r=2, target_modules=["qkv_proj"], slices={"qkv_proj": ((24, 8, 8), (True, False, True))})
    _randomize_b(model)
    lora_fast.save_adapter(model, tmp_path / "good")
    # an off-block entry in B_full: not a per-slice adapter
    (tmp_path / "bad").mkdir()
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    key = "base_model.model.qkv_proj.lora_B.weight"
    tensors[key][0, -1] = 1.0
    save_file(tensors, tmp_path / "bad" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(config))
    plain = FusedQKV()
    with pytest.raises(ValueError, match="lora_B.weight: B_full: 1 non-zero entries outside"):
        lora_fast.load_adapter(plain, tmp_path / "bad")
    assert not lora_fast.lora_layers(plain)
    # rank_pattern that disagrees with the slices
    save_file(load_file(tmp_path / "good" / "adapter_model.safetensors"), tmp_path / "bad" / "adapter_model.safetensors")
    config["rank_pattern"] = {"qkv_proj": 6}   # k·r is 4
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rank_pattern=.*are not those of its lora_fast_slices"):
        lora_fast.load_adapter(plain, tmp_path / "bad")
    # a model whose layer is a plain LoRA layer
    other = FusedQKV()
    lora_fast.inject(other, r=2, target_modules=["qkv_proj"])
    before = other.qkv_proj.lora_A.clone()
    with pytest.raises(ValueError, match="with slices .* the model's has none"):
        lora_fast.load_adapter(other, tmp_path / "good")
    with pytest.raises(ValueError, match="hotswap: per-slice layers"):
        lora_fast.load_adapter(model, tmp_path / "good", hotswap=True)
    assert torch.equal(other.qkv_proj.lora_A, before) and not isinstance(other.qkv_proj, LoRASlicedLinear)


def test_inject_slices_refusals():
    model = FusedQKV()
    with pytest.raises(ValueError, match="slices: 'k_proj' matches none of the target layers"):
        lora_fast.inject(model, r=2, target_modules=["qkv_proj"], slices={"k_proj": ((24, 8, 8), (True,) * 3)})
    with pytest.raises(ValueError, match=r"slices\['qkv_proj'\] \(layer 'qkv_proj'\): slices: .* sum to 39"):
        lora_fast.inject(model, r=2, target_modules=["qkv_proj"], slices={"qkv_proj": ((24, 8, 7), (True,) * 3)})
    with pytest.raises(ValueError, match="expected \\(sizes, enable\\)"):
        lora_fast.inject(model, r=2, target_modules=["qkv_proj"], slices={"qkv_proj": (24, 8, 8)})
    with pytest.raises(ValueError, match="per-slice LoRA is not available with use_dora"):
        lora_fast.inject(model, r=2, target_modules=["qkv_proj"], use_dora=True,
                         slices={"qkv_proj": ((24, 8, 8), (True,) * 3)})
    assert not lora_fast.lora_layers(model)


def test_batch_adapters_refuses_sliced_layers_at_entry():
    model = FusedQKV()
    lora_fast.inject(model, r=2, target_modules=["qkv_proj"], slices={"qkv_proj": ((24, 8, 8), (True, False, True))})
    with pytest.raises(ValueError, match="LoRASlicedLinear layers hold adapters of the batch"):
        with lora_fast.batch_adapters(model, ["default", None]):
            pass
    # a batch none of whose rows uses the sliced layer's adapters: it computes its base linear
    lora_fast.add_adapter(model, "plain", r=2, target_modules=["o_proj"])
    _randomize_b(model)
    x = torch.randn(2, 24)
    with lora_fast.batch_adapters(model, ["plain", None]):
        out = model(x)
    lora_fast.set_adapter(model, "plain")
    with torch.no_grad():
        expected = model.o_proj(model.qkv_proj.base_linear(x))
    torch.testing.assert_close(out[0], expected[0], rtol=1e-6, atol=1e-6)


def test_peft_resave_loads_into_the_sliced_model_and_is_refused_with_a_hint_elsewhere(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = FusedQKV()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lora_fast.inject(model, r=2, lora_alpha=3, target_modules=["qkv_proj"], use_rslora=True,
                     slices={"qkv_proj": ((24, 8, 8), (True, False, True))})
    _randomize_b(model)
    x = torch.randn(3, 24)
    ref = model(x)
    lora_fast.save_adapter(model, tmp_path / "ours")
    plain = FusedQKV()
    plain.load_state_dict(state)
    with pytest.warns(UserWarning):
        theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")   # PEFT drops lora_fast_slices
    target = FusedQKV()
    target.load_state_dict(state)
    with pytest.raises(ValueError, match="lost its lora_fast_slices"):
        lora_fast.load_adapter(target, tmp_path / "peft")
    assert not lora_fast.lora_layers(target)
    lora_fast.inject(target, r=2, lora_alpha=3, target_modules=["qkv_proj"], use_rslora=True,
                     slices={"qkv_proj": ((24, 8, 8), (True, False, True))})
    lora_fast.load_adapter(target, tmp_path / "peft")
    assert torch.equal(target.qkv_proj.lora_B, model.qkv_proj.lora_B)
    torch.testing.assert_close(target(x), ref, rtol=0, atol=0)
