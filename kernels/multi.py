"""Mixed-batch LoRA, forward and backward: every row of the batch has its own adapter of a stack
(Punica / S-LoRA style), in a fixed number of launches whatever the number of adapters.

Row m of x uses adapter a = ids[m] (a = -1: the base model alone, xs[m] = gs[m] = 0):

    y[m]  = x[m] @ W0ᵀ + bias + xs[m] @ B[a]ᵀ,      xs[m] = scale[a] · (keep[m] ⊙ x[m]) @ A[a]ᵀ
    dX[m] = dY[m] @ W0 + keep[m] ⊙ (gs[m] @ A[a]),  gs[m] = scale[a] · dY[m] @ B[a]
    dA[a] = Σ_{ids[m]=a} gs[m]ᵀ (keep[m] ⊙ x[m]),   dB[a] = Σ_{ids[m]=a} dY[m]ᵀ xs[m]

keep[m, k] = tl.rand(seed, m·K + k) >= p[a] (blocks.keep_mask, m the row's index in x); A (n, R, K)
and B (n, N, R) hold the adapters zero-padded to the largest rank R <= 64 (the whole rank in one
tile); scale[a] = scaling[a] / (1 - p[a]).

Rows are taken in `perm` order (the row indices stably sorted by adapter), so that a BLOCK_M row tile
holds a contiguous run of adapters a_lo..a_hi (blocks.adapter_range), most often one. A program:
  main loop  the single-adapter kernel's K-loop (forward.py, backward.py): the base GEMM and, from the
             same x (dY) tiles, the low-rank product of every row with a_lo's A (B): one small dot a
             step; the result is then kept on a_lo's rows only;
  others     for each other adapter present (blocks.next_adapter, so absent ids cost nothing), one
             pass of the low-rank product alone (k_loop with BASE=False: no W0, the x tile from L2),
             kept on that adapter's rows;
  epilogue   per adapter present, its rows' xs @ B[a]ᵀ (forward) or gs @ A[a] and dA partial
             (backward) into the one accumulator (blocks' MULTI options).
Rows are disjoint, so one (BLOCK_M, BLOCK_R) accumulator holds every row's xs (gs), and each row's
sums are the single-adapter kernels' term for term (the other adapters add exact zeros).

Launches per pass:
  forward "tiled"    one kernel over tiles of y
  forward "split_k"  decode sizes (M <= 64): a partial kernel over (tile, K-split) as splitk.py's,
                     whose low-rank passes (every adapter of the tile, none in the main loop) are
                     dealt round-robin over the column tiles — a decode batch of all-different
                     adapters is then no single program's work — and a fixed-order reduce that
                     rounds xs and adds the expand
  backward           one GEMM over tiles of dX. Its programs write the dA and dB partials of (row
                     tile t, adapter a) to slot t + a: injective, since with sorted rows a tile's
                     least adapter is no less than the previous tile's greatest. Then one reducer per
                     gradient asked sums, per adapter, the slots of the tiles its segment of sorted
                     rows covers, in tile order: deterministic, no atomics. The segment bounds come
                     from a searchsorted on the device: no host sync, so every pass can be captured
                     in a CUDA graph.
Memory: the backward's partials are M/BLOCK_M + n - 1 fp32 slots of (R, K) and of (N, R): the
single-adapter kernels' one per row tile, plus at most one fp32 copy of dA and dB.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .blocks import adapter_range, dx_epilogue, k_loop, next_adapter, y_epilogue
from .launch import bias_arg, cdiv, empty, input_precision, launch, optional, strides
from .tiling import grouped_tile, row_major_tile, tile_offsets


@triton.jit
def _sorted_rows(perm_ptr, offs_p, mask_p, PERM: tl.constexpr):
    """The rows of x at sorted positions offs_p: perm's, or the positions themselves (ids sorted)."""
    rows = offs_p
    if PERM:
        rows = tl.load(perm_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    return rows


@triton.jit
def _per_row(ptr, ids):
    """Each row's entry of a per-adapter fp32 vector (scale, p), as a (BLOCK_M, 1) column; 0 for the
    rows of no adapter."""
    return tl.load(ptr + ids, mask=ids >= 0, other=0.0)[:, None]


@triton.constexpr_function
def _half(step):
    """The other adapters' reduction step (see _other_adapters); tl.dot's least is 16."""
    return max(16, step // 2)


@triton.jit
def _other_adapters(ids, a_lo, a_hi, x_ptr, a_ptr, side_ptr, part_ptr, seed_ptr,
                    offs_m, offs_n, mask_m, mask_n, L, K, R, emit_partial,
                    stride_xm, stride_xk, stride_ak, stride_ar, stride_sm, stride_sr, stride_aa, stride_pa,
                    dropout_p,
                    DROPOUT: tl.constexpr, PARTIAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """The low-rank product of the rows of the tile's adapters after a_lo, each with its own matrix
    (A stride_aa apart), zero on the other rows: one pass over [0, L) of the product alone per
    adapter present. With PARTIAL each pass also writes its adapter's dB partial (its rows of side)
    at part_ptr + ad · stride_pa.
    The kernels call it before their main loop, so that the main accumulator is not live beside its
    tiles, and with half the main loop's reduction step, so that the two loops share no pointer
    tensors (shared, they were computed once and held across these passes): each cut the spills
    the AOT report found (bf16 at 128 rows on sm_80 went from 255 registers to 193, fp32 dropout
    decode tiles stopped spilling)."""
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    ad = next_adapter(ids, a_lo, a_hi)
    while ad <= a_hi:
        rows = ids == ad
        xa_ad = k_loop(x_ptr, x_ptr, a_ptr + ad.to(tl.int64) * stride_aa, side_ptr,
                       part_ptr + ad.to(tl.int64) * stride_pa, seed_ptr,
                       offs_m, offs_n, mask_m, mask_n, 0, L, K, R, emit_partial,
                       stride_xm, stride_xk, stride_xk, stride_xk, stride_ak, stride_ar, stride_sm, stride_sr,
                       dropout_p, True, DROPOUT, PARTIAL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
                       rows, False, True, WEIGHT="dense")[1]
        xa = tl.where(rows[:, None], xa_ad, xa)
        ad = next_adapter(ids, ad, a_hi)
    return xa


@triton.autotune(configs=configs.multi_forward_configs(), key=configs.MULTI_FORWARD_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_multi_forward_config},
                 do_bench=configs.bench_config)
@triton.jit
def _multi_forward_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xs_ptr, y_ptr, seed_ptr, ids_ptr, perm_ptr, scale_ptr, p_ptr,
    # sizes (M_BUCKET is only the autotune key)
    M, N, K, R, M_BUCKET,
    # strides (stride_aa, stride_ba: from one adapter to the next in the stacks)
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_aa, stride_ar, stride_ak,
    stride_ba, stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    STORE_XS: tl.constexpr,
    PERM: tl.constexpr,         # rows in perm's order (else ids are sorted: the identity)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_p, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    offs_m = _sorted_rows(perm_ptr, offs_p, mask_m, PERM)
    ids, a_lo, a_hi = adapter_range(ids_ptr, offs_m, mask_m)
    p = 0.0
    if DROPOUT:
        p = _per_row(p_ptr, ids)
    xa_others = _other_adapters(ids, a_lo, a_hi, x_ptr, a_ptr, x_ptr, x_ptr, seed_ptr,
                                offs_m, offs_n, mask_m, mask_n, K, K, R, False,
                                stride_xm, stride_xk, stride_ak, stride_ar, 0, 0, stride_aa, 0, p,
                                DROPOUT, False, INPUT_PRECISION, BLOCK_M, BLOCK_N, _half(BLOCK_K), BLOCK_R)
    acc, xa, _ = k_loop(x_ptr, w_ptr, a_ptr + a_lo.to(tl.int64) * stride_aa, x_ptr, x_ptr, seed_ptr,
                     offs_m, offs_n, mask_m, mask_n, 0, K, K, R, False,
                     stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, 0, 0, p,
                     True, DROPOUT, False, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, WEIGHT="dense")
    xa = tl.where((ids == a_lo)[:, None], xa, xa_others)
    # Every column-tile computed the same xs; the first one keeps it for backward.
    y_epilogue(acc, xa, xs_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, R, pid_n == 0,
               stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, _per_row(scale_ptr, ids),
               "sum", STORE_XS, HAS_BIAS, INPUT_PRECISION, BLOCK_R, ids, a_lo, a_hi, stride_ba, True)


@triton.autotune(configs=configs.split_k_configs(), key=configs.MULTI_SPLIT_K_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_multi_split_k_config},
                 do_bench=configs.bench_config)
@triton.jit
def _multi_split_k_partial_kernel(
    x_ptr, w_ptr, a_ptr, part_ptr, xa_part_ptr, seed_ptr, ids_ptr, perm_ptr, p_ptr,
    M, N, K, R, M_BUCKET, SPLIT_K, K_PER_SPLIT,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_aa, stride_ar, stride_ak,
    DROPOUT: tl.constexpr, PERM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_n = row_major_tile(tl.program_id(0), N, BLOCK_N)
    split = tl.program_id(1)
    offs_p, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    offs_m = _sorted_rows(perm_ptr, offs_p, mask_m, PERM)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    ids, a_lo, a_hi = adapter_range(ids_ptr, offs_m, mask_m)
    p = 0.0
    if DROPOUT:
        p = _per_row(p_ptr, ids)
    # as splitk.py: a multiple of the granule, so that the loads can be asynchronous copies
    k_lo = tl.multiple_of(split * K_PER_SPLIT, 16)
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = k_loop(x_ptr, w_ptr, a_ptr, x_ptr, x_ptr, seed_ptr, offs_m, offs_n, mask_m, mask_n,
                 k_lo, k_hi, K, R, False,
                 stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, 0, 0, 0.0,
                 False, False, False, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, WEIGHT="dense")[0]
    split_m = split.to(tl.int64) * M + offs_m          # row of the (SPLIT_K·M, ·) partial buffers
    tl.store(part_ptr + split_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])
    # The j-th adapter present goes to column tile j mod (the number of column tiles), which
    # writes its rows of d(x)·Aᵀ over this K-range; the rows of no adapter are written by none (the reduce masks them).
    ad = a_lo
    j = 0 * a_lo
    while ad <= a_hi:
        if j % tl.cdiv(N, BLOCK_N) == pid_n:
            rows = ids == ad
            xa = k_loop(x_ptr, w_ptr, a_ptr + ad.to(tl.int64) * stride_aa, x_ptr, x_ptr, seed_ptr,
                        offs_m, offs_n, mask_m, mask_n, k_lo, k_hi, K, R, False,
                        stride_xm, stride_xk, stride_wk, stride_wn, stride_ak, stride_ar, 0, 0, p,
                        True, DROPOUT, False, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
                        0, False, WEIGHT="dense")[1]
            tl.store(xa_part_ptr + split_m[:, None] * R + offs_r[None, :], xa,
                     mask=(mask_m & rows)[:, None] & (offs_r[None, :] < R))
        ad = next_adapter(ids, ad, a_hi)
        j += 1


@triton.jit
def _multi_split_k_reduce_kernel(
    part_ptr, xa_part_ptr, b_ptr, bias_ptr, xs_ptr, y_ptr, ids_ptr, perm_ptr, scale_ptr,
    M, N, R, SPLIT_K,
    stride_ba, stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, STORE_XS: tl.constexpr, PERM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_n = row_major_tile(tl.program_id(0), N, BLOCK_N)
    offs_p, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    offs_m = _sorted_rows(perm_ptr, offs_p, mask_m, PERM)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    ids, a_lo, a_hi = adapter_range(ids_ptr, offs_m, mask_m)
    mask_xa = (mask_m & (ids >= 0))[:, None] & (offs_r[None, :] < R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(0, SPLIT_K):         # fixed order: the same sums on every run
        rows = split * M + offs_m
        acc += tl.load(part_ptr + rows[:, None] * N + offs_n[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        xa += tl.load(xa_part_ptr + rows[:, None] * R + offs_r[None, :], mask=mask_xa, other=0.0)
    y_epilogue(acc, xa, xs_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, R, pid_n == 0,
               stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, _per_row(scale_ptr, ids),
               "sum", STORE_XS, HAS_BIAS, INPUT_PRECISION, BLOCK_R, ids, a_lo, a_hi, stride_ba, True)


@triton.autotune(configs=configs.multi_backward_configs(), key=configs.MULTI_BACKWARD_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_multi_backward_config},
                 do_bench=configs.bench_config)
@triton.jit
def _multi_backward_kernel(
    # pointers
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, xs_ptr, dx_ptr, da_part_ptr, db_part_ptr, seed_ptr,
    ids_ptr, perm_ptr, scale_ptr, p_ptr,
    # sizes (M_BUCKET is only the autotune key)
    M, N, K, R, M_BUCKET,
    # strides
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_aa, stride_ar, stride_ak,
    stride_ba, stride_bn, stride_br,
    stride_xm, stride_xk,
    stride_sm, stride_sr,
    stride_dxm, stride_dxk,
    # meta-parameters
    DROPOUT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DA: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    PERM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dB alone: one program per row tile, the first K-column's (those emit the dB partials)
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K if COMPUTE_DX or COMPUTE_DA else 1,
                                BLOCK_M, BLOCK_K, GROUP_M)
    offs_p, offs_k, mask_m, mask_k = tile_offsets(pid_m, pid_k, M, K, BLOCK_M, BLOCK_K)
    offs_m = _sorted_rows(perm_ptr, offs_p, mask_m, PERM)
    ids, a_lo, a_hi = adapter_range(ids_ptr, offs_m, mask_m)
    # Slot t of the fp32 partial buffers, (slots, N, R) for dB and (slots, R, K) for dA; adapter a's
    # partials go to slot t + a.
    db_slot = db_part_ptr + pid_m.to(tl.int64) * N * R
    g_others = _other_adapters(ids, a_lo, a_hi, dy_ptr, b_ptr, xs_ptr, db_slot, seed_ptr,
                               offs_m, offs_k, mask_m, mask_k, N, N, R, pid_k == 0,
                               stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_ba, N * R,
                               0.0, False, COMPUTE_DB, INPUT_PRECISION, BLOCK_M, BLOCK_K, _half(BLOCK_N), BLOCK_R)
    # The N-loop is the forward's K-loop with dY for x, W0 read as (N, K) and B for A, as backward.py's
    # fused one; without dX asked it leaves the base GEMM out (dA needs gs all the same).
    acc, g, _ = k_loop(dy_ptr, w_ptr, b_ptr + a_lo.to(tl.int64) * stride_ba, xs_ptr,
                    db_slot + a_lo.to(tl.int64) * N * R, seed_ptr,
                    offs_m, offs_k, mask_m, mask_k, 0, N, N, R, pid_k == 0,
                    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br,
                    stride_sm, stride_sr, 0.0,
                    True, False, COMPUTE_DB, INPUT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R,
                    ids == a_lo, COMPUTE_DX, True, WEIGHT="dense")
    g = tl.where((ids == a_lo)[:, None], g, g_others)
    p = 0.0
    if DROPOUT:
        p = _per_row(p_ptr, ids)
    dx_epilogue(acc, g, x_ptr, a_ptr, x_ptr, dx_ptr, da_part_ptr + pid_m.to(tl.int64) * R * K,
                tl.load(seed_ptr) if DROPOUT else 0,
                offs_m, offs_k, mask_m, mask_k, K, R,
                0, 0, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
                _per_row(scale_ptr, ids), p,
                "sum", COMPUTE_DX, COMPUTE_DA, DROPOUT, INPUT_PRECISION, BLOCK_R,
                ids, a_lo, a_hi, stride_aa, R * K, True)


@triton.jit
def _multi_reduce_kernel(part_ptr, out_ptr, bounds_ptr, WIDTH, TILE_M, BLOCK: tl.constexpr):
    """out[a, c] = Σ part[t + a, c] over the row tiles t (TILE_M sorted rows each) that adapter a's
    rows bounds[a] .. bounds[a + 1] cover, in tile order; zero for an adapter with no rows."""
    a = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WIDTH
    start = tl.load(bounds_ptr + a)
    end = tl.load(bounds_ptr + a + 1)
    t_lo = start // TILE_M
    t_hi = tl.where(end > start, (end - 1) // TILE_M + 1, t_lo)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        acc += tl.load(part_ptr + (t + a).to(tl.int64) * WIDTH + offs, mask=mask, other=0.0)
    tl.store(out_ptr + a.to(tl.int64) * WIDTH + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _dropout_args(scale, dropout_p, seed, ids):
    """(DROPOUT, p pointer, seed pointer): stand-ins where there is no dropout (never read)."""
    if dropout_p is None:
        return False, scale, ids
    return True, dropout_p, seed


def multi_forward(x, weight, bias, A, B, scale, dropout_p, seed, ids, perm, *, save_xs=True, path="tiled"):
    """y = x @ weightᵀ + bias + xs @ B[ids]ᵀ row by row, xs = scale[ids] · (keep ⊙ x) @ A[ids]ᵀ (0 where
    ids is -1); returns (y, xs), xs (M, R) in x.dtype for backward or None unless save_xs.

    x (M, K) and weight (N, K) of any strides, bias (N,) any stride or None; A (n, R, K) and B
    (n, N, R) contiguous stacks in x.dtype, zero-padded to R <= 64; scale (n,) fp32, scaling[a] /
    (1 - p[a]); dropout_p (n,) fp32 or None, seed a 1-element int64 tensor with it; ids (M,) int32
    in [-1, n); perm (M,) int32 the rows stably sorted by ids, or None when ids is non-decreasing.
    path: "tiled" (one launch), or "split_k" for M <= configs.SPLIT_K_MAX_M (two). M = 0 launches
    nothing."""
    M, K = x.shape
    n, N, R = B.shape
    y = empty(x, M, N)
    xs = empty(x, M, R) if save_xs else None
    if M == 0:
        return y, xs
    dropout, p_arg, seed_arg = _dropout_args(scale, dropout_p, seed, ids)
    precision = input_precision(x.dtype)
    perm_arg, xs_arg, bias_ptr = optional(perm, ids), optional(xs, y), bias_arg(bias, y)
    block_r = configs.block_r(R)
    if path == "split_k":
        block_m, block_n, split, k_per_split = configs.split_k_plan(M, N, K, configs.split_k_target_programs(x.device))
        part = empty(x, split * M, N, torch.float32)
        xa_part = empty(x, split * M, R, torch.float32)
        tiles = cdiv(M, block_m) * cdiv(N, block_n)
        launch(_multi_split_k_partial_kernel, (tiles, split), x)(
            x, weight, A, part, xa_part, seed_arg, ids, perm_arg, p_arg,
            M, N, K, R, configs.m_bucket(M), split, k_per_split,
            *strides(x), *strides(weight), *A.stride(),
            DROPOUT=dropout, PERM=perm is not None, INPUT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        )
        launch(_multi_split_k_reduce_kernel, (tiles,), x)(
            part, xa_part, B, bias_ptr, xs_arg, y, ids, perm_arg, scale,
            M, N, R, split,
            *B.stride(), *strides(xs_arg), *strides(y),
            HAS_BIAS=bias is not None, STORE_XS=xs is not None, PERM=perm is not None,
            INPUT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
            num_warps=configs.SPLIT_K_REDUCE_WARPS,
        )
        return y, xs
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    launch(_multi_forward_kernel, grid, x)(
        x, weight, bias_ptr, A, B, xs_arg, y, seed_arg, ids, perm_arg, scale, p_arg,
        M, N, K, R, configs.m_bucket(M),
        *strides(x), *strides(weight), *A.stride(), *B.stride(), *strides(xs_arg), *strides(y),
        HAS_BIAS=bias is not None, DROPOUT=dropout, STORE_XS=xs is not None, PERM=perm is not None,
        INPUT_PRECISION=precision, BLOCK_R=block_r,
    )
    return y, xs


def multi_backward(dy, x, xs, weight, A, B, scale, dropout_p, seed, ids, perm, *,
                   need_dx=True, need_da=True, need_db=True):
    """Gradients (dX, dA, dB) of multi_forward with W0 frozen; None for those not asked. dy (M, N),
    x (M, K), xs (M, R) the forward's (needed for dB only) and weight of any strides; the other
    arguments as multi_forward's (the same dropout_p and seed: the keep-mask is regenerated). dA
    (n, R, K) and dB (n, N, R) come back in A's dtype, reduced in fp32 in a fixed order, zero for
    adapters without rows. One GEMM launch and one reducer launch per LoRA gradient asked."""
    M, N = dy.shape
    n, R, K = A.shape
    dx = empty(dy, M, K) if need_dx else None
    if M == 0:
        return dx, torch.zeros_like(A) if need_da else None, torch.zeros_like(B) if need_db else None
    if not (need_dx or need_da or need_db):
        return None, None, None
    dropout, p_arg, seed_arg = _dropout_args(scale, dropout_p, seed, ids)
    precision = input_precision(dy.dtype)
    block_m = configs.partial_block_m(M, True, precision)
    slots = cdiv(M, block_m) + n - 1              # slot t + a <= (tiles - 1) + (n - 1)
    da_part = torch.empty((slots, R, K), device=dy.device, dtype=torch.float32) if need_da else None
    db_part = torch.empty((slots, N, R), device=dy.device, dtype=torch.float32) if need_db else None
    dx_arg = optional(dx, dy)
    cols = lambda meta: cdiv(K, meta["BLOCK_K"]) if need_dx or need_da else 1
    launch(_multi_backward_kernel, lambda meta: (cdiv(M, block_m) * cols(meta),), dy)(
        dy, weight, A, B, x, optional(xs, dy), dx_arg, optional(da_part, dy), optional(db_part, dy), seed_arg,
        ids, optional(perm, ids), scale, p_arg,
        M, N, K, R, configs.m_bucket(M),
        *strides(dy), *strides(weight), *A.stride(), *B.stride(), *strides(x), *strides(xs), *strides(dx_arg),
        DROPOUT=dropout, COMPUTE_DX=need_dx, COMPUTE_DA=need_da, COMPUTE_DB=need_db, PERM=perm is not None,
        INPUT_PRECISION=precision, BLOCK_M=block_m, BLOCK_R=configs.block_r(R),
    )
    da = db = None
    if need_da or need_db:
        # adapter a's rows are sorted positions bounds[a] .. bounds[a + 1]
        sorted_ids = ids if perm is None else ids.index_select(0, perm)
        bounds = torch.searchsorted(sorted_ids, torch.arange(n + 1, device=ids.device, dtype=ids.dtype),
                                    out_int32=True)
        da = _reduce(da_part, bounds, A, block_m) if need_da else None
        db = _reduce(db_part, bounds, B, block_m) if need_db else None
    return dx, da, db


def _reduce(part, bounds, like, tile_m):
    """like-shaped (n, ...) sums of the partial slots, in like's dtype (the reducer)."""
    out = torch.empty(like.shape, device=like.device, dtype=like.dtype)
    width = out[0].numel()
    launch(_multi_reduce_kernel, (out.shape[0], cdiv(width, configs.MULTI_REDUCE_BLOCK)), part)(
        part, out, bounds, width, tile_m, BLOCK=configs.MULTI_REDUCE_BLOCK, num_warps=configs.MULTI_REDUCE_WARPS)
    return out
