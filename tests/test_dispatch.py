"""The dispatcher (lora_fast/dispatch.py): which path a "triton"-backend call runs. Measuring is
checked on CPU with a stand-in timer (the interpreter's times mean nothing) that gives each path a
time; the paths themselves run for real, and every forward/backward pairing is held to float64."""
import json

import pytest
import torch

from helpers import HAS_CUDA, KERNEL_DTYPES, assert_close, make_inputs
from lora_fast import dispatch, kernels, lora_linear
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref

SCALING = 1.7


@pytest.fixture
def ran(monkeypatch, tmp_path):
    """The paths run, in order ("forward:in_loop", "backward:cublas", ...), with a fresh dispatcher
    whose cache file is under tmp_path."""
    calls = []

    def spy(label, fn):
        def wrapped(*args, **kwargs):
            calls.append(label)
            return fn(*args, **kwargs)
        return wrapped
    # Each entry of the dispatcher's own path table, wrapped: what runs is what the table names.
    for pass_name, paths in dispatch.table().items():
        for name, path in paths.items():
            monkeypatch.setitem(paths, name, path._replace(launcher=spy(f"{pass_name}:{name}", path.launcher)))
    monkeypatch.setenv("LORA_FAST_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    monkeypatch.delenv("LORA_FAST_DISPATCH", raising=False)
    dispatch.clear()
    yield calls
    dispatch.clear()


@pytest.fixture
def timed(monkeypatch, ran):
    """Measuring switched on, with a timer that runs the path and returns the time set for it in
    the returned dict (ms by "pass:path"); the timed paths are appended to its "timed" list."""
    speeds = {"timed": []}

    def timer(fn, device):
        before = len(ran)
        fn()
        path = ran[before]
        del ran[before:]          # what the timer ran is not what the call ran
        speeds["timed"].append(path)
        return speeds[path]
    monkeypatch.setattr(dispatch, "can_measure", lambda t: True)
    monkeypatch.setattr(dispatch, "timer", timer)
    return speeds


def _step(M, K=40, N=36, r=8, dtype=torch.float32, dropout_p=0.0, seed=0):
    """A training step through lora_linear (triton backend); returns the inputs, y and the grads."""
    t = make_inputs(M, K, N, r, dtype, seed=seed)
    leaves = {k: t[k].clone().requires_grad_() for k in ("x", "lora_A", "lora_B")}
    y = lora_linear(leaves["x"], t["weight"], leaves["lora_A"], leaves["lora_B"], t["bias"],
                    scaling=SCALING, dropout_p=dropout_p, training=dropout_p > 0, backend="triton")
    dy = make_inputs(M, N, 1, 1, dtype, seed=seed + 1)["x"]
    y.backward(dy)
    return t, dy, y, {k: v.grad for k, v in leaves.items()}


def _assert_matches_reference(t, dy, y, grads, dtype):
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), dtype)
    ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    for name in ("x", "lora_A", "lora_B"):
        assert_close(name, grads[name], ref[name], dtype)


@pytest.mark.parametrize("M,expected", [(1, ["forward:in_loop", "backward:fused"]),
                                        (300, ["forward:split", "backward:split"])])
def test_without_measuring_the_static_rule_decides(M, expected, ran, monkeypatch):
    """On CPU nothing is timed (no CUDA events): in_loop/fused up to IN_LOOP_MAX_M rows, split above;
    LORA_FAST_DISPATCH=heuristic gives the same even where timing could run."""
    assert kernels.configs.IN_LOOP_MAX_M < 300
    monkeypatch.setattr(dispatch, "timer", lambda fn, device: pytest.fail("timed without a GPU"))
    _step(M)
    assert ran == expected
    monkeypatch.setenv("LORA_FAST_DISPATCH", "heuristic")
    monkeypatch.setattr(dispatch, "can_measure", lambda t: True)
    ran.clear()
    _step(M)
    assert ran == expected
    assert dispatch.choices() == {}, "the heuristic must not be recorded as a measured choice"


@pytest.mark.parametrize("fastest", [("in_loop", "split"), ("split", "cublas"), ("split_k", "fused"),
                                     ("cublas", "fused")])
