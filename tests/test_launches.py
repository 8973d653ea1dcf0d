"""How many kernels a call starts (issue 8, static half): decode-size inference must be one Triton
launch and nothing else — no extra pass over W0, no torch kernel around it — since at M ≤ 64 the
layer is bound by launch latency and by reading W0 once. Counted on the interpreter: Triton
launches through kernels/launch.py, torch work through the profiler's aten events, nested ones
included (allocations and views launch nothing and are not counted)."""
import contextlib

import pytest
import torch

from helpers import make_inputs
from lora_fast import kernels as lf_kernels  # noqa: F401  (imports the kernel modules)
from lora_fast.function import lora_linear

import lora_fast.kernels.backward as backward_mod
import lora_fast.kernels.forward as forward_mod
import lora_fast.kernels.skinny as skinny_mod
import lora_fast.kernels.splitk as splitk_mod
from lora_fast import dispatch

_FREE = {"empty", "empty_strided", "view", "_unsafe_view", "reshape", "t", "transpose", "alias",
         "detach", "as_strided", "expand", "permute", "select", "slice", "unsqueeze", "squeeze",
         "new_empty", "new_empty_strided", "lift_fresh", "resolve_conj", "resolve_neg"}


@contextlib.contextmanager
def torch_kernels():
    """Yields a list, filled on exit with the aten ops run in the block that compute or copy."""
    ops = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield ops
    ops.extend(e.name[len("aten::"):] for e in prof.events()
               if e.name.startswith("aten::") and e.name[len("aten::"):] not in _FREE)


@pytest.fixture
def triton_launches(monkeypatch):
    """Records the Triton launches instead of running them (the interpreter's own tensor work, and
    deterministic mode's NaN fill of new tensors, would otherwise show as torch ops)."""
    launched = []

    def recording(kernel, grid, like):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return lambda *args, **kwargs: None
    for module in (forward_mod, backward_mod, skinny_mod, splitk_mod):
        monkeypatch.setattr(module, "launch", recording)
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    # The small-M path itself (on a GPU the dispatcher would time these no-op launches and pick any).
    monkeypatch.setenv("LORA_FAST_DISPATCH", "heuristic")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield launched
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("M", [1, 8, 64])
def test_decode_inference_is_one_launch(M, triton_launches):
    t = make_inputs(M, 96, 80, 16, torch.float32)
    with torch.no_grad(), torch_kernels() as torch_ops:
        y = lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling=2.0)
    assert y.shape == (M, 80)
    assert triton_launches == ["_lora_forward_kernel"]
    assert torch_ops == [], f"torch kernels around the fused launch: {torch_ops}"


@pytest.mark.parametrize("M", [1, 64])
def test_split_k_inference_is_two_launches(M, triton_launches):
    """The split-K decode path (the dispatcher's alternative at M <= 64): the partial launch and
    the fixed-order reduce, no torch kernel (its partial buffers are allocations, not launches)."""
    t = make_inputs(M, 96, 80, 16, torch.float32)
    with torch.no_grad(), torch_kernels() as torch_ops, dispatch.forced(forward="split_k"):
        y = lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling=2.0)
    assert y.shape == (M, 80)
    assert triton_launches == ["_lora_split_k_partial_kernel", "_lora_split_k_reduce_kernel"]
    assert torch_ops == [], f"torch kernels around the split-K launches: {torch_ops}"


def test_small_m_training_step_launches(triton_launches):
    """Training at M ≤ 256: forward one launch (x·Aᵀ in the K-loop), backward one fused launch plus
    the two fixed-order partial reductions (dA, dB)."""
    t = make_inputs(33, 48, 40, 8, torch.float32)
    x = t["x"].requires_grad_()
    A, B = t["lora_A"].requires_grad_(), t["lora_B"].requires_grad_()
    y = lora_linear(x, t["weight"], A, B, t["bias"], scaling=2.0)
    assert triton_launches == ["_lora_forward_kernel"]
    with torch_kernels() as torch_ops:
        y.backward(torch.ones_like(y))
    assert triton_launches == ["_lora_forward_kernel", "_lora_backward_kernel"]
    assert sorted(op for op in torch_ops if op == "sum") == ["sum", "sum"], torch_ops
