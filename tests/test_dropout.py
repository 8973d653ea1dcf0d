"""LoRA dropout inside the kernels: the mask is a Philox draw regenerated in backward (never
stored), the same in forward and backward, reproducible from torch's seed, at the right rate; the
saved bytes do not grow with p. lora_fast.dropout reproduces that mask bit for bit outside the
kernels (plain PyTorch, C++), so the torch backend drops the same elements as the triton one and
the float64 reference can rebuild it from the seed. Plus autocast, float32 master adapters and NaN
propagation."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from torch import nn

from bench.common import saved_bytes
from helpers import DEVICE, KERNEL_DTYPES, assert_close, make_inputs
from lora_fast import LoRALinear, LoRALinearFunction, cref, dispatch, lora_linear
from lora_fast.dropout import keep_mask, threshold
from lora_fast.kernels.dropout import dropout_mask
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref
from lora_fast.tolerances import rel_err

SCALING, P = 1.3, 0.3
BACKENDS = ["triton", "torch"]
# (M, K, N, r): odd sizes; r > 64 (rank chunks); K = 1
SHAPES = [(37, 45, 53, 5), (33, 17, 29, 100), (21, 1, 3, 2)]


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_kernels_apply_the_mask_they_regenerate(shape, dtype):
    """Every kernel path (in-loop or first-pass forward, fused or split backward; forced through the
    dispatcher, run by the autograd Function) equals the float64 reference computed with the mask
    materialised from the same seed: each applies the mask it regenerates. (Every path with and
    without dropout, and every forward x backward pair: tests/test_paths.py.)"""
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, dtype, seed=41)
    dy = make_inputs(M, N, 1, 1, dtype, seed=42)["x"]
    seed = _seed(2024)
    keep = dropout_mask(seed, M, K, P)
    y_ref = lora_linear_ref(**t, scaling=SCALING, dropout_mask=keep, dropout_p=P)
    g_ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING, keep, P)
    one_tile = r <= 64        # in_loop and fused hold the whole rank in one tile
    for forward, backward in ([("in_loop", "fused")] if one_tile else []) + [("split", "split")]:
        x, a, b = (t[k].detach().requires_grad_() for k in ("x", "lora_A", "lora_B"))
        with dispatch.forced(forward=forward, backward=backward):
            y, _ = LoRALinearFunction.apply(x, t["weight"], t["bias"], a, b, SCALING, "triton", P, seed)
            dx, da, db = torch.autograd.grad(y, (x, a, b), dy)
        assert_close(f"y {forward}", y, y_ref, dtype)
        assert_close(f"dx {forward}/{backward}", dx, g_ref["x"], dtype)
        assert_close(f"dA {forward}/{backward}", da, g_ref["lora_A"], dtype)
        assert_close(f"dB {forward}/{backward}", db, g_ref["lora_B"], dtype)


# The mask outside the kernels. Seeds: small, past 2**32 (the key's high word), near 2**62 (the
# top of the layer's draw), negative (the bits of an int64). p: the float32 u = fp32(v)·S is
# compared with fp32(p); EDGE_P are p's whose threshold sits where a rounding decides it.
MASK_SHAPES = [(37, 45), (1, 1), (3, 1000), (64, 33)]
MASK_SEEDS = [7, 2**32 + 5, 2**62 - 3, -12345]
MASK_P = [0.05, 0.1, 0.3, 0.5, 0.9]
_S = np.float32(4.6566127342e-10)
_V0 = 2**30 + 2**29 + 128 * 12345        # a multiple of 128 past 2**30: v0 - 64 .. v0 + 64 round to fp32(v0)
EDGE_P = [
    float(np.float32(_V0) * _S),                                        # u exactly: keep from the tie up
    float(np.float32(_V0) * _S) + 0.25 * float(np.spacing(np.float32(_V0) * _S)),   # rounds down to it in fp32
    float(np.nextafter(np.float32(_V0) * _S, np.float32(0))),           # the float just below
]
# rows of x whose offsets m·K + k straddle 2**32 (counter word c1 from 0 to 1) for K = 45
ROW0_PAST_2_32 = 2**32 // 45 - 1


def _mask_impls():
    return ["torch", "triton"] + (["cpp"] if cref.available() else [])


@pytest.mark.parametrize("impl", ["torch", "triton", "cpp"])
def test_any_one_element_seed_shape_gives_the_same_mask(impl):
    if impl == "cpp" and not cref.available():
        pytest.skip("built without the C++ extension")
    value = 2**63 - 12345
    masks = [keep_mask(torch.tensor(value, dtype=torch.int64).reshape(shape).to(DEVICE), 7, 9, 0.3, impl=impl)
             for shape in ((1,), (), (1, 1))]
    assert all(torch.equal(m, masks[0]) for m in masks) and masks[0].shape == (7, 9)


@pytest.mark.parametrize("p", MASK_P + EDGE_P, ids=lambda p: f"p{p:.9g}")
def test_keep_mask_is_the_kernels_mask(p):
    """Every implementation (and the automatic choice) equals the kernels' own mask bit for bit,
    over odd shapes, seeds across the int64 range, and rows whose offsets pass 2**32."""
    for seed_value in MASK_SEEDS:
        seed = _seed(seed_value)
        for M, K in MASK_SHAPES:
            for row0 in (0, ROW0_PAST_2_32 if K == 45 else 2**33 // K):
                want = dropout_mask(seed, M, K, p, row0=row0)
                for impl in _mask_impls() + [None]:
                    got = keep_mask(seed, M, K, p, row0=row0, impl=impl)
                    assert got.dtype == torch.bool and got.device == seed.device
                    assert torch.equal(got, want), f"{impl}: seed {seed_value}, {M}x{K}, row0 {row0}: " \
                        f"{(got != want).sum().item()} elements differ"


def test_without_the_extension_the_cpu_mask_is_plain_pytorch(monkeypatch):
    """Installed without the C++ extension: asking for it raises, the automatic choice falls back
    to the plain-PyTorch mask, which is the same mask."""
    monkeypatch.setattr(cref, "_cref", None)
    monkeypatch.setattr(cref, "_MISSING", "lora_fast._cref is not built (test)")
    seed = _seed(1)
    with pytest.raises(RuntimeError, match=r"lora_fast._cref is not built \(test\)"):
        keep_mask(seed, 2, 3, 0.5, impl="cpp")
    assert torch.equal(keep_mask(seed, 9, 13, 0.5), dropout_mask(seed, 9, 13, 0.5))


def test_row0_reaches_offsets_past_2_32():
    """Rows straddling offset 2**32 continue the flat run of counters: the mask of rows row0..
    equals the tail of the mask from row 0 (checked where both are small), and past 2**32 the
    counter's high word is used (the mask differs from the one 2**32 offsets earlier)."""
    seed, K = _seed(99), 45
    whole = dropout_mask(seed, 40, K, 0.5)
    assert torch.equal(keep_mask(seed, 30, K, 0.5, row0=10, impl="torch"), whole[10:])
    late = keep_mask(seed, 4, K, 0.5, row0=ROW0_PAST_2_32, impl="torch").reshape(-1)
    first = ROW0_PAST_2_32 * K
    wrapped = keep_mask(seed, 1, first + 4 * K - 2**32, 0.5, impl="torch").reshape(-1)   # offsets mod 2**32
    past = 2**32 - first
    assert not torch.equal(late[past:], wrapped[:late.numel() - past]), "high counter word ignored"