def test_measuring_keeps_the_fastest_and_caches_it(fastest, timed, ran, tmp_path, monkeypatch):
    fwd, bwd = fastest
    timed.update({f"forward:{p}": 1.0 if p == fwd else 2.0 for p in dispatch.FORWARD_PATHS})
    timed.update({f"backward:{p}": 1.0 if p == bwd else 3.0 for p in dispatch.BACKWARD_PATHS})
    t, dy, y, grads = _step(37)
    forward_paths = dispatch.candidates("forward", dispatch.Call(37, 8))     # fp32: no tma
    backward_paths = dispatch.candidates("backward", dispatch.Call(37, 8))
    assert sorted(timed["timed"]) == sorted([f"forward:{p}" for p in forward_paths] +
                                            [f"backward:{p}" for p in backward_paths])
    assert ran == [f"forward:{fwd}", f"backward:{bwd}"]
    _assert_matches_reference(t, dy, y, grads, torch.float32)

    # Another M in the same power-of-two bucket (33..64): the kept choice, not timed again.
    timed["timed"].clear()
    ran.clear()
    _step(60, seed=5)
    assert timed["timed"] == [] and ran == [f"forward:{fwd}", f"backward:{bwd}"]

    # The cache file holds both choices with their times, under this device's section.
    data = json.loads((tmp_path / "dispatch.json").read_text())
    (section, entries), = data.items()
    assert section.startswith("cpu | torch ") and "| lora_fast " in section
    assert sorted(e["path"] for e in entries.values()) == sorted([fwd, bwd])
    fwd_entry = next(e for k, e in entries.items() if k.startswith("forward|float32|64|36|40|8|"))
    assert fwd_entry["ms"][fwd] == 1.0 and sorted(fwd_entry["ms"]) == sorted(forward_paths)
    assert dispatch.choices() == data

    # A new process (clear): the file's choices are used without timing.
    dispatch.clear()
    monkeypatch.setattr(dispatch, "timer", lambda fn, device: pytest.fail("timed despite the cache file"))
    ran.clear()
    _step(50, seed=9)
    assert ran == [f"forward:{fwd}", f"backward:{bwd}"]


def test_only_applicable_paths_are_timed(timed, ran, monkeypatch):
    """dropout > 0: every path, cublas too (the torch path draws the kernels' mask); r > 64: no
    in_loop/fused/split_k (one rank tile); M > 64: no split_k; M above IN_LOOP_CANDIDATE_MAX_M: no
    in_loop/fused; inference keys apart from training ones."""
    timed.update({"forward:in_loop": 2.0, "forward:split": 1.0, "forward:split_k": 1.5, "forward:cublas": 3.5,
                  "backward:fused": 1.0, "backward:split": 2.0, "backward:cublas": 2.5})
    _step(20, dropout_p=0.25)
    assert sorted(timed["timed"]) == ["backward:cublas", "backward:fused", "backward:split",
                                      "forward:cublas", "forward:in_loop", "forward:split", "forward:split_k"]
    assert ran == ["forward:split", "backward:fused"]
    timed.update({"forward:cublas": 0.5, "backward:cublas": 0.5})
    timed["timed"].clear()
    _step(20, r=100)
    assert sorted(timed["timed"]) == ["backward:cublas", "backward:split", "forward:cublas", "forward:split"]
    timed["timed"].clear()
    _step(65)     # past split-K's decode sizes
    assert sorted(timed["timed"]) == ["backward:cublas", "backward:fused", "backward:split",
                                      "forward:cublas", "forward:in_loop", "forward:split"]
    timed["timed"].clear()
    t = make_inputs(20, 40, 36, 8, torch.float32)
    with torch.no_grad():
        lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], backend="triton")
    assert sorted(timed["timed"]) == ["forward:cublas", "forward:in_loop", "forward:split", "forward:split_k"]
    assert dispatch.candidates("backward", dispatch.Call(20, 8, need_dx=False)) == ("split", "cublas")
    timed["timed"].clear()
    _step(0)      # an empty batch: nothing to time, and no key shared with M = 1
    assert timed["timed"] == []
    monkeypatch.setattr(kernels.configs, "IN_LOOP_CANDIDATE_MAX_M", 128)
    _step(130, seed=3)    # a new bucket (129..256) above the (lowered) limit
    assert sorted(timed["timed"]) == ["backward:cublas", "backward:split", "forward:cublas", "forward:split"]
    assert "in_loop" in dispatch.applicable("forward", dispatch.Call(130, 8)), "forced runs may still use it"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("fwd", dispatch.FORWARD_PATHS)
