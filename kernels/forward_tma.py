"""Forward GEMM with Hopper's tensor memory accelerator and a persistent grid (sm_90+, bf16/fp16).

The split design of forward.py (xs = s·d(x)·Aᵀ from the skinny first pass, added as xs·Bᵀ in the
epilogue) with the main loop rebuilt the way Triton reaches cuBLAS on Hopper: x and W0 tiles come
in through TMA descriptors (one bulk copy per tile instead of per-thread address arithmetic, and
out-of-bounds rows zero-filled by the hardware: no masks in the K-loop), and one program per SM
walks the output tiles in grouped order (`tl.range(..., flatten=True)` lets the pipeliner start the
next tile's loads under this tile's epilogue). Requires what TMA requires: x and W0 contiguous
along K, 16-byte-aligned base addresses and row strides (`tma_eligible`); lora_fast.dispatch offers
it only then, and only where it measures it faster than the other paths.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .launch import launch
from .skinny import skinny
from .tiling import grouped_tile

try:   # host-side TMA descriptors; with a Triton that has none, the dispatcher runs the other paths
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def _set_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' tile is the config's."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


@triton.autotune(configs=configs.tma_configs(_set_block_shapes), key=configs.TMA_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_tma_config}, do_bench=configs.bench_config)
@triton.jit
def _lora_forward_tma_kernel(
    x_desc, w_desc, xs_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = offs_r < R
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            x = x_desc.load([row0, ki * BLOCK_K])
            w = w_desc.load([col0, ki * BLOCK_K])
            acc = tl.dot(x, w.T, acc)

        offs_m = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_n = col0.to(tl.int64) + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        xs = tl.load(xs_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xs, b, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def tma_eligible(x, weight):
    """Whether TMA can read x (M, K) and weight (N, K): a Triton with host descriptors, fp16/bf16,
    contiguous along K, 16-byte aligned base addresses and row strides (the descriptors' rules)."""
    if TensorDescriptor is None:
        return False
    for t in (x, weight):
        if (t.dtype not in (torch.float16, torch.bfloat16) or t.stride(1) != 1
                or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16):
            return False
    return True


def lora_forward_tma(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0, seed=None):
    """The split-design forward with a TMA main loop, for 2-D x (M, K) passing tma_eligible and
    r <= 64; returns (y, xs) as kernels.lora_forward does (xs is always produced: the first pass
    makes it)."""
    from .forward import bias_arg, input_precision
    M, K = x.shape
    N, R = lora_B.shape
    if not tma_eligible(x, weight) or R > configs.MAX_BLOCK_R:
        raise ValueError("TMA forward: expected fp16/bf16 x and weight contiguous along K with 16-byte "
                         f"aligned addresses and rows, r <= {configs.MAX_BLOCK_R}, and a Triton with host "
                         f"tensor descriptors; got x {x.dtype} "
                         f"strides {tuple(x.stride())}, weight strides {tuple(weight.stride())}, r={R}")
    if dropout_p > 0 and seed is None:
        raise ValueError("seed: dropout_p > 0 needs a seed tensor")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, torch.empty((0, R), device=x.device, dtype=x.dtype)
    xs, _ = skinny(x, lora_A.t(), scaling / (1.0 - dropout_p), input_precision(x.dtype),
                   dropout_p=dropout_p, seed=seed)
    # Placeholder block shapes (no config has them): the autotuner's pre-hook sets each config's.
    x_desc = TensorDescriptor.from_tensor(x, [8, 8])
    w_desc = TensorDescriptor.from_tensor(weight, [8, 8])
    programs = configs.persistent_programs(x.device)
    grid = lambda meta: (min(programs, configs.cdiv(M, meta["BLOCK_M"]) * configs.cdiv(N, meta["BLOCK_N"])),)
    launch(_lora_forward_tma_kernel, grid, x)(
        x_desc, w_desc, xs, lora_B, bias_arg(bias, y), y,
        M, N, K, R, configs.m_bucket(M),
        xs.stride(0), xs.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        NUM_PROGRAMS=programs,
        BLOCK_R=configs.block_r(R),
    )
    return y, xs