@triton.jit
def _uniform_kernel(v_ptr, out_ptr, n, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, (tl.uint_to_uniform_float(v) >= p).to(tl.int8), mask=offs < n)


@pytest.mark.parametrize("p", MASK_P + EDGE_P + [1e-12, 0.999999999], ids=lambda p: f"p{p:.9g}")
def test_threshold_is_triton_own_comparison_near_it(p):
    """keep ⇔ v >= threshold(p), checked exhaustively around the threshold against Triton's own
    uniform conversion and comparison (tl.uint_to_uniform_float(v) >= p in a kernel), for the
    word v and for its negative twin ~v; and over a wider window with numpy float32."""
    t = threshold(p)
    v = torch.arange(max(t - 4096, 0), min(t + 4096, 2**31), dtype=torch.int64)
    words = torch.cat([v, -v - 1]).to(torch.int32)           # ~v folds back onto v
    out = torch.empty(words.numel(), dtype=torch.int8)
    _uniform_kernel[(triton.cdiv(words.numel(), 1024),)](words, out, words.numel(), p, BLOCK=1024)
    assert torch.equal(out.bool(), torch.cat([v, v]) >= t), f"threshold {t} for p={p} is off"
    wide = np.arange(max(t - 2**20, 0), min(t + 2**20, 2**31), dtype=np.int64)
    assert np.array_equal(wide.astype(np.float32) * _S >= np.float32(p), wide >= t)


