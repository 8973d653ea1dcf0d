"""Block sizes, autotune configs, tuning keys and path heuristics for every lora_fast kernel, in one
place.

Nothing here has been timed on a GPU yet (see bench/NOTES.md). The GPU lists are the standard
Hopper/Ampere GEMM tiles (128x128x64 / 128x256x64, 3-4 stages, 4-8 warps) that Triton's matmul
tutorial and cuBLAS heuristics settle on for bf16, cut to two or three per kernel and shape class
(a class is the BLOCK_M the rows call for: 16, 32 or 64 up to 64 rows, 128 above) so that a first step
compiles and times few of them (`python -m bench.tuning`: counts per kernel, bench/NOTES.md v7),
each kept only where `python -m lora_fast.aot --all-configs` builds it without a spill on sm_80 and
sm_90 under Triton 3.6 and 3.9 (LIMITS and the pruners below). Each list is ordered by prediction,
best first: the first config a pruner keeps for large M (decode rows for split-K) is the main tile
the AOT report builds (`python -m lora_fast.aot`), and a key whose pruner keeps one config runs it
untimed (kernels/tuning.py).

Tuning keys: Triton's autotuner keys its cache on the `key` arguments plus the argument dtypes, and
reuses a tuned config for every launch with the same key, without pruning again. So each key below
names every launch-time value its pruner reads (the path constexprs, BLOCK_M where the launcher
sets it, the rank tile, the fp32 precision): otherwise a tile tuned for one path would be run by
another whose pruner forbids it (`python -m bench.tuning` found 154 such keys on sm_90 before,
over the model step, the Llama-3-8B grid and the test shapes; tests/test_tuning.py holds it at none).

Under the interpreter (TRITON_INTERPRET=1) every kernel gets a single small config: the
interpreter runs programs one by one in numpy, so small tiles keep tests fast, and tiles smaller
than the test shapes make every mask, tail and cross-program reduction run.
"""
from collections import namedtuple

import triton

from .launch import INTERPRET, cdiv, device_capability, next_power_of_2, sm_count

# Ridge point in dense bf16 (datasheet peaks): 989 TFLOP/s / 3.35 TB/s ~= 295 FLOP/byte on an H100,
# 989 / 4.8 ~= 206 on the H200 the GPU sessions use (bench/NOTES.md, the same numbers).
# A GEMM with M rows has arithmetic intensity ~M, so for M up to about this it is bound by
# reading W0, and the r/BLOCK_N extra MMA work of computing x·Aᵀ inside the main loop is free,
# while a separate first pass costs a launch (~4 us on a ~10 us decode GEMM). Above it the GEMM
# is compute-bound and the first pass (one extra read of x, ~M·K·2 bytes) is cheaper than the
# redundant MMA work. Full arithmetic in bench/NOTES.md; the dispatcher measures it on a GPU and
# uses this only where nothing can be timed.
IN_LOOP_MAX_M = 256
# The in-loop variants keep the whole rank in registers next to the main accumulator.
IN_LOOP_MAX_R = 64
# Rank chunk for epilogues and the skinny kernel: a [BLOCK_M, 64] fp32 tile is 32 KB of
# registers per 128 rows, beside a 64 KB main accumulator; larger r loops over chunks.
MAX_BLOCK_R = 64
# The dispatcher times in_loop/fused only up to this many rows: above IN_LOOP_MAX_M they are predicted
# to lose (r/BLOCK_N redundant MMA work, 12.5% at r=16) and every candidate a first step times costs
# compiles; the margin up to 1024 is for the GPU measurement to confirm or move (bench/NOTES.md v7).
IN_LOOP_CANDIDATE_MAX_M = 1024


def block_r(r):
    """Rank tile: tl.dot needs every dimension >= 16, so r < 16 is padded (masked) to 16."""
    return min(MAX_BLOCK_R, max(16, next_power_of_2(r)))


def m_bucket(m):
    """Autotune key for M: one tuning per power of two, not one per sequence length. A symbolic M
    (torch.compile with dynamic shapes) is returned as it is: a traced launch has no key (inductor
    tunes once per compiled graph), and the kernel gets a size, not an expression of bit operations
    on one; the pruners' comparisons of M_BUCKET hold for M itself all the same."""
    if not isinstance(m, int):
        return m
    return next_power_of_2(max(m, 1))


def partial_block_m(m, fused=False, precision="tf32"):
    """BLOCK_M of the kernels that write one partial sum per M-tile (dA, dB reductions).

    Fixed by the launcher, not autotuned, because the partial buffer (grid_m rows) is
    allocated before the launch. 128 rows halves the partial buffer against 64 while still
    giving a Hopper warpgroup MMA its 64-row minimum twice over. The fused backward holds gs
    and the dB operands beside its dX accumulator: at 128 rows it spilled on sm_80 (AOT report,
    bench/NOTES.md), and it only runs for small M, where 64 rows lose nothing. fp32 with "ieee"
    dots (FMAs: the operand fragments live in registers) spilled at 64 and 128 rows with the
    dropout draw (8-1016 B, AOT report), at 32 never: 32 rows.
    """
    if INTERPRET:
        return 16
    cap = 32 if precision == "ieee" else 64 if fused else 128
    return min(cap, max(16, next_power_of_2(m)))


