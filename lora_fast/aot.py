"""Ahead-of-time compilation of the kernels for a GPU target, on any machine (no GPU needed).

`compile_variant(variant, dtype_name, arch, config)` builds PTX and cubin with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` for one launchable kernel
variant, specialised as the launchers specialise it for contiguous tensors (inner strides are
the constant 1, pointers and the other strides 16-divisible), and returns what the compiler
reports. The variants mirror the launchers' constexpr choices one for one.

    python -m lora_fast.aot [--arch 80 90] [--dtype bf16 fp16 fp32 fp32-ieee] [--all-configs] [--strided] [--json]

compiles every variant at its main tile (the first config its pruner keeps for large M, for 16
rows on the split-K path) or at every config its pruner keeps (--all-configs, per row class) and
prints registers, stack (spill) bytes, shared memory and whether the PTX uses mma / wgmma. fp32 is
built twice: as tf32 dots (tensor cores, when torch allows tf32) and as ieee ones (FMAs: torch's
default "highest" precision). It checks whichever Triton is imported: `PYTHONPATH=build/triton-3.6`
builds with the GPU image's 3.6, whose ptxas allocates registers differently. It must run with
TRITON_INTERPRET unset: under the interpreter triton.jit produces interpreter wrappers, which
cannot be compiled.
"""
import argparse
import inspect
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from triton.runtime.jit import JITFunction

from lora_fast.kernels import backward, backward_tma, configs, forward, forward_tma, multi, skinny, splitk

_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# A build's dtype name: its tensors' dtype and the tl.dot precision the launchers pass for it —
# fp32 as tf32 (tensor cores, when torch allows tf32) or as ieee (FMAs: torch's default "highest"
# fp32 matmul precision); the 16-bit ones ignore the precision.
BUILD_DTYPES = {"bf16": (torch.bfloat16, "tf32"), "fp16": (torch.float16, "tf32"),
                "fp32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee")}
_FP32_POINTERS = {"part_ptr", "da_part_ptr", "db_part_ptr", "xa_part_ptr", "scale_ptr", "p_ptr",
                  "c_ptr", "dm_part_ptr"}   # c_ptr, dm_part_ptr: DoRA's column scales and magnitude partials
_I32_POINTERS = {"ids_ptr", "perm_ptr"}      # the mixed-batch kernels' row -> adapter map and row order
_SCALARS = {"scaling", "scale", "dropout_p"}
_DORA_POINTERS = {"c_ptr": "COL_SCALE", "dm_part_ptr": "DM"}   # fp32 only with their constexpr on
# Pointer tensors over the large operands (x, W0, dY, src of the skinny pass, ...): their offsets
# must be 64-bit, since row * stride (or k * stride on a transposed view) can pass 2**31.
_OPERAND_ADDPTR = re.compile(r"%(x_ptrs|w_ptrs|dy_ptrs|src_ptrs|mat_ptrs|a_ptrs|part_ptrs|da_ptrs|db_ptrs)"
                             r"\w* = tt\.addptr .*tensor<[0-9x]*xi32>")


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: object                   # the autotuned kernel (its .fn is the JITFunction), or a JITFunction
    constexprs: dict                 # launcher-chosen meta-parameters besides the config's
    unit_strides: tuple              # stride arguments that are 1 for contiguous inputs
    main_path: bool                  # carries a large GEMM: must use wgmma on sm_90
    archs: tuple = (80, 90)          # the targets it is built for
    dtypes: tuple = ("bf16", "fp16", "fp32", "fp32-ieee")
    descs: tuple = ()                # TMA descriptor arguments: (name, (row block, column block))
    pointers: tuple = ()             # (name, type) for pointers not of the build's dtype (NF4's bytes)


# A 4-bit W0 (launch.weight_args): its bytes, and its statistics (absmax fp32, or uint8 codes into
# the fp32 map with fp32 scales and offset: one build for both, blocks.nf4_tile; the fp32 levels)
_NF4_POINTERS = (("w_ptr", "*u8"), ("absmax_ptr", "*fp32"), ("qabsmax_ptr", "*u8"), ("code_ptr", "*fp32"),
                 ("scale_ptr", "*fp32"), ("offset_ptr", "*fp32"), ("levels_ptr", "*fp32"))