def test_edge_thresholds_are_edges():
    """The edge p's are what they claim: the tie group of v0 decides the first two (fp32(p) is
    that float), and comparing in float64 would move the second one's threshold."""
    t0, t1, t2 = (threshold(p) for p in EDGE_P)
    assert t0 == t1 and t0 < _V0 and np.float32(t0) == np.float32(_V0) != np.float32(t0 - 1)
    assert t2 < t0
    assert float(np.float32(t1) * _S) < EDGE_P[1]   # float64 comparison would drop v = t1


def test_keep_mask_dtypes_and_refusals():
    seed = _seed(3)
    keep = keep_mask(seed, 5, 7, 0.3)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.uint8):
        for impl in _mask_impls():
            as_dtype = keep_mask(seed, 5, 7, 0.3, dtype=dtype, impl=impl)
            assert as_dtype.dtype == dtype and torch.equal(as_dtype, keep.to(dtype)), (dtype, impl)
    assert keep_mask(seed, 0, 7, 0.3).shape == (0, 7)
    with pytest.raises(TypeError, match="seed: expected a 1-element int64 tensor, got a \\(2,\\)"):
        keep_mask(torch.zeros(2, dtype=torch.int64), 5, 7, 0.3)
    with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\), got 1.0"):
        keep_mask(seed, 5, 7, 1.0)
    with pytest.raises(ValueError, match="impl: expected one of"):
        keep_mask(seed, 5, 7, 0.3, impl="numpy")


def test_drop_rate():
    M, K, p = 64, 1000, 0.1
    keep = dropout_mask(_seed(7), M, K, p)
    rate = 1 - keep.float().mean().item()
    sigma = (p * (1 - p) / (M * K)) ** 0.5
    assert abs(rate - p) < 5 * sigma, f"drop rate {rate:.4f} for p={p} (5 sigma = {5 * sigma:.4f})"
    other = dropout_mask(_seed(8), M, K, p)
    assert (keep != other).float().mean() > 0.1, "different seeds must give different masks"


def _leaves(t):
    return {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in t.items()}


