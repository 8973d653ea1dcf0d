"""The one tolerance table, used by the tests and by `python -m lora_fast.check`.

Bound on the relative Frobenius error ‖out − ref‖ / ‖ref‖ against a float64 reference computed
from the same (already rounded) inputs. The kernels accumulate in fp32, so what remains is the
rounding of the output and of the (M, r) intermediates to the storage dtype: about twice that
dtype's unit roundoff u.

A sum with heavy cancellation (dA over a few rows whose terms nearly cancel, say) can lose more
than that to the same, unavoidable rounding of its inputs: there the bound is twice the error of
plain PyTorch computing the same thing in the same dtype, when that is larger
(`bound(dtype, baseline_err)`; the rule flash-attention's tests use).
"""
import torch

TOLERANCE = {
    torch.float32: 2e-5,   # u = 6e-8; fp32 FMAs ("ieee"), longer K-sums still far below this
    "tf32": 4e-3,          # tf32 operands keep 10 mantissa bits: u = 4.9e-4 per product, x2 for sums
    torch.float16: 1e-3,   # u = 4.9e-4 on the output; measured 2-4e-4 on the test shapes
    torch.bfloat16: 8e-3,  # u = 3.9e-3 on the output
    torch.float64: 1e-12,  # two float64 implementations of the same sums, in different orders
}


def tolerance(dtype):
    """The bound for results computed in `dtype`, tf32 when torch lets fp32 matmuls use it on CUDA."""
    from .backend import tf32_allowed
    if dtype == torch.float32 and torch.cuda.is_available() and tf32_allowed():
        return TOLERANCE["tf32"]
    return TOLERANCE[dtype]


def bound(dtype, baseline_err=None):
    """Allowed relative error: the table's, or twice plain PyTorch's in the same dtype if larger."""
    tol = tolerance(dtype)
    return tol if baseline_err is None else max(tol, 2 * baseline_err)


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 on the CPU (NaN or inf anywhere gives NaN or inf)."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
