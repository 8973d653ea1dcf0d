"""LoRA dropout inside the kernels: the mask is a Philox draw regenerated in backward (never
stored), the same in forward and backward, reproducible from torch's seed, at the right rate; the
saved bytes do not grow with p. Plus autocast, float32 master adapters and NaN propagation."""
import pytest
import torch
from torch import nn

from bench.common import saved_bytes
from helpers import DEVICE, KERNEL_DTYPES, assert_close, make_inputs
from lora_fast import LoRALinear, lora_linear
from lora_fast.kernels import lora_backward, lora_forward
from lora_fast.kernels.dropout import dropout_mask
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref

SCALING, P = 1.3, 0.3
BACKENDS = ["triton", "torch"]
# (M, K, N, r): odd sizes; r > 64 (rank chunks); K = 1
SHAPES = [(37, 45, 53, 5), (33, 17, 29, 100), (21, 1, 3, 2)]


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_kernels_apply_the_mask_they_regenerate(shape, dtype):
    """Every path (in-loop or first-pass forward, fused or split backward) equals the float64
    reference computed with the mask materialised from the same seed."""
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, dtype, seed=41)
    dy = make_inputs(M, N, 1, 1, dtype, seed=42)["x"]
    seed = _seed(2024)
    keep = dropout_mask(seed, M, K, P)
    y_ref = lora_linear_ref(**t, scaling=SCALING, dropout_mask=keep, dropout_p=P)
    g_ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING, keep, P)
    for in_loop in ([True, False] if r <= 64 else [False]):
        y, xs = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING,
                             in_loop=in_loop, dropout_p=P, seed=seed)
        assert_close("y", y, y_ref, dtype)
        for fused in ([True, False] if r <= 64 else [False]):
            dx, da, db = lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING,
                                       fused=fused, dropout_p=P, seed=seed)
            assert_close("dx", dx, g_ref["x"], dtype)
            assert_close("dA", da, g_ref["lora_A"], dtype)
            assert_close("dB", db, g_ref["lora_B"], dtype)


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