def _with_weight(variants):
    """The GEMM variants that read W0 as they are (WEIGHT "dense") and again for a 4-bit one
    (WEIGHT "nf4"), in the 16-bit dtypes: on a GPU a 4-bit W0 with fp32 compute runs cuBLAS on the
    decoded weight (dispatch.kernels_read_4bit)."""
    out = []
    for v in variants:
        out.append(v)
        # reads W0; DoRA (COL_SCALE) is refused on 4-bit layers
        if "WEIGHT" in v.constexprs and v.constexprs.get("COMPUTE_DX") is not False and not v.constexprs.get("COL_SCALE"):
            out.append(Variant(f"{v.name}_nf4", v.kernel, {**v.constexprs, "WEIGHT": "nf4"}, v.unit_strides,
                               v.main_path, v.archs, ("bf16", "fp16"), v.descs, _NF4_POINTERS))
    return out


def _variants():
    fwd = forward._lora_forward_kernel
    fwd_strides = ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_sr", "stride_yn")
    bwd = backward._lora_backward_kernel
    bwd_strides = ("stride_dyn", "stride_wk", "stride_ak", "stride_br", "stride_xk", "stride_sr",
                   "stride_gr", "stride_dxk")
    sk = skinny._lora_skinny_kernel
    both = {"COMPUTE_DX": True, "COMPUTE_DA": True}
    dense = {"WEIGHT": "dense"}   # _with_weight adds the NF4 builds of these
    variants = []
    for dropout in (False, True):
        tag = "_dropout" if dropout else ""
        variants += [
            Variant("forward_in_loop" + tag, fwd,
                    {"HAS_BIAS": True, "XS_IN_LOOP": True, "STORE_XS": True, "DROPOUT": dropout, **dense},
                    fwd_strides, True),
            Variant("backward_fused" + tag, bwd, {"G_IN_LOOP": True, "COMPUTE_DB": True, "DROPOUT": dropout, **both,
                                                  **dense},
                    bwd_strides, True),
            Variant("backward_split" + tag, bwd, {"G_IN_LOOP": False, "COMPUTE_DB": False, "DROPOUT": dropout, **both,
                                                  **dense},
                    bwd_strides, True),
            # no dX, no N-loop: W0 is not read, so one build serves every weight format
            Variant("backward_da_only" + tag, bwd, {"G_IN_LOOP": False, "COMPUTE_DB": False, "DROPOUT": dropout,
                                                    "COMPUTE_DX": False, "COMPUTE_DA": True,
                                                    **dense},
                    bwd_strides, False),
            # forward first pass: src = x (M, K), mat = Aᵀ (K, r) so its L-stride is 1
            Variant("skinny_xa" + tag, sk, {"WITH_PARTIAL": False, "DROPOUT": dropout},
                    ("stride_sl", "stride_ml", "stride_or"), False),
        ]
    # the first-pass forward GEMM reads xs and never sees the mask; the dY pass has no dropout
    variants += [
        Variant("forward_first_pass", fwd, {"HAS_BIAS": True, "XS_IN_LOOP": False, "STORE_XS": False,
                                            "DROPOUT": False, **dense}, fwd_strides, True),
        Variant("skinny_dy", sk, {"WITH_PARTIAL": True, "DROPOUT": False},
                ("stride_sl", "stride_mr", "stride_or", "stride_dr"), False),
        # the decode split-K forward (M <= 64): memory-bound, not a main GEMM
        Variant("split_k_reduce", splitk._lora_split_k_reduce_kernel,
                {"HAS_BIAS": True, "STORE_XS": True}, ("stride_br", "stride_sr", "stride_yn"), False),
    ]
    # TMA descriptors: Hopper and later, 16-bit operands only
    hopper_16bit = {"archs": (90,), "dtypes": ("bf16", "fp16")}
    variants.append(Variant("forward_tma", forward_tma._lora_forward_tma_kernel, {"HAS_BIAS": True},
                            ("stride_sr", "stride_br", "stride_yn"), True, **hopper_16bit,
                            descs=(("x_desc", ("BLOCK_M", "BLOCK_K")), ("w_desc", ("BLOCK_N", "BLOCK_K")))))
    for dropout in (False, True):
        variants.append(Variant("backward_tma" + ("_dropout" if dropout else ""),
                                backward_tma._lora_backward_tma_kernel, {"DROPOUT": dropout, "COMPUTE_DA": True},
                                ("stride_ak", "stride_xk", "stride_gr", "stride_dxk"), True, **hopper_16bit,
                                descs=(("dy_desc", ("BLOCK_M", "BLOCK_N")), ("w_desc", ("BLOCK_N", "BLOCK_K")))))
    for dropout in (False, True):
        variants.append(Variant("split_k_partial" + ("_dropout" if dropout else ""),
                                splitk._lora_split_k_partial_kernel, {"DROPOUT": dropout, **dense},
                                ("stride_xk", "stride_wk", "stride_ak"), False))
    # the mixed-batch kernels (rows in perm's order, as an unsorted batch runs them); their dA/dB
    # reducer is left out: a streaming sum with no MMA, which every build here is checked to use
    for dropout in (False, True):
        tag = "_dropout" if dropout else ""
        variants += [
            Variant("multi_forward" + tag, multi._multi_forward_kernel,
                    {"HAS_BIAS": True, "STORE_XS": True, "DROPOUT": dropout, "PERM": True}, fwd_strides, True),
            Variant("multi_backward" + tag, multi._multi_backward_kernel,
                    {"COMPUTE_DB": True, "DROPOUT": dropout, "PERM": True, **both},
                    tuple(s for s in bwd_strides if s != "stride_gr"), True),
            Variant("multi_split_k_partial" + tag, multi._multi_split_k_partial_kernel,
                    {"DROPOUT": dropout, "PERM": True}, ("stride_xk", "stride_wk", "stride_ak"), False),
        ]
    variants.append(Variant("multi_split_k_reduce", multi._multi_split_k_reduce_kernel,
                            {"HAS_BIAS": True, "STORE_XS": True, "PERM": True}, ("stride_br", "stride_sr", "stride_yn"),
                            False))
    # DoRA's column scale (blocks.y_epilogue, blocks.k_loop, skinny): off in every build above,
    # then the builds that run it — each pass's main kernels, both dropout settings where the mask
    # is inside the kernel (the "lora" dropout form; the PEFT form's forward runs the plain builds)
    for v in variants:
        names = _arg_names(v.kernel)
        v.constexprs.update({k: False for k in ("COL_SCALE", "DM", "PEFT_FORM") if k in names and k not in v.constexprs})
    by_name = {v.name: v for v in variants}
    dora = {"COL_SCALE": True}
    for base, extra, strides in [
            ("forward_in_loop", {}, ("stride_zn",)), ("forward_in_loop_dropout", {}, ("stride_zn",)),
            ("forward_first_pass", {}, ("stride_zn",)), ("split_k_reduce", {}, ("stride_zn",)),
            ("forward_tma", {}, ("stride_zn",)),
            ("backward_fused", {}, ()), ("backward_fused_dropout", {}, ()),
            ("backward_split", {}, ()), ("backward_split_dropout", {}, ()),
            ("skinny_dy", {"DM": True}, ("stride_zl",)),
            # PEFT's dropout form: the second base product in the forward's K-loop and the dX GEMM's
            ("forward_in_loop_dropout", {"PEFT_FORM": True}, ("stride_zn",)),
            ("forward_first_pass", {"PEFT_FORM": True}, ("stride_zn",)),
            ("backward_fused_dropout", {"PEFT_FORM": True}, ()), ("backward_split_dropout", {"PEFT_FORM": True}, ())]:
        v = by_name[base]
        # not fp32-ieee: on a GPU the dispatcher runs cuBLAS for it (dispatch.candidates), the kernels
        # only when forced, and split-K's 64-row reduce tile (not tuned) spills 8 B there with z
        variants.append(Variant(f"{base}_dora" + ("_peft" if extra.get("PEFT_FORM") else ""), v.kernel, {**v.constexprs, **dora, **extra}, v.unit_strides + strides,
                                v.main_path, v.archs,
                                # the PEFT form: 16-bit only (dispatch.Call.kernels_take_form)
                                ("bf16", "fp16") if extra.get("PEFT_FORM") else
                                tuple(d for d in v.dtypes if d != "fp32-ieee"), v.descs, v.pointers))
    return _with_weight(variants)


