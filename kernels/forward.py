"""Fused LoRA forward: y = x @ W0ᵀ + bias + xs @ Bᵀ with xs = scaling · x @ Aᵀ.

One GEMM kernel over tiles of y. The low-rank product xs (M, r) comes one of two ways
(XS_IN_LOOP: the path lora_fast.dispatch chose; arithmetic in bench/NOTES.md):
  in loop     each program also accumulates x_tile @ Aᵀ_tile in its K-loop, reusing the x tile
              it already loaded for the main product: no extra pass or launch, r/BLOCK_N extra
              MMA work. Best when the GEMM is bound by reading W0 (small M).
  first pass  xs is computed once by the skinny kernel (one extra read of x) and read back in
              the epilogue. Best when the GEMM is compute-bound (large M).
Either way xs is kept for backward (M·r values), and the epilogue adds xs @ Bᵀ and the bias
to the fp32 accumulator before the single rounding to the output dtype.
"""
import triton
import triton.language as tl

from . import configs
from .blocks import k_loop, y_epilogue
from .launch import bias_arg, cdiv, dora_output, empty, launch, optional, peft_form, prologue, weight_args
from .skinny import skinny
from .tiling import grouped_tile, tile_offsets


@triton.autotune(configs=configs.forward_kernel_configs(), key=configs.FORWARD_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_forward_config}, do_bench=configs.bench_config)
@triton.jit(do_not_specialize=["double_quant"])   # 0 or 1: one build for both
def _lora_forward_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xs_ptr, y_ptr, seed_ptr,
    c_ptr, z_ptr,               # DoRA (COL_SCALE): the column scales (fp32) and the unscaled output
    # a 4-bit W0's statistics (launch.weight_args; stand-ins for a dense one)
    absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr,
    # sizes (M_BUCKET is only the autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_ym, stride_yn,
    stride_zm, stride_zn,
    scaling,                    # s / (1 - p): the dropout rescale rides on xs
    dropout_p,
    double_quant,               # a 4-bit W0's absmax is 8-bit codes (run time: blocks.nf4_tile)
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,      # in-loop only: zero the dropped x elements for the x·Aᵀ product
    XS_IN_LOOP: tl.constexpr,   # compute xs in the K-loop (else read it from xs_ptr)
    STORE_XS: tl.constexpr,     # in-loop only: write xs for backward
    INPUT_PRECISION: tl.constexpr,
    WEIGHT: tl.constexpr,       # "dense", or "nf4": w_ptr is NF4 bytes (blocks.nf4_tile)
    COL_SCALE: tl.constexpr,    # DoRA: y = c ⊙ z + bias, z kept (blocks.y_epilogue)
    PEFT_FORM: tl.constexpr,    # with COL_SCALE: DoRA's PEFT dropout form, d(x)·W0ᵀ in the same K-loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    acc, xa, acc2 = k_loop(x_ptr, w_ptr, a_ptr, x_ptr, x_ptr, seed_ptr, offs_m, offs_n, mask_m, mask_n, 0, K, K, R,
                     False, stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, 0, 0, dropout_p,
                     XS_IN_LOOP, DROPOUT, False, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
                     0, True, False, absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr,
                     double_quant, pid_n * BLOCK_N, 0, WEIGHT, SECOND=1 if PEFT_FORM else 0)
    # Every column-tile computed the same xs; the first one keeps it for backward.
    y_epilogue(acc, xa, xs_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, R, pid_n == 0,
               stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, scaling,
               "sum" if XS_IN_LOOP else "chunks", STORE_XS, HAS_BIAS, INPUT_PRECISION, BLOCK_R,
               c_ptr=c_ptr, z_ptr=z_ptr, stride_zm=stride_zm, stride_zn=stride_zn, COL_SCALE=COL_SCALE,
               acc2=acc2, drop_scale=1.0 / (1.0 - dropout_p), PEFT_FORM=PEFT_FORM)


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0, seed=None,
                 col_scale=None, peft_dropout=False, in_loop):
    """y = x @ weightᵀ + bias + xs @ lora_Bᵀ, xs = scaling/(1-p) · (keep ⊙ x) @ lora_Aᵀ, for 2-D x
    (M >= 1, K) of any strides: the in-loop path (in_loop=True; r <= 64) or the split path.

    Dropout (p = dropout_p > 0) uses `seed`, a 1-element int64 tensor on x's device; the keep-mask
    is blocks.keep_mask of it, never stored. Returns (y, xs) with xs (M, r) in x.dtype for
    backward, or None when save_xs is False (in-loop path only; the first pass always produces it).
    col_scale (N,) fp32 (DoRA): y = col_scale ⊙ (x @ weightᵀ + xs @ lora_Bᵀ) + bias instead, and
    (y, xs, z) comes back with z the unscaled product before the bias (launch.dora_output). With
    peft_dropout too (and dropout_p > 0): DoRA's PEFT dropout form, y = x @ weightᵀ + bias +
    (c − 1) ⊙ z + xs @ lora_Bᵀ with z = d(x) @ weightᵀ + xs @ lora_Bᵀ, both base products from the
    same tiles of x and the weight.
    """
    M, K = x.shape
    N, R = lora_B.shape
    pro = prologue(x, scaling, dropout_p, seed)
    y = empty(x, M, N)
    dora = dora_output(col_scale, y)
    if in_loop:
        xs = empty(x, M, R) if save_xs else None
    elif R == 0:   # no adapter (dispatch.base_forward): the GEMM and the bias alone
        xs = None
    else:
        xs, _, _ = skinny(x, lora_A.t(), pro.scale, pro.precision, dropout_p=dropout_p, seed=seed)
    xs_arg = optional(xs, y)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    w = weight_args(weight)
    launch(_lora_forward_kernel, grid, x)(
        x, w.ptr, bias_arg(bias, y), lora_A, lora_B, xs_arg, y, pro.seed, dora.c, dora.z, *w.statistics,
        M, N, K, R, configs.m_bucket(M),
        x.stride(0), x.stride(1),
        *w.strides,
        lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        xs_arg.stride(0), xs_arg.stride(1),
        y.stride(0), y.stride(1),
        *dora.z_strides,
        pro.scale, dropout_p, w.double_quant,
        HAS_BIAS=bias is not None,
        DROPOUT=pro.dropout and in_loop,
        XS_IN_LOOP=in_loop,
        STORE_XS=xs is not None,
        INPUT_PRECISION=pro.precision,
        WEIGHT=w.kind,
        COL_SCALE=col_scale is not None,
        PEFT_FORM=peft_form(col_scale, peft_dropout, dropout_p),
        BLOCK_R=configs.block_r(R),
    )
    return dora.result(y, xs)
