"""Block sizes, autotune configs and path heuristics for every lora_fast kernel, in one place.

Nothing here has been tuned on a GPU yet (see bench/NOTES.md): the GPU lists are the
standard Hopper/Ampere GEMM tiles (128x128x64 / 128x256x64, 3-4 stages, 4-8 warps) that
Triton's matmul tutorial and cuBLAS heuristics settle on for bf16, pruned so that every
main-path config has BLOCK_M >= 64 (a Hopper warpgroup MMA needs 64 rows per warpgroup).
Under the interpreter (TRITON_INTERPRET=1) every kernel gets a single small config: the
interpreter runs programs one by one in numpy, so small tiles keep tests fast, and tiles
smaller than the test shapes make every mask, tail and cross-program reduction run.
"""
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Ridge point of an H100 in bf16: ~700 TFLOP/s (dense, achievable) / ~3 TB/s ~= 230 FLOP/byte.
# A GEMM with M rows has arithmetic intensity ~M, so for M up to about this it is bound by
# reading W0, and the r/BLOCK_N extra MMA work of computing x·Aᵀ inside the main loop is free,
# while a separate first pass costs a launch (~4 us on a ~10 us decode GEMM). Above it the GEMM
# is compute-bound and the first pass (one extra read of x, ~M·K·2 bytes) is cheaper than the
# redundant MMA work. Full arithmetic in bench/NOTES.md; issue 8 replaces this with measurement.
IN_LOOP_MAX_M = 256
# The in-loop variants keep the whole rank in registers next to the main accumulator.
IN_LOOP_MAX_R = 64
# Rank chunk for epilogues and the skinny kernel: a [BLOCK_M, 64] fp32 tile is 32 KB of
# registers per 128 rows, beside a 64 KB main accumulator; larger r loops over chunks.
MAX_BLOCK_R = 64


def next_power_of_2(n):
    """triton.next_power_of_2 for an int n >= 1 without its call overhead (~6 us a call in Triton
    3.9, a few of them per launch: the whole budget of a decode step); a symbolic size (torch.compile
    with dynamic shapes) goes to Triton's."""
    if type(n) is int:
        return 1 << (n - 1).bit_length()
    return triton.next_power_of_2(n)


def cdiv(a, b):
    """Ceiling division, for ints and symbolic sizes alike, written as triton.cdiv is (whose call
    costs as much as next_power_of_2's)."""
    return (a + b - 1) // b


def block_r(r):
    """Rank tile: tl.dot needs every dimension >= 16, so r < 16 is padded (masked) to 16."""
    return min(MAX_BLOCK_R, max(16, next_power_of_2(r)))


def m_bucket(m):
    """Autotune key for M: one tuning per power of two, not one per sequence length. A symbolic M
    (torch.compile with dynamic shapes) is returned as it is: a traced launch has no key (inductor
    tunes once per compiled graph), and the kernel gets a size, not an expression of bit operations
    on one; keep_forward_config's `M_BUCKET <= 32` holds exactly when M <= 32 all the same."""
    if not isinstance(m, int):
        return m
    return next_power_of_2(max(m, 1))


def partial_block_m(m, fused=False):
    """BLOCK_M of the kernels that write one partial sum per M-tile (dA, dB reductions).

    Fixed by the launcher, not autotuned, because the partial buffer (grid_m rows) is
    allocated before the launch. 128 rows halves the partial buffer against 64 while still
    giving a Hopper warpgroup MMA its 64-row minimum twice over. The fused backward holds gs
    and the dB operands beside its dX accumulator: at 128 rows it spilled on sm_80 (AOT report,
    bench/NOTES.md), and it only runs for M <= IN_LOOP_MAX_M, where 64 rows lose nothing.
    """
    if INTERPRET:
        return 16
    return min(64 if fused else 128, max(16, next_power_of_2(m)))


def _config(bm, bn, bk, stages, warps, group_m=8):
    kw = {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}
    if bm is not None:
        kw["BLOCK_M"] = bm
    return triton.Config(kw, num_stages=stages, num_warps=warps)


def device_capability():
    """Major compute capability of the current CUDA device (0 when there is none)."""
    import torch
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


# Opt-in shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_MEMORY = {8: 166912, 9: 232448}


