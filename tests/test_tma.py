"""The TMA / persistent kernels (kernels/forward_tma.py, kernels/backward_tma.py) against float64
under the interpreter (fp16: the interpreter does no bf16; bf16 too on a GPU), with a persistent
grid smaller than the tile count (each program walks several tiles), odd sizes, M = 1, every rank
tile, dropout; and the inputs TMA cannot read, which they refuse by name."""
import pytest
import torch

from helpers import DEVICE, HAS_CUDA, assert_close, make_inputs
from lora_fast.kernels import configs, lora_backward, lora_forward, lora_forward_tma, tma_eligible
from lora_fast.kernels.dropout import dropout_mask
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref

SCALING = 1.1
DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# (M, K, N, r): K a multiple of 8 (16-byte rows in fp16/bf16); K not a multiple of the K tile
SHAPES = [(37, 40, 45, 5), (70, 56, 33, 16), (1, 24, 100, 64), (19, 8, 3, 1)]


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability()[0] < 9, reason="TMA needs sm_90+")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_tma_forward(shape, dtype):
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, dtype, seed=M * N)
    y, xs = lora_forward_tma(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING)
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), dtype)
    assert_close("xs", xs, SCALING * t["x"].double().cpu() @ t["lora_A"].double().cpu().T, dtype)


def test_persistent_grid_walks_several_tiles():
    """Under the interpreter 3 programs and 16x16 tiles: the first shapes give each program several
    tiles, so the persistent loop (not only its first iteration) is what the tests check."""
    if HAS_CUDA:
        pytest.skip("the GPU's grid is its SM count; this is about the interpreter's")
    M, K, N, r = SHAPES[0]
    assert configs.cdiv(M, 16) * configs.cdiv(N, 16) >= 3 * configs.persistent_programs(DEVICE)


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability()[0] < 9, reason="TMA needs sm_90+")
def test_tma_forward_dropout_and_no_bias():
    M, K, N, r, p = 29, 48, 50, 7, 0.25
    t = make_inputs(M, K, N, r, torch.float16, seed=5, bias=False)
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    y, _ = lora_forward_tma(t["x"], t["weight"], t["lora_A"], t["lora_B"], None, SCALING, dropout_p=p, seed=seed)
    ref = lora_linear_ref(**t, scaling=SCALING, dropout_mask=dropout_mask(seed, M, K, p), dropout_p=p)
    assert_close("y", y, ref, torch.float16)


def test_tma_refuses_what_descriptors_cannot_read():
    t = make_inputs(8, 40, 16, 4, torch.float16)
    assert tma_eligible(t["x"], t["weight"])
    cases = {
        "fp32": (t["x"].float(), t["weight"].float()),
        "K = 41: rows of 82 bytes": (make_inputs(8, 41, 16, 4, torch.float16)["x"],
                                     make_inputs(8, 41, 16, 4, torch.float16)["weight"]),
        "x transposed": (t["x"].t().contiguous().t(), t["weight"]),
        "x offset by one element": (torch.empty(8 * 40 + 1, dtype=torch.float16, device=DEVICE)[1:].view(8, 40),
                                    t["weight"]),
    }
    for name, (x, w) in cases.items():
        assert not tma_eligible(x, w), name
        r = 4
        a = torch.randn(r, x.shape[1], dtype=x.dtype, device=DEVICE)
        b = torch.randn(w.shape[0], r, dtype=x.dtype, device=DEVICE)
        with pytest.raises(ValueError, match="TMA forward: expected fp16/bf16 x and weight contiguous"):
            lora_forward_tma(x, w, a, b, None, 1.0)


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability()[0] < 9, reason="TMA needs sm_90+")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("shape", [(70, 56, 32, 16), (130, 24, 104, 64), (67, 40, 8, 1)],
                         ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_tma_backward(shape, p, dtype):
    """dX (with the dropout mask on its low-rank term), dA and dB of the split path with the TMA
    dX kernel, against float64 with the mask materialised from the same seed."""
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, dtype, seed=N)
    dy = make_inputs(M, N, 1, 1, dtype, seed=N + 1)["x"]
    seed = torch.tensor([11], dtype=torch.int64, device=DEVICE)
    keep = dropout_mask(seed, M, K, p) if p else None
    _, xs = lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING,
                         in_loop=False, dropout_p=p, seed=seed)
    dx, da, db = lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING,
                               fused=False, tma=True, dropout_p=p, seed=seed)
    ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING, keep, p)
    assert_close("dx", dx, ref["x"], dtype)
    assert_close("dA", da, ref["lora_A"], dtype)
    assert_close("dB", db, ref["lora_B"], dtype)
    dx_only, da_none, db_none = lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING,
                                              need_da=False, need_db=False, fused=False, tma=True,
                                              dropout_p=p, seed=seed)
    assert da_none is None and db_none is None
    assert_close("dx (dA not asked)", dx_only, ref["x"], dtype)


def test_tma_backward_refuses_what_it_cannot_do():
    t = make_inputs(70, 48, 26, 4, torch.float16)          # dY rows of 52 bytes
    dy = make_inputs(70, 26, 1, 1, torch.float16)["x"]
    xs = torch.zeros(70, 4, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="TMA backward: expected the split path with dX asked"):
        lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], 1.0, fused=False, tma=True)
    t = make_inputs(70, 48, 32, 4, torch.float16)
    dy = make_inputs(70, 32, 1, 1, torch.float16)["x"]
    with pytest.raises(ValueError, match="need_dx=False"):
        lora_backward(dy, t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], 1.0, fused=False, tma=True,
                      need_dx=False)
