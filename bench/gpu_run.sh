#!/usr/bin/env bash
# What a session with a lent GPU runs, from the repository root, one stage per device call (each
# fits the 10-minute limit):
#   bash bench/gpu_run.sh tests     install, GPU facts, the whole test suite on the GPU, lora-fast-check
#   bash bench/gpu_run.sh quick     bench.layer --quick and its report
#   bash bench/gpu_run.sh targets   bench.layer --grid targets (issue 8's cases) and its report
#   bash bench/gpu_run.sh layer     the default bench.layer grid and its report
#   bash bench/gpu_run.sh model     bench.model (PEFT vs lora_fast, ~0.9B Llama) and its report
# Results are appended under bench/results/ and copied to $OUT (the device tool brings $OUT back);
# commit them with the notes in bench/NOTES.md.
set -euo pipefail
stage=${1:?usage: bash bench/gpu_run.sh tests|quick|targets|layer|model}
out=${OUT:-bench/results/out}
mkdir -p "$out"
if ! python -c "import pybind11" 2>/dev/null; then
  echo "pybind11 is not on this machine: installing without the C++ reference (its tests skip)"
  export LORA_FAST_BUILD_EXT=0
fi
pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
python - <<'PY'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, L2 {p.L2_cache_size / 2**20:.0f} MiB;"
      f" torch {torch.__version__}, triton {triton.__version__}")
PY
case "$stage" in
  tests)
    python -m pytest -q tests 2>&1 | tee "$out/pytest-gpu.log" | tail -25
    lora-fast-check 2>&1 | tee "$out/check-gpu.log" | tail -5
    lora-fast-check --all-paths 2>&1 | tee "$out/check-all-paths-gpu.log" | tail -3 ;;
  quick|layer)
    csv=bench/results/layer-cuda.csv
    if [ "$stage" = quick ]; then python -m bench.layer --quick --out "$csv"; else python -m bench.layer --out "$csv"; fi
    python -m bench.report "$csv" && cp bench/results/layer-cuda* "$out"/ ;;
  targets)
    csv=bench/results/targets-cuda.csv
    python -m bench.layer --grid targets --out "$csv" && python -m bench.report "$csv" && cp bench/results/targets-cuda* "$out"/ ;;
  model)
    csv=bench/results/model-cuda.csv
    python -m bench.model --out "$csv" && python -m bench.report "$csv" && cp bench/results/model-cuda* "$out"/ ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
