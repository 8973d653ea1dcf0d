"""Three implementations that share no code agree: the float64 PyTorch reference, the C++ reference
(double, OpenMP) and the Triton kernels (interpreter on CPU, compiled on GPU), on the forward and
every gradient, over the kernel tests' odd shapes and a 3-D input."""
import os

import pytest
import torch

from helpers import DEVICE, KERNEL_DTYPES, SHAPES, assert_close, case_id, make_inputs
from lora_fast import cref, lora_linear
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref
from lora_fast.tolerances import TOLERANCE, rel_err

SCALING = 1.3

if not cref.available():
    if os.environ.get("LORA_FAST_BUILD_EXT") == "0":
        pytest.skip("installed with LORA_FAST_BUILD_EXT=0: no C++ reference", allow_module_level=True)
    pytest.fail(f"the C++ reference is missing: {cref.missing_reason()}", pytrace=False)

CASES = [(s, False) for s in SHAPES] + [((2 * 19, 33, 26, 7), True)]


def _inputs(shape, three_d, dtype, device):
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, dtype, device=device, seed=hash(shape) % 2**31)
    if three_d:
        t["x"] = t["x"].reshape(2, M // 2, K)
    return t


@pytest.mark.parametrize("shape,three_d", CASES, ids=[case_id(s) + ("-3d" if d else "") for s, d in CASES])
def test_torch_reference_and_cpp_agree(shape, three_d):
    t = _inputs(shape, three_d, torch.float64, "cpu")
    dy = torch.randn(*t["x"].shape[:-1], shape[2], dtype=torch.float64)
    y_cpp = cref.lora_linear_cref(**t, scaling=SCALING)
    y_ref = lora_linear_ref(**t, scaling=SCALING)
    assert y_cpp.shape == y_ref.shape
    assert rel_err(y_cpp, y_ref) <= TOLERANCE[torch.float64]
    g_cpp = cref.lora_linear_backward_cref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    g_ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    for name in ("x", "lora_A", "lora_B", "bias"):
        assert g_cpp[name].shape == g_ref[name].shape, name
        assert rel_err(g_cpp[name], g_ref[name]) <= TOLERANCE[torch.float64], name


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,three_d", CASES, ids=[case_id(s) + ("-3d" if d else "") for s, d in CASES])
def test_triton_kernels_agree_with_cpp(shape, three_d, dtype):
    """Through the public autograd path: lora_linear(backend="triton") forward and backward."""
    t = _inputs(shape, three_d, dtype, DEVICE)
    leaves = {k: v.detach().clone().requires_grad_(k in ("x", "lora_A", "lora_B", "bias"))
              for k, v in t.items()}
    y = lora_linear(**leaves, scaling=SCALING, backend="triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    y.backward(dy)
    base = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in leaves.items()}
    y_base = lora_linear(**base, scaling=SCALING, backend="torch")   # plain PyTorch, same dtype
    y_base.backward(dy)
    assert_close("y", y, cref.lora_linear_cref(**t, scaling=SCALING), dtype, y_base)
    g = cref.lora_linear_backward_cref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    for name in ("x", "lora_A", "lora_B", "bias"):
        assert_close(f"grad {name}", leaves[name].grad, g[name], dtype, base[name].grad)


def test_cpp_refuses_mismatched_shapes():
    t = _inputs((5, 7, 4, 3), False, torch.float64, "cpu")
    with pytest.raises(ValueError, match=r"lora_B: expected shape \(4, 3\), got \(4, 2\)"):
        cref.lora_linear_cref(t["x"], t["weight"], t["lora_A"], t["lora_B"][:, :2])


def test_cpp_reports_openmp():
    assert isinstance(cref.has_openmp(), bool)