def row_class(m):
    """BLOCK_M of the GEMM tiles for M rows (its power-of-two bucket): 16, 32 or 64 (decode: a tile
    no taller than the rows), 128 above 64 rows (a Hopper warpgroup MMA per 64 rows). The class
    edges are those the paths already have (split-K and TMA change at 64, the in-loop crossover at
    256), so a torch.compile graph with a dynamic M guards on no new ones. A symbolic M is compared
    as it is (a plain bool: bool == SymBool would fail in sympy)."""
    if bool(m <= 16):
        return 16
    if bool(m <= 32):
        return 32
    return 64 if bool(m <= 64) else 128


# Opt-in shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_MEMORY = {8: 166912, 9: 232448}


def fits_shared_memory(stages, tile_elements, itemsize, capability):
    """Whether the pipelined operand tiles fit shared memory. The AOT builds hold `stages` copies
    of the K-step's tiles on sm_90 and `stages - 1` on sm_80 (fp32 128x128x64 at 4 stages needs
    256 KB on sm_90: pruned there)."""
    buffers = stages if capability >= 9 else stages - 1
    return buffers * tile_elements * itemsize <= SHARED_MEMORY[9 if capability >= 9 else 8]


def values_per_thread(rows, cols, num_warps):
    """fp32 values per thread of a (rows x cols) register tile spread over num_warps warps: the
    measure of register pressure in LIMITS."""
    return rows * cols // (32 * num_warps)


# A config of one of `kernels` launched where `when` holds (each named fact equal: fp32 operands, ieee
# dots, dropout, in_loop (XS_IN_LOOP), partial (WITH_PARTIAL), hopper (sm_90 and later), decode
# (BLOCK_M <= 32), warps) must meet every bound given. Its tile is BLOCK_M x cols: BLOCK_N of y
# (forward, split-K, TMA), BLOCK_K of dX (backward, TMA backward), BLOCK_L of the skinny pass's src;
# max_per_thread bounds its values_per_thread; the step is its reduction tile (BLOCK_K; BLOCK_N of dX).
Limit = namedtuple("Limit", "kernels when max_per_thread max_cols max_step min_step warps",
                   defaults=({}, None, None, None, None, None))