def _train_step(t, backend, seed, grad_out):
    torch.manual_seed(seed)
    leaves = _leaves(t)
    y = lora_linear(**leaves, scaling=SCALING, dropout_p=P, training=True, backend=backend)
    y.backward(grad_out)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_backends_drop_the_same_elements(dtype):
    """One seed, both backends: y and every gradient equal the float64 reference that rebuilds the
    mask from that seed (plain PyTorch) and each other, to rounding; against another seed's
    reference they are far off, so the comparison does see which elements were dropped."""
    t = make_inputs(37, 45, 53, 5, dtype, seed=51)
    dy = make_inputs(37, 53, 1, 1, dtype, seed=52)["x"]
    torch.manual_seed(21)
    seed = torch.randint(0, 2**62, (1,), device=DEVICE, dtype=torch.int64)   # lora_linear's draw

    def reference(seed):
        g = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING,
                                     dropout_p=P, seed=seed)
        return {"y": lora_linear_ref(**t, scaling=SCALING, dropout_p=P, seed=seed), **g}

    ref, other = reference(seed), reference(seed + 1)
    out = {backend: _train_step(t, backend, 21, dy) for backend in BACKENDS}
    for backend, (y, grads) in out.items():
        assert_close(f"{backend} y", y, ref["y"], dtype)
        for name in ("x", "lora_A", "lora_B", "bias"):
            assert_close(f"{backend} grad {name}", grads[name], ref[name], dtype)
        for name, value in (("y", y), ("x", grads["x"]), ("lora_A", grads["lora_A"])):
            assert rel_err(value, other[name]) > 1e-2, f"{backend} {name}: another seed's mask fits too"
    (y_torch, g_torch), (y_triton, g_triton) = out["torch"], out["triton"]
    assert_close("torch vs triton y", y_torch, y_triton.double(), dtype)
    for name in ("x", "lora_A", "lora_B", "bias"):
        assert_close(f"torch vs triton grad {name}", g_torch[name], g_triton[name].double(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_bit_identical(backend):
    t = make_inputs(29, 24, 19, 4, torch.float32, seed=43)
    dy = torch.randn(29, 19, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y1, g1 = _train_step(t, backend, 5, dy)
    y2, g2 = _train_step(t, backend, 5, dy)
    y3, _ = _train_step(t, backend, 6, dy)
    assert torch.equal(y1, y2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert not torch.equal(y1, y3), "another seed must give another mask"


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_differences_see_the_same_mask(backend):
    """With the seed fixed, central differences of L = Σ y·c through the whole function match the
    gradients of every input: forward and backward used one mask. (L is linear in x and
    bilinear in A, B, so central differences are exact up to rounding.)"""
    t = make_inputs(23, 31, 17, 3, torch.float32, seed=44)
    c = torch.randn(23, 17, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _, grads = _train_step(t, backend, 11, c)
    gen = torch.Generator().manual_seed(3)

    def loss(**over):
        torch.manual_seed(11)
        args = {**t, **over}
        return (lora_linear(**args, scaling=SCALING, dropout_p=P, training=True, backend=backend).double()
                * c.double()).sum().item()

    eps = 1e-2
    for name in ("x", "lora_A", "lora_B", "bias"):
        v = torch.randn(t[name].shape, generator=gen).to(DEVICE)
        fd = (loss(**{name: t[name] + eps * v}) - loss(**{name: t[name] - eps * v})) / (2 * eps)
        analytic = (grads[name].double() * v.double()).sum().item()
        assert abs(fd - analytic) <= 1e-3 * abs(analytic) + 1e-4, f"{name}: FD {fd} vs grad {analytic}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_has_no_dropout(backend):
    t = make_inputs(9, 12, 10, 3, torch.float32, seed=45)
    ref = lora_linear_ref(**t, scaling=SCALING)
    y = lora_linear(**t, scaling=SCALING, dropout_p=P, training=False, backend=backend)
    assert_close("eval", y, ref, torch.float32)
    layer = LoRALinear(12, 10, r=3, lora_dropout=P, device=DEVICE).eval()
    x = t["x"]
    assert_close("module eval", layer(x), lora_linear_ref(x, layer.weight, layer.lora_A, layer.lora_B,
                                                          layer.bias, layer.scaling), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_bytes_do_not_grow_with_dropout(backend):
    """x plus M·r values, p = 0 or 0.1 alike (parameters excluded); PEFT keeps a dropped copy of x."""
    M, K, N, r = 64, 48, 40, 4
    layer = LoRALinear(K, N, r=r, device=DEVICE)
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)

    def step(p):
        return saved_bytes(lambda: lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias,
                                               scaling=2.0, dropout_p=p, training=True, backend=backend),
                           exclude=list(layer.parameters()))

    assert step(0.0) == step(0.1) == M * K * 4 + M * r * 4
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    base = nn.Linear(K, N, device=DEVICE).requires_grad_(False)
    peft = PeftLinear(base, "default", config=LoraConfig(r=r, lora_dropout=0.1), r=r, lora_alpha=r,
                      lora_dropout=0.1).to(DEVICE)
    assert saved_bytes(lambda: peft(x), exclude=list(peft.parameters())) == 2 * M * K * 4 + M * r * 4


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout_refused(p):
    t = make_inputs(4, 8, 6, 2, torch.float32, device="cpu", seed=46)
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\)"):
        lora_linear(**t, dropout_p=p, training=True, backend="torch")
    with pytest.raises(TypeError, match="training: expected a bool"):
        lora_linear(**t, dropout_p=0.1, training="yes", backend="torch")


def test_autocast_cpu_bf16_behaves_like_linear():
    layer = LoRALinear(16, 12, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_lin = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = lora_linear_ref(x.to(torch.bfloat16), layer.weight.to(torch.bfloat16), layer.lora_A.to(torch.bfloat16),
                          layer.lora_B.to(torch.bfloat16), layer.bias.to(torch.bfloat16), layer.scaling)
    assert_close("y", y, ref, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_adapters_on_half_base(backend):
    """fp32 master adapters on an fp16 base and input (bf16 needs a GPU for the kernels): the output
    is fp16, the adapters' gradients fp32 and right."""
    t = make_inputs(11, 20, 14, 3, torch.float16, seed=47)
    t["lora_A"], t["lora_B"] = t["lora_A"].float(), t["lora_B"].float()
    leaves = _leaves(t)
    y = lora_linear(**leaves, scaling=SCALING, backend=backend)
    assert y.dtype == torch.float16
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.float16)
    y.backward(dy)
    assert leaves["lora_A"].grad.dtype == torch.float32 and leaves["lora_B"].grad.dtype == torch.float32
    half = {k: v.to(torch.float16) for k, v in t.items()}
    g = lora_linear_backward_ref(dy, half["x"], half["weight"], half["lora_A"], half["lora_B"], SCALING)
    assert_close("y", y, lora_linear_ref(**half, scaling=SCALING), torch.float16)
    assert_close("dA", leaves["lora_A"].grad, g["lora_A"], torch.float16)


def test_mixed_dtypes_autocast_would_not_resolve_are_refused():
    t = make_inputs(4, 8, 6, 2, torch.float16, device="cpu", seed=48)
    t["weight"] = t["weight"].to(torch.bfloat16)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float16"):
        lora_linear(**t, backend="torch")
    t = make_inputs(4, 8, 6, 2, torch.float32, device="cpu", seed=48)
    t["lora_A"] = t["lora_A"].half()
    with pytest.raises(TypeError, match="lora_A: expected dtype torch.float32"):
        lora_linear(**t, backend="torch")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_row_stays_in_that_row(backend):
    """NaN and inf in x propagate as in the reference: into their rows only, and the zero padding
    of the rank (r = 3 padded to 16) or masked tails never turn an inf into a NaN."""
    t = make_inputs(19, 21, 13, 3, torch.float32, seed=49)
    t["x"][5, 7] = float("nan")
    t["x"][11, 0] = float("inf")
    y = lora_linear(**t, scaling=SCALING, backend=backend)
    ref = lora_linear_ref(**t, scaling=SCALING)
    assert torch.equal(torch.isnan(y).cpu(), torch.isnan(ref)), "NaN pattern differs from the reference"
    assert torch.equal(torch.isinf(y).cpu(), torch.isinf(ref)), "inf pattern differs from the reference"
    bad = torch.zeros(19, dtype=torch.bool)
    bad[[5, 11]] = True
    assert torch.isfinite(y[~bad.to(y.device)]).all()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_cuda_behaves_like_linear(dtype):
    layer = LoRALinear(256, 192, r=16, device="cuda")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(300, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
        y_lin = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == y_lin.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    low = {k: getattr(layer, k).to(dtype) for k in ("weight", "lora_A", "lora_B", "bias")}
    assert_close("y", y, lora_linear_ref(x.to(dtype), low["weight"], low["lora_A"], low["lora_B"], low["bias"],
                                         layer.scaling), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
def test_float32_adapters_on_bf16_base_gpu():
    t = make_inputs(130, 96, 160, 16, torch.bfloat16, seed=50)
    t["lora_A"], t["lora_B"] = t["lora_A"].float(), t["lora_B"].float()
    leaves = _leaves(t)
    y = lora_linear(**leaves, scaling=SCALING, dropout_p=0.1, training=True)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert leaves["lora_A"].grad.dtype == torch.float32 and torch.isfinite(leaves["lora_A"].grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_mask_is_captured_in_a_cuda_graph_gpu(impl):
    """Nothing is read back to the host: the mask is captured in a CUDA graph, and a replay after
    the seed tensor changes gives that seed's mask."""
    seed = _seed(11)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        keep_mask(seed, 37, 45, 0.3, impl=impl)   # compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = keep_mask(seed, 37, 45, 0.3, impl=impl)
    for value in (12, 2**40 + 3):
        seed.fill_(value)
        graph.replay()
        assert torch.equal(out, dropout_mask(seed, 37, 45, 0.3)), value


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
def test_torch_backend_dropout_step_is_captured_gpu():
    """The torch backend with dropout, forward and backward, in one CUDA graph (its mask no longer
    comes from seed.item()); replays draw new masks."""
    t = _leaves(make_inputs(64, 48, 40, 4, torch.float32, seed=53))
    dy = torch.randn(64, 40, device="cuda")

    def step():
        for v in t.values():
            v.grad = None
        y = lora_linear(**t, scaling=SCALING, dropout_p=P, training=True, backend="torch")
        y.backward(dy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    graph.replay()
    first, first_dx = static_y.clone(), t["x"].grad.clone()
    graph.replay()
    assert torch.isfinite(first).all() and torch.isfinite(first_dx).all()
    assert not torch.equal(first, static_y) and not torch.equal(first_dx, t["x"].grad), "same mask twice"