def _arg_names(kernel):
    """A kernel's parameter names (autotuned or not; under the interpreter too, where the kernels are
    not JITFunctions: the variants are built at import, and the tests import them so)."""
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    if hasattr(fn, "arg_names"):
        return fn.arg_names
    return list(inspect.signature(getattr(fn, "fn", fn)).parameters)


# The split-K kernels (decode rows: their main tile is 16 rows') and, of those, the reduce kernels
# (not autotuned: split_k_plan's tile).
_SPLIT_K = (splitk._lora_split_k_partial_kernel, splitk._lora_split_k_reduce_kernel,
            multi._multi_split_k_partial_kernel, multi._multi_split_k_reduce_kernel)
_SPLIT_K_REDUCE = (splitk._lora_split_k_reduce_kernel, multi._multi_split_k_reduce_kernel)


VARIANTS = {v.name: v for v in _variants()}


def main_config(variant, arch, dtype_name, rank=16):
    """The variant's main tile on this arch and dtype: the first config its pruner keeps (the lists
    are ordered best first) for large M, or for 16 rows where the kernel is split-K's (decode)."""
    split_k = VARIANTS[variant].kernel in _SPLIT_K
    return _pruned(variant, arch, dtype_name, 16 if split_k else 1 << 20, rank)[0]