def fits_registers(rows, cols, num_warps, capability, dropout=False):
    """Whether a (rows x cols) fp32 accumulator leaves the rest of the kernel room in 255
    registers/thread. From `python -m lora_fast.aot --all-configs` (bench/NOTES.md, v1): 64
    accumulator values per thread never spilled; 128 spilled everywhere on sm_80 (mma.sync keeps
    operand fragments in registers too) and with 4 warps on sm_90, but not with 8 warps on sm_90,
    where wgmma reads its operands from shared memory (the 128x256 Hopper tile). With dropout the
    Philox draws for a tile of the same shape need about as much again: 32 per thread never
    spilled, 64 did (up to 2.5 KB of stack on sm_80)."""
    per_thread = rows * cols // (32 * num_warps)
    if dropout:
        return per_thread <= 32
    limit = 128 if capability >= 9 and num_warps == 8 else 64
    return per_thread <= limit


def fits_shared_memory(stages, tile_elements, itemsize, capability):
    """Whether the pipelined operand tiles fit shared memory. The AOT builds hold `stages` copies
    of the K-step's tiles on sm_90 and `stages - 1` on sm_80 (fp32 128x128x64 at 4 stages needs
    256 KB on sm_90: pruned there)."""
    buffers = stages if capability >= 9 else stages - 1
    return buffers * tile_elements * itemsize <= SHARED_MEMORY[9 if capability >= 9 else 8]


def _launch_arg(name, named_args, kwargs):
    """A launch argument as early_config_prune receives it: the positional ones in named_args,
    the constexprs the launchers pass by keyword in kwargs."""
    return kwargs[name] if name in kwargs else named_args[name]


def forward_configs():
    """Configs for the fused forward GEMM (tiles of y: BLOCK_M x BLOCK_N, reduction BLOCK_K)."""
    if INTERPRET:
        return [_config(16, 32, 32, 1, 4)]
    big = [_config(bm, bn, 64, s, w)
           for bm, bn, w in ((128, 128, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4), (128, 256, 8))
           for s in (3, 4)]
    decode = [_config(bm, bn, 64, 4, 4) for bm in (16, 32) for bn in (32, 64, 128)]
    return big + decode


def keep_forward_config(configs, named_args, capability=None, **kwargs):
    """Prune: decode tiles (BLOCK_M < 64) only for M <= 32, GEMM tiles only above; and only tiles
    whose accumulator fits the registers and whose pipeline fits shared memory on this device."""
    if INTERPRET:
        return configs
    cap = device_capability() if capability is None else capability
    m = _launch_arg("M_BUCKET", named_args, kwargs)
    itemsize = _launch_arg("x_ptr", named_args, kwargs).element_size()
    rank = _launch_arg("BLOCK_R", named_args, kwargs) if _launch_arg("XS_IN_LOOP", named_args, kwargs) else 0
    dropout = _launch_arg("DROPOUT", named_args, kwargs)
    decode = bool(m <= 32)   # a plain bool: on a symbolic M, bool == SymBool would fail in sympy
    # Decode tiles with fp32 (tf32) operands and the in-loop dropout draw: 32 accumulator values
    # per thread spilled (32x128 with 4 warps: 24 B of stack on sm_80, 88 B on sm_90, `python -m
    # lora_fast.aot --all-configs`), 16 did not; the 64x64 GEMM tile at 32 did not spill either.
    tight = dropout and itemsize == 4
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if ((bm < 64) == decode and fits_registers(bm, bn, c.num_warps, cap, dropout)
                and not (tight and bm < 64 and bm * bn // (32 * c.num_warps) > 16)
                and fits_shared_memory(c.num_stages, bk * (bm + bn + rank), itemsize, cap)):
            kept.append(c)
    return kept


def backward_configs():
    """Configs for the dX GEMM (tiles of dX: BLOCK_M x BLOCK_K, reduction over N in BLOCK_N).
    BLOCK_M is set by the launcher (partial_block_m)."""
    if INTERPRET:
        return [_config(None, 32, 32, 1, 4)]
    return [_config(None, bn, bk, s, w)
            for bk, w in ((64, 4), (64, 8), (128, 8)) for bn in (32, 64) for s in (3, 4)]


def keep_backward_config(configs, named_args, capability=None, **kwargs):
    if INTERPRET:
        return configs
    cap = device_capability() if capability is None else capability
    bm = _launch_arg("BLOCK_M", named_args, kwargs)
    itemsize = _launch_arg("dy_ptr", named_args, kwargs).element_size()
    rank = _launch_arg("BLOCK_R", named_args, kwargs) if _launch_arg("G_IN_LOOP", named_args, kwargs) else 0
    dropout = _launch_arg("DROPOUT", named_args, kwargs)
    return [c for c in configs
            if fits_registers(bm, c.kwargs["BLOCK_K"], c.num_warps, cap, dropout)
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_N"] * (bm + c.kwargs["BLOCK_K"] + rank),
                                   itemsize, cap)]