GEMMS = ("forward", "backward", "split_k", "tma")
# Register limits, from `python -m lora_fast.aot --all-configs` (bench/NOTES.md, "Static check" and
# v7; a stack frame is a spill): a config meets every row its launch matches. The lists hold 4- and
# 8-warp configs only.
LIMITS = (
    # 64 accumulator values per thread never spilled; 128 spilled everywhere on sm_80 (mma.sync keeps
    # operand fragments in registers too) and with 4 warps on sm_90, but not with 8 warps on sm_90,
    # where wgmma reads its operands from shared memory (the 128x256 Hopper tile)
    Limit(GEMMS, max_per_thread=128),
    Limit(GEMMS, dict(hopper=False), max_per_thread=64),
    Limit(GEMMS, dict(warps=4), max_per_thread=64),
    # the Philox draws for a tile of the same shape need about as much again: 32 per thread never
    # spilled, 64 did (up to 2.5 KB of stack on sm_80); the skinny pass draws for its src tile
    Limit(GEMMS + ("skinny", "backward_tma"), dict(dropout=True), max_per_thread=32),
    # forward decode tiles, fp32 operands and the in-loop dropout draw: 32 spilled (32x128 with 4
    # warps: 24 B on sm_80, 88 B on sm_90), 16 did not, except 16x128 under Triton 3.6 on sm_80
    # (64 B): 64 columns; the 64x64 GEMM tile at 32 did not spill
    Limit(("forward",), dict(fp32=True, dropout=True, decode=True), max_per_thread=16, max_cols=64),
    # fp32 (tf32) in-loop tiles with 4 warps: 64 beside the x·Aᵀ accumulator spilled 8 B on sm_80
    # under Triton 3.6 (64x128); 32 did not, nor did 64 with 8 warps
    Limit(("forward",), dict(fp32=True, ieee=False, in_loop=True, warps=4), max_per_thread=32),
    # with the dB partial the src tile is also transposed into an MMA operand: 128 per thread spilled
    # in fp32 on sm_80 and sm_90, 64 never
    Limit(("skinny",), dict(partial=True), max_per_thread=64),
    # fp32 (tf32) decode rows: 128-wide steps at 32 rows spilled 8 B on sm_90 (72 registers: ptxas's
    # choice, not pressure; Triton 3.6 and 3.9 alike)
    Limit(("skinny",), dict(fp32=True, decode=True), max_cols=64),
    # split-K with fp32 (tf32) operands and dropout: the forward decode tiles' 16 per thread
    Limit(("split_k",), dict(fp32=True, ieee=False, dropout=True), max_per_thread=16),
    # with dropout the x tile is drawn too: 64x128 used 254-255 registers everywhere and spilled 16-32 B
    # with 8 warps on sm_80 (and fp32 on sm_90), 128-wide steps 56-80 B at 32 rows; 64x64 at most 238
    # registers, no spill
    Limit(("split_k",), dict(dropout=True), max_step=64),
    # decode rows, 16-bit, no dropout: 64-wide K steps spilled 8-16 B (sm_80 under Triton 3.9, sm_90
    # under 3.6, 96 registers); 128-wide did not (a dense W0: the 4-bit tiles are NF4_SPLIT_K_TILES')
    Limit(("split_k",), dict(fp32=False, dropout=False, decode=True, nf4=False), min_step=128),
    # 4-bit W0 (NF4_SPLIT_K_TILES) with dropout on sm_90: 32 decode rows with 64-wide K steps spilled
    # 24 B under Triton 3.9 (16 and 64 rows did not); 32-wide steps are the decode rows' tile there
    Limit(("split_k",), dict(nf4=True, dropout=True, hopper=True, decode=True), max_step=32),
    # ieee (FMA) tiles: of those tried (both Triton versions, with and without dropout) only these
    # spilled nowhere: 8 warps and 2 stages up to 32 rows, 4 warps at 64; except with dropout on
    # sm_90, where 16 rows with 8 warps spilled 4 B under Triton 3.9 (64 registers: ptxas's choice
    # under Triton's --regAllocOptLevel=2, not pressure; after the 4-bit statistics pointers joined
    # the kernel's arguments) and the 4-warp tile did not (80-126 registers, both versions, both
    # split-K kernels, 16 and 32 rows; 2026-12-03)
    Limit(("split_k",), dict(ieee=True, decode=True, hopper=False), warps=8),
    Limit(("split_k",), dict(ieee=True, decode=True, hopper=True, dropout=False), warps=8),
    Limit(("split_k",), dict(ieee=True, decode=True, hopper=True, dropout=True), warps=4),
    Limit(("split_k",), dict(ieee=True, decode=False), warps=4),
    # The mixed-batch kernels (multi.py), beside the GEMM rows above: the other adapters' low-rank
    # passes hold a second x·Aᵀ (gs) tile and, with dropout, draw again (`python -m lora_fast.aot
    # --all-configs`, Triton 3.6 and 3.9, 2026-12-02). Forward: 16- and 32-row tiles 128 wide spilled
    # (fp32 (tf32) on sm_80, 16-bit with dropout on sm_90), 64 wide did not
    Limit(("multi_forward",), dict(decode=True), max_cols=64),
    # 128x128 with 8 warps spilled on sm_80 (16 B bf16, 152 B fp32), 128x64 did not
    Limit(("multi_forward",), dict(hopper=False, warps=8), max_per_thread=32),
    # fp32 (tf32) with dropout on sm_80: 16 per thread spilled with 4 warps (32x64), 32 with 8
    # (128x64); 8 and 16 did not (16x64; 64x64 and 128x32 with 8 warps: MULTI_FORWARD_FALLBACKS)
    Limit(("multi_forward",), dict(fp32=True, ieee=False, dropout=True, hopper=False, warps=4), max_per_thread=8),
    Limit(("multi_forward",), dict(fp32=True, ieee=False, dropout=True, hopper=False, warps=8), max_per_thread=16),
    # ieee tiles with dropout: 64x64 with 4 warps spilled on both archs, 32x64 and 64x64 with 8 did not
    Limit(("multi_forward",), dict(ieee=True, dropout=True, warps=4), max_per_thread=16),
    # Backward: on sm_80, 32 per thread spilled (64x128 with 8 warps, 64x64 with 4: every dtype), 16 not
    Limit(("multi_backward",), dict(hopper=False), max_per_thread=16),
    # fp32 (tf32) with dropout: 16 spilled (32x64 with 4 warps on both archs, 64x64 with 8 on sm_80);
    # 8 did not (64x32 and 32x32 with 8 warps: MULTI_BACKWARD_FALLBACKS)
    Limit(("multi_backward",), dict(fp32=True, ieee=False, dropout=True), max_per_thread=8),
    # ieee with dropout: 16x32 (BLOCK_K 32) spilled on both archs, 16x16 did not, but 32x16 with 4
    # warps did on sm_90 under Triton 3.6 (8 B), with 8 warps and 2 stages nowhere
    Limit(("multi_backward",), dict(ieee=True, dropout=True), max_cols=16),
    Limit(("multi_backward",), dict(ieee=True, dropout=True, warps=4), max_per_thread=2),
    # Split-K partials: on sm_80 32 per thread spilled (64 rows with 4 warps: 8-16 B under Triton 3.6),
    # 16 not; with dropout 4 warps spilled (32 rows 16-bit on sm_80 under 3.9, 16 rows fp32 under 3.6),
    # 8 warps (64x64 steps) nowhere; the ieee tiles spilled nowhere
    Limit(("multi_split_k",), dict(hopper=False, ieee=False), max_per_thread=16),
    Limit(("multi_split_k",), dict(ieee=False, dropout=True), warps=8),
    # TMA dX: the epilogue holds the gs·A product, the x tile and the dA operands beside the
    # accumulator, so not the GEMMs' 128 for 8-warp Hopper tiles: 128x256 spilled 280 B on sm_90;
    # 64 per thread used at most 248 registers, no spill
    Limit(("backward_tma",), max_per_thread=64),
    # DoRA's column scale (COL_SCALE, `python -m lora_fast.aot --all-configs`, Triton 3.6 and 3.9,
    # 2026-12-03, bench/NOTES.md v16). Forward: the epilogue stores z beside y; the 8-warp Hopper
    # tiles at 128 per thread spilled 24 B (in-loop) and 48 B (TMA), 64 never
    Limit(("forward", "tma"), dict(col_scale=True), max_per_thread=64),
    # dX GEMM reading c ⊙ dY: fp32 (tf32) on sm_90, 64 per thread (128x64, 4 warps) spilled 32 B;
    # the fused one (gs in its N-loop) on sm_80, 16-bit: 64x128 with 8 warps spilled 8 B under Triton
    # 3.6 (255 registers; LoRA's build of that tile fits), 64 columns did not
    Limit(("backward",), dict(col_scale=True, in_loop=True, hopper=False), max_cols=64),
    Limit(("backward",), dict(col_scale=True, fp32=True), max_per_thread=32),
    # the split pass over dY with dm's z tile: fp32, 64 per thread spilled 120-472 B, 32 never
    Limit(("skinny",), dict(dm=True, fp32=True), max_per_thread=32),
    # PEFT's dropout form (PEFT_FORM: a second accumulator, 16-bit only): the in-loop forward's
    # 128-wide decode tiles spilled 312-432 B on both archs, 64-wide none
    Limit(("forward",), dict(peft_form=True, decode=True), max_cols=64),
    # the fused dX GEMM's second accumulator on sm_80: 64x64 with 8 warps spilled 8 B under Triton
    # 3.6 (255 registers), with 4 warps not
    Limit(("backward",), dict(peft_form=True, in_loop=True, hopper=False), warps=4),
)


