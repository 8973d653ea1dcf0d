"""Split-K forward for decode sizes (M <= 64): y = x @ W0ᵀ + bias + xs @ Bᵀ, xs = s·d(x) @ Aᵀ.

At small M the layer is one read of W0, and the in-loop forward has one program per tile of y:
cdiv(N, BLOCK_N) programs, 16 for a 4096→1024 projection at BLOCK_N = 64 — an eighth of an
H100's SMs, far from the bandwidth it needs. Here the K dimension is split too, so the grid has
about two programs per SM whatever N is:

  partial  program (tile of y, split s) reduces its K-range into part[s] (fp32), and its rows of
           d(x) @ Aᵀ over the same range into xa_part[s] (the same x tile, one more tl.dot);
  reduce   program (tile of y) sums the splits in a fixed order (deterministic, no atomics),
           rounds xs = s·Σ xa_part once as the other paths do, and adds xs @ Bᵀ and the bias.

Two launches and S·M·(N + r) fp32 of traffic (0.3 MB at M = 8, N = 4096, S = 4): chosen over the
one-launch in-loop kernel only where lora_fast.dispatch measures it faster.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .blocks import k_loop, y_epilogue
from .launch import bias_arg, cdiv, dora_output, peft_form, empty, launch, optional, prologue, weight_args
from .tiling import row_major_tile, tile_offsets


@triton.autotune(configs=configs.split_k_kernel_configs(), key=configs.SPLIT_K_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_split_k_config}, do_bench=configs.bench_config)
@triton.jit(do_not_specialize=["double_quant"])   # 0 or 1: one build for both
def _lora_split_k_partial_kernel(
    x_ptr, w_ptr, a_ptr, part_ptr, xa_part_ptr, seed_ptr,
    absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr,   # a 4-bit W0's statistics
    M, N, K, R, M_BUCKET, SPLIT_K, K_PER_SPLIT,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    dropout_p,
    double_quant,               # a 4-bit W0's absmax is 8-bit codes (run time: blocks.nf4_tile)
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WEIGHT: tl.constexpr,       # "dense", or "nf4" (blocks.nf4_tile)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_n = row_major_tile(tl.program_id(0), N, BLOCK_N)
    split = tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)

    # K_PER_SPLIT is a multiple of the granule: said here too, because without that alignment the
    # loads cannot be asynchronous copies and the K-loop is not pipelined (one stage of shared
    # memory whatever num_stages, AOT report).
    k_lo = tl.multiple_of(split * K_PER_SPLIT, 16)
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    # Every column tile computes the same rows of d(x)·Aᵀ (r/BLOCK_N more MMA work, hidden under
    # the read of W0); the first one keeps them.
    acc, xa, _ = k_loop(x_ptr, w_ptr, a_ptr, x_ptr, x_ptr, seed_ptr, offs_m, offs_n, mask_m, mask_n,
                     k_lo, k_hi, K, R, False,
                     stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, 0, 0, dropout_p,
                     True, DROPOUT, False, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
                     0, True, False, absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr,
                     double_quant, pid_n * BLOCK_N, 0, WEIGHT)

    split_m = split.to(tl.int64) * M + offs_m          # row of the (SPLIT_K·M, ·) partial buffers
    tl.store(part_ptr + split_m[:, None] * N + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])
    if pid_n == 0:
        tl.store(xa_part_ptr + split_m[:, None] * R + offs_r[None, :], xa,
                 mask=mask_m[:, None] & (offs_r[None, :] < R))


@triton.jit
def _lora_split_k_reduce_kernel(
    part_ptr, xa_part_ptr, b_ptr, bias_ptr, xs_ptr, y_ptr, c_ptr, z_ptr,
    M, N, R, SPLIT_K,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_ym, stride_yn,
    stride_zm, stride_zn,
    scaling,
    HAS_BIAS: tl.constexpr, STORE_XS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COL_SCALE: tl.constexpr,    # DoRA: y = c ⊙ z + bias, z kept (blocks.y_epilogue)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_n = row_major_tile(tl.program_id(0), N, BLOCK_N)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(0, SPLIT_K):         # fixed order: the same sums on every run
        rows = split * M + offs_m
        acc += tl.load(part_ptr + rows[:, None] * N + offs_n[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        xa += tl.load(xa_part_ptr + rows[:, None] * R + offs_r[None, :],
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    y_epilogue(acc, xa, xs_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, R, pid_n == 0,
               stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, scaling,
               "sum", STORE_XS, HAS_BIAS, INPUT_PRECISION, BLOCK_R,
               c_ptr=c_ptr, z_ptr=z_ptr, stride_zm=stride_zm, stride_zn=stride_zn, COL_SCALE=COL_SCALE)


def lora_forward_split_k(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0, seed=None,
                         col_scale=None, peft_dropout=False):
    """The split-K forward for 2-D x (1 <= M <= configs.SPLIT_K_MAX_M, K) of any strides and
    r <= 64; returns (y, xs) as forward.lora_forward does (xs None unless save_xs; z after them
    with col_scale, DoRA)."""
    M, K = x.shape
    N, R = lora_B.shape
    pro = prologue(x, scaling, dropout_p, seed)
    block_m, block_n, split, k_per_split = configs.split_k_plan(M, N, K, configs.split_k_target_programs(x.device))
    block_r = configs.block_r(R)
    part = empty(x, split * M, N, torch.float32)
    xa_part = empty(x, split * M, max(R, 1), torch.float32)   # a real pointer at rank 0 too (never written)
    y = empty(x, M, N)
    if peft_form(col_scale, peft_dropout, dropout_p):
        raise ValueError("peft_dropout: DoRA's PEFT dropout form runs on the in_loop and split forward paths")
    dora = dora_output(col_scale, y)
    xs = empty(x, M, R) if save_xs else None
    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    w = weight_args(weight)
    launch(_lora_split_k_partial_kernel, (tiles, split), x)(
        x, w.ptr, lora_A, part, xa_part, pro.seed, *w.statistics,
        M, N, K, R, configs.m_bucket(M), split, k_per_split,
        x.stride(0), x.stride(1),
        *w.strides,
        lora_A.stride(0), lora_A.stride(1),
        dropout_p, w.double_quant,
        DROPOUT=pro.dropout, INPUT_PRECISION=pro.precision, WEIGHT=w.kind,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )
    xs_arg = optional(xs, y)
    launch(_lora_split_k_reduce_kernel, (tiles,), x)(
        part, xa_part, lora_B, bias_arg(bias, y), xs_arg, y, dora.c, dora.z,
        M, N, R, split,
        lora_B.stride(0), lora_B.stride(1),
        xs_arg.stride(0), xs_arg.stride(1),
        y.stride(0), y.stride(1),
        *dora.z_strides,
        pro.scale,
        HAS_BIAS=bias is not None, STORE_XS=xs is not None, INPUT_PRECISION=pro.precision, COL_SCALE=dora.on,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=configs.SPLIT_K_REDUCE_WARPS,
    )
    return dora.result(y, xs)
