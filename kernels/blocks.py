"""The pieces every LoRA kernel is built from, each written once as a @triton.jit helper and
specialised by constexpr flags (Triton inlines them: a helper costs nothing at run time).

  keep_mask     the dropout keep-mask of elements (m, k) of x: one Philox draw each, wherever used
  load_weight   the one read of a 16/32-bit base-weight tile
  nf4_tile      the one decode of a 4-bit (NF4, bitsandbytes' bytes) base-weight tile: codes and
                block absmax (plain or double-quantised) loaded per tile, never a decoded copy
  k_loop        the base GEMM's reduction, with the LoRA product x·Aᵀ (or dY·B) of the same tiles
                and the dB partial dYᵀ·xs as options
  tma_k_loop    the same reduction (base GEMM only) from TMA descriptors, for the Hopper kernels
  y_epilogue    y = acc + xs·Bᵀ + bias, xs from the K-loop's sum or read back; rounded once (DoRA:
                c ⊙ (acc + xs·Bᵀ) + bias, the unscaled sum kept)
  dx_epilogue   dX = acc + keep ⊙ (gs·A), and the dA partial gsᵀ·(keep ⊙ x) from the same tiles
  adapter_range, next_adapter   the adapters present in a row tile whose rows each have their own
                (multi.py: sorted rows, so a tile holds a contiguous run of adapters)

Each kernel file keeps its own grid and program mapping (tile order, persistent loop, split-K) and
calls these. Offsets are int64 throughout: row · stride (or k · stride on a transposed view) can
pass 2**31 on large activations.
"""
import triton
import triton.language as tl

from .launch import INTERPRET

# A product rounded before the sum it feeds: double-quantised absmax is map × scale, rounded, then
# + offset, as bitsandbytes decodes it, where Triton fuses a plain `a * b + c` into one fma on the
# GPU (fp fusion: 32 fma.rn.f32 in the split-K partial's PTX). PTX's mul.rn is never fused (and,
# unlike libdevice's mul_rn, which Triton builds as mul.rn.ftz, keeps denormals). The interpreter
# (numpy) never fuses, and runs no inline assembly.
_ROUND_PRODUCTS = tl.constexpr(not INTERPRET)


@triton.jit
def _mul_rn(a, b):
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def keep_mask(seed, offs_m, offs_k, K, p):
    """Boolean keep-mask for the rows offs_m and columns offs_k of x (M, K): tl.rand(seed, m·K + k)
    >= p, independent of tiling, strides and pass (lora_fast/dropout.py reproduces it bit for bit
    in torch and C++)."""
    return tl.rand(seed, offs_m[:, None] * K + offs_k[None, :]) >= p


@triton.jit
def load_weight(w_ptrs, mask):
    """A tile of the frozen base weight stored in the compute dtype. Every kernel reads a dense W0
    through here and a 4-bit one through nf4_tile, nowhere else."""
    return tl.load(w_ptrs, mask=mask, other=0.0)


@triton.jit
def nf4_tile(codes_ptr, absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr, base, local,
             mask, double_quant):
    """The fp32 (rows, 2·cols) tile of an NF4 weight whose bytes are at codes_ptr + base + local
    (base: the tile's first byte, int64; local: (rows, cols) int32 offsets from it): a row's
    element 2j from byte j's high nibble and 2j + 1 from its low one (bitsandbytes' order over the
    row-major (out, in) weight, in even), each NF4 level times its 64-element block's absmax in
    fp32, as lora_fast.nf4 decodes it (the caller rounds it once to the compute dtype). The absmax
    is absmax_ptr's fp32 or, with double_quant, a uint8 code (qabsmax_ptr) into the 256-entry map
    code_ptr, times its group's fp32 scale (256 blocks a group), plus the one offset. double_quant
    is a run-time flag, not a constexpr: one build serves both formats (the branch is uniform, once
    per tile), which halves the 4-bit builds. Masked elements are 0.

    Offsets within the tile are int32 (rows · in/2 + cols < 2**31 while in < 2**24, which
    dispatch.kernels_read_4bit requires), from int64 scalars: int64 tiles of byte, block and group
    indices spilled on sm_80 (AOT report, bench/NOTES.md v12). Block b of byte base + l is
    base // 32 + (base % 32 + l) // 32, and likewise for the groups of 256 blocks.

    One byte tile per K-step, contiguous along the row (two codes a byte: a quarter of a 16-bit
    tile's bytes); the 16 levels and the map are read through the L1 cache (64 B and 1 KB)."""
    byte = tl.load(codes_ptr + base + local, mask=mask, other=0).to(tl.int32)
    block0 = base // 32                # 32 bytes (64 codes) a block: both codes of a byte in one
    block = ((base % 32).to(tl.int32) + local) // 32
    if double_quant:
        q = tl.load(qabsmax_ptr + block0 + block, mask=mask, other=0).to(tl.int32)
        code = tl.load(code_ptr + q)
        group = ((block0 % 256).to(tl.int32) + block) // 256
        scale = tl.load(scale_ptr + block0 // 256 + group, mask=mask, other=0.0)
        if _ROUND_PRODUCTS:
            absmax = _mul_rn(code, scale) + tl.load(offset_ptr)
        else:
            absmax = code * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block0 + block, mask=mask, other=0.0)
    absmax = tl.where(mask, absmax, 0.0)
    high = tl.load(levels_ptr + (byte >> 4)) * absmax
    low = tl.load(levels_ptr + (byte & 15)) * absmax
    return tl.interleave(high, low)