@pytest.mark.parametrize("bwd", dispatch.BACKWARD_PATHS)
def test_every_pairing_computes_the_function(fwd, bwd, dtype, ran):
    """Forward and backward are chosen apart: every pair (their saved xs is the same quantity)
    matches float64, with odd sizes (tma: fp16/bf16, M > 64 and 16-byte rows: K = 48, N = 24)."""
    tma = "tma" in (fwd, bwd)
    if tma and dtype == torch.float32:
        pytest.skip("TMA reads fp16/bf16 only")
    if fwd == "split_k" and bwd == "tma":
        pytest.skip("split_k runs for M <= 64, tma for M > 64")
    M, K, N = (70, 48, 24) if tma else (29, 45, 23)
    with dispatch.forced(forward=fwd, backward=bwd):
        t, dy, y, grads = _step(M, K=K, N=N, r=5, dtype=dtype)
    assert ran == [f"forward:{fwd}", f"backward:{bwd}"]
    _assert_matches_reference(t, dy, y, grads, dtype)


def test_tma_is_offered_only_where_it_can_read_the_inputs(timed, ran):
    """fp16 with 16-byte rows: both passes' tma timed; K = 45, N = 26: neither. A key that chose tma,
    called with an x TMA cannot read (misaligned view), runs split instead of failing."""
    timed.update({f"forward:{p}": 2.0 for p in dispatch.FORWARD_PATHS})
    timed.update({f"backward:{p}": 1.0 for p in dispatch.BACKWARD_PATHS})
    timed["forward:tma"] = timed["backward:tma"] = 0.5
    _step(70, K=48, N=24, dtype=torch.float16)
    assert {"forward:tma", "backward:tma"} <= set(timed["timed"]) and ran == ["forward:tma", "backward:tma"]
    timed["timed"].clear()
    _step(70, K=45, N=26, dtype=torch.float16)          # 90- and 52-byte rows
    assert timed["timed"] and not {"forward:tma", "backward:tma"} & set(timed["timed"])
    t = make_inputs(70, 48, 36, 8, torch.float16)
    args = (t["weight"], t["lora_A"], t["lora_B"], t["bias"])
    ran.clear()
    with torch.no_grad():
        lora_linear(t["x"], *args, scaling=SCALING, backend="triton")
        assert ran == ["forward:tma"]
        storage = torch.empty(70 * 48 + 1, dtype=torch.float16)
        x = storage[1:].view(70, 48).copy_(t["x"])      # the same key, base address 2 bytes off
        ran.clear()
        y = lora_linear(x, *args, scaling=SCALING, backend="triton")
    assert ran == ["forward:split"]
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), torch.float16)


def test_forced_paths_are_checked(ran):
    with pytest.raises(ValueError, match="forward: expected one of"):
        with dispatch.forced(forward="fused"):
            pass
    with pytest.raises(ValueError, match="forced forward path 'in_loop' does not apply"):
        with dispatch.forced(forward="in_loop"):
            _step(4, r=100)
    with pytest.raises(ValueError, match="forced backward path 'tma' does not apply"):
        with dispatch.forced(backward="tma"):
            _step(70)      # fp32: TMA reads 16-bit operands only
    assert dispatch._forced.get() == {}, "a failed forced block must restore the dispatcher"


