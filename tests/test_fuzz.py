"""Property test: hypothesis draws shapes, ranks, dtypes, strides, bias and dropout settings and
holds the Triton kernels (both forward and both backward paths, forced through the dispatcher and run
by the autograd Function) to the float64 reference.
Profiles: "ci" (default, minutes on 2 CPU cores under the interpreter) and "gpu" (many more
examples; HYPOTHESIS_PROFILE=gpu)."""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import DEVICE, KERNEL_DTYPES, assert_close, make_inputs
from lora_fast import LoRALinearFunction, dispatch
from lora_fast.kernels.dropout import dropout_mask
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref

settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@st.composite
def cases(draw):
    M = draw(st.integers(0, 40))
    K = draw(st.integers(1, 70))
    N = draw(st.integers(1, 70))
    r = draw(st.integers(1, 80))
    small_rank = r <= 64      # in_loop and fused hold the whole rank in one tile
    return {
        "shape": (M, K, N, r),
        "dtype": draw(st.sampled_from(KERNEL_DTYPES)),
        "x_transposed": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "dropout_p": draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        "forward": "in_loop" if draw(st.booleans()) and small_rank else "split",
        "backward": "fused" if draw(st.booleans()) and small_rank else "split",
        "scaling": draw(st.floats(0.25, 4.0)),
        "seed": draw(st.integers(0, 2**40)),
    }


def _plain_torch(t, dy, s, keep, p):
    """The same computation in plain PyTorch ops in the inputs' dtype: the error baseline of the
    tolerance rule (lora_fast.tolerances.bound) for sums that cancel."""
    x, w, a, b, bias = t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"]
    keep = None if keep is None else keep.to(x.dtype)
    x_lora = x if keep is None else x * keep
    xs = (x_lora @ a.T) * (s / (1 - p))
    y = x @ w.T + xs @ b.T + (0 if bias is None else bias)
    gs = (dy @ b) * (s / (1 - p))
    dx_lora = gs @ a
    dx = dy @ w + (dx_lora if keep is None else dx_lora * keep)
    return y, dx, gs.T @ x_lora, dy.T @ xs


@given(cases())
def test_kernels_match_reference(case):
    M, K, N, r = case["shape"]
    dtype, p, s = case["dtype"], case["dropout_p"], case["scaling"]
    t = make_inputs(M, K, N, r, dtype, seed=case["seed"] % 2**31, bias=case["bias"])
    if case["x_transposed"]:
        t["x"] = t["x"].T.contiguous().T        # same values, strides (1, M)
    dy = make_inputs(M, N, 1, 1, dtype, seed=case["seed"] % 2**31 + 1)["x"]
    seed = torch.tensor([case["seed"]], dtype=torch.int64, device=DEVICE)
    keep = dropout_mask(seed, M, K, p) if p > 0 else None

    x, a, b = (t[k].detach().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    with dispatch.forced(forward=case["forward"], backward=case["backward"]):
        y, _ = LoRALinearFunction.apply(x, t["weight"], t["bias"], a, b, s, "triton", p, seed if p > 0 else None)
        dx, da, db = torch.autograd.grad(y, (x, a, b), dy)
    ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], s, keep, p)
    assert y.shape == (M, N) and dx.shape == (M, K)
    if M == 0:   # empty batch: nothing to compare but the zero adapter gradients
        assert torch.equal(da, torch.zeros_like(da)) and torch.equal(db, torch.zeros_like(db))
        return
    y_pt, dx_pt, da_pt, db_pt = _plain_torch(t, dy, s, keep, p)
    assert_close("y", y, lora_linear_ref(**t, scaling=s, dropout_mask=keep, dropout_p=p), dtype, y_pt)
    assert_close("dx", dx, ref["x"], dtype, dx_pt)
    assert_close("dA", da, ref["lora_A"], dtype, da_pt)
    assert_close("dB", db, ref["lora_B"], dtype, db_pt)