def _facts(capability, itemsize, ieee, dropout, in_loop=False, partial=False, nf4=False, a=None):
    """The launch facts LIMITS rows are matched on (decode and warps come per config); a: the launch's
    arguments, for DoRA's constexprs (col_scale: COL_SCALE, dm: DM, peft_form: PEFT_FORM) where the
    kernel has them."""
    a = a or {}
    return {"hopper": capability >= 9, "fp32": itemsize == 4, "ieee": ieee, "dropout": bool(dropout),
            "in_loop": bool(in_loop), "partial": bool(partial), "nf4": bool(nf4),
            "col_scale": bool(a.get("COL_SCALE")), "dm": bool(a.get("DM")), "peft_form": bool(a.get("PEFT_FORM"))}


def _nf4(a):
    """Whether the launch reads a 4-bit W0 (WEIGHT "nf4" / "nf4_dq": blocks.nf4_tile)."""
    return a.get("WEIGHT", "dense") != "dense"


# The 4-bit kernels' tiles (WEIGHT "nf4"), one per tile class: 8 warps and 64x64 W0 tiles, i.e. 16
# decoded weights a thread beside the accumulator (blocks.nf4_tile holds the codes, the block
# indices, the absmax and both nibbles' values of its tile at once). From the dense lists' tiles
# 4-warp ones and 128-wide steps spilled 8-400 B on sm_80 and, under Triton 3.6, on sm_90 (decode
# tiles included), and fp32 64x128 dX tiles crashed both Triton versions' sm_90 layout pass
# (`python -m lora_fast.aot --all-configs`, bench/NOTES.md v12). Not tuned: one build per class
# until a GPU session times the decode against other tiles (bench/TODO.md); each candidate would
# cost the first step a compile, and CI's AOT check ~2.6 s a build (a dense one ~1.5).
NF4_FORWARD_TILES = ((16, 64, 64, 3, 8), (32, 64, 64, 3, 8), (64, 64, 64, 3, 8), (128, 64, 64, 3, 8))
NF4_BACKWARD_TILES = ((32, 64, 3, 8), (64, 64, 3, 8))        # (BLOCK_N, BLOCK_K, stages, warps)
NF4_SPLIT_K_TILES = ((64, 3, 8), (32, 3, 8))                # (BLOCK_K, stages, warps); 32: LIMITS


