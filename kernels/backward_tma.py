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
from .dropout import keep_mask
from .forward_tma import TensorDescriptor
from .launch import launch
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
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = offs_r < R
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_k = grouped_tile(tile, M, K, BLOCK_M, BLOCK_K, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_k * BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for ni in range(n_tiles):
            dy = dy_desc.load([row0, ni * BLOCK_N])
            w = w_desc.load([ni * BLOCK_N, col0])
            acc = tl.dot(dy, w, acc)

        offs_m = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_k = col0.to(tl.int64) + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_k = offs_k < K
        gs = tl.load(gs_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            # the forward's draw for these (m, k), regenerated; multiplied as F.dropout does
            keep = keep_mask(seed, offs_m, offs_k, K, dropout_p)
            acc += tl.dot(gs, a) * keep.to(tl.float32)
        else:
            acc = tl.dot(gs, a, acc)
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
        if COMPUTE_DA:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if DROPOUT:
                x = x * keep.to(x.dtype)
            da = tl.dot(tl.trans(gs), x)
            # da_part is a contiguous fp32 (grid_m, R, K) buffer.
            tl.store(da_part_ptr + pid_m.to(tl.int64) * R * K + offs_r[:, None] * K + offs_k[None, :], da,
                     mask=mask_r[:, None] & mask_k[None, :])


def launch_dx_tma(dy, x, gs, weight, lora_A, dx, da_part, seed, block_m, dropout_p):
    """Launch the TMA dX kernel: dx and da_part (None when dA is not asked) are written."""
    M, N = dy.shape
    K, R = x.shape[1], lora_A.shape[0]
    dropout = dropout_p > 0
    # Placeholder block shapes (no config has them): the autotuner's pre-hook sets each config's.
    dy_desc = TensorDescriptor.from_tensor(dy, [8, 8])
    w_desc = TensorDescriptor.from_tensor(weight, [8, 8])
    programs = configs.persistent_programs(dy.device)
    grid = lambda meta: (min(programs, configs.cdiv(M, block_m) * configs.cdiv(K, meta["BLOCK_K"])),)
    launch(_lora_backward_tma_kernel, grid, dy)(
        dy_desc, w_desc, lora_A, x, gs, dx, da_part if da_part is not None else dx,
        seed if dropout else dx,
        M, N, K, R, configs.m_bucket(M),
        lora_A.stride(0), lora_A.stride(1),
        x.stride(0), x.stride(1),
        gs.stride(0), gs.stride(1),
        dx.stride(0), dx.stride(1),
        dropout_p,
        DROPOUT=dropout,
        COMPUTE_DA=da_part is not None,
        NUM_PROGRAMS=programs,
        BLOCK_M=block_m,
        BLOCK_R=configs.block_r(R),
    )
