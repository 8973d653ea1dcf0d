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
from .blocks import dx_epilogue, k_loop
from .launch import cdiv, empty, launch, optional, peft_form, prologue, strides, weight_args
from .skinny import skinny
from .tiling import grouped_tile, tile_offsets


@triton.autotune(configs=configs.backward_kernel_configs(), key=configs.BACKWARD_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_backward_config}, do_bench=configs.bench_config)
@triton.jit(do_not_specialize=["double_quant"])   # 0 or 1: one build for both
def _lora_backward_kernel(
    # pointers
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, xs_ptr, gs_ptr, dx_ptr, da_part_ptr, db_part_ptr, seed_ptr,
    c_ptr,                      # DoRA (COL_SCALE): the column scales (fp32)
    # a 4-bit W0's statistics (launch.weight_args; stand-ins for a dense one)
    absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr,
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
    double_quant,               # a 4-bit W0's absmax is 8-bit codes (run time: blocks.nf4_tile)
    # meta-parameters
    DROPOUT: tl.constexpr,      # the LoRA branch saw keep ⊙ x: mask dX's low-rank term and dA's x
    G_IN_LOOP: tl.constexpr,    # accumulate gs (and dB partials) in the N-loop, else read gs
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DA: tl.constexpr,
    COMPUTE_DB: tl.constexpr,   # only with G_IN_LOOP
    INPUT_PRECISION: tl.constexpr,
    WEIGHT: tl.constexpr,       # "dense", or "nf4": W0's tiles decoded (blocks.nf4_tile)
    COL_SCALE: tl.constexpr,    # DoRA: the N-loop reads c ⊙ dY (blocks.k_loop)
    PEFT_FORM: tl.constexpr,    # with COL_SCALE and DROPOUT: DoRA's PEFT dropout form's dX term, same N-loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m, offs_k, mask_m, mask_k = tile_offsets(pid_m, pid_k, M, K, BLOCK_M, BLOCK_K)
    # The N-loop is the forward's K-loop with dY for x, W0 read as (N, K) and B for A (G_IN_LOOP:
    # g = dY @ B from the same dY tiles); its dB partials are contiguous fp32 (grid_m, N, R). It
    # runs only with dX asked (the fused path needs dX; without it only the dA epilogue runs).
    if COMPUTE_DX:
        acc, g, acc2 = k_loop(dy_ptr, w_ptr, b_ptr, xs_ptr, db_part_ptr + pid_m.to(tl.int64) * N * R, seed_ptr,
                        offs_m, offs_k, mask_m, mask_k, 0, N, N, R, pid_k == 0,
                        stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br,
                        stride_sm, stride_sr, dropout_p,
                        G_IN_LOOP, False, COMPUTE_DB, INPUT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R,
                        0, True, False, absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr,
                        double_quant, pid_k * BLOCK_K, K, WEIGHT, True,
                        c_ptr=c_ptr, COL_SCALE=COL_SCALE, SECOND=2 if PEFT_FORM else 0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        acc2 = acc
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # da_part is a contiguous fp32 (grid_m, R, K) buffer.
    dx_epilogue(acc, g, gs_ptr, a_ptr, x_ptr, dx_ptr, da_part_ptr + pid_m.to(tl.int64) * R * K,
                tl.load(seed_ptr) if DROPOUT else 0,
                offs_m, offs_k, mask_m, mask_k, K, R,
                stride_gm, stride_gr, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
                scaling, dropout_p,
                "sum" if G_IN_LOOP else "chunks", COMPUTE_DX, COMPUTE_DA, DROPOUT, INPUT_PRECISION, BLOCK_R,
                acc2=acc2, PEFT_FORM=PEFT_FORM)


def lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, *, need_dx=True, need_da=True, need_db=True,
                  dropout_p=0.0, seed=None, col_scale=None, z=None, peft_dropout=False, path):
    """Gradients (dX, dA, dB) of the LoRA linear with W0 frozen; None for those not asked. path:
    "fused" (dX asked, r <= 64), "split", or "tma" (split with backward_tma's dX GEMM: dX asked,
    r <= 64, dY and weight TMA-readable).

    dy (M >= 1, N), x (M, K), xs (M, r) from the forward (made with the same dropout_p and seed,
    whose keep-mask is regenerated here); any strides. dA and dB come back in lora_A.dtype /
    lora_B.dtype, reduced in fp32 in a fixed order.

    col_scale (N,) fp32 (DoRA): the gradients of y = col_scale ⊙ z + bias instead (every pass
    reads c ⊙ dY as it loads dY; not the tma path), returned as (dX, dA, dB, dm) with dm = Σ_rows
    dY ⊙ z (N,) fp32 when z (M, N) is given, else None: the split path's pass over dY sums it from
    its dY tiles, the fused path (small M, W0-bound) in row chunks after its kernel (_dm_rows).
    With peft_dropout too (and dropout_p > 0): DoRA's PEFT dropout form, whose dX also has
    (keep/(1−p) − 1) ⊙ (((c − 1) ⊙ dY) @ weight), from the same dY and weight tiles.
    """
    M, N = dy.shape
    K = x.shape[1]
    R = lora_A.shape[0]
    fused = path == "fused"
    assert need_dx or not fused, "the fused backward computes dX"
    pro = prologue(dy, scaling, dropout_p, seed)
    block_m = configs.partial_block_m(M, fused, pro.precision)
    grid_m = cdiv(M, block_m)

    if col_scale is not None and path == "tma":
        raise ValueError("path: 'tma' takes dY as stored, not DoRA's col_scale ⊙ dY; expected 'fused' or 'split'")
    dora = col_scale is not None
    if dora:   # read as N contiguous values by the N-loop and the pass over dY
        col_scale = col_scale.contiguous()
    gs = db_part = dm_part = None
    if not fused and R > 0:   # rank 0 (dispatch.base_backward): no gs, the epilogue's rank loop is empty
        gs, db_part, dm_part = skinny(dy, lora_B, pro.scale, pro.precision, side=xs if need_db else None,
                                      col_scale=col_scale, z=z)
    elif need_db:
        db_part = torch.empty((grid_m, N, R), device=dy.device, dtype=torch.float32)
    dx = empty(dy, M, K) if need_dx else None
    da_part = torch.empty((grid_m, R, K), device=dy.device, dtype=torch.float32) if need_da else None

    if path == "tma":
        launch_dx_tma(dy, x, gs, weight, lora_A, dx, da_part, pro, block_m)
    elif need_dx or need_da:
        # without dX, W0 is not read: the dense build, dY standing in for it
        dx_arg, gs_arg, w = optional(dx, dy), optional(gs, dy), weight_args(weight if need_dx else dy)
        grid = lambda meta: (grid_m * cdiv(K, meta["BLOCK_K"]),)
        launch(_lora_backward_kernel, grid, dy)(
            dy, w.ptr, lora_A, lora_B, x, optional(xs, dy), gs_arg, dx_arg, optional(da_part, dy), optional(db_part, dy),
            pro.seed, optional(col_scale, dy), *w.statistics,
            M, N, K, R, configs.m_bucket(M),
            *strides(dy), *w.strides, *strides(lora_A), *strides(lora_B), *strides(x), *strides(xs),
            *strides(gs_arg), *strides(dx_arg),
            pro.scale, dropout_p, w.double_quant,
            DROPOUT=pro.dropout,
            G_IN_LOOP=fused,
            COMPUTE_DX=need_dx,
            COMPUTE_DA=need_da,
            COMPUTE_DB=fused and need_db,
            INPUT_PRECISION=pro.precision,
            WEIGHT=w.kind,
            COL_SCALE=dora and need_dx,
            PEFT_FORM=need_dx and peft_form(col_scale, peft_dropout, dropout_p),
            BLOCK_M=block_m,
            BLOCK_R=configs.block_r(R),
        )
    # Fixed-order reductions over the M-tiles: deterministic run to run.
    da = da_part.sum(0).to(lora_A.dtype) if need_da else None
    db = db_part.sum(0).to(lora_B.dtype) if need_db else None
    if dora:
        if z is None:
            return dx, da, db, None
        return dx, da, db, dm_part.sum(0) if dm_part is not None else _dm_rows(dy, z)
    return dx, da, db


# rows of dY and z per step of _dm_rows: two fp32 (rows, N) temporaries, 32 MB at N = 4096
_DM_ROWS = 1024


def _dm_rows(dy, z):
    """Σ_rows dY ⊙ z (N,) in fp32 (products and sums), over row chunks (a bounded temporary)."""
    dm = torch.zeros(dy.shape[1], device=dy.device, dtype=torch.float32)
    for i in range(0, dy.shape[0], _DM_ROWS):
        dm += (dy[i:i + _DM_ROWS].float() * z[i:i + _DM_ROWS].float()).sum(0)
    return dm
