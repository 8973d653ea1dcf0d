"""Every kernel variant the launchers can pick compiles ahead of time for sm_80 and sm_90 (no GPU
needed): tensor-core MMA in the PTX, no spills, shared memory within the architecture's limit, and
on Hopper the main GEMMs use warpgroup MMA (wgmma). Runs `python -m lora_fast.aot --json` in a
subprocess because the test session itself may have the interpreter switched on."""
import json
import os
import subprocess
import sys

import pytest

SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}     # opt-in shared memory per block: A100, H100


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lora_fast.aot", "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_every_variant_dtype_arch_built(rows):
    from lora_fast.aot import VARIANTS
    built = {(r["variant"], r["dtype"], r["arch"]) for r in rows}
    assert built == {(v, d, a) for v in VARIANTS for d in ("bf16", "fp16", "fp32") for a in SHARED_LIMIT}


def test_tensor_cores_no_spills_shared_fits(rows):
    for r in rows:
        where = f"{r['variant']} {r['dtype']} {r['arch']}"
        assert r["mma"], f"{where}: no tensor-core MMA in the PTX"
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{where}: spills ({r['stack_bytes']} B stack)"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], f"{where}: {r['shared_bytes']} B shared"


def test_hopper_main_gemms_use_wgmma(rows):
    hopper_main = [r for r in rows if r["arch"] == "sm_90" and r["main_path"]]
    assert hopper_main
    for r in hopper_main:
        assert r["wgmma"], f"{r['variant']} {r['dtype']}: main GEMM without wgmma on sm_90"
    # the check is not vacuous: the same kernels built for Ampere have none
    assert not any(r["wgmma"] for r in rows if r["arch"] == "sm_80")