def compile_variant(variant, dtype_name, arch, config, strided=False):
    """Compile one variant for a BUILD_DTYPES name; returns a dict of what the compiler reports.
    strided=True compiles it for arbitrary strides (no stride specialised to 1, as for transposed or
    sliced views)."""
    spec = VARIANTS[variant]
    dtype, precision = BUILD_DTYPES[dtype_name]
    fn = spec.kernel if isinstance(spec.kernel, JITFunction) else spec.kernel.fn
    config = dict(config)
    options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
    constexprs = {**spec.constexprs, **config}
    if "INPUT_PRECISION" in fn.arg_names:          # the TMA kernels take 16-bit operands only
        constexprs["INPUT_PRECISION"] = precision
    if "NUM_PROGRAMS" in fn.arg_names:             # persistent kernels: an H100 SXM's SM count
        constexprs["NUM_PROGRAMS"] = 132
    if not strided:
        constexprs.update({s: 1 for s in spec.unit_strides})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in dict(spec.descs):   # a TMA descriptor of the config's tile
            rows, cols = (constexprs[b] for b in dict(spec.descs)[name])
            signature[name] = f"tensordesc<{_TYPE[dtype]}[{rows}, {cols}]>"
        elif name == "seed_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            # DoRA's fp32 pointers are the launchers' stand-ins (an operand of the build's dtype) while off
            fp32 = name in _FP32_POINTERS and constexprs.get(_DORA_POINTERS.get(name), True)
            signature[name] = dict(spec.pointers).get(name) or (
                "*fp32" if fp32 else "*i32" if name in _I32_POINTERS else f"*{_TYPE[dtype]}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            # as Triton's launcher specialises them at run time (K_PER_SPLIT: a multiple of 256)
            if name.startswith("stride_") or name in ("N", "K", "L", "K_PER_SPLIT"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(fn.arg_names) - set(signature)
    if missing:
        raise ValueError(f"variant {variant}: no type for {sorted(missing)}")
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {
        "variant": variant,
        "dtype": dtype_name,
        "arch": f"sm_{arch}",
        "main_path": spec.main_path,
        "wgmma": "wgmma" in ptx,
        "mma": "mma.sync" in ptx or "wgmma" in ptx,
        "shared_bytes": compiled.metadata.shared,
        "i32_operand_offsets": len(_OPERAND_ADDPTR.findall(compiled.asm["ttir"])),
        "rounded_products": ptx.count("mul.rn.f32"),     # blocks._mul_rn: the 4-bit absmax decode
        **resource_usage(compiled.asm["cubin"]),
    }


def resource_usage(cubin):
    """Registers per thread and stack-frame bytes (non-zero means spills), read from the cubin by
    the cuobjdump that ships inside triton's NVIDIA backend."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(found["REG"]), "stack_bytes": int(found["STACK"]),
            "local_bytes": int(found["LOCAL"])}


def _pruned(variant, arch, dtype_name, m, rank=16):
    """The configs the variant's kernel keeps for M rows: its config list through its own
    early_config_prune, called as the autotuner calls it (positional arguments in named_args, the
    launcher's keyword constexprs in kwargs), BLOCK_M (and split-K's BLOCK_N) set as the launchers
    set them where they are not tuned; each config as the meta-parameters a build takes. The
    split-K reduce kernel is not autotuned: the launcher's tile."""
    spec = VARIANTS[variant]
    kernel = spec.kernel
    if kernel in _SPLIT_K_REDUCE:
        block_m, block_n = configs.split_k_plan(m, 1, 1, 1)[:2]
        return [{"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_R": configs.block_r(rank),
                 "num_warps": configs.SPLIT_K_REDUCE_WARPS, "num_stages": 3}]   # Triton's default stages
    dtype, precision = BUILD_DTYPES[dtype_name]
    pointer = torch.empty(0, dtype=dtype)
    named_args = {"M_BUCKET": m, "x_ptr": pointer, "dy_ptr": pointer, "src_ptr": pointer}
    kwargs = {**spec.constexprs, "BLOCK_R": configs.block_r(rank), "INPUT_PRECISION": precision}
    if kernel in _SPLIT_K:
        kwargs["BLOCK_M"], kwargs["BLOCK_N"] = configs.split_k_plan(m, 1, 1, 1)[:2]
    elif kernel not in (forward._lora_forward_kernel, forward_tma._lora_forward_tma_kernel,
                        multi._multi_forward_kernel):
        fused = spec.constexprs.get("G_IN_LOOP", kernel is multi._multi_backward_kernel)
        kwargs["BLOCK_M"] = configs.partial_block_m(m, fused, precision)
    kept = kernel.early_config_prune(kernel.configs, named_args, capability=arch // 10, **kwargs)
    if not kept:   # the autotuner would launch with no config at all: a pruning bug
        raise RuntimeError(f"{variant} {dtype_name} sm_{arch}: the pruner leaves no config at M_BUCKET={m}")
    launcher = {k: v for k, v in kwargs.items() if k not in spec.constexprs and k != "INPUT_PRECISION"}
    return [{**launcher, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in kept]


def autotune_configs(variant, arch, dtype_name, rank=16):
    """Every config the autotuner may launch for the variant on this arch and dtype: what its pruner
    keeps (_pruned) in each M regime — every row class (configs.row_class, partial_block_m); split-K
    (M <= SPLIT_K_MAX_M) at 1, 32 and 64 rows, the TMA kernels (M > SPLIT_K_MAX_M) at the large ones."""
    kernel = VARIANTS[variant].kernel
    if kernel in _SPLIT_K:
        regimes = (1, 32, configs.SPLIT_K_MAX_M)
    elif kernel in (forward_tma._lora_forward_tma_kernel, backward_tma._lora_backward_tma_kernel):
        regimes = (128, 1 << 20)
    else:
        regimes = (16, 32, 64, 128, 1 << 20)
    out = []
    for m in regimes:
        for c in _pruned(variant, arch, dtype_name, m, rank):
            if c not in out:
                out.append(c)
    return out


def _compile_row(job):
    variant, dtype_name, arch, config, strided = job
    row = compile_variant(variant, dtype_name, arch, config, strided)
    row["config"] = {k: v for k, v in config.items() if k != "BLOCK_R"}
    return row


def report(archs=(80, 90), dtypes=tuple(BUILD_DTYPES), jobs=None, all_configs=False, strided=False):
    """Compile every variant for every (dtype, arch) in parallel processes, at its main tile or
    at every autotune config; one dict per build."""
    work = [(v, d, a, c, strided) for v in VARIANTS for d in dtypes for a in archs
            if a in VARIANTS[v].archs and d in VARIANTS[v].dtypes
            for c in (autotune_configs(v, a, d) if all_configs else [main_config(v, a, d)])]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        return list(pool.map(_compile_row, work))


def build_parser():
    from lora_fast.check import HelpFormatter   # the project's one --help layout
    parser = argparse.ArgumentParser(prog="python -m lora_fast.aot", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], metavar="SM",
                        help="target SM versions (80: A100, 90: H100/H200)")
    parser.add_argument("--dtype", nargs="+", default=list(BUILD_DTYPES), choices=list(BUILD_DTYPES),
                        help="dtypes to build: fp32 builds as tf32 dots, fp32-ieee as ieee (FMA) ones")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="parallel compiler processes (default: one per CPU)")
    parser.add_argument("--all-configs", action="store_true",
                        help="build every autotune config the pruners keep, not only each variant's main tile")
    parser.add_argument("--strided", action="store_true",
                        help="compile for arbitrary strides (no stride specialised to 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, the interpreter's kernels cannot be compiled")
    rows = report(args.arch, args.dtype, args.jobs, args.all_configs, args.strided)
    if args.json:
        print(json.dumps(rows))
        return
    cols = ["variant", "dtype", "arch", "registers", "stack_bytes", "shared_bytes", "mma", "wgmma",
            "i32_operand_offsets"]
    cols += ["config"] if args.all_configs else []
    print("  ".join(f"{c:>18}" if i == 0 else f"{c:>12}" for i, c in enumerate(cols)))
    for row in rows:
        print("  ".join(f"{row[c]!s:>18}" if i == 0 else f"{row[c]!s:>12}" for i, c in enumerate(cols)))


if __name__ == "__main__":
    main()
