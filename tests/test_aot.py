"""Every kernel config the launchers can run (every variant, every autotune config left by the
kernels' own pruning, each dtype) compiles ahead of time for sm_80 and sm_90, with no GPU: uses
tensor-core MMA, fits the architecture's shared memory and does not spill; on the main path (the GEMM
tiles, BLOCK_M >= 64, of the forward and dX kernels) it uses warpgroup MMA (wgmma) on Hopper, and
the only sm_90 builds without it are those whose MMA is too small for a warpgroup.
Runs `python -m lora_fast.aot --all-configs --json` once, in a subprocess, because this test session
may have the Triton interpreter switched on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_fast.aot import VARIANTS

SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}     # opt-in shared memory per block: A100, H100


ROOT = Path(__file__).resolve().parents[1]
# The GPU image's Triton, unpacked beside the checkout by the README's test command
# (`pip install --no-deps --target build/triton-3.6 triton==3.6.0`): its ptxas and passes allocate
# registers differently (11 builds spilled there and not under 3.9 before the pruners knew).
TRITON_36 = ROOT / "build" / "triton-3.6"


def _aot_env(triton_version):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_version == "3.6":
        if not (TRITON_36 / "triton").is_dir():
            if os.environ.get("CI"):
                pytest.fail(f"{TRITON_36} is missing: CI must AOT-check the GPU image's Triton 3.6 "
                            "(the README's test command installs it there)")
            pytest.skip(f"triton 3.6 is not unpacked at {TRITON_36} (the README's test command does it)")
        env["PYTHONPATH"] = os.pathsep.join([str(TRITON_36), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module", params=["current", "3.6"], ids=lambda v: f"triton-{v}")
def rows(request):
    env = _aot_env(request.param)
    run = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                         check=True, capture_output=True, text=True)
    if request.param == "3.6":
        assert run.stdout.strip().startswith("3.6"), f"expected triton 3.6 under {TRITON_36}, got {run.stdout}"
    out = subprocess.run([sys.executable, "-m", "lora_fast.aot", "--all-configs", "--json"], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _where(r):
    return f"{r['variant']} {r['dtype']} {r['arch']} {r['config']}"


def test_every_variant_dtype_arch_built(rows):
    built = {(r["variant"], r["dtype"], r["arch"]) for r in rows}
    assert built == {(v, d, f"sm_{a}") for v, spec in VARIANTS.items() for d in spec.dtypes for a in spec.archs}
    # bf16, fp16, fp32 (tf32) and fp32-ieee; the three TMA ones: sm_90, bf16 and fp16 only; the 4-bit
    # ones (WEIGHT "nf4"): bf16 and fp16; DoRA's (COL_SCALE): not fp32-ieee (cuBLAS runs it on a GPU),
    # one of them TMA, and its PEFT dropout form's bf16 and fp16 only
    nf4 = [v for v in VARIANTS if v.endswith("_nf4")]
    dora = [v for v in VARIANTS if v.endswith(("_dora", "_dora_peft"))]
    assert len(nf4) == 9 and len(dora) == 14 and all(VARIANTS[v].constexprs["COL_SCALE"] for v in dora)
    peft = [v for v in dora if v.endswith("_peft")]   # DoRA's PEFT dropout form: 16-bit only
    assert len(built) == (2 * 4 * (len(VARIANTS) - 3 - len(nf4) - len(dora)) + 3 * 2 + 2 * 2 * len(nf4)
                          + 2 * 3 * (len(dora) - 1 - len(peft)) + 2 + 2 * 2 * len(peft))


def test_4bit_builds_round_the_absmax_product_before_the_offset(rows):
    """Double-quantised absmax = fp32(map · scale) + offset, two roundings as bitsandbytes decodes it:
    the product is PTX's mul.rn.f32 (never fused into an fma); no dense build has one."""
    for r in rows:
        if r["variant"].endswith("_nf4"):
            assert r["rounded_products"] > 0, _where(r)
        else:
            assert r["rounded_products"] == 0, _where(r)