def test_bad_mode_is_refused(ran, monkeypatch):
    monkeypatch.setenv("LORA_FAST_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="LORA_FAST_DISPATCH: expected one of"):
        _step(4)


def test_unreadable_cache_is_warned_about_and_rewritten(timed, ran, tmp_path):
    (tmp_path / "dispatch.json").write_text("{not json")
    timed.update({f"forward:{p}": 1.0 for p in dispatch.FORWARD_PATHS})
    timed.update({f"backward:{p}": 1.0 for p in dispatch.BACKWARD_PATHS})
    with pytest.warns(RuntimeWarning, match="not a readable dispatch cache"):
        _step(8)
    assert len(json.loads((tmp_path / "dispatch.json").read_text())) == 1


def test_empty_cache_setting_keeps_choices_in_the_process(timed, ran, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_FAST_DISPATCH_CACHE", "")
    timed.update({f"forward:{p}": 1.0 for p in dispatch.FORWARD_PATHS})
    timed.update({f"backward:{p}": 1.0 for p in dispatch.BACKWARD_PATHS})
    _step(8)
    assert dispatch.choices() and not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_measuring_on_the_gpu(ran):
    """The real timer: positive times for every applicable path, the fastest kept, correct results;
    inside a CUDA-graph capture a new key is not timed (the heuristic runs) and capture succeeds."""
    t, dy, y, grads = _step(512, K=1024, N=1024, r=16, dtype=torch.bfloat16)
    _assert_matches_reference(t, dy, y, grads, torch.bfloat16)
    (entries,) = dispatch.choices().values()
    assert len(entries) == 2
    for entry in entries.values():
        assert all(ms > 0 for ms in entry["ms"].values()) and entry["path"] == min(entry["ms"], key=entry["ms"].get)
    s = make_inputs(8, 1024, 1024, 16, torch.bfloat16)
    args = (s["x"], s["weight"], s["lora_A"], s["lora_B"], s["bias"])
    dispatch.clear()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm-up on a side stream compiles the kernel the heuristic picks (forced: nothing timed or kept).
    with torch.cuda.stream(side), torch.no_grad(), dispatch.forced(forward="in_loop"):
        lora_linear(*args, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = lora_linear(*args, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert dispatch.choices() == {}, "a key was timed inside a CUDA-graph capture"
    assert ran[-1] == "forward:in_loop"
    assert_close("y", out, lora_linear_ref(**s), torch.bfloat16)


def _break(monkeypatch, pass_name, path, error=RuntimeError("out of resources: shared memory")):
    """Make one path of the dispatcher's table raise, as a compile error or a launch a driver
    refuses would; returns the list of its calls."""
    calls = []

    def broken(*args, **kwargs):
        calls.append(kwargs)
        raise error
    paths = dispatch.table()[pass_name]
    monkeypatch.setitem(paths, path, paths[path]._replace(launcher=broken))
    return calls


def test_a_path_failing_while_measured_is_dropped_with_one_warning(timed, ran, monkeypatch, tmp_path):
    """split_k raises while the dispatcher times it: one warning naming the path and the error,
    the others measured and the fastest of them kept, the result right, the failure kept in the
    process and the cache file; the next key does not warn again for the same failure."""
    timed.update({f"forward:{p}": 2.0 for p in dispatch.FORWARD_PATHS})
    timed.update({f"backward:{p}": 1.0 for p in dispatch.BACKWARD_PATHS})
    timed["forward:split_k"] = 0.1            # it would have won
    timed["forward:split"] = 1.0
    calls = _break(monkeypatch, "forward", "split_k")
    with pytest.warns(RuntimeWarning, match=r"forward path 'split_k' failed .*out of resources"):
        t, dy, y, grads = _step(20)
    assert calls, "split_k was not tried"
    assert ran[-2:] == ["forward:split", "backward:fused"]
    _assert_matches_reference(t, dy, y, grads, torch.float32)
    (key, failed), = dispatch.failures().items()
    assert key.startswith("forward|float32|32|") and "out of resources" in failed["split_k"]
    entry = json.loads((tmp_path / "dispatch.json").read_text())
    (section,) = entry.values()
    assert section[key]["path"] == "split" and "split_k" in section[key]["failed"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(2, seed=4)                      # another key: split_k fails again, quietly
    assert len(dispatch.failures()) == 2


def test_a_kept_path_that_raises_later_falls_back(timed, ran, monkeypatch, tmp_path):
    """The measured choice (in_loop) starts raising on a later call (a shape of the same bucket the
    driver refuses, say): that call still returns the right result, on the next fastest path, and
    the key's choice moves there, in the process and in the file."""
    timed.update({"forward:in_loop": 0.5, "forward:split": 1.0, "forward:split_k": 2.0, "forward:cublas": 3.0})
    timed.update({f"backward:{p}": 1.0 for p in dispatch.BACKWARD_PATHS})
    _step(40)
    assert ran[0] == "forward:in_loop"
    _break(monkeypatch, "forward", "in_loop", RuntimeError("CUDA error: too many resources requested for launch"))
    ran.clear()
    with pytest.warns(RuntimeWarning, match="forward path 'in_loop' failed"):
        t, dy, y, grads = _step(50, seed=6)
    _assert_matches_reference(t, dy, y, grads, torch.float32)
    key = next(k for k in dispatch.failures() if k.startswith("forward"))
    data = json.loads((tmp_path / "dispatch.json").read_text())
    (section,) = data.values()
    assert section[key]["path"] == "split" and "in_loop" in section[key]["failed"]
    assert dispatch.choices()[next(iter(data))][key]["path"] == "split"


def test_every_path_failing_raises_and_forced_paths_are_not_replaced(timed, ran, monkeypatch):
    for path in dispatch.FORWARD_PATHS:
        _break(monkeypatch, "forward", path)
    timed.update({f"forward:{p}": 1.0 for p in dispatch.FORWARD_PATHS})
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every forward path failed"):
        _step(20)
    dispatch.clear()
    with pytest.raises(RuntimeError, match="out of resources"), dispatch.forced(forward="split"):
        _step(20)
    assert dispatch.failures() == {}, "a forced path's failure is the benchmark's to see, not remembered"


def test_errors_another_path_would_not_cure_are_raised_as_they_are(timed, ran, monkeypatch):
    """Out of memory is the caller's to handle (and says nothing about the path): raised, nothing
    recorded. A call without a key (a symbolic M under torch.compile) whose paths fail is not
    retried forever: every applicable path is tried once, then the error is raised. M = 0 runs
    no path at all."""
    timed.update({f"forward:{p}": 1.0 for p in dispatch.FORWARD_PATHS})
    timed.update({f"backward:{p}": 1.0 for p in dispatch.BACKWARD_PATHS})
    _break(monkeypatch, "forward", "split_k", torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        _step(4)
    assert dispatch.failures() == {}
    calls = {p: _break(monkeypatch, "forward", p) for p in dispatch.FORWARD_PATHS}
    t, dy, y, grads = _step(0)
    assert y.shape == (0, 36) and all(c == [] for c in calls.values()), "M = 0 ran a path"
    monkeypatch.setattr(dispatch, "_key", lambda *args: None)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="out of resources"):
        _step(4)
    assert {p: len(c) for p, c in calls.items()} == {"in_loop": 1, "split": 1, "split_k": 1, "tma": 0,
                                                      "cublas": 1}


def test_forcing_one_pass_leaves_the_other_its_fallback(timed, ran, monkeypatch):
    timed.update({f"forward:{p}": 1.0 for p in dispatch.FORWARD_PATHS})
    timed.update({"backward:fused": 0.5, "backward:split": 1.0, "backward:cublas": 2.0})
    _step(20)                                            # backward keeps fused
    _break(monkeypatch, "backward", "fused", RuntimeError("refused"))
    ran.clear()
    with dispatch.forced(forward="split"), pytest.warns(RuntimeWarning, match="'fused' failed"):
        t, dy, y, grads = _step(20, seed=2)
    _assert_matches_reference(t, dy, y, grads, torch.float32)


def test_a_failure_recorded_in_the_cache_file_is_not_tried_again(timed, ran, monkeypatch, tmp_path):
    """A new process reads the key's choice and its failed paths: the choice runs, and when it fails
    too, the fallback skips the path the file says failed."""
    timed.update({"forward:in_loop": 0.5, "forward:split": 1.0, "forward:split_k": 2.0, "forward:cublas": 3.0})
    timed.update({f"backward:{p}": 1.0 for p in dispatch.BACKWARD_PATHS})
    calls = _break(monkeypatch, "forward", "split_k")
    with pytest.warns(RuntimeWarning):
        _step(40)
    dispatch.clear()
    calls.clear()
    monkeypatch.setattr(dispatch, "timer", lambda fn, device: pytest.fail("timed despite the cache file"))
    _break(monkeypatch, "forward", "in_loop", RuntimeError("refused"))
    ran.clear()
    with pytest.warns(RuntimeWarning, match="'in_loop' failed"):
        t, dy, y, grads = _step(40, seed=8)
    assert calls == [], "split_k was tried although the cache file records it as failed"
    _assert_matches_reference(t, dy, y, grads, torch.float32)


def test_fp32_without_tf32_on_a_gpu_runs_cublas(timed, ran, monkeypatch):
    """fp32 with tf32 off on a GPU: only cublas is timed (the kernels' ieee dots are FMA tiles for
    correctness); a forced kernel path still runs."""
    monkeypatch.setattr(dispatch, "fp32_ieee_gpu", lambda t: t.dtype == torch.float32)
    monkeypatch.setattr(dispatch, "timer", lambda fn, device: pytest.fail("one candidate: nothing to time"))
    t, dy, y, grads = _step(20)
    assert ran == ["forward:cublas", "backward:cublas"]
    ran.clear()
    with dispatch.forced(forward="split", backward="fused"):
        _step(20)
    assert ran == ["forward:split", "backward:fused"]
    assert dispatch.candidates("forward", dispatch.Call(20, 8), fp32_ieee_gpu=True) == ("cublas",)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_the_timer_measures_gpu_time_not_python_overhead():
    """A path whose Python side takes 2 ms per run and whose GPU work takes microseconds is timed at
    its GPU work: the runs are queued behind a GPU sleep, so the host's gaps fall outside the events."""
    import time
    x = torch.randn(1 << 16, device="cuda")

    def path():
        time.sleep(0.002)
        x.mul_(1.0)
    ms = dispatch.timer(path, x.device)
    assert 0 < ms < 0.5, f"{ms:.3f} ms: the host's 2 ms sleep is inside the timed region"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_capturing_an_unseen_shape_asks_for_a_warm_up(ran):
    """A CUDA-graph capture of a shape no eager call has run: nothing is timed, tuned or compiled
    inside it (each would fail the capture): a clear error asking for an eager warm-up, no path
    recorded as failed; after one eager call the same capture works and replays right."""
    s = make_inputs(24, 512, 384, 16, torch.bfloat16, seed=21)
    args = (s["x"], s["weight"], s["lora_A"], s["lora_B"], s["bias"])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="run the model once eagerly"):
        with torch.cuda.graph(graph), torch.no_grad():
            lora_linear(*args, scaling=SCALING, backend="triton")
    assert dispatch.choices() == {} and dispatch.failures() == {}
    with torch.no_grad():
        lora_linear(*args, scaling=SCALING, backend="triton")          # the warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = lora_linear(*args, scaling=SCALING, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert_close("y", out, lora_linear_ref(**s, scaling=SCALING), torch.bfloat16)


def test_fp32_precision_is_read_through_either_torch_api():
    """torch's newer fp32_precision settings make reading the legacy allow_tf32 flag raise: the
    precision the kernels compile and the dispatcher's fp32 routing read both (in a subprocess:
    the setting is process-wide)."""
    import subprocess
    import sys
    code = ("import torch\n"
            "from lora_fast.backend import tf32_allowed\n"
            "assert tf32_allowed() is False\n"
            "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
            "assert tf32_allowed() is True\n"
            "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
            "assert tf32_allowed() is False\n"
            "torch.backends.cuda.matmul.fp32_precision = 'none'\n"
            "torch.backends.fp32_precision = 'tf32'\n"
            "assert tf32_allowed() is True\n")
    subprocess.run([sys.executable, "-c", code], check=True)
