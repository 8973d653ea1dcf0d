"""The fused kernels on a 4-bit NF4 W0 (issue 17's kernel half): each tile of codes and its block
absmax decoded in the K-loop (kernels/blocks.nf4_tile), no decoded copy of W0 anywhere.

- every kernel path that reads W0 (forward in_loop / split / split_k, backward fused / split), plain
  and double-quantised absmax: bit for bit the same kernels on the decoded weight (the decode is
  exact and the GEMM the same), and within the dtype's bound of the float64 reference on the
  reference's own decode; odd N, in_features not a multiple of 64 (blocks across rows), M = 1,
  3-D and strided inputs, a strided bias, dropout; outputs poisoned (conftest: torch.empty is NaN)
- the dispatcher: 4-bit keys apart from dense ones, no TMA path, cublas (decode, then cuBLAS) for
  an odd in_features, where the bytes of a row are not whole
- LoRALinear4bit on the "triton" backend never decodes W0 (NF4Weight.dequantize raises) in a
  training step, matches the torch backend, and keeps nothing of W0 for backward; under autocast
  and saved-tensor hooks too
- the stand-in the kernels read instead of a decoded weight (lora_fast.weights.packed) is NaN to
  anything that reads it as a tensor, and the torch path decodes it
"""
import contextlib
import copy
import os

import pytest
import torch
from torch import nn

from helpers import HAS_CUDA, KERNEL_DTYPES, assert_close
from lora_fast import dispatch, nf4, reference, torch_path, weights
from lora_fast.inject import disable_adapters
from lora_fast.qlora import Linear4bit, LoRALinear4bit

