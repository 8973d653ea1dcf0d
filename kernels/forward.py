"""Fused LoRA forward: y = x @ W0ᵀ + bias + xs @ Bᵀ with xs = scaling · x @ Aᵀ.

One GEMM kernel over tiles of y. The low-rank product xs (M, r) comes one of two ways
(XS_IN_LOOP, chosen by the launcher; arithmetic in bench/NOTES.md):
  in loop     each program also accumulates x_tile @ Aᵀ_tile in its K-loop, reusing the x tile
              it already loaded for the main product: no extra pass or launch, r/BLOCK_N extra
              MMA work. Best when the GEMM is bound by reading W0 (small M).
  first pass  xs is computed once by the skinny kernel (one extra read of x) and read back in
              the epilogue. Best when the GEMM is compute-bound (large M).
Either way xs is kept for backward (M·r values), and the epilogue adds xs @ Bᵀ and the bias
to the fp32 accumulator before the single rounding to the output dtype.
"""
import torch
import triton
import triton.language as tl

from lora_fast.backend import tf32_allowed

from . import configs
from .dropout import keep_mask
from .launch import launch
from .skinny import skinny
from .tiling import grouped_tile


@triton.autotune(configs=configs.forward_configs(), key=configs.FORWARD_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_forward_config}, do_bench=configs.bench_config)
@triton.jit
def _lora_forward_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xs_ptr, y_ptr, seed_ptr,
    # sizes (M_BUCKET is only the autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_ym, stride_yn,
    scaling,                    # s / (1 - p): the dropout rescale rides on xs
    dropout_p,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,      # in-loop only: zero the dropped x elements for the x·Aᵀ product
    XS_IN_LOOP: tl.constexpr,   # compute xs in the K-loop (else read it from xs_ptr)
    STORE_XS: tl.constexpr,     # in-loop only: write xs for backward
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # int64 offsets: M * stride_xm (and N * stride_wn) can pass 2**31.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # The reduction offsets are int64 too: a transposed x has stride_xk = M, and k * M can pass 2**31.
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    if DROPOUT:
        seed = tl.load(seed_ptr)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
    w_step = BLOCK_K * tl.cast(stride_wk, tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if XS_IN_LOOP:
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
        a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        if XS_IN_LOOP:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
            x_lora = x
            if DROPOUT:
                x_lora = x * keep_mask(seed, offs_m, k0 + offs_k, K, dropout_p).to(x.dtype)
            xa = tl.dot(x_lora, a, xa, input_precision=INPUT_PRECISION)
            a_ptrs += a_step
        x_ptrs += x_step
        w_ptrs += w_step

    if XS_IN_LOOP:
        # Rounded to the input dtype like the first-pass xs, so both paths feed B the same way.
        # The padded rank columns are zeroed: an inf in x times the zero padding of A is NaN there.
        xs = tl.where(offs_r[None, :] < R, xa * scaling, 0.0).to(x_ptr.dtype.element_ty)
        if STORE_XS:
            # Every column-tile computed the same xs; the first one keeps it for backward.
            if pid_n == 0:
                tl.store(xs_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, xs,
                         mask=mask_m[:, None] & (offs_r[None, :] < R))
        b = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                    mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0)
        acc = tl.dot(xs, b, acc, input_precision=INPUT_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            mask_r = offs_r < R - r0
            xs = tl.load(xs_ptr + offs_m[:, None] * stride_sm + (r0 + offs_r)[None, :] * stride_sr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(b_ptr + (r0 + offs_r)[:, None] * stride_br + offs_n[None, :] * stride_bn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(xs, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def input_precision(dtype):
    """tl.dot precision for fp32 operands, following torch's own matmul setting: tf32 only
    when torch allows it (lora_fast.backend.tf32_allowed: float32_matmul_precision != "highest")."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def bias_arg(bias, y):
    """The bias pointer argument of the forward kernels: they read bias as N contiguous values
    (bias_ptr + offs_n), so a strided view (bias[::2], an expanded scalar) is copied first — N
    values, against reading its stride in every epilogue; y stands in for an absent bias (never
    read: HAS_BIAS=False)."""
    return y if bias is None else bias.contiguous()


def xs_in_loop(M, R):
    return M <= configs.IN_LOOP_MAX_M and R <= configs.IN_LOOP_MAX_R


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, in_loop=None,
                 dropout_p=0.0, seed=None):
    """y = x @ weightᵀ + bias + xs @ lora_Bᵀ, xs = scaling/(1-p) · (keep ⊙ x) @ lora_Aᵀ, for 2-D x (M, K).

    Dropout (p = dropout_p > 0) needs `seed`, a 1-element int64 tensor on x's device; the keep-mask
    is dropout.keep_mask of it, never stored. Returns (y, xs) with xs (M, r) in x.dtype for
    backward, or None when save_xs is False (in-loop path only; the first pass always produces it).
    Any strides; nothing is copied but a strided bias (bias_arg). in_loop=None picks the path by xs_in_loop(M, r).
    """
    M, K = x.shape
    N, R = lora_B.shape
    if in_loop is None:
        in_loop = xs_in_loop(M, R)
    block_r = configs.block_r(R)
    if in_loop and R > block_r:
        raise ValueError(f"in-loop forward holds the whole rank in one tile: r={R} > {block_r}")
    dropout = dropout_p > 0
    if dropout and seed is None:
        raise ValueError("seed: dropout_p > 0 needs a seed tensor")
    scaling = scaling / (1.0 - dropout_p)
    precision = input_precision(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, torch.empty((0, R), device=x.device, dtype=x.dtype)
    if in_loop:
        xs = torch.empty((M, R), device=x.device, dtype=x.dtype) if save_xs else None
    else:
        xs, _ = skinny(x, lora_A.t(), scaling, precision, dropout_p=dropout_p, seed=seed)
    xs_arg = xs if xs is not None else y
    grid = lambda meta: (configs.cdiv(M, meta["BLOCK_M"]) * configs.cdiv(N, meta["BLOCK_N"]),)
    launch(_lora_forward_kernel, grid, x)(
        x, weight, bias_arg(bias, y), lora_A, lora_B, xs_arg, y,
        seed if dropout else y,
        M, N, K, R, configs.m_bucket(M),
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        xs_arg.stride(0), xs_arg.stride(1),
        y.stride(0), y.stride(1),
        scaling, dropout_p,
        HAS_BIAS=bias is not None,
        DROPOUT=dropout and in_loop,
        XS_IN_LOOP=in_loop,
        STORE_XS=xs is not None,
        INPUT_PRECISION=precision,
        BLOCK_R=block_r,
    )
    return y, xs
