"""Autotuning as a first GPU step meets it (issue 13), checked without a GPU.

- The launchers' real autotune calls, replayed (bench.tuning: launches recorded on meta tensors,
  the dispatcher timing every candidate as on a fresh GPU process) over the bench grid, the ~0.9B
  model step and the test shapes: no two launches with one autotune key may keep different config
  sets (else the autotuner reuses a tile one path's pruner forbids), and a first step's compile and
  benchmark counts stay within their caps.
- kernels/tuning.py on a kernel of two configs under the interpreter, Triton's own Autotuner
  underneath: a config tuned in an earlier process (the cache file) is used without timing —
  which also shows its key is the one Triton computes —, a winner is written there, a single kept
  config is not timed, and inside a CUDA-graph capture the first kept config runs, with a warning,
  and the key stays untuned.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from lora_fast import cache_file
from lora_fast.kernels import launch, tuning

# A first training step of bench.model's ~0.9B Llama on sm_90 (bench/NOTES.md v7): 218 configs
# timed and 146 builds before the caps; these are the caps (each a few above today's counts).
MODEL_1B_MAX_BENCHMARKS = 75
MODEL_1B_MAX_BUILDS = 42


@pytest.fixture(scope="module")
def replay():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench.tuning", "--capability", "8", "9", "--json"], env=env,
                         check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_replay_covers_every_workload_and_kernel(replay):
    assert set(replay) == {f"sm_{c}0/{w}" for c in (8, 9) for w in ("llama3-8b", "model-1b", "tests")}
    kernels = set().union(*(r["kernels"] for r in replay.values()))
    assert {"_lora_forward_kernel", "_lora_backward_kernel", "_lora_skinny_kernel", "_lora_split_k_partial_kernel",
            "_lora_forward_tma_kernel", "_lora_backward_tma_kernel"} <= kernels


def test_no_two_launches_share_a_key_with_different_pruned_configs(replay):
    for name, r in replay.items():
        assert r["collisions"] == [], f"{name}: {len(r['collisions'])} collisions, first {r['collisions'][:1]}"


def test_first_step_of_the_1b_model_tunes_within_the_caps(replay):
    total = replay["sm_90/model-1b"]["total"]
    assert 0 < total["benchmarks"] <= MODEL_1B_MAX_BENCHMARKS, total
    assert 0 < total["builds"] <= MODEL_1B_MAX_BUILDS, total


_exact_key = tuning.autotune_key   # the tests' own reference, whatever a test patches


def _keep(configs, named_args, **kwargs):
    return [c for c in configs if c.kwargs["BLOCK"] <= named_args["N"]]


@triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["N"],
                 prune_configs_by={"early_config_prune": _keep})
@triton.jit
def _double_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)


@pytest.fixture
def kernel(monkeypatch, tmp_path):
    """_double_kernel with a fresh autotune cache, its timing recorded (a stand-in: the
    interpreter's times mean nothing) and the cache file under tmp_path."""
    monkeypatch.setenv("LORA_FAST_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    monkeypatch.setattr(_double_kernel, "cache", {})
    timed = []

    def bench(*args, config, **meta):
        timed.append(config.kwargs["BLOCK"])
        return [1.0 if config.kwargs["BLOCK"] == 32 else 2.0] * 3
    monkeypatch.setattr(_double_kernel, "_bench", bench)
    _double_kernel.timed = timed
    return _double_kernel


def _run(kernel, n):
    x = torch.arange(n, dtype=torch.float32)
    y = torch.full_like(x, float("nan"))
    launch.launch(kernel, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x)(x, y, n)
    assert torch.equal(y, 2 * x)
    return _exact_key(kernel, (x, y, n), {})


def test_a_tuned_config_is_written_and_read_back_without_timing(kernel):
    key = _run(kernel, 100)
    assert kernel.timed == [16, 32] and kernel.cache[key].kwargs == {"BLOCK": 32}
    section = cache_file.read_section(torch.device("cpu"))
    assert section[f"autotune|_double_kernel|{key!r}"] == {"kwargs": {"BLOCK": 32}, "num_warps": 4,
                                                          "num_stages": 3}
    kernel.cache.clear()                   # a new process: Triton's cache is empty, the file is not
    kernel.timed.clear()
    assert _run(kernel, 100) == key
    assert kernel.timed == [], "timed again although the cache file has the key"
    assert kernel.cache[key].kwargs == {"BLOCK": 32}


def test_a_stale_file_entry_is_ignored(kernel):
    key = tuning.autotune_key(kernel, (torch.empty(1), torch.empty(1), 100), {})
    cache_file.write(torch.device("cpu"), {f"autotune|_double_kernel|{key!r}":
                                           {"kwargs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 3}})
    _run(kernel, 100)
    assert kernel.timed == [16, 32]


def test_one_kept_config_is_not_timed(kernel):
    key = _run(kernel, 20)                 # the pruner keeps BLOCK 16 only
    assert kernel.timed == [] and kernel.cache[key].kwargs == {"BLOCK": 16}


def test_inside_a_capture_an_untuned_key_is_refused_clearly(kernel, monkeypatch):
    """Timing synchronises and a first launch loads a module, both of which fail (and invalidate) a
    capture: an untuned key raises before anything is launched, naming the remedy; a key placed
    without timing (from disk, or the one kept config) runs; eagerly, later, the key tunes."""
    monkeypatch.setattr(tuning, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture.*run the model once eagerly"):
        _run(kernel, 100)
    assert kernel.timed == [] and kernel.cache == {}
    _run(kernel, 20)                       # one config kept: nothing to time, runs in the capture
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    key = _run(kernel, 100)
    assert kernel.timed == [16, 32] and key in kernel.cache


def test_a_launch_met_before_skips_the_exact_key(kernel, monkeypatch):
    """The exact key costs ~20 µs a launch: a launch whose key was met before asks only the cheap one."""
    _run(kernel, 100)
    exact = []
    monkeypatch.setattr(tuning, "autotune_key", lambda *a: exact.append(a) or _exact_key(*a))
    _run(kernel, 100)
    assert exact == [], "the exact key was computed for a launch met before"
    _run(kernel, 101)                      # another N: another key, which must be computed
    assert len(exact) == 1


class _FakeJIT:
    """A kernel's JIT function whose builds fail for BLOCK 32: to see what the parallel compile
    does with a config that does not build (Triton's own AsyncCompileMode, no GPU needed)."""
    def __init__(self):
        self.built = []

    def warmup(self, *args, grid, **kwargs):
        if kwargs["BLOCK"] == 32:
            raise RuntimeError("PassManager::run failed")
        self.built.append(kwargs["BLOCK"])
        return object()


def test_a_config_that_does_not_build_is_left_out_of_the_timing(monkeypatch):
    class Kernel:
        arg_names = ["x_ptr", "N"]
        fn = _FakeJIT()
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    monkeypatch.delenv("LORA_FAST_PARALLEL_COMPILE", raising=False)
    built = tuning._precompile(Kernel(), (1,), (torch.empty(4), 4), {}, configs)
    assert [c.kwargs["BLOCK"] for c in built] == [16, 64] and sorted(Kernel.fn.built) == [16, 64]
    with pytest.raises(RuntimeError, match="PassManager"):
        tuning._precompile(Kernel(), (1,), (torch.empty(4), 4), {}, configs[1:2])


def test_an_unwritable_cache_file_warns_and_the_launch_goes_on(kernel, monkeypatch, tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("LORA_FAST_DISPATCH_CACHE", str(tmp_path / "not-a-dir" / "dispatch.json"))
    with pytest.warns(RuntimeWarning, match="cannot write"):
        key = _run(kernel, 100)
    assert kernel.cache[key].kwargs == {"BLOCK": 32}
