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
from .dropout import keep_mask
from .launch import launch


@triton.autotune(configs=configs.split_k_configs(), key=configs.SPLIT_K_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_split_k_config}, do_bench=configs.bench_config)
@triton.jit
def _lora_split_k_partial_kernel(
    x_ptr, w_ptr, a_ptr, part_ptr, xa_part_ptr, seed_ptr,
    M, N, K, R, M_BUCKET, SPLIT_K, K_PER_SPLIT,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    dropout_p,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    split = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # K_PER_SPLIT is a multiple of the granule: said here too, because without that alignment the
    # loads cannot be asynchronous copies and the K-loop is not pipelined (one stage of shared
    # memory whatever num_stages, AOT report).
    k_lo = tl.multiple_of(split * K_PER_SPLIT, 16)
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    k_first = k_lo.to(tl.int64) + offs_k
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + k_first[None, :] * stride_xk
    w_ptrs = w_ptr + k_first[:, None] * stride_wk + offs_n[None, :] * stride_wn
    a_ptrs = a_ptr + k_first[:, None] * stride_ak + offs_r[None, :] * stride_ar
    x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
    w_step = BLOCK_K * tl.cast(stride_wk, tl.int64)
    a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        # Every column tile computes the same rows of d(x)·Aᵀ (r/BLOCK_N more MMA work, hidden under
        # the read of W0); the first one keeps them.
        a = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
        x_lora = x
        if DROPOUT:
            x_lora = x * keep_mask(seed, offs_m, k0 + offs_k, K, dropout_p).to(x.dtype)
        xa = tl.dot(x_lora, a, xa, input_precision=INPUT_PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step
        a_ptrs += a_step

    split_m = split.to(tl.int64) * M + offs_m          # row of the (SPLIT_K·M, ·) partial buffers
    tl.store(part_ptr + split_m[:, None] * N + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])
    if pid_n == 0:
        tl.store(xa_part_ptr + split_m[:, None] * R + offs_r[None, :], xa,
                 mask=mask_m[:, None] & (offs_r[None, :] < R))


@triton.jit
def _lora_split_k_reduce_kernel(
    part_ptr, xa_part_ptr, b_ptr, bias_ptr, xs_ptr, y_ptr,
    M, N, R, SPLIT_K,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, STORE_XS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(0, SPLIT_K):         # fixed order: the same sums on every run
        rows = split * M + offs_m
        acc += tl.load(part_ptr + rows[:, None] * N + offs_n[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        xa += tl.load(xa_part_ptr + rows[:, None] * R + offs_r[None, :],
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    # Rounded to the input dtype as the other paths round xs; padded rank columns zeroed.
    xs = tl.where(mask_r[None, :], xa * scaling, 0.0).to(y_ptr.dtype.element_ty)
    if STORE_XS:
        if pid_n == 0:
            tl.store(xs_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, xs,
                     mask=mask_m[:, None] & mask_r[None, :])
    b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = tl.dot(xs, b, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def lora_forward_split_k(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0,
                         seed=None):
    """The split-K forward for 2-D x (M, K) with 1 <= M <= configs.SPLIT_K_MAX_M and r <= 64;
    returns (y, xs) as kernels.lora_forward does (xs None unless save_xs). Any strides."""
    from .forward import bias_arg, input_precision
    M, K = x.shape
    N, R = lora_B.shape
    if not 1 <= M <= configs.SPLIT_K_MAX_M or R > configs.MAX_BLOCK_R:
        raise ValueError(f"split-K forward: expected 1 <= M <= {configs.SPLIT_K_MAX_M} and "
                         f"r <= {configs.MAX_BLOCK_R}, got M={M}, r={R}")
    dropout = dropout_p > 0
    if dropout and seed is None:
        raise ValueError("seed: dropout_p > 0 needs a seed tensor")
    scaling = scaling / (1.0 - dropout_p)
    precision = input_precision(x.dtype)
    block_m, block_n, split, k_per_split = configs.split_k_plan(M, N, K, configs.split_k_target_programs(x.device))
    block_r = configs.block_r(R)
    part = torch.empty((split * M, N), device=x.device, dtype=torch.float32)
    xa_part = torch.empty((split * M, R), device=x.device, dtype=torch.float32)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xs = torch.empty((M, R), device=x.device, dtype=x.dtype) if save_xs else None
    tiles = configs.cdiv(M, block_m) * configs.cdiv(N, block_n)
    launch(_lora_split_k_partial_kernel, (tiles, split), x)(
        x, weight, lora_A, part, xa_part, seed if dropout else part,
        M, N, K, R, configs.m_bucket(M), split, k_per_split,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1),
        dropout_p,
        DROPOUT=dropout, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )
    xs_arg = xs if xs is not None else y
    launch(_lora_split_k_reduce_kernel, (tiles,), x)(
        part, xa_part, lora_B, bias_arg(bias, y), xs_arg, y,
        M, N, R, split,
        lora_B.stride(0), lora_B.stride(1),
        xs_arg.stride(0), xs_arg.stride(1),
        y.stride(0), y.stride(1),
        scaling,
        HAS_BIAS=bias is not None, STORE_XS=xs is not None, INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=4,
    )
    return y, xs