def _gemm_shape(c):
    return tuple(c.kwargs.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (c.num_stages, c.num_warps)


def _backward_shape(c):
    return (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)


def _split_k_shape(c):
    return (c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)


def _with_nf4_tiles(configs, tiles, shape, make):
    """A kernel's config list: the dense one and the 4-bit tiles it lacks (the interpreter: one config)."""
    if INTERPRET:
        return configs
    have = {shape(c) for c in configs}
    return configs + [make(t) for t in tiles if t not in have]


def _for_weight(configs, a, tiles, shape, dense):
    """The configs a launch chooses from: a 4-bit W0's tiles only, or for a dense W0 the dense list's
    (not the tiles only the 4-bit kernels have). Under the interpreter, the one config."""
    if INTERPRET and len(configs) == 1:
        return configs
    if _nf4(a):
        return [c for c in configs if shape(c) in tiles]
    return [c for c in configs if shape(c) in dense]


def _one_if_nf4(kept, a):
    """A 4-bit W0's launch: the first tile kept (one build per class, not tuned)."""
    return kept[:1] if _nf4(a) else kept


def _within_limits(kernels, facts, config, rows, cols, step):
    """Whether a config of `kernels` (a name or names: a mixed-batch kernel is its single-adapter
    kernel and itself; tile rows x cols, reduction step `step`) meets every LIMITS row its launch
    (facts) matches."""
    kernels = (kernels,) if isinstance(kernels, str) else kernels
    facts = {**facts, "decode": rows <= 32, "warps": config.num_warps}
    per_thread = values_per_thread(rows, cols, config.num_warps)
    for limit in LIMITS:
        if any(k in limit.kernels for k in kernels) and all(facts[k] == v for k, v in limit.when.items()):
            maxima = ((limit.max_per_thread, per_thread), (limit.max_cols, cols), (limit.max_step, step))
            if (any(bound is not None and value > bound for bound, value in maxima)
                    or step < (limit.min_step or 0) or limit.warps not in (None, config.num_warps)):
                return False
    return True


def _pruner(keep):
    """keep(configs, args, capability) as an early_config_prune(configs, named_args, capability=None,
    **kwargs): args are the launch arguments as the autotuner passes them (the positional ones in
    named_args, the launchers' keyword constexprs in kwargs), capability the caller's (the AOT report
    and bench.tuning pass theirs) or the device's. Under the interpreter at run time nothing is
    pruned (one config)."""
    def prune(configs, named_args, capability=None, **kwargs):
        if capability is None:
            if INTERPRET:
                return configs
            capability = device_capability()
        return keep(configs, {**named_args, **kwargs}, capability)
    prune.__name__, prune.__qualname__, prune.__doc__ = keep.__name__, keep.__qualname__, keep.__doc__
    return prune


def bench_config(kernel_call, quantiles):
    """How the autotuner times one config: Triton's do_bench with a 5 ms warm-up and 20 ms of
    repetitions (its default is 25 + 100 ms, ~125 ms a config: 27 s for a 0.9B model's first step,
    bench.tuning's count) — still dozens of runs of even a 300 us GEMM, enough to rank tiles whose
    times differ by more than a few percent."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _config(bm, bn, bk, stages, warps, group_m=8):
    kw = {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}
    if bm is not None:
        kw["BLOCK_M"] = bm
    return triton.Config(kw, num_stages=stages, num_warps=warps)


# ---------------------------------------------------------------------------------------------
# Forward GEMM (forward.py): tiles of y, BLOCK_M x BLOCK_N, reduction BLOCK_K.
# COL_SCALE (DoRA's epilogue, which also writes z) tunes apart: its tiles' register budgets differ
FORWARD_KEY = ["M_BUCKET", "N", "K", "R", "BLOCK_R", "XS_IN_LOOP", "DROPOUT", "INPUT_PRECISION", "WEIGHT",
               "COL_SCALE", "PEFT_FORM"]


def forward_kernel_configs():
    """forward.py's list: forward_configs() and the 4-bit tiles."""
    return _with_nf4_tiles(forward_configs(), NF4_FORWARD_TILES, _gemm_shape, lambda t: _config(*t))


def forward_configs():
    if INTERPRET:
        return [_config(16, 32, 32, 1, 4)]
    return [_config(bm, bn, bk, s, w) for bm, bn, bk, s, w in (
        (16, 64, 64, 4, 4), (16, 128, 64, 4, 4),       # decode: as many column tiles as possible
        (32, 64, 64, 4, 4), (32, 128, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),       # 33-64 rows: one 64-row warpgroup MMA
        (128, 128, 64, 3, 8), (128, 256, 64, 3, 8), (128, 64, 64, 3, 8),   # large; 128x64 holds the dropout draw
        # fp32 "ieee" (FMA dots, BLOCK_K 16 marks them): one tile per class; BLOCK_K 64 spilled up to
        # 7 KB (AOT report), 16 never; 32 rows at least (16-row ones spilled 8-16 B on sm_90)
        (32, 64, 16, 3, 4), (64, 64, 16, 3, 4), (128, 64, 16, 3, 8))]


@_pruner
def keep_forward_config(configs, a, cap):
    """The M bucket's row class (row_class; at least 32 rows for the ieee tiles), the ieee tiles for
    ieee dots only, LIMITS, and pipelines (x, W0 and with x·Aᵀ in the loop A tiles) that fit shared
    memory on this device."""
    dense = {_gemm_shape(c) for c in forward_configs()}
    return _one_if_nf4(_forward_kept(_for_weight(configs, a, NF4_FORWARD_TILES, _gemm_shape, dense), a, cap,
                                     "forward"), a)


def _forward_kept(configs, a, cap, kernels, ieee_max_rows=128):
    ieee = a["INPUT_PRECISION"] == "ieee"
    rows = min(ieee_max_rows, max(32, row_class(a["M_BUCKET"]))) if ieee else row_class(a["M_BUCKET"])
    itemsize = a["x_ptr"].element_size()
    rank = a["BLOCK_R"] if a["XS_IN_LOOP"] else 0
    # DoRA's PEFT dropout form draws the mask in the K-loop whether or not xs is computed there
    facts = _facts(cap, itemsize, ieee, a["DROPOUT"] or a.get("PEFT_FORM"), in_loop=a["XS_IN_LOOP"], nf4=_nf4(a),
                   a=a)
    return [c for c in configs
            if c.kwargs["BLOCK_M"] == rows and (c.kwargs["BLOCK_K"] == 16) == ieee
            and _within_limits(kernels, facts, c, rows, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_K"] * (rows + c.kwargs["BLOCK_N"] + rank),
                                   itemsize, cap)]


# ---------------------------------------------------------------------------------------------
# dX GEMM (backward.py): tiles of dX, BLOCK_M x BLOCK_K (BLOCK_M the launcher's partial_block_m),
# reduction over N in BLOCK_N.
BACKWARD_KEY = ["M_BUCKET", "N", "K", "R", "BLOCK_M", "BLOCK_R", "G_IN_LOOP", "DROPOUT", "COMPUTE_DX",
                "INPUT_PRECISION", "WEIGHT", "COL_SCALE", "PEFT_FORM"]


def backward_kernel_configs():
    """backward.py's list: backward_configs() and the 4-bit tiles."""
    return _with_nf4_tiles(backward_configs(), NF4_BACKWARD_TILES, _backward_shape, lambda t: _config(None, *t))


def backward_configs():
    if INTERPRET:
        return [_config(None, 32, 32, 1, 4)]
    return [_config(None, bn, bk, s, w) for bn, bk, s, w in (
        (64, 128, 3, 8), (64, 64, 4, 4),               # 64 accumulator values per thread at 128 rows
        (64, 64, 3, 8),                                # 32 at 128 rows: the dropout draw fits
        (32, 64, 4, 4),                                # decode rows: many programs over K
        (16, 32, 3, 4))]                               # fp32 "ieee" (BLOCK_N 16 marks it; <= 32 rows)


@_pruner
def keep_backward_config(configs, a, cap):
    """The tile class by its BLOCK_N (ieee, decode rows (BLOCK_M <= 32), the others), LIMITS, and
    pipelines (dY, W0 and with gs in the loop B tiles) that fit shared memory; the dA-only launch
    (no dX: the epilogue alone, no N-loop) gets one config, as its tiles do not change its work."""
    dense = {_backward_shape(c) for c in backward_configs()}
    return _one_if_nf4(_backward_kept(_for_weight(configs, a, NF4_BACKWARD_TILES, _backward_shape, dense), a, cap,
                                      "backward"), a)


def _backward_kept(configs, a, cap, kernels):
    bm = a["BLOCK_M"]
    itemsize = a["dy_ptr"].element_size()
    rank = a["BLOCK_R"] if a["G_IN_LOOP"] else 0
    ieee = a["INPUT_PRECISION"] == "ieee"
    width = 16 if ieee else 32 if bm <= 32 else 64
    facts = _facts(cap, itemsize, ieee, a["DROPOUT"], in_loop=a["G_IN_LOOP"], nf4=_nf4(a), a=a)
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] == width
            and _within_limits(kernels, facts, c, bm, c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"])
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_N"] * (bm + c.kwargs["BLOCK_K"] + rank),
                                   itemsize, cap)]
    return kept if a["COMPUTE_DX"] else kept[:1]