pytestmark = pytest.mark.skipif(not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the kernels need a GPU or the Triton interpreter")


@pytest.fixture(autouse=True, scope="module")
def layout_independent_interpreter_dot():
    """The interpreter's tl.dot is np.matmul, and OpenBLAS's result depends on the operands'
    memory layout on some CPUs (a transposed view takes another kernel: 1 ulp apart in fp32 on an
    AMD EPYC, never on the CPU these tests were first run on). The forward's 4-bit tile is a
    tl.trans of the decoded one, the dense tile a plain load, so "bit for bit the same GEMM" would
    test numpy there, not the kernels; on a GPU the MMA does not see layouts. Under the interpreter
    the operands are made contiguous for this module's tests."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    from triton.runtime import interpreter
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = copy.copy(a), copy.copy(b)
        a.data, b.data = np.ascontiguousarray(a.data), np.ascontiguousarray(b.data)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = original

# (M, K, N, r): K not a multiple of 64 (absmax blocks straddle rows) nor of 32, odd N, M = 1, and
# more than 256 blocks
SHAPES = [(5, 96, 48, 8), (1, 64, 40, 4), (33, 160, 24, 16), (7, 34, 70, 3),
          (3, 130, 131, 4)]   # 267 blocks: double quantisation's second group of 256


def _nf4_inputs(M, K, N, r, dtype, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = nf4.quantize_nf4(torch.randn(N, K, generator=g) * K ** -0.5, double_quant=double_quant)
    return {
        "x": torch.randn(M, K, generator=g).to(dtype),
        "nf4": w,
        "lora_A": (torch.randn(r, K, generator=g) * K ** -0.5).to(dtype),
        "lora_B": (torch.randn(N, r, generator=g) * r ** -0.5).to(dtype),
        "bias": torch.randn(N, generator=g).to(dtype),
    }


def _forward(path, x, weight, t, dropout_p=0.0, seed=None):
    with dispatch.forced(forward=path):
        return dispatch.lora_forward(x, weight, t["lora_A"], t["lora_B"], t["bias"], 0.75,
                                     dropout_p=dropout_p, seed=seed)


def _backward(path, dy, x, xs, weight, t, dropout_p=0.0, seed=None):
    with dispatch.forced(backward=path):
        return dispatch.lora_backward(dy, x, xs, weight, t["lora_A"], t["lora_B"], 0.75,
                                      dropout_p=dropout_p, seed=seed)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_every_path_decodes_as_the_dense_kernels_and_the_reference(shape, dtype, double_quant):
    M, K, N, r = shape
    t = _nf4_inputs(M, K, N, r, dtype, double_quant)
    dense = t["nf4"].dequantize(dtype)
    packed = weights.packed(t["nf4"], dtype)
    w64 = reference.dequantize_nf4_ref(t["nf4"])
    y_ref = reference.lora_linear_ref(t["x"], w64, t["lora_A"], t["lora_B"], t["bias"], 0.75)
    paths = ["in_loop", "split"] + (["split_k"] if M <= 64 else [])
    for path in paths:
        y, xs = _forward(path, t["x"], packed, t)
        y_dense, xs_dense = _forward(path, t["x"], dense, t)
        assert torch.equal(y, y_dense) and torch.equal(xs, xs_dense), path
        assert_close(f"forward {path}", y, y_ref, dtype)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(5)).to(dtype)
    g_ref = reference.lora_linear_backward_ref(dy, t["x"], w64, t["lora_A"], t["lora_B"], 0.75)
    for path in ("fused", "split"):
        grads = _backward(path, dy, t["x"], xs, packed, t)
        for name, g, g_dense, ref in zip(("x", "lora_A", "lora_B"), grads,
                                         _backward(path, dy, t["x"], xs, dense, t),
                                         (g_ref["x"], g_ref["lora_A"], g_ref["lora_B"])):
            assert torch.equal(g, g_dense), f"{path} d{name}"
            assert_close(f"backward {path} d{name}", g, ref, dtype)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
def test_strided_inputs_bias_dropout_and_3d_rows(double_quant):
    M, K, N, r = 6, 96, 37, 5
    t = _nf4_inputs(2 * M, 2 * K, N, r, torch.float32, double_quant)
    t["nf4"] = _nf4_inputs(M, K, N, r, torch.float32, double_quant, seed=1)["nf4"]
    x = t["x"][::2, ::2]                                   # non-contiguous rows and columns
    t["lora_A"] = t["lora_A"][:, ::2]
    t["bias"] = torch.randn(2 * N)[::2]                    # a strided bias
    dense = t["nf4"].dequantize(torch.float32)
    packed = weights.packed(t["nf4"], torch.float32)
    seed = torch.tensor([1234], dtype=torch.int64)
    for path in ("in_loop", "split", "split_k"):
        y, xs = _forward(path, x, packed, t, dropout_p=0.25, seed=seed)
        y_dense, _ = _forward(path, x, dense, t, dropout_p=0.25, seed=seed)
        assert torch.equal(y, y_dense), path
        ref = reference.lora_linear_ref(x, reference.dequantize_nf4_ref(t["nf4"]), t["lora_A"], t["lora_B"],
                                        t["bias"], 0.75, dropout_p=0.25, seed=seed)
        assert_close(f"forward {path}", y, ref, torch.float32)
    dy = torch.randn(N, M).t()                             # a transposed dY
    for path in ("fused", "split"):
        assert all(torch.equal(a, b) for a, b in zip(_backward(path, dy, x, xs, packed, t, 0.25, seed),
                                                     _backward(path, dy, x, xs, dense, t, 0.25, seed)))
    # a 3-D input through the layer: the rows of (2, 3, K)
    layer = LoRALinear4bit.from_4bit(Linear4bit(t["nf4"], t["bias"].contiguous()), r=r, lora_alpha=r)
    nn.init.normal_(layer.lora_B)
    x3 = torch.randn(2, 3, K)
    with _backend("triton"):
        y3 = layer(x3)
    with _backend("torch"):
        y3_torch = layer(x3)
    assert y3.shape == (2, 3, N)
    assert_close("3-D rows", y3, y3_torch, torch.float32)


def test_empty_batch():
    t = _nf4_inputs(0, 64, 20, 4, torch.float32, True)
    packed = weights.packed(t["nf4"], torch.float32)
    y, xs = dispatch.lora_forward(t["x"], packed, t["lora_A"], t["lora_B"], t["bias"], 1.0)
    assert y.shape == (0, 20)
    dx, da, db = dispatch.lora_backward(torch.empty(0, 20), t["x"], xs, packed, t["lora_A"], t["lora_B"], 1.0)
    assert dx.shape == (0, 64) and torch.equal(da, torch.zeros_like(da)) and torch.equal(db, torch.zeros_like(db))


def test_dispatcher_keys_and_paths_for_a_4bit_weight():
    dispatch.clear()
    t = _nf4_inputs(9, 64, 24, 4, torch.float32, True)
    packed = weights.packed(t["nf4"], torch.float32)
    call, _, shape = dispatch._forward_call(t["x"], packed, t["lora_A"], t["lora_B"], t["bias"], 1.0)
    dense_call, _, dense_shape = dispatch._forward_call(t["x"], t["nf4"].dequantize(), t["lora_A"], t["lora_B"],
                                                        t["bias"], 1.0)
    assert shape == dense_shape + ("nf4_dq",)               # a key of its own; dense keys unchanged
    assert "tma" not in dispatch.applicable("forward", call)  # the TMA kernels read a dense W0
    assert set(dispatch.applicable("forward", call)) == {"in_loop", "split", "split_k", "cublas"}
    # in_features odd: a row's codes are not whole bytes, so only the decode-then-cuBLAS path
    odd = nf4.quantize_nf4(torch.randn(6, 33), double_quant=False)
    x = torch.randn(3, 33)
    a, b = torch.randn(2, 33), torch.randn(6, 2)
    odd_call = dispatch._forward_call(x, weights.packed(odd, torch.float32), a, b, None, 1.0)[0]
    assert dispatch.applicable("forward", odd_call) == ("cublas",)
    assert dispatch.heuristic("forward", odd_call) == "cublas"
    y, _ = dispatch.lora_forward(x, weights.packed(odd, torch.float32), a, b, None, 1.0)
    assert torch.equal(y, torch_path.lora_forward(x, odd.dequantize(), a, b, None, 1.0)[0])
    with pytest.raises(ValueError, match="does not apply"):
        with dispatch.forced(forward="in_loop"):
            dispatch.lora_forward(x, weights.packed(odd, torch.float32), a, b, None, 1.0)
    # on a GPU the kernels decode for 16-bit compute dtypes; fp32 runs cuBLAS on the decoded weight
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dispatch.kernels_read_4bit(cuda, torch.bfloat16, 64) and dispatch.kernels_read_4bit(cuda, torch.float16, 64)
    assert not dispatch.kernels_read_4bit(cuda, torch.float32, 64)
    assert dispatch.kernels_read_4bit(cpu, torch.float32, 64) and not dispatch.kernels_read_4bit(cpu, torch.float32, 63)


def test_the_stand_in_is_nan_to_a_reader_and_the_torch_path_decodes_it():
    w = nf4.quantize_nf4(torch.randn(8, 64))
    stand_in = weights.packed(w, torch.float16)
    assert stand_in.shape == (8, 64) and stand_in.dtype == torch.float16
    assert torch.isnan(stand_in).all()
    assert stand_in.untyped_storage().nbytes() == 2            # one element, expanded
    assert torch.equal(weights.dense(stand_in), w.dequantize(torch.float16))
    x, a, b = torch.randn(3, 64), torch.randn(2, 64), torch.randn(8, 2)
    y, _ = torch_path.lora_forward(x, weights.packed(w, torch.float32), a, b, None, 1.0)
    assert torch.equal(y, torch_path.lora_forward(x, w.dequantize(), a, b, None, 1.0)[0])
    # autocast's cast keeps it a stand-in (no copy of its expanded values)
    cast = weights.cast(weights.packed(w, torch.float32), torch.float16)
    assert weights.packed_source(cast) is w and cast.dtype == torch.float16


@contextlib.contextmanager
def _backend(name):
    old = os.environ.get("LORA_FAST_BACKEND")
    os.environ["LORA_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["LORA_FAST_BACKEND"]
        else:
            os.environ["LORA_FAST_BACKEND"] = old


def _layer(double_quant, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    layer = LoRALinear4bit.from_4bit(base, r=8, lora_alpha=16, lora_dropout=dropout)
    nn.init.normal_(layer.lora_B, std=0.1)
    return layer.train()


def _step(layer, x):
    layer.zero_grad()
    x = x.detach().requires_grad_()
    torch.manual_seed(7)   # the dropout seed
    y = layer(x)
    y.square().sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
def test_layer_trains_on_the_kernels_without_decoding_w0(double_quant, monkeypatch):
    layer = _layer(double_quant, dropout=0.1)
    x = torch.randn(3, 5, 96)
    with _backend("torch"):
        expected = _step(layer, x)

    def refuse(self, dtype=None):
        raise AssertionError("W0 was decoded outside the kernels")
    monkeypatch.setattr(nf4.NF4Weight, "dequantize", refuse)
    saved = []
    with _backend("triton"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = _step(layer, x)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, expected):
        assert_close(name, a, b, torch.float32)
    # nothing of W0 is kept for backward (not even the stand-in): x, xs and the adapters
    assert saved and not any(t.shape[-2:] == (40, 96) for t in saved if t.dim() >= 2)


def test_layer_on_the_kernels_with_a_float16_compute_dtype_and_checkpointing():
    layer = _layer(True)
    layer.compute_dtype = torch.float16
    x = torch.randn(4, 96)
    with _backend("triton"):
        got = _step(layer, x)
        # activation checkpointing runs the forward again in backward: the stand-in is made again
        layer.zero_grad()
        xc = x.detach().requires_grad_()
        torch.utils.checkpoint.checkpoint(layer, xc, use_reentrant=False).square().sum().backward()
        assert torch.equal(xc.grad, got[1]) and torch.equal(layer.lora_A.grad, got[2])
    with _backend("torch"):
        expected = _step(layer, x)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, expected):
        assert_close(name, a, b, torch.float16)


def test_layer_on_the_kernels_under_autocast():
    """autocast casts the stand-in as it casts a weight (weights.cast): still the codes, in float16."""
    layer = _layer(False)
    x = torch.randn(5, 96)
    results = {}
    dispatch.clear()
    for name in ("triton", "torch"):
        with _backend(name), torch.autocast("cpu", dtype=torch.float16):
            results[name] = _step(layer, x)
    # the kernels ran in float16 on the codes (the 4-bit key), not on a decoded float32 weight
    assert {(k[1], k[-1]) for k in dispatch._settled} == {(torch.float16, "nf4")}
    for name, a, b in zip(("y", "dx", "dA", "dB"), results["triton"], results["torch"]):
        assert_close(name, a, b, torch.float16)


@pytest.mark.parametrize("rows", [3, 70], ids=["decode_rows", "gemm_rows"])
def test_a_4bit_linear_without_an_adapter_runs_the_kernels_at_rank_0(rows, monkeypatch):
    """Linear4bit (no LoRA target) and a LoRALinear4bit with its adapters off: the base linear on the
    kernels (split-K forward at decode rows, the GEMM above; the dX GEMM), W0 never decoded."""
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(96, 40), double_quant=True)
    layer = LoRALinear4bit.from_4bit(copy.deepcopy(base), r=4, lora_alpha=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, rows, 96)

    def run(backend):   # {name: (y, dx)} of the 4-bit linear and of the layer with its adapter off
        out = {}
        with _backend(backend):
            for name, module in (("base", base), ("off", layer)):
                xg = x.clone().requires_grad_()
                with disable_adapters(layer) if name == "off" else contextlib.nullcontext():
                    y = module(xg)
                y.square().sum().backward()
                out[name] = (y.detach(), xg.grad)
        return out
    expected = run("torch")
    assert torch.equal(expected["off"][0], expected["base"][0])   # the adapter is off: the base alone
    monkeypatch.setattr(nf4.NF4Weight, "dequantize", lambda self, dtype=None: pytest.fail("W0 decoded"))
    for name, (y, dx) in run("triton").items():
        assert_close(f"{name} y", y, expected[name][0], torch.float32)
        assert_close(f"{name} dx", dx, expected[name][1], torch.float32)
    # every path of the table at rank 0, against the float64 reference on the reference's decode
    w64 = reference.dequantize_nf4_ref(base.nf4)
    x2 = x.reshape(-1, 96)
    packed = weights.packed(base.nf4, torch.float32)
    dy = torch.randn(2 * rows, 40)
    kernel_paths = ["in_loop", "split"] + (["split_k"] if rows <= 64 else [])
    for forward, backward in [*zip(kernel_paths, ["fused", "split", "fused"]), ("cublas", "cublas")]:
        if forward == "cublas":
            monkeypatch.undo()   # the torch path decodes W0
        with dispatch.forced(forward=forward, backward=backward):
            y = dispatch.base_forward(x2, packed, base.bias)
            dx = dispatch.base_backward(dy, packed)
        assert_close(f"base_forward {forward}", y, x2.double() @ w64.t() + base.bias.double(), torch.float32)
        assert_close(f"base_backward {backward}", dx, dy.double() @ w64, torch.float32)


def test_odd_in_features_and_settings_the_kernels_cannot_run_keep_the_4bit_layers_working():
    """in_features odd (a row's codes are not whole bytes): cublas, on the decoded weight;
    LORA_FAST_BACKEND=triton with a float64 input: Linear4bit decodes and runs F.linear as before
    (no backend error from a layer that has no adapter); a strided view of the bytes decodes right."""
    torch.manual_seed(0)
    odd = Linear4bit.from_linear(nn.Linear(33, 6), double_quant=False)
    x = torch.randn(4, 33)
    with _backend("torch"):
        expected = odd(x)
    with _backend("triton"):
        assert torch.equal(odd(x), expected)
        b64 = Linear4bit.from_linear(nn.Linear(64, 8)).double()
        x64 = torch.randn(3, 64, dtype=torch.float64)
        assert torch.equal(b64(x64), nn.functional.linear(x64, b64.dequantize(torch.float64), b64.bias))
    w = nf4.quantize_nf4(torch.randn(8, 64), double_quant=True)
    wide = torch.zeros(w.packed.shape[0], 2, dtype=torch.uint8)
    wide[:, :1] = w.packed
    strided = nf4.NF4Weight(wide[:, :1], w.absmax, w.absmax_code, w.absmax_scale, w.absmax_offset, (8, 64))
    assert not strided.packed.is_contiguous()
    a, b = torch.randn(2, 64), torch.randn(8, 2)
    x = torch.randn(5, 64)
    with dispatch.forced(forward="in_loop"):
        y, _ = dispatch.lora_forward(x, weights.packed(strided, torch.float32), a, b, None, 1.0)
    assert torch.equal(y, dispatch.lora_forward(x, weights.packed(w, torch.float32), a, b, None, 1.0)[0])


def test_check_cli_on_a_4bit_weight_with_odd_in_features():
    """lora-fast-check --nf4 on a shape whose in_features is odd: the dispatcher's only path there
    (cublas) is the one checked, on both the default and --all-paths runs (no forced kernel path)."""
    from lora_fast import check
    for extra in ([], ["--all-paths"]):
        assert check.main(["--shapes", "3x33x10", "--ranks", "3", "--dtypes", "fp32", "--nf4", "--dropout", "0",
                           *extra]) == 0
