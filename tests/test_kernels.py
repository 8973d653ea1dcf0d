"""The Triton kernels (interpreter on CPU, compiled on GPU) against the float64 reference:
forward and every gradient, both paths of each (in-loop / first-pass forward, fused / split
backward), odd shapes, strided operands. Outputs are poisoned (see conftest)."""
import pytest
import torch

from helpers import DEVICE, KERNEL_DTYPES, SHAPES, assert_close, case_id, make_inputs
from lora_fast.kernels import configs, lora_backward, lora_forward
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref

SCALING = 1.7


def _paths(r):
    """Both paths where the rank fits the in-loop tile, else only the chunked one."""
    return [True, False] if r <= configs.IN_LOOP_MAX_R else [False]


FORWARD_CASES = [(s, p) for s in SHAPES for p in _paths(s[3])]
BACKWARD_CASES = FORWARD_CASES


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape,in_loop", FORWARD_CASES,
                         ids=[f"{case_id(s)}-{'inloop' if p else 'firstpass'}" for s, p in FORWARD_CASES])
def test_forward(shape, in_loop, bias, dtype):
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, dtype, seed=hash((shape, bias)) % 2**31, bias=bias)
    y, xs = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING,
                         in_loop=in_loop)
    assert y.dtype == dtype and xs.dtype == dtype
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), dtype)
    xs_ref = SCALING * t["x"].double().cpu() @ t["lora_A"].double().cpu().T
    assert_close("xs", xs, xs_ref, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,fused", BACKWARD_CASES,
                         ids=[f"{case_id(s)}-{'fused' if p else 'split'}" for s, p in BACKWARD_CASES])
def test_backward(shape, fused, dtype):
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, dtype, seed=hash(shape) % 2**31, bias=False)
    dy = make_inputs(M, N, 1, 1, dtype, seed=7)["x"]
    _, xs = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], None, SCALING)
    dx, da, db = lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING,
                               fused=fused)
    ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    assert_close("dx", dx, ref["x"], dtype)
    assert_close("dA", da, ref["lora_A"], dtype)
    assert_close("dB", db, ref["lora_B"], dtype)
    assert da.dtype == t["lora_A"].dtype and db.dtype == t["lora_B"].dtype


@pytest.mark.parametrize("need", [(False, True, True), (False, True, False), (False, False, True),
                                  (True, False, False), (True, False, True)],
                         ids=["dA_dB", "dA", "dB", "dX", "dX_dB"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_backward_subsets(need, fused):
    """Only the asked gradients are computed, and each is right on its own."""
    M, K, N, r = 37, 45, 53, 5
    t = make_inputs(M, K, N, r, torch.float32, seed=3, bias=False)
    dy = make_inputs(M, N, 1, 1, torch.float32, seed=4)["x"]
    _, xs = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], None, SCALING)
    got = lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING,
                        need_dx=need[0], need_da=need[1], need_db=need[2], fused=fused)
    ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    for name, key, wanted, out in zip(("dx", "dA", "dB"), ("x", "lora_A", "lora_B"), need, got):
        if wanted:
            assert_close(name, out, ref[key], torch.float32)
        else:
            assert out is None, f"{name} computed although not asked"


def test_strided_operands():
    """Transposed and sliced views go to the kernels as strides, not copies: x as the transpose of a
    (K, M) tensor, weight as a column slice, lora_B transposed storage, dy a row slice."""
    M, K, N, r = 29, 37, 41, 6
    dtype = torch.float32
    base = make_inputs(M, K, N, r, dtype, seed=11)
    x = base["x"].T.contiguous().T                       # strides (1, M)
    weight = torch.cat([base["weight"], base["weight"]], 1)[:, ::2]   # strides (2K, 2)
    weight.copy_(base["weight"])
    lora_B = base["lora_B"].T.contiguous().T             # strides (1, N)
    dy_big = make_inputs(2 * M, N, 1, 1, dtype, seed=12)["x"]
    dy = dy_big[::2]                                     # strides (2N, 1)
    assert not x.is_contiguous() and not weight.is_contiguous() and not lora_B.is_contiguous()
    for path in (True, False):
        y, xs = lora_forward(x, weight, base["lora_A"], lora_B, base["bias"], SCALING, in_loop=path)
        assert_close("y", y, lora_linear_ref(x, weight, base["lora_A"], lora_B, base["bias"], SCALING), dtype)
        dx, da, db = lora_backward(dy, x, xs, weight, base["lora_A"], lora_B, SCALING, fused=path)
        ref = lora_linear_backward_ref(dy, x, weight, base["lora_A"], lora_B, SCALING)
        assert_close("dx", dx, ref["x"], dtype)
        assert_close("dA", da, ref["lora_A"], dtype)
        assert_close("dB", db, ref["lora_B"], dtype)


def test_empty_batch():
    t = make_inputs(0, 24, 18, 4, torch.float32)
    for path in (True, False):
        y, xs = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING, in_loop=path)
        assert y.shape == (0, 18) and xs.shape == (0, 4)
        dx, da, db = lora_backward(y, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING, fused=path)
        assert dx.shape == (0, 24)
        assert torch.equal(da, torch.zeros_like(t["lora_A"]))
        assert torch.equal(db, torch.zeros_like(t["lora_B"]))


def test_in_loop_refuses_rank_over_tile():
    t = make_inputs(5, 8, 8, configs.IN_LOOP_MAX_R + 1, torch.float32)
    with pytest.raises(ValueError, match="r=65"):
        lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], None, 1.0, in_loop=True)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_backward_deterministic_gpu(fused):
    """Bit-identical gradients run to run: partial sums are reduced in a fixed order, no atomics."""
    M, K, N, r = 1000, 384, 320, 16
    t = make_inputs(M, K, N, r, torch.bfloat16, seed=5, bias=False)
    dy = make_inputs(M, N, 1, 1, torch.bfloat16, seed=6)["x"]
    _, xs = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], None, SCALING)
    first = lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING, fused=fused)
    for _ in range(3):
        again = lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING, fused=fused)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(4096, 4096, 4096, 16), (8, 4096, 1024, 64), (333, 1000, 3000, 128)],
                         ids=case_id)
def test_large_shapes_gpu(shape):
    """Real-model sizes in bf16, default path choice, every output and gradient."""
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, torch.bfloat16, seed=9)
    dy = make_inputs(M, N, 1, 1, torch.bfloat16, seed=10)["x"]
    y, xs = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING)
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), torch.bfloat16)
    dx, da, db = lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING)
    ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    assert_close("dx", dx, ref["x"], torch.bfloat16)
    assert_close("dA", da, ref["lora_A"], torch.bfloat16)
    assert_close("dB", db, ref["lora_B"], torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")
def test_tf32_follows_torch_setting_gpu():
    """fp32 uses tf32 tensor cores only when torch allows tf32 matmuls, and then within the tf32 bound."""
    M, K, N, r = 512, 1024, 768, 16
    t = make_inputs(M, K, N, r, torch.float32, seed=13)
    ref = lora_linear_ref(**t, scaling=SCALING)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        y, _ = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING)
        assert_close("y tf32", y, ref, "tf32")
        torch.backends.cuda.matmul.allow_tf32 = False
        y, _ = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING)
        assert_close("y ieee", y, ref, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