# ---------------------------------------------------------------------------------------------
# Skinny pass (skinny.py): (M x L) @ (L x r), BLOCK_M the launcher's. Memory-bound: wide BLOCK_L
# for long contiguous loads, enough stages to keep them in flight.
SKINNY_KEY = ["M_BUCKET", "L", "R", "BLOCK_M", "BLOCK_R", "WITH_PARTIAL", "DROPOUT", "INPUT_PRECISION",
              "COL_SCALE", "DM"]


def skinny_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_L": 32}, num_stages=1, num_warps=4)]
    return [triton.Config({"BLOCK_L": bl}, num_stages=s, num_warps=w)
            for bl, s, w in ((128, 3, 4), (64, 4, 4), (64, 3, 8),
                             (16, 3, 4))]   # fp32 "ieee" (BLOCK_L 16 marks it): 64+ spilled with the partial


@_pruner
def keep_skinny_config(configs, a, cap):
    """The ieee tile exactly for ieee dots, LIMITS (the src tile BLOCK_M x BLOCK_L), and pipelines (src
    and the rank matrix) that fit shared memory."""
    bm, rank = a["BLOCK_M"], a["BLOCK_R"]
    itemsize = a["src_ptr"].element_size()
    ieee = a["INPUT_PRECISION"] == "ieee"
    facts = _facts(cap, itemsize, ieee, a["DROPOUT"], partial=a["WITH_PARTIAL"], a=a)
    return [c for c in configs
            if (c.kwargs["BLOCK_L"] == 16) == ieee
            and _within_limits("skinny", facts, c, bm, c.kwargs["BLOCK_L"], c.kwargs["BLOCK_L"])
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_L"] * (bm + rank), itemsize, cap)]


# ---------------------------------------------------------------------------------------------
# Split-K decode forward (splitk.py): M up to this, the rank in one tile.
SPLIT_K_MAX_M = 64
# Column tile of y; fixed (not tuned) because the number of splits is chosen from the tile count.
SPLIT_K_BLOCK_N = 16 if INTERPRET else 64
# Each split covers a multiple of this many K (a multiple of every tuned BLOCK_K), at least once.
SPLIT_K_GRANULE = 32 if INTERPRET else 256
# The reduce kernel is not autotuned: split_k_plan's tile, this many warps, Triton's default stages.
SPLIT_K_REDUCE_WARPS = 4
# the mixed-batch partial kernel (multi.py) reads a dense W0 only: the key less WEIGHT
MULTI_SPLIT_K_KEY = ["M_BUCKET", "N", "K", "SPLIT_K", "BLOCK_M", "BLOCK_N", "BLOCK_R", "DROPOUT", "INPUT_PRECISION"]
SPLIT_K_KEY = MULTI_SPLIT_K_KEY + ["WEIGHT"]


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


def split_k_kernel_configs():
    """splitk.py's partial kernel's list: split_k_configs() and the 4-bit tile."""
    return _with_nf4_tiles(split_k_configs(), NF4_SPLIT_K_TILES, _split_k_shape,
                           lambda t: triton.Config({"BLOCK_K": t[0]}, num_stages=t[1], num_warps=t[2]))


def split_k_configs():
    """The partial kernel's K step and pipeline (its tile is split_k_plan's): memory-bound, so deep
    pipelines of wide K steps."""
    if INTERPRET:
        return [triton.Config({"BLOCK_K": 16}, num_stages=1, num_warps=4)]
    return [triton.Config({"BLOCK_K": bk}, num_stages=s, num_warps=w) for bk, s, w in
            ((128, 4, 4), (64, 4, 4), (64, 3, 8),    # 8 warps: for the fp32 dropout cap only
             (16, 2, 8), (16, 3, 4))]                # fp32 "ieee" (BLOCK_K 16 marks it): <= 32, 64 rows


@_pruner
def keep_split_k_config(configs, a, cap):
    """The ieee tiles exactly for ieee dots, LIMITS (the tile BLOCK_M x BLOCK_N, step BLOCK_K), and
    pipelines (x, W0, A) that fit shared memory; of those, the 4-warp ones where there are any."""
    dense = {_split_k_shape(c) for c in split_k_configs()}
    return _one_if_nf4(_split_k_kept(_for_weight(configs, a, NF4_SPLIT_K_TILES, _split_k_shape, dense), a, cap,
                                     "split_k"), a)


def _split_k_kept(configs, a, cap, kernels):
    bm, bn, rank = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_R"]
    itemsize = a["x_ptr"].element_size()
    ieee = a["INPUT_PRECISION"] == "ieee"
    facts = _facts(cap, itemsize, ieee, a["DROPOUT"], nf4=_nf4(a))
    kept = [c for c in configs
            if (c.kwargs["BLOCK_K"] == 16) == ieee
            and _within_limits(kernels, facts, c, bm, bn, c.kwargs["BLOCK_K"])
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_K"] * (bm + bn + rank), itemsize, cap)]
    # 8 warps only where no 4-warp config fits (fp32 with dropout at 64 rows, ieee decode rows):
    # memory-bound, more warps per program would only halve the programs' count of loads in flight per warp
    return [c for c in kept if c.num_warps == 4] or kept


# ---------------------------------------------------------------------------------------------
# TMA forward (forward_tma.py): Hopper GEMM tiles, a 64-row warpgroup MMA per warpgroup; it runs
# for M > 64 with 16-bit operands.
TMA_KEY = ["M_BUCKET", "N", "K", "R", "BLOCK_R", "COL_SCALE"]


def tma_configs(pre_hook):
    """`pre_hook` gives the descriptors each config's block shape."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                              num_stages=1, num_warps=4, pre_hook=pre_hook)]
    shapes = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=s, num_warps=w, pre_hook=pre_hook) for bm, bn, bk, s, w in shapes]


@_pruner
def keep_tma_config(configs, a, cap):
    """LIMITS and pipelines (x and W0 tiles) that fit shared memory: the epilogue's xs and B tiles
    are loaded once per tile, outside the pipelined loop."""
    facts = _facts(cap, 2, False, False, a=a)
    return [c for c in configs
            if _within_limits("tma", facts, c, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]),
                                   2, cap)]


# ---------------------------------------------------------------------------------------------
# TMA dX GEMM (backward_tma.py): tiles of dX, BLOCK_M x BLOCK_K (BLOCK_M the launcher's 128),
# reduction step BLOCK_N.
BACKWARD_TMA_KEY = ["M_BUCKET", "N", "K", "R", "BLOCK_M", "BLOCK_R", "DROPOUT", "COMPUTE_DA"]


def backward_tma_configs(pre_hook):
    """`pre_hook` gives the descriptors each config's block shape."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_stages=1, num_warps=4,
                              pre_hook=pre_hook)]
    # 128x64 tiles with 8 warps: with dropout (32 accumulator values per thread) nothing wider is kept
    shapes = [(64, 128, 3, 8), (128, 128, 3, 8), (128, 64, 3, 8)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w,
                          pre_hook=pre_hook) for bn, bk, s, w in shapes]