def test_tensor_cores_and_shared_memory(rows):
    """Every build but fp32-ieee's uses tensor cores; ieee dots are FMAs by definition (the
    dispatcher runs cuBLAS there, these builds serve forced runs and direct kernel calls)."""
    for r in rows:
        assert r["mma"] == (r["dtype"] != "fp32-ieee"), f"{_where(r)}: mma {r['mma']}"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], f"{_where(r)}: {r['shared_bytes']} B shared"


def _main_path(rows):
    return [r for r in rows if r["main_path"] and r["config"]["BLOCK_M"] >= 64 and r["dtype"] != "fp32-ieee"]


def test_no_launchable_config_spills(rows):
    """Every config the pruners leave, decode tiles and partial kernels included (issue 8: configs
    that spill are pruned, not left to the autotuner)."""
    assert _main_path(rows)
    for r in rows:
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{_where(r)}: spills {r['stack_bytes']} B"


def test_hopper_main_path_uses_wgmma(rows):
    hopper = [r for r in _main_path(rows) if r["arch"] == "sm_90"]
    assert hopper
    for r in hopper:
        assert r["wgmma"], f"{_where(r)}: main GEMM without wgmma on sm_90"
    # the check is not vacuous: the same kernels built for Ampere have none
    assert not any(r["wgmma"] for r in rows if r["arch"] == "sm_80")


def test_hopper_builds_without_wgmma_are_the_small_mma_ones(rows):
    """wgmma takes 64 rows per warpgroup. Without it on sm_90 (mma.sync instead) are only: decode
    tiles (BLOCK_M 16/32: memory-bound, a 64-row MMA would be mostly padding), the skinny pass (its
    MMA is r columns wide) and the dA-only backward (gsᵀ·x: an r-row MMA) — none a main GEMM."""
    for r in rows:
        if r["arch"] == "sm_90" and not r["wgmma"] and r["dtype"] != "fp32-ieee":
            small = (r["config"].get("BLOCK_M", 64) < 64 or r["variant"].startswith("skinny")
                     or r["variant"].startswith("backward_da_only"))
            assert small, f"{_where(r)}: no wgmma"


def test_main_tiles_are_configs_the_pruners_keep():
    """The quick report's tile of each build (`python -m lora_fast.aot` without --all-configs) is one
    the autotuner can launch: aot.main_config takes it from configs' lists through the kernel's own
    pruner (the first kept for large M, for 16 rows on the split-K path), not from a table of its own."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from lora_fast.aot import VARIANTS, autotune_configs, main_config\n"
            "print([(v, a, d) for v, s in VARIANTS.items() for a in s.archs for d in s.dtypes\n"
            "       if main_config(v, a, d) not in autotune_configs(v, a, d)])")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


# Prints the (variant, dtype, arch) whose pruners keep a fallback tile, and the launches (those and M)
# that keep one beside a shared tile; run without the interpreter (its lists are one config each).
_FALLBACK_USE = """
from lora_fast.aot import VARIANTS, _pruned
from lora_fast.kernels import configs
fallbacks = {"multi_forward": set(configs.MULTI_FORWARD_FALLBACKS),
             "multi_backward": {(None, *f) for f in configs.MULTI_BACKWARD_FALLBACKS}}
seen, beside = set(), []
for variant, spec in VARIANTS.items():
    kind = variant.replace("_dropout", "")
    if kind not in fallbacks:
        continue
    for arch in spec.archs:
        for dtype in spec.dtypes:
            for m in (16, 32, 64, 128, 1 << 20):
                hits = [(c.get("BLOCK_M") if kind == "multi_forward" else None, c["BLOCK_N"], c["BLOCK_K"],
                         c["num_stages"], c["num_warps"]) in fallbacks[kind] for c in _pruned(variant, arch, dtype, m)]
                if any(hits):
                    seen.add((variant, dtype, arch))
                if any(hits) and not all(hits):
                    beside.append((variant, dtype, arch, m))
