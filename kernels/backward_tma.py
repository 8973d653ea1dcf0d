"""dX GEMM of the split backward with Hopper's TMA and a persistent grid (sm_90+, fp16/bf16).

The same job as backward.py's split variant — dX = dY @ W0 + keep ⊙ (gs @ A) and the dA partial
gsᵀ @ (keep ⊙ x) per M-tile, gs from the skinny pass over dY — with the main loop rebuilt as in
forward_tma.py: dY tiles (BLOCK_M x BLOCK_N) and W0 tiles (BLOCK_N x BLOCK_K, W0 being (N, K)
row-major) through TMA descriptors, no masks in the N-loop, one program per SM walking the (M, K)
tiles in grouped order. BLOCK_M is the launcher's (it sizes the dA partial buffer); r <= 64.
"""
import triton
import triton.language as tl

from . import configs
from .blocks import dx_epilogue, tma_k_loop
from .launch import cdiv, descriptor, launch, optional, persistent_programs, strides
from .tiling import grouped_tile


def _set_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' tiles are the config's (BLOCK_M is the launcher's)."""
    nargs["dy_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


@triton.autotune(configs=configs.backward_tma_configs(_set_block_shapes), key=configs.BACKWARD_TMA_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_backward_tma_config},
                 do_bench=configs.bench_config)
@triton.jit
def _lora_backward_tma_kernel(
    dy_desc, w_desc, a_ptr, x_ptr, gs_ptr, dx_ptr, da_part_ptr, seed_ptr,
    M, N, K, R, M_BUCKET,
    stride_ar, stride_ak,
    stride_xm, stride_xk,
    stride_gm, stride_gr,
    stride_dxm, stride_dxk,
    dropout_p,
    DROPOUT: tl.constexpr,
    COMPUTE_DA: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_k = grouped_tile(tile, M, K, BLOCK_M, BLOCK_K, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_k * BLOCK_K
        # The reduction runs over N: dY (M, N) tiles against W0's (N, K) ones as stored.
        acc = tma_k_loop(dy_desc, w_desc, row0, col0, N, False, BLOCK_M, BLOCK_K, BLOCK_N)
        offs_m = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_k = col0.to(tl.int64) + tl.arange(0, BLOCK_K)
        # da_part is a contiguous fp32 (grid_m, R, K) buffer.
        dx_epilogue(acc, acc, gs_ptr, a_ptr, x_ptr, dx_ptr, da_part_ptr + pid_m.to(tl.int64) * R * K, seed,
                    offs_m, offs_k, offs_m < M, offs_k < K, K, R,
                    stride_gm, stride_gr, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
                    1.0, dropout_p, "tile", True, COMPUTE_DA, DROPOUT, "tf32", BLOCK_R)


def launch_dx_tma(dy, x, gs, weight, lora_A, dx, da_part, pro, block_m):
    """Launch the TMA dX kernel (the backward's prologue `pro`): dx and da_part (None when dA is
    not asked) are written."""
    M, N = dy.shape
    K, R = x.shape[1], lora_A.shape[0]
    programs = persistent_programs(dy.device)
    grid = lambda meta: (min(programs, cdiv(M, block_m) * cdiv(K, meta["BLOCK_K"])),)
    launch(_lora_backward_tma_kernel, grid, dy)(
        descriptor(dy), descriptor(weight), lora_A, x, gs, dx, optional(da_part, dx), pro.seed,
        M, N, K, R, configs.m_bucket(M),
        *strides(lora_A), *strides(x), *strides(gs), *strides(dx),
        pro.dropout_p,
        DROPOUT=pro.dropout,
        COMPUTE_DA=da_part is not None,
        NUM_PROGRAMS=programs,
        BLOCK_M=block_m,
        BLOCK_R=configs.block_r(R),
    )