def skinny_configs():
    """Configs for the skinny (M x L) @ (L x r) pass; BLOCK_M is set by the launcher.
    Memory-bound: wide BLOCK_L for long contiguous loads, enough stages to keep them in flight."""
    if INTERPRET:
        return [triton.Config({"BLOCK_L": 32}, num_stages=1, num_warps=4)]
    return [triton.Config({"BLOCK_L": bl}, num_stages=s, num_warps=w)
            for bl in (64, 128) for s in (3, 4) for w in (4, 8)]


def keep_skinny_config(configs, named_args, capability=None, **kwargs):
    """Pipelines that fit shared memory; with the dB partial the src tile is also transposed into an
    MMA operand, which at 128 values per thread spilled in fp32 on sm_80 and sm_90 (AOT report) and
    at 64 never did; with dropout the Philox draws for the src tile need 32."""
    if INTERPRET:
        return configs
    cap = device_capability() if capability is None else capability
    bm = _launch_arg("BLOCK_M", named_args, kwargs)
    rank = _launch_arg("BLOCK_R", named_args, kwargs)
    itemsize = _launch_arg("src_ptr", named_args, kwargs).element_size()
    partial = _launch_arg("WITH_PARTIAL", named_args, kwargs)
    dropout = _launch_arg("DROPOUT", named_args, kwargs)
    per_thread = 32 if dropout else 64    # src values per thread; the dropout draws need room too
    return [c for c in configs
            if fits_shared_memory(c.num_stages, c.kwargs["BLOCK_L"] * (bm + rank), itemsize, cap)
            and (not (partial or dropout) or bm * c.kwargs["BLOCK_L"] // (32 * c.num_warps) <= per_thread)]


# Split-K decode forward (splitk.py): M up to this, the rank in one tile.
SPLIT_K_MAX_M = 64
# Column tile of y; fixed (not tuned) because the number of splits is chosen from the tile count.
SPLIT_K_BLOCK_N = 16 if INTERPRET else 64
# Each split covers a multiple of this many K (a multiple of every tuned BLOCK_K), at least once.
SPLIT_K_GRANULE = 32 if INTERPRET else 256
_SM_COUNT = {}


def sm_count(device):
    """Streaming multiprocessors of a CUDA device (cached); None under the interpreter or on CPU."""
    if device.type != "cuda" or INTERPRET:
        return None
    index = device.index if device.index is not None else 0
    if index not in _SM_COUNT:
        import torch
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def split_k_target_programs(device):
    """About two programs per SM on a GPU; 8 under the interpreter, so small test shapes split too."""
    sms = sm_count(device)
    return 2 * sms if sms else 8


def split_k_plan(m, n, k, programs, block_n=SPLIT_K_BLOCK_N, granule=SPLIT_K_GRANULE):
    """(BLOCK_M, BLOCK_N, splits, K per split) of the split-K forward: enough splits for `programs`
    programs, none of them empty, each a whole number (>= 1) of `granule`s of K."""
    block_m = max(16, next_power_of_2(m))
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    splits = max(1, min(cdiv(programs, tiles), cdiv(k, granule)))
    k_per_split = cdiv(cdiv(k, splits), granule) * granule
    return block_m, block_n, cdiv(k, k_per_split), k_per_split


def split_k_configs():
    """The partial kernel's K step and pipeline (its tile is split_k_plan's): memory-bound, so deep
    pipelines of wide K steps."""
    if INTERPRET:
        return [triton.Config({"BLOCK_K": 16}, num_stages=1, num_warps=4)]
    return [triton.Config({"BLOCK_K": bk}, num_stages=s, num_warps=w)
            for bk in (64, 128) for s in (3, 4) for w in (4, 8)]


def keep_split_k_config(configs, named_args, capability=None, **kwargs):
    """Pipelines that fit shared memory, accumulators that fit registers (the fp32 + dropout cap of
    the decode tiles, keep_forward_config's, included). With dropout the x tile is drawn too: at
    64x128 it used 254-255 registers everywhere and spilled 16-32 B with 8 warps on sm_80 (and fp32
    on sm_90); at 64x64 at most 238, no spill (AOT report) — so at most 64x64 with dropout."""
    if INTERPRET:
        return configs
    cap = device_capability() if capability is None else capability
    bm = _launch_arg("BLOCK_M", named_args, kwargs)
    bn = _launch_arg("BLOCK_N", named_args, kwargs)
    rank = _launch_arg("BLOCK_R", named_args, kwargs)
    itemsize = _launch_arg("x_ptr", named_args, kwargs).element_size()
    dropout = _launch_arg("DROPOUT", named_args, kwargs)
    tight = dropout and itemsize == 4
    return [c for c in configs
            if fits_registers(bm, bn, c.num_warps, cap, dropout)
            and not (tight and bm * bn // (32 * c.num_warps) > 16)
            and not (dropout and bm * c.kwargs["BLOCK_K"] > 64 * 64)
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_K"] * (bm + bn + rank), itemsize, cap)]


def persistent_programs(device):
    """Programs of a persistent kernel: one per SM (3 under the interpreter, so that test shapes
    give each program several tiles)."""
    return sm_count(device) or 3


def tma_configs(pre_hook):
    """The TMA forward's tiles: Hopper GEMM tiles (a 64-row warpgroup MMA per warpgroup), 8 warps
    for the 128-row ones; `pre_hook` gives the descriptors each config's block shape."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                              num_stages=1, num_warps=4, pre_hook=pre_hook)]
    shapes = [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (128, 128, 128, 3, 8),
              (64, 128, 64, 4, 4), (64, 256, 64, 3, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=s, num_warps=w, pre_hook=pre_hook) for bm, bn, bk, s, w in shapes]


def keep_tma_config(configs, named_args, capability=None, **kwargs):
    """Accumulators that fit the registers and pipelines that fit shared memory (the epilogue's xs
    and B tiles are loaded once per tile, outside the pipelined loop)."""
    if INTERPRET:
        return configs
    cap = device_capability() if capability is None else capability
    return [c for c in configs
            if fits_registers(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, cap)
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]),
                                   2, cap)]


def backward_tma_configs(pre_hook):
    """The TMA dX kernel's tiles of dX (BLOCK_M x BLOCK_K, BLOCK_M the launcher's 128) and its
    reduction step BLOCK_N; `pre_hook` gives the descriptors each config's block shape."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_stages=1, num_warps=4,
                              pre_hook=pre_hook)]
    # 128x64 tiles with 8 warps: with dropout (32 accumulator values per thread, fits_registers)
    # nothing wider is kept
    shapes = [(64, 128, 3, 8), (64, 128, 4, 8), (128, 128, 3, 8), (64, 64, 4, 4), (64, 64, 4, 8),
              (128, 64, 3, 8)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w,
                          pre_hook=pre_hook) for bn, bk, s, w in shapes]


def keep_backward_tma_config(configs, named_args, capability=None, **kwargs):
    """dX accumulators of at most 64 fp32 values per thread (32 with the dropout draw) and pipelines
    that fit shared memory. Not fits_registers' 128 for 8-warp Hopper tiles: this epilogue holds
    the gs·A product, the x tile and the dA operands beside the accumulator, and the 128x256 tile
    spilled 280 B on sm_90 (AOT report); 64 per thread used at most 248 registers, no spill."""
    if INTERPRET:
        return configs
    cap = device_capability() if capability is None else capability
    bm = _launch_arg("BLOCK_M", named_args, kwargs)
    dropout = _launch_arg("DROPOUT", named_args, kwargs)
    return [c for c in configs
            if bm * c.kwargs["BLOCK_K"] // (32 * c.num_warps) <= (32 if dropout else 64)
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_N"] * (bm + c.kwargs["BLOCK_K"]), 2, cap)]
