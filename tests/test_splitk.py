"""The split-K decode forward (kernels/splitk.py) against float64: y and the saved xs, with K split
into several ranges (checked from the plan, so the cross-split reduction really runs), odd sizes,
M = 1, strided x, dropout, and the sizes it refuses."""
import pytest
import torch

from helpers import DEVICE, KERNEL_DTYPES, assert_close, make_inputs
from lora_fast.kernels import configs, lora_forward_split_k
from lora_fast.kernels.dropout import dropout_mask
from lora_fast.reference import lora_linear_ref

SCALING = 0.7
# (M, K, N, r): splits > 1 for all but the last (K below one granule: a single split)
SHAPES = [(1, 150, 37, 16), (5, 97, 50, 3), (37, 130, 45, 64), (64, 70, 17, 1), (3, 20, 33, 8)]


def _xs_ref(t, keep=None, p=0.0):
    x = t["x"].double().cpu()
    if keep is not None:
        x = x * keep.double().cpu() / (1 - p)
    return SCALING * x @ t["lora_A"].double().cpu().T


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_split_k_forward(shape, dtype):
    M, K, N, r = shape
    splits = configs.split_k_plan(M, N, K, configs.split_k_target_programs(DEVICE))[2]
    assert (splits > 1) == (K > configs.SPLIT_K_GRANULE), (shape, splits)
    t = make_inputs(M, K, N, r, dtype, seed=M + K)
    y, xs = lora_forward_split_k(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING)
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), dtype)
    assert_close("xs", xs, _xs_ref(t), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_split_k_strided_no_bias_no_xs(dtype):
    M, K, N, r = 7, 150, 29, 5
    t = make_inputs(M, K, N, r, dtype, bias=False)
    x_t = t["x"].t().contiguous().t()            # column-major: stride (1, M)
    w = torch.empty(K, N, dtype=dtype, device=DEVICE).copy_(t["weight"].t()).t()   # transposed W0
    y, xs = lora_forward_split_k(x_t, w, t["lora_A"], t["lora_B"], None, SCALING, save_xs=False)
    assert xs is None
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_split_k_dropout_uses_the_kernels_mask(dtype):
    M, K, N, r, p = 9, 150, 40, 6, 0.3
    t = make_inputs(M, K, N, r, dtype, seed=3)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    keep = dropout_mask(seed, M, K, p)
    y, xs = lora_forward_split_k(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING,
                                 dropout_p=p, seed=seed)
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING, dropout_mask=keep, dropout_p=p), dtype)
    assert_close("xs", xs, _xs_ref(t, keep, p), dtype)


def test_split_k_refuses_what_it_cannot_do():
    t = make_inputs(65, 20, 10, 4, torch.float32)
    with pytest.raises(ValueError, match="split-K forward: expected 1 <= M <= 64"):
        lora_forward_split_k(t["x"], t["weight"], t["lora_A"], t["lora_B"], None, 1.0)
    t = make_inputs(4, 20, 10, 65, torch.float32)
    with pytest.raises(ValueError, match="r <= 64, got M=4, r=65"):
        lora_forward_split_k(t["x"], t["weight"], t["lora_A"], t["lora_B"], None, 1.0)
    t = make_inputs(4, 20, 10, 4, torch.float32)
    with pytest.raises(ValueError, match="seed: dropout_p > 0 needs a seed"):
        lora_forward_split_k(t["x"], t["weight"], t["lora_A"], t["lora_B"], None, 1.0, dropout_p=0.1)


def test_split_k_plan_fills_the_gpu():
    """With an H100's 132 SMs (264 programs wanted) and the GPU's tile and granule, a 4096→1024
    decode gets about two programs per SM, each split a whole number of granules and none empty;
    a wide layer splits little or not at all."""
    block_m, block_n, splits, k_per = configs.split_k_plan(1, 1024, 4096, 264, block_n=64, granule=256)
    assert block_m == 16 and splits == 16 and 1024 // block_n * splits == 256
    assert k_per % 256 == 0 and (splits - 1) * k_per < 4096 <= splits * k_per
    assert configs.split_k_plan(8, 14336, 4096, 264, block_n=64, granule=256)[2] == 2
    assert configs.split_k_plan(1, 28672, 8192, 264, block_n=64, granule=256)[2] == 1
    assert configs.split_k_plan(1, 64, 300, 264, block_n=64, granule=256)[2:] == (2, 256)
