"""Forward GEMM with Hopper's tensor memory accelerator and a persistent grid (sm_90+, bf16/fp16).

The split design of forward.py (xs = s·d(x)·Aᵀ from the skinny first pass, added as xs·Bᵀ in the
epilogue) with the main loop rebuilt the way Triton reaches cuBLAS on Hopper: x and W0 tiles come
in through TMA descriptors (one bulk copy per tile instead of per-thread address arithmetic, and
out-of-bounds rows zero-filled by the hardware: no masks in the K-loop), and one program per SM
walks the output tiles in grouped order (`tl.range(..., flatten=True)` lets the pipeliner start the
next tile's loads under this tile's epilogue). Requires what TMA requires: x and W0 contiguous
along K, 16-byte-aligned base addresses and row strides (`launch.tma_eligible`); lora_fast.dispatch offers
it only then, and only where it measures it faster than the other paths.
"""
import triton
import triton.language as tl

from . import configs
from .blocks import tma_k_loop, y_epilogue
from .launch import bias_arg, cdiv, descriptor, dora_output, peft_form, empty, launch, persistent_programs, prologue
from .skinny import skinny
from .tiling import grouped_tile


def _set_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' tile is the config's."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


@triton.autotune(configs=configs.tma_configs(_set_block_shapes), key=configs.TMA_KEY,
                 prune_configs_by={"early_config_prune": configs.keep_tma_config}, do_bench=configs.bench_config)
@triton.jit
def _lora_forward_tma_kernel(
    x_desc, w_desc, xs_ptr, b_ptr, bias_ptr, y_ptr, c_ptr, z_ptr,
    M, N, K, R, M_BUCKET,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr,
    COL_SCALE: tl.constexpr,    # DoRA: y = c ⊙ z + bias, z kept (blocks.y_epilogue)
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tma_k_loop(x_desc, w_desc, row0, col0, K, True, BLOCK_M, BLOCK_N, BLOCK_K)
        offs_m = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_n = col0.to(tl.int64) + tl.arange(0, BLOCK_N)
        y_epilogue(acc, acc, xs_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_m < M, offs_n < N, R, False,
                   stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn, 1.0,
                   "tile", False, HAS_BIAS, "tf32", BLOCK_R,
                   c_ptr=c_ptr, z_ptr=z_ptr, stride_zm=stride_zm, stride_zn=stride_zn, COL_SCALE=COL_SCALE)


def lora_forward_tma(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0, seed=None,
                     col_scale=None, peft_dropout=False):
    """The split-design forward with a TMA main loop, for 2-D x (M > 64, K) and weight passing
    launch.tma_eligible, r <= 64; returns (y, xs) as forward.lora_forward does (xs is always
    produced: the first pass makes it), and z after them with col_scale (DoRA)."""
    M, K = x.shape
    N, R = lora_B.shape
    pro = prologue(x, scaling, dropout_p, seed)
    y = empty(x, M, N)
    if peft_form(col_scale, peft_dropout, dropout_p):
        raise ValueError("peft_dropout: DoRA's PEFT dropout form runs on the in_loop and split forward paths")
    dora = dora_output(col_scale, y)
    xs, _, _ = skinny(x, lora_A.t(), pro.scale, pro.precision, dropout_p=dropout_p, seed=seed)
    programs = persistent_programs(x.device)
    grid = lambda meta: (min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)
    launch(_lora_forward_tma_kernel, grid, x)(
        descriptor(x), descriptor(weight), xs, lora_B, bias_arg(bias, y), y, dora.c, dora.z,
        M, N, K, R, configs.m_bucket(M),
        xs.stride(0), xs.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        y.stride(0), y.stride(1),
        *dora.z_strides,
        HAS_BIAS=bias is not None,
        COL_SCALE=dora.on,
        NUM_PROGRAMS=programs,
        BLOCK_R=configs.block_r(R),
    )
    return dora.result(y, xs)