@_pruner
def keep_backward_tma_config(configs, a, cap):
    """LIMITS and pipelines (dY and W0 tiles) that fit shared memory."""
    bm = a["BLOCK_M"]
    facts = _facts(cap, 2, False, a["DROPOUT"])
    return [c for c in configs
            if _within_limits("backward_tma", facts, c, bm, c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"])
            and fits_shared_memory(c.num_stages, c.kwargs["BLOCK_N"] * (bm + c.kwargs["BLOCK_K"]), 2, cap)]


# ---------------------------------------------------------------------------------------------
# Mixed-batch kernels (multi.py): every row has its own adapter. Their GEMMs are the in-loop
# forward's, the fused backward's and split-K's main loops (the first adapter of a row tile rides
# in the loop as the single adapter does), followed by passes of the low-rank product alone for the
# tile's other adapters, which hold no W0 tile: so they take those kernels' tiles and pruners, under
# LIMITS rows of their own (the multi_forward/multi_backward ones) as well.
MULTI_FORWARD_KEY = ["M_BUCKET", "N", "K", "R", "BLOCK_R", "DROPOUT", "INPUT_PRECISION"]
MULTI_BACKWARD_KEY = ["M_BUCKET", "N", "K", "R", "BLOCK_M", "BLOCK_R", "DROPOUT", "COMPUTE_DX", "INPUT_PRECISION"]
# Tiles for the launches where those rows leave none of the shared list's (fp32 (tf32) with dropout on
# sm_80, ieee with dropout at 64 rows; the backward's fp32 with dropout and ieee with dropout): each
# built without a spill on sm_80 and sm_90 under both Triton versions, and kept only there, so the
# other launches time the same tiles as the single-adapter kernels.
MULTI_FORWARD_FALLBACKS = ((32, 64, 64, 3, 8), (64, 64, 64, 3, 8), (128, 32, 64, 3, 8), (64, 64, 16, 3, 8))
MULTI_BACKWARD_FALLBACKS = ((64, 32, 3, 8), (32, 32, 3, 8), (16, 16, 3, 4), (16, 16, 2, 8))
# The ieee (FMA) forward tiles stop at 64 rows: 128x64 with 8 warps spilled on sm_80 beside the other
# adapters' passes (no dropout; 128x32 too, 8 B under Triton 3.9). A mixed batch in fp32 without tf32
# runs the torch path's grouped cuBLAS products unless the triton backend is forced (mixed.py).
MULTI_IEEE_MAX_ROWS = 64


def _shape(c):
    return (c.kwargs.get("BLOCK_M"), c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)


def _or_fallbacks(kept, fallbacks):
    """The kept configs of the shared list, or where there are none, the kept fallbacks."""
    shared = [c for c in kept if _shape(c) not in fallbacks]
    return shared or kept


def multi_forward_configs():
    if INTERPRET:
        return forward_configs()
    return forward_configs() + [_config(*c) for c in MULTI_FORWARD_FALLBACKS]


def multi_backward_configs():
    if INTERPRET:
        return backward_configs()
    return backward_configs() + [_config(None, *c) for c in MULTI_BACKWARD_FALLBACKS]


@_pruner
def keep_multi_forward_config(configs, a, cap):
    """The in-loop forward's choice (x·Aᵀ in the K-loop; ieee tiles up to MULTI_IEEE_MAX_ROWS rows)
    under the multi kernel's LIMITS rows too, or its fallbacks where those leave none."""
    kept = _forward_kept(configs, {**a, "XS_IN_LOOP": True}, cap, ("forward", "multi_forward"),
                         MULTI_IEEE_MAX_ROWS)
    return _or_fallbacks(kept, MULTI_FORWARD_FALLBACKS)


@_pruner
def keep_multi_backward_config(configs, a, cap):
    """The fused backward's choice (dY·B in the N-loop) under the multi kernel's LIMITS rows too, or
    its fallbacks where those leave none."""
    kept = _backward_kept(configs, {**a, "G_IN_LOOP": True}, cap, ("backward", "multi_backward"))
    return _or_fallbacks(kept, {(None, *c) for c in MULTI_BACKWARD_FALLBACKS})


@_pruner
def keep_multi_split_k_config(configs, a, cap):
    """Split-K's choice (keep_split_k_config) under the multi kernel's LIMITS rows too."""
    return _split_k_kept(configs, a, cap, ("split_k", "multi_split_k"))


# The dA/dB reducer (multi.py) sums a few fp32 partials per element: a streaming, memory-bound
# kernel, not tuned. 1024 values a program is 8 per thread at 4 warps (two 16-byte loads per
# partial); under the interpreter 128, so that the test shapes' R·K spans several programs.
MULTI_REDUCE_BLOCK = 128 if INTERPRET else 1024
MULTI_REDUCE_WARPS = 4