import json
print(json.dumps([sorted(seen), beside]))
"""


def test_mixed_kernels_take_their_fallback_tiles_only_where_limits_leave_no_shared_one():
    """The mixed-batch kernels' fallback tiles (configs.MULTI_*_FALLBACKS) are kept only for the
    launches their LIMITS rows leave none of the single-adapter kernels' tiles (fp32 (tf32) with dropout,
    the forward on sm_80; ieee with dropout), never beside one of those, so every other launch times
    the same tiles as the single-adapter kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _FALLBACK_USE], env=env, check=True, capture_output=True,
                         text=True).stdout
    seen, beside = json.loads(out.strip().splitlines()[-1])
    assert beside == []
    assert {tuple(s) for s in seen} == {
        ("multi_forward_dropout", "fp32", 80), ("multi_forward_dropout", "fp32-ieee", 80),
        ("multi_forward_dropout", "fp32-ieee", 90), ("multi_backward_dropout", "fp32", 80),
        ("multi_backward_dropout", "fp32", 90), ("multi_backward_dropout", "fp32-ieee", 80),
        ("multi_backward_dropout", "fp32-ieee", 90)}


# Prints, per variant, the tiles its pruner keeps over every row class that are (not) 4-bit tiles.
_NF4_TILE_USE = """
import json
from lora_fast.aot import VARIANTS, autotune_configs
from lora_fast.kernels import configs
tiles = {"forward": {t for t in configs.NF4_FORWARD_TILES}, "backward": {t for t in configs.NF4_BACKWARD_TILES},
         "split_k": {t for t in configs.NF4_SPLIT_K_TILES}}
only = {k: v - {s for s in v if s in dense} for k, (v, dense) in {
    "forward": (tiles["forward"], {configs._gemm_shape(c) for c in configs.forward_configs()}),
    "backward": (tiles["backward"], {configs._backward_shape(c) for c in configs.backward_configs()}),
    "split_k": (tiles["split_k"], {configs._split_k_shape(c) for c in configs.split_k_configs()})}.items()}
def shape(kind, c):
    if kind == "forward":
        return (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"], c["num_warps"])
    if kind == "backward":
        return (c["BLOCK_N"], c["BLOCK_K"], c["num_stages"], c["num_warps"])
    return (c["BLOCK_K"], c["num_stages"], c["num_warps"])
wrong = []
for v, spec in VARIANTS.items():
    kind = ("forward" if v.startswith("forward_") and "tma" not in v else "backward" if v.startswith("backward_")
            and "tma" not in v else "split_k" if v.startswith("split_k_partial") else None)
    if kind is None:
        continue
    for a in spec.archs:
        for d in spec.dtypes:
            for c in autotune_configs(v, a, d):
                s = shape(kind, c)
                if v.endswith("_nf4") != (s in tiles[kind]) and (v.endswith("_nf4") or s in only[kind]):
                    wrong.append((v, d, a, s))
print(json.dumps(wrong))
"""


def test_4bit_kernels_take_only_their_tiles_and_dense_ones_never():
    """A 4-bit W0's launches choose among configs.NF4_*_TILES only (8 warps, 64x64 W0 tiles: the dense
    lists' tiles spilled with the decode), and a dense W0's launches never take the tiles only the
    4-bit kernels have: the dense builds are those of before 4-bit weights."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _NF4_TILE_USE], env=env, check=True, capture_output=True,
                         text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_operand_offsets_are_64_bit_for_any_strides():
    """Compiled for arbitrary strides (transposed or sliced views), every pointer offset into x, W0,
    dY, A, B and the partial buffers is computed in int64 (row * stride, or k * stride on a
    transposed view, can pass 2**31 elements): no `tt.addptr` of theirs takes i32 offsets. Checked on
    the TTIR, so no tensor of 2**31 elements is needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lora_fast.aot", "--strided", "--dtype", "bf16", "fp32",
                          "--json"], env=env, check=True, capture_output=True, text=True).stdout
    strided = json.loads(out.strip().splitlines()[-1])
    assert {r["variant"] for r in strided} == set(VARIANTS)
    for r in strided:
        assert r["i32_operand_offsets"] == 0, f"{_where(r)}: {r['i32_operand_offsets']} i32 pointer offsets"