@triton.jit
def k_loop(x_ptr, w_ptr, a_ptr, side_ptr, part_ptr, seed_ptr,
           offs_m, offs_n, mask_m, mask_n, k_lo, k_hi, K, R, emit_partial,
           stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, stride_sm, stride_sr,
           dropout_p,
           LORA: tl.constexpr, DROPOUT: tl.constexpr, PARTIAL: tl.constexpr,
           INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
           side_rows=0, BASE: tl.constexpr = True, SIDE_ROWS: tl.constexpr = False,
           absmax_ptr=0, qabsmax_ptr=0, code_ptr=0, scale_ptr=0, offset_ptr=0, levels_ptr=0, double_quant=0,
           w_out0=0, w_cols=0, WEIGHT: tl.constexpr = "dense", W_BY_ROWS: tl.constexpr = False,
           c_ptr=0, COL_SCALE: tl.constexpr = False, SECOND: tl.constexpr = 0):
    """(acc, xa, acc2) over the reduction range [k_lo, k_hi): acc = x[offs_m, k] @ w[k, offs_n] in fp32
    and, with LORA, xa = d(x)[offs_m, k] @ a[k, :R] from the x tiles already loaded for acc (d: the
    dropout keep-mask with DROPOUT, keep_mask's column index k of a K-wide x).

    The backward's dX GEMM is the same loop with x = dY, w = W0 read as (N, K), a = B: its LoRA
    product is g = dY @ B, and with PARTIAL the programs for which emit_partial holds also write,
    per reduction step, the dB partial dY_tileᵀ @ side (side = xs) to part_ptr (contiguous
    (reduction, R) fp32 rows of this M-tile's slice).

    Rows with adapters of their own (multi.py) run it once per adapter of the tile: every pass but
    the first leaves the base GEMM out (BASE=False: acc stays zero, W0 is not read), and with
    SIDE_ROWS only the rows side_rows of side (that adapter's) enter the dB partial. dropout_p may
    be a (BLOCK_M, 1) tensor, each row's own probability.

    WEIGHT "nf4": w_ptr is an NF4 weight's bytes (nf4_tile, its statistics the pointers after
    SIDE_ROWS; stride_wk, stride_wn the bytes per row of W0 and 1, in this loop's (reduction,
    output) naming), decoded per tile and rounded once to x's dtype. The byte tile runs along W0's
    rows: the reduction's in the forward (W0's columns are reduced, then the tile is transposed;
    the output tile is W0's rows from w_out0), the output's with W_BY_ROWS (the dX GEMM reduces
    over W0's rows; its output columns are [w_out0, w_out0 + BLOCK_N) of w_cols).
    COL_SCALE (DoRA's backward, lora_fast.dora): the x tiles (dY) are scaled per reduction column
    by c (fp32, at c_ptr) as they are loaded, rounded back to their dtype (dY·c, as the torch
    path rounds it): every product of the loop sees c ⊙ dY. (The magnitude's Σ_rows dY ⊙ z is not
    summed here: the z tile beside the dX accumulator spilled on sm_80, AOT report, bench/NOTES.md v16.)
    SECOND (DoRA's PEFT dropout form, lora_fast.dora): a second base product acc2 from the same x and
    W0 tiles, fp32 — 1: d(x) @ w, the keep-masked x tile (the forward's d(x)·W0ᵀ; the mask is drawn
    whether or not DROPOUT is on, the 1/(1−p) rescale is the caller's); 2: ((c − 1) ⊙ dY) @ w, the
    unscaled dY tile times c − 1, rounded to its dtype (the backward's dX term). 0: none (acc2 is a
    zero tile the compiler drops).
    Every caller passes WEIGHT: Triton 3.6 (the GPU image's) fails to compile a call that leaves a
    string constexpr to its default ("'str' object has no attribute 'type'"); 3.9 and the
    interpreter accept it, so only the AOT report under 3.6 sees it.
    """
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = offs_r < R
    if DROPOUT or SECOND == 1:
        seed = tl.load(seed_ptr)
    k_first = k_lo + offs_k
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + k_first[None, :] * stride_xk
    x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
    if WEIGHT == "dense":
        w_ptrs = w_ptr + k_first[:, None] * stride_wk + offs_n[None, :] * stride_wn
        w_step = BLOCK_K * tl.cast(stride_wk, tl.int64)
    elif W_BY_ROWS:   # byte tile (BLOCK_K rows of W0, BLOCK_N / 2 bytes of the output columns)
        out_half = tl.arange(0, BLOCK_N // 2)
        w_local = tl.arange(0, BLOCK_K)[:, None] * stride_wk + out_half[None, :]   # int32: nf4_tile
        w_ptrs = tl.cast(k_lo, tl.int64) * stride_wk + w_out0 // 2                 # the tile's first byte
        w_step = BLOCK_K * tl.cast(stride_wk, tl.int64)
        out_mask = w_out0 + 2 * out_half < w_cols
    else:             # byte tile (BLOCK_N rows of W0, BLOCK_K / 2 bytes of the reduction)
        k_half = tl.arange(0, BLOCK_K // 2)
        w_local = tl.arange(0, BLOCK_N)[:, None] * stride_wn + k_half[None, :]
        w_ptrs = tl.cast(w_out0, tl.int64) * stride_wn + k_lo // 2
        w_step = BLOCK_K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if LORA:
        a_ptrs = a_ptr + k_first[:, None] * stride_ak + offs_r[None, :] * stride_ar
        a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    if PARTIAL:
        side_mask = mask_m
        if SIDE_ROWS:
            side_mask = mask_m & side_rows
        side_ptrs = side_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr
        part_ptrs = part_ptr + k_first[:, None] * R + offs_r[None, :]
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if SECOND == 1:
            x_drop = x * keep_mask(seed, offs_m, k0 + offs_k, K, dropout_p).to(x.dtype)
        if COL_SCALE:
            c = tl.load(c_ptr + k0 + offs_k, mask=mask_k, other=0.0)
            if SECOND == 2:
                x_second = (x.to(tl.float32) * (c - 1.0)[None, :]).to(x_ptr.dtype.element_ty)
            x = (x.to(tl.float32) * c[None, :]).to(x_ptr.dtype.element_ty)
        if BASE:
            if WEIGHT == "dense":
                w = load_weight(w_ptrs, mask_k[:, None] & mask_n[None, :])
            elif W_BY_ROWS:
                w = nf4_tile(w_ptr, absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr, w_ptrs,
                             w_local, mask_k[:, None] & out_mask[None, :], double_quant).to(x.dtype)
            else:   # k_hi - k0 is even (even K, even split bounds): a byte is in range or not
                w = nf4_tile(w_ptr, absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr, w_ptrs,
                             w_local, mask_n[:, None] & (2 * k_half < k_hi - k0)[None, :], double_quant)
                w = tl.trans(w.to(x.dtype))
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
            if SECOND == 1:
                acc2 = tl.dot(x_drop, w, acc2, input_precision=INPUT_PRECISION)
            if SECOND == 2:
                acc2 = tl.dot(x_second, w, acc2, input_precision=INPUT_PRECISION)
        if LORA:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
            x_lora = x
            if SECOND == 1:
                x_lora = x_drop
            elif DROPOUT:
                x_lora = x * keep_mask(seed, offs_m, k0 + offs_k, K, dropout_p).to(x.dtype)
            xa = tl.dot(x_lora, a, xa, input_precision=INPUT_PRECISION)
            a_ptrs += a_step
            if PARTIAL:
                # The x tile is the same for every output column-tile; one of them emits the
                # partial. side is re-read from L1/L2 each step rather than held in registers for
                # the whole loop: holding it spilled on sm_80 (AOT report).
                if emit_partial:
                    side = tl.load(side_ptrs, mask=side_mask[:, None] & mask_r[None, :], other=0.0)
                    part = tl.dot(tl.trans(x), side, input_precision=INPUT_PRECISION)
                    tl.store(part_ptrs, part, mask=mask_k[:, None] & mask_r[None, :])
                part_ptrs += BLOCK_K * tl.cast(R, tl.int64)
        x_ptrs += x_step
        if BASE:
            w_ptrs += w_step
    return acc, xa, acc2


@triton.jit
def tma_k_loop(x_desc, w_desc, row0, col0, K,
               W_TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """acc = x[row0 : row0 + BLOCK_M, :K] @ w[:K, col0 : col0 + BLOCK_N] in fp32, every tile a TMA
    bulk copy (no masks, no address arithmetic: the hardware zero-fills out-of-bounds rows). The
    weight descriptor is over W0 as stored, (N, K): the forward reads its [col, k] tiles and
    transposes them (W_TRANSPOSED), the backward's dX GEMM reads [k, col] tiles as they are."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        x = x_desc.load([row0, ki * BLOCK_K])
        if W_TRANSPOSED:
            w = w_desc.load([col0, ki * BLOCK_K]).T
        else:
            w = w_desc.load([ki * BLOCK_K, col0])
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def y_epilogue(acc, xa, xs_ptr, b_ptr, bias_ptr, y_ptr,
               offs_m, offs_n, mask_m, mask_n, R, store_xs_here,
               stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, scaling,
               XS: tl.constexpr, STORE_XS: tl.constexpr, HAS_BIAS: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
               ids=0, a_lo=0, a_hi=0, stride_ba=0, MULTI: tl.constexpr = False,
               c_ptr=0, z_ptr=0, stride_zm=0, stride_zn=0, COL_SCALE: tl.constexpr = False,
               acc2=0, drop_scale=1.0, PEFT_FORM: tl.constexpr = False):
    """Store y = acc + xs @ Bᵀ + bias, rounded once to y's dtype. XS says where xs comes from:
      "sum"     xs = scaling · xa, the K-loop's (or split-K's summed) fp32 product, rounded to the
                input dtype as a first pass rounds it (so every path feeds B the same xs), padded
                rank columns zeroed (an inf in x times A's zero padding is NaN there); with
                STORE_XS the programs for which store_xs_here holds keep it for backward
      "tile"    read back from xs_ptr, the whole rank in one tile (R <= BLOCK_R)
      "chunks"  read back over rank chunks of BLOCK_R (any R)
    COL_SCALE (DoRA, lora_fast.dora): y = c ⊙ (acc + xs @ Bᵀ) + bias with c (N,) fp32 at c_ptr,
    scaled in fp32 before the one rounding (the bias after the scale, as PEFT adds it), and the
    unscaled z = acc + xs @ Bᵀ stored too, rounded to y's dtype, to z_ptr: DoRA's backward takes
    the magnitude's gradient from it. PEFT_FORM (with COL_SCALE: DoRA's PEFT dropout form):
    acc2 is the K-loop's d(x) @ W0ᵀ (k_loop's SECOND 1) and drop_scale 1/(1−p):
    y = acc + (c − 1) ⊙ side + xs @ Bᵀ + bias, computed as (acc − side₀) + c ⊙ side with
    side₀ = drop_scale · acc2 and side = side₀ + xs @ Bᵀ, which is what z_ptr gets.
    MULTI: each row has its own adapter (ids; a_lo..a_hi those of the tile, adapter_range; b_ptr
    the stack of B, stride_ba apart): one dot per adapter present, on its rows of xs (the others
    zeroed), into the one accumulator; scaling may be a (BLOCK_M, 1) tensor of the rows' scales."""
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    if PEFT_FORM:   # the rank loop below adds xs·Bᵀ to side₀, the base product of d(x)
        base = acc - acc2 * drop_scale
        acc = acc2 * drop_scale
    # One pass unless XS is "chunks": a loop of one constant trip is folded away by the compiler.
    for r0 in range(0, R if XS == "chunks" else 1, BLOCK_R):
        mask_r = offs_r < R - r0
        if XS == "sum":
            xs = tl.where(mask_r[None, :], xa * scaling, 0.0).to(y_ptr.dtype.element_ty)
            if STORE_XS:
                if store_xs_here:
                    tl.store(xs_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, xs,
                             mask=mask_m[:, None] & mask_r[None, :])
        else:
            xs = tl.load(xs_ptr + offs_m[:, None] * stride_sm + (r0 + offs_r)[None, :] * stride_sr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if MULTI:
            ad = a_lo
            while ad <= a_hi:
                acc = _add_low_rank(acc, rows_only(xs, ids == ad), b_ptr + ad.to(tl.int64) * stride_ba,
                                    r0 + offs_r, offs_n, mask_r, mask_n, stride_br, stride_bn, INPUT_PRECISION)
                ad = next_adapter(ids, ad, a_hi)
        else:
            acc = _add_low_rank(acc, xs, b_ptr, r0 + offs_r, offs_n, mask_r, mask_n, stride_br, stride_bn,
                                INPUT_PRECISION)
    if COL_SCALE:
        z = acc
        if PEFT_FORM:
            acc = base + acc * tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        else:
            acc = acc * tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        _store(z_ptr, offs_m, offs_n, stride_zm, stride_zn, z, mask_m, mask_n)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _store(y_ptr, offs_m, offs_n, stride_ym, stride_yn, acc, mask_m, mask_n)


@triton.jit
def dx_epilogue(acc, g, gs_ptr, a_ptr, x_ptr, dx_ptr, da_ptr, seed,
                offs_m, offs_k, mask_m, mask_k, K, R,
                stride_gm, stride_gr, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
                scaling, dropout_p,
                GS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr,
                DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                ids=0, a_lo=0, a_hi=0, stride_aa=0, stride_da=0, MULTI: tl.constexpr = False,
                acc2=0, PEFT_FORM: tl.constexpr = False):
    """Store dX = acc + keep ⊙ (gs @ A) (acc: the dY @ W0 tile) and, from the x tile of the same
    (M, K) block, the dA partial gsᵀ @ (keep ⊙ x) to da_ptr (this M-tile's contiguous fp32 (R, K)
    slice). keep is the forward's dropout mask for these (m, k), regenerated from `seed` (the
    loaded seed; loaded once by a persistent kernel, not once per tile). GS says where gs comes
    from, as y_epilogue's XS: "sum" (scaling · g, the N-loop's fp32 dY @ B, rounded to the input
    dtype, padded rank columns zeroed: an inf in dY times B's zero padding is NaN there), "tile"
    (read back, R <= BLOCK_R) or "chunks" (read back over rank chunks).
    MULTI ("sum" only): rows with adapters of their own, as y_epilogue's; per adapter present, the
    gs·A term of its rows (A stride_aa apart in the stack) and its dA partial, stride_da past
    da_ptr per adapter index (multi.py's slot t + a); scaling and dropout_p may be (BLOCK_M, 1).
    PEFT_FORM (DoRA's PEFT dropout form, DROPOUT on): acc2 is the N-loop's ((c − 1) ⊙ dY) @ W0
    (k_loop's SECOND 2), and dX gains (keep/(1−p) − 1) ⊙ acc2, the gradient through the form's
    second base product on d(x)."""
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    if DROPOUT and (COMPUTE_DX or COMPUTE_DA):
        keep = keep_mask(seed, offs_m, offs_k, K, dropout_p)
    else:
        keep = 1   # never read: DROPOUT is off
    if PEFT_FORM:
        if COMPUTE_DX:
            acc += (keep.to(tl.float32) * (1.0 / (1.0 - dropout_p)) - 1.0) * acc2
    # The x tile: "sum" and "chunks" load it first (the loop reads it on every rank chunk); "tile"
    # (the TMA kernel's 128-row tiles) only after dX is stored, so that the dX accumulator and the
    # x tile are never live together: loading it first took the 128x128 dropout tile from 242 to
    # 254 registers on sm_90 under Triton 3.9 (AOT report, bench/NOTES.md v9). MULTI too: with its
    # adapter loops, loading x first spilled 40-300 B on sm_80 (multi.py's backward, AOT report).
    if COMPUTE_DA and GS != "tile" and not MULTI:
        x = _dropped_x(x_ptr, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, keep, DROPOUT)
    da_ptrs = da_ptr + offs_r[:, None] * K + offs_k[None, :]
    for r0 in range(0, R if GS == "chunks" else 1, BLOCK_R):   # one pass unless "chunks"
        mask_r = offs_r < R - r0
        if GS == "sum":
            gs = tl.where(mask_r[None, :], g * scaling, 0.0).to(x_ptr.dtype.element_ty)
        else:
            gs = tl.load(gs_ptr + offs_m[:, None] * stride_gm + (r0 + offs_r)[None, :] * stride_gr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if MULTI:
            if COMPUTE_DX:
                ad = a_lo
                while ad <= a_hi:
                    acc = _add_dx_term(acc, rows_only(gs, ids == ad), a_ptr + ad.to(tl.int64) * stride_aa,
                                       r0 + offs_r, offs_k, mask_r, mask_k, stride_ar, stride_ak, keep, DROPOUT,
                                       INPUT_PRECISION)
                    ad = next_adapter(ids, ad, a_hi)
                _store(dx_ptr, offs_m, offs_k, stride_dxm, stride_dxk, acc, mask_m, mask_k)
            if COMPUTE_DA:
                x = _dropped_x(x_ptr, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, keep, DROPOUT)
                ad = a_lo
                while ad <= a_hi:
                    _store_da(rows_only(gs, ids == ad), x, da_ptrs + ad.to(tl.int64) * stride_da, mask_r, mask_k,
                              INPUT_PRECISION)
                    ad = next_adapter(ids, ad, a_hi)
        else:
            if COMPUTE_DX:
                acc = _add_dx_term(acc, gs, a_ptr, r0 + offs_r, offs_k, mask_r, mask_k, stride_ar, stride_ak,
                                   keep, DROPOUT, INPUT_PRECISION)
                if GS == "tile":
                    _store(dx_ptr, offs_m, offs_k, stride_dxm, stride_dxk, acc, mask_m, mask_k)
            if COMPUTE_DA:
                if GS == "tile":
                    x = _dropped_x(x_ptr, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, keep, DROPOUT)
                _store_da(gs, x, da_ptrs, mask_r, mask_k, INPUT_PRECISION)
        if COMPUTE_DA:
            da_ptrs += BLOCK_R * tl.cast(K, tl.int64)
    if COMPUTE_DX and GS != "tile" and not MULTI:
        _store(dx_ptr, offs_m, offs_k, stride_dxm, stride_dxk, acc, mask_m, mask_k)


@triton.jit
def adapter_range(ids_ptr, offs_m, mask_m):
    """(ids, a_lo, a_hi) of a row tile: each row's adapter (-1: the base model alone, as are rows
    past M) and the least and greatest adapter among them; a_lo > a_hi when there is none (a_lo is
    then 0: still a valid adapter to point at, whose rows it selects are none)."""
    ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
    a_hi = tl.max(ids, 0)
    a_lo = tl.min(tl.where(ids >= 0, ids, a_hi + 1), 0)
    return ids, a_lo, a_hi


@triton.jit
def next_adapter(ids, ad, a_hi):
    """The next adapter after ad among the tile's rows (a_hi + 1 past the last): loops visit only
    the adapters present, however sparse the ids."""
    return tl.min(tl.where(ids > ad, ids, a_hi + 1), 0)


@triton.jit
def rows_only(t, rows):
    """t with the rows outside `rows` zeroed (selected, so a NaN there does not leak through)."""
    return tl.where(rows[:, None], t, tl.zeros_like(t))


@triton.jit
def _add_low_rank(acc, xs, b_ptr, rows_r, offs_n, mask_r, mask_n, stride_br, stride_bn,
                  INPUT_PRECISION: tl.constexpr):
    b = tl.load(b_ptr + rows_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    return tl.dot(xs, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _add_dx_term(acc, gs, a_ptr, rows_r, offs_k, mask_r, mask_k, stride_ar, stride_ak, keep,
                 DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    a = tl.load(a_ptr + rows_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    if DROPOUT:
        acc += tl.dot(gs, a, input_precision=INPUT_PRECISION) * keep.to(tl.float32)
    else:
        acc = tl.dot(gs, a, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _store_da(gs, x, da_ptrs, mask_r, mask_k, INPUT_PRECISION: tl.constexpr):
    da = tl.dot(tl.trans(gs), x, input_precision=INPUT_PRECISION)
    tl.store(da_ptrs, da, mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _dropped_x(x_ptr, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, keep, DROPOUT: tl.constexpr):
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    if DROPOUT:
        # multiplied, not selected, as F.dropout does (a dropped NaN stays NaN); tl.where here
        # also crashed Triton's sm_90 layout pass in the fused variant
        x = x * keep.to(x.dtype)
    return x


@triton.jit
def _store(ptr, offs_m, offs_n, stride_m, stride_n, acc, mask_m, mask_n):
    """Store an fp32 accumulator tile, rounded once to the output's dtype."""
    tl.store(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n,
             acc.to(ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
