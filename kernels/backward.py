"""Fused LoRA backward with W0 frozen. With xs = s·x@Aᵀ (saved by forward) and gs = s·dY@B:

    dX = dY @ W0 + gs @ A        dA = gsᵀ @ x        dB = dYᵀ @ xs

One GEMM kernel over tiles of dX (reduction over N) carries the small products:
  fused (G_IN_LOOP)  the N-loop also accumulates gs = dY_tile @ B_tile from the dY tile it
                     already loaded, and the programs of the first K-column also emit the dB
                     partial dY_tileᵀ @ xs per N-tile. dY, W0 and x are each read once.
  split              the skinny kernel first makes gs and the dB partials in one pass over dY;
                     the GEMM reads gs back in its epilogue. One extra read of dY, no redundant
                     MMA work: better once the GEMM is compute-bound (arithmetic in NOTES.md).
Either way the epilogue adds gs @ A to the fp32 accumulator and, from the x tile of the same
(M, K) block, writes the dA partial gsᵀ @ x_tile. Partials (one per M-tile) are summed in a
fixed order afterwards, so dA and dB are deterministic: no atomics anywhere.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .backward_tma import launch_dx_tma
from .forward import input_precision
from .forward_tma import tma_eligible
from .dropout import keep_mask
from .launch import launch
from .skinny import skinny
from .tiling import grouped_tile


@triton.autotune(configs=configs.backward_configs(), key=configs.BACKWARD_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_backward_config}, do_bench=configs.bench_config)
@triton.jit
def _lora_backward_kernel(
    # pointers
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, xs_ptr, gs_ptr, dx_ptr, da_part_ptr, db_part_ptr, seed_ptr,
    # sizes (M_BUCKET is only the autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_xm, stride_xk,
    stride_sm, stride_sr,
    stride_gm, stride_gr,
    stride_dxm, stride_dxk,
    scaling,                    # s / (1 - p): the dropout rescale rides on gs
    dropout_p,
    # meta-parameters
    DROPOUT: tl.constexpr,      # the LoRA branch saw keep ⊙ x: mask dX's low-rank term and dA's x
    G_IN_LOOP: tl.constexpr,    # accumulate gs (and dB partials) in the N-loop, else read gs
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DA: tl.constexpr,
    COMPUTE_DB: tl.constexpr,   # only with G_IN_LOOP
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)   # n * stride can pass 2**31 on strided dY / W0
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    dtype = dy_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if G_IN_LOOP:
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        mask_r = offs_r < R
        b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
        b_step = BLOCK_N * tl.cast(stride_bn, tl.int64)
        if COMPUTE_DB:
            xs_ptrs = xs_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
            # db_part is a contiguous fp32 (grid_m, N, R) buffer.
            db_ptrs = (db_part_ptr + pid_m.to(tl.int64) * N * R
                       + offs_n[:, None] * R + offs_r[None, :])
    if COMPUTE_DX or G_IN_LOOP:
        dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        dy_step = BLOCK_N * tl.cast(stride_dyn, tl.int64)
        w_step = BLOCK_N * tl.cast(stride_wn, tl.int64)
        for n0 in range(0, N, BLOCK_N):
            mask_n = offs_n < N - n0
            dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            if COMPUTE_DX:
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
            if G_IN_LOOP:
                b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
                g = tl.dot(dy, b, g, input_precision=INPUT_PRECISION)
                b_ptrs += b_step
                if COMPUTE_DB:
                    # The dY tile is the same for every K-column; only the first one emits dB.
                    if pid_k == 0:
                        # xs is re-read from L1/L2 each step rather than held in registers for
                        # the whole loop: holding it spilled on sm_80 (AOT report).
                        xs = tl.load(xs_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                        db = tl.dot(tl.trans(dy), xs, input_precision=INPUT_PRECISION)
                        tl.store(db_ptrs, db, mask=mask_n[:, None] & mask_r[None, :])
                    db_ptrs += BLOCK_N * tl.cast(R, tl.int64)
            dy_ptrs += dy_step
            w_ptrs += w_step

    if DROPOUT and (COMPUTE_DX or COMPUTE_DA):
        # the same draw as the forward's for these (m, k): regenerated, never stored
        keep = keep_mask(tl.load(seed_ptr), offs_m, offs_k, K, dropout_p)
    if COMPUTE_DA:
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            # multiplied, not selected, as F.dropout does (a dropped NaN stays NaN); tl.where here
            # also crashed Triton's sm_90 layout pass in the fused variant
            x = x * keep.to(x.dtype)
        # da_part is a contiguous fp32 (grid_m, R, K) buffer.
        da_ptrs = (da_part_ptr + pid_m.to(tl.int64) * R * K
                   + offs_r[:, None] * K + offs_k[None, :])
    if G_IN_LOOP:
        # padded rank columns zeroed: an inf in dY times B's zero padding is NaN there
        gs = tl.where(mask_r[None, :], g * scaling, 0.0).to(dtype)
        if COMPUTE_DX:
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            if DROPOUT:
                acc += tl.dot(gs, a, input_precision=INPUT_PRECISION) * keep.to(tl.float32)
            else:
                acc = tl.dot(gs, a, acc, input_precision=INPUT_PRECISION)
        if COMPUTE_DA:
            da = tl.dot(tl.trans(gs), x, input_precision=INPUT_PRECISION)
            tl.store(da_ptrs, da, mask=mask_r[:, None] & mask_k[None, :])
    else:
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            gs = tl.load(gs_ptr + offs_m[:, None] * stride_gm + (r0 + offs_r)[None, :] * stride_gr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if COMPUTE_DX:
                a = tl.load(a_ptr + (r0 + offs_r)[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                if DROPOUT:
                    acc += tl.dot(gs, a, input_precision=INPUT_PRECISION) * keep.to(tl.float32)
                else:
                    acc = tl.dot(gs, a, acc, input_precision=INPUT_PRECISION)
            if COMPUTE_DA:
                da = tl.dot(tl.trans(gs), x, input_precision=INPUT_PRECISION)
                tl.store(da_ptrs, da, mask=mask_r[:, None] & mask_k[None, :])
                da_ptrs += BLOCK_R * tl.cast(K, tl.int64)

    if COMPUTE_DX:
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


def g_in_loop(M, R):
    """Same crossover as the forward (configs.IN_LOOP_MAX_M): below it the dX GEMM is bound by
    reading W0 and the redundant dY @ B work is free; above it the extra pass over dY is cheaper."""
    return M <= configs.IN_LOOP_MAX_M and R <= configs.IN_LOOP_MAX_R


def lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, *,
                  need_dx=True, need_da=True, need_db=True, fused=None, tma=False, dropout_p=0.0, seed=None):
    """Gradients (dX, dA, dB) of the LoRA linear with W0 frozen; None for those not asked.

    dy (M, N), x (M, K), xs (M, r) from the forward (made with the same dropout_p and seed, whose
    keep-mask is regenerated here); any strides.
    dA and dB come back in lora_A.dtype / lora_B.dtype, reduced in fp32 in a fixed order.
    fused=None picks the path by g_in_loop(M, r); without dX the split path is always used.
    tma=True runs the split path's dX GEMM as backward_tma's TMA, persistent kernel (dX asked,
    r <= 64, dY and weight TMA-readable: forward_tma.tma_eligible).
    """
    M, N = dy.shape
    K = x.shape[1]
    R = lora_A.shape[0]
    dev = dy.device
    if M == 0:
        return (torch.empty((0, K), device=dev, dtype=dy.dtype) if need_dx else None,
                torch.zeros_like(lora_A) if need_da else None,
                torch.zeros_like(lora_B) if need_db else None)
    if fused is None:
        fused = g_in_loop(M, R)
    dropout = dropout_p > 0
    if dropout and seed is None:
        raise ValueError("seed: dropout_p > 0 needs the forward's seed tensor")
    scaling = scaling / (1.0 - dropout_p)
    fused = fused and need_dx
    block_r = configs.block_r(R)
    if tma and (fused or not need_dx or R > block_r or not tma_eligible(dy, weight)):
        raise ValueError("TMA backward: expected the split path with dX asked, r <= "
                         f"{configs.MAX_BLOCK_R}, and fp16/bf16 dY and weight contiguous along their "
                         "last dimension with 16-byte aligned addresses and rows (and a Triton with host "
                         f"tensor descriptors); got fused={fused}, "
                         f"need_dx={need_dx}, r={R}, dY {dy.dtype} strides {tuple(dy.stride())}, "
                         f"weight strides {tuple(weight.stride())}")
    if fused and R > block_r:
        raise ValueError(f"fused backward holds the whole rank in one tile: r={R} > {block_r}")
    precision = input_precision(dy.dtype)
    block_m = configs.partial_block_m(M, fused, precision)
    grid_m = configs.cdiv(M, block_m)

    gs = db_part = None
    if not fused and (need_dx or need_da or need_db):
        gs, db_part = skinny(dy, lora_B, scaling, precision, side=xs if need_db else None)
    if fused and need_db:
        db_part = torch.empty((grid_m, N, R), device=dev, dtype=torch.float32)
    dx = torch.empty((M, K), device=dev, dtype=dy.dtype) if need_dx else None
    da_part = torch.empty((grid_m, R, K), device=dev, dtype=torch.float32) if need_da else None

    if tma:
        launch_dx_tma(dy, x, gs, weight, lora_A, dx, da_part, seed, block_m, dropout_p)
    elif need_dx or need_da:
        dummy = dy
        dx_arg = dx if dx is not None else dummy
        gs_arg = gs if gs is not None else dummy
        grid = lambda meta: (grid_m * configs.cdiv(K, meta["BLOCK_K"]),)
        launch(_lora_backward_kernel, grid, dy)(
            dy, weight, lora_A, lora_B, x, xs, gs_arg, dx_arg,
            da_part if da_part is not None else dummy,
            db_part if db_part is not None else dummy,
            seed if dropout else dummy,
            M, N, K, R, configs.m_bucket(M),
            dy.stride(0), dy.stride(1),
            weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1),
            x.stride(0), x.stride(1),
            xs.stride(0), xs.stride(1),
            gs_arg.stride(0), gs_arg.stride(1),
            dx_arg.stride(0), dx_arg.stride(1),
            scaling, dropout_p,
            DROPOUT=dropout,
            G_IN_LOOP=fused,
            COMPUTE_DX=need_dx,
            COMPUTE_DA=need_da,
            COMPUTE_DB=fused and need_db,
            INPUT_PRECISION=precision,
            BLOCK_M=block_m,
            BLOCK_R=block_r,
        )
    # Fixed-order reductions over the M-tiles: deterministic run to run.
    da = da_part.sum(0).to(lora_A.dtype) if need_da else None
    db = db_part.sum(0).to(lora_B.dtype) if need_db else None
    return dx, da, db
