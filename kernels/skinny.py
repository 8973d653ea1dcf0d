"""Skinny pass: out = scale · src @ mat, with src (M, L) and mat (L, r), r small.

It is the "first pass" of both directions of the split path:
  forward   xs = s · x @ Aᵀ                      (src = x,  mat = Aᵀ)
  backward  gs = s · dY @ B  and  dB partials     (src = dY, mat = B, side = xs)
The backward use also emits, from the same src tiles (so dY is read once for both),
one partial of srcᵀ @ side per M-tile: part[pid_m] = dY[tile]ᵀ @ xs[tile], summed afterwards
in a fixed order so dB is deterministic.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .blocks import keep_mask
from .launch import cdiv, launch, optional, strides


@triton.autotune(configs=configs.skinny_configs(), key=configs.SKINNY_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_skinny_config}, do_bench=configs.bench_config)
@triton.jit
def _lora_skinny_kernel(
    # pointers
    src_ptr, mat_ptr, out_ptr, side_ptr, part_ptr, seed_ptr,
    c_ptr, z_ptr, dm_part_ptr,   # DoRA's backward (COL_SCALE): column scales (fp32), z, dm partials
    # sizes (M_BUCKET is only the autotune key)
    M, L, R, M_BUCKET,
    # strides
    stride_sm, stride_sl,
    stride_ml, stride_mr,
    stride_om, stride_or,
    stride_dm, stride_dr,
    stride_zm, stride_zl,
    scale,
    dropout_p,
    # meta-parameters
    WITH_PARTIAL: tl.constexpr,
    DROPOUT: tl.constexpr,       # zero the dropped src elements (src = x in the forward)
    INPUT_PRECISION: tl.constexpr,
    COL_SCALE: tl.constexpr,     # src = dY read as c ⊙ dY, rounded back to its dtype (blocks.k_loop's)
    DM: tl.constexpr,            # with COL_SCALE: also the partials Σ_rows dY ⊙ z, from the unscaled tile
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    # int64 row offsets: M * stride can pass 2**31 on large activations.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L).to(tl.int64)   # l * stride_sl passes 2**31 on a transposed src
    mask_m = offs_m < M
    mask_r = offs_r < R

    if DROPOUT:
        seed = tl.load(seed_ptr)
    src_ptrs = src_ptr + offs_m[:, None] * stride_sm + offs_l[None, :] * stride_sl
    mat_ptrs = mat_ptr + offs_l[:, None] * stride_ml + offs_r[None, :] * stride_mr
    src_step = BLOCK_L * tl.cast(stride_sl, tl.int64)
    mat_step = BLOCK_L * tl.cast(stride_ml, tl.int64)
    if WITH_PARTIAL:
        side = tl.load(side_ptr + offs_m[:, None] * stride_dm + offs_r[None, :] * stride_dr,
                       mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        # part is a contiguous fp32 (grid_m, L, R) buffer.
        part_ptrs = (part_ptr + pid_m.to(tl.int64) * L * R
                     + offs_l[:, None] * R + offs_r[None, :])

    if DM:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_l[None, :] * stride_zl
        dm_ptrs = dm_part_ptr + pid_m.to(tl.int64) * L + offs_l   # a contiguous fp32 (grid_m, L) buffer
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        mask_l = offs_l < L - l0
        src = tl.load(src_ptrs, mask=mask_m[:, None] & mask_l[None, :], other=0.0)
        if COL_SCALE:
            if DM:
                if pid_r == 0:   # one program per row tile, whatever the rank chunks
                    z = tl.load(z_ptrs, mask=mask_m[:, None] & mask_l[None, :], other=0.0)
                    tl.store(dm_ptrs, tl.sum(src.to(tl.float32) * z.to(tl.float32), 0), mask=mask_l)
                z_ptrs += BLOCK_L * tl.cast(stride_zl, tl.int64)
                dm_ptrs += BLOCK_L
            c = tl.load(c_ptr + l0 + offs_l, mask=mask_l, other=0.0)
            src = (src.to(tl.float32) * c[None, :]).to(src_ptr.dtype.element_ty)
        if DROPOUT:
            src = src * keep_mask(seed, offs_m, l0 + offs_l, L, dropout_p).to(src.dtype)
        mat = tl.load(mat_ptrs, mask=mask_l[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(src, mat, acc, input_precision=INPUT_PRECISION)
        if WITH_PARTIAL:
            part = tl.dot(tl.trans(src), side, input_precision=INPUT_PRECISION)
            tl.store(part_ptrs, part, mask=mask_l[:, None] & mask_r[None, :])
            part_ptrs += BLOCK_L * tl.cast(R, tl.int64)
        src_ptrs += src_step
        mat_ptrs += mat_step

    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, out,
             mask=mask_m[:, None] & mask_r[None, :])


def skinny(src, mat, scale, input_precision, side=None, dropout_p=0.0, seed=None, col_scale=None, z=None):
    """Return (scale · src @ mat in src.dtype, part or None, dm or None).

    src (M, L) and mat (L, r) may be any strided views. With side (M, r), also returns
    part (grid_m, L, r) fp32 with part.sum(0) == srcᵀ @ side. With dropout_p > 0 the dropped
    elements of src (dropout.keep_mask of `seed`) count as zero. With col_scale (L,) fp32 (DoRA's
    backward, src = dY) src's columns are scaled by it first (for out and part alike); with z
    (M, L) too, dm (grid_m, L) fp32 with dm.sum(0) == Σ_rows src ⊙ z of the unscaled src.
    """
    M, L = src.shape
    R = mat.shape[1]
    block_m = configs.partial_block_m(M, precision=input_precision)
    block_r = configs.block_r(R)
    grid_m = cdiv(M, block_m)
    out = torch.empty((M, R), device=src.device, dtype=src.dtype)
    part = dm = None
    if side is not None:
        part = torch.empty((grid_m, L, R), device=src.device, dtype=torch.float32)
    if z is not None:
        dm = torch.empty((grid_m, L), device=src.device, dtype=torch.float32)
    launch(_lora_skinny_kernel, (grid_m, cdiv(R, block_r)), src)(
        src, mat, out, optional(side, out), optional(part, out),
        seed if dropout_p > 0 else out,
        optional(col_scale, out), optional(z, out), optional(dm, out),
        M, L, R, configs.m_bucket(M),
        src.stride(0), src.stride(1),
        mat.stride(0), mat.stride(1),
        out.stride(0), out.stride(1),
        *strides(side),
        *strides(z),
        scale, dropout_p,
        WITH_PARTIAL=side is not None,
        DROPOUT=dropout_p > 0,
        INPUT_PRECISION=input_precision,
        COL_SCALE=col_scale is not None,
        DM=z is not None,
        BLOCK_M=block_m, BLOCK_R=block_r,
    )
    return out, part, dm
