"""Three implementations that share no code agree: the float64 PyTorch reference, the C++ reference
(double, OpenMP) and the Triton kernels (interpreter on CPU, compiled on GPU), on the forward and
every gradient, over the kernel tests' odd shapes and a 3-D input; with LoRA dropout too, each
drawing the mask from the seed in its own way."""
import os

import pytest
import torch

from helpers import DEVICE, KERNEL_DTYPES, SHAPES, assert_close, case_id, make_inputs
from lora_fast import cref, dispatch, lora_linear, torch_path
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


DROPOUT_P = 0.3


def _dropout_seed(shape):
    return torch.tensor([2**40 + hash(shape) % 2**31], dtype=torch.int64)   # both key words non-zero


@pytest.mark.parametrize("shape,three_d", CASES, ids=[case_id(s) + ("-3d" if d else "") for s, d in CASES])
def test_cpp_dropout_agrees_with_torch_reference(shape, three_d):
    """With dropout the C++ reference draws the kernels' mask from the seed with its own Philox;
    the float64 reference rebuilds it in plain PyTorch: the two agree to float64 rounding, and
    neither is the dropout-free result (the C++ did drop something)."""
    t = _inputs(shape, three_d, torch.float64, "cpu")
    dy = torch.randn(*t["x"].shape[:-1], shape[2], dtype=torch.float64)
    seed = _dropout_seed(shape)
    drop = {"seed": seed, "dropout_p": DROPOUT_P}
    y_cpp = cref.lora_linear_cref(**t, scaling=SCALING, **drop)
    assert rel_err(y_cpp, lora_linear_ref(**t, scaling=SCALING, **drop)) <= TOLERANCE[torch.float64]
    g_cpp = cref.lora_linear_backward_cref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING, **drop)
    g_ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING, **drop)
    for name in ("x", "lora_A", "lora_B", "bias"):
        assert rel_err(g_cpp[name], g_ref[name]) <= TOLERANCE[torch.float64], name
    if t["x"].numel() > 1:
        assert rel_err(y_cpp, lora_linear_ref(**t, scaling=SCALING)) > 1e-6, "nothing was dropped"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=case_id)
@pytest.mark.parametrize("paths", [("in_loop", "fused"), ("split", "split")], ids="/".join)
def test_triton_dropout_agrees_with_cpp(shape, paths, dtype):
    """The kernels' forward and backward with dropout against the C++ reference given only the
    seed: the same elements dropped, in forward and in backward, on the single-kernel paths and on
    the split ones."""
    M, K, N, r = shape
    t = _inputs(shape, False, dtype, DEVICE)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    seed = _dropout_seed(shape).to(DEVICE)
    drop = {"dropout_p": DROPOUT_P, "seed": seed}
    args = (t["weight"], t["lora_A"], t["lora_B"])
    with dispatch.forced(*paths):
        y, xs = dispatch.lora_forward(t["x"], *args, t["bias"], SCALING, **drop)
        dx, da, db = dispatch.lora_backward(dy, t["x"], xs, *args, SCALING, **drop)
    y_pt, xs_pt = torch_path.lora_forward(t["x"], *args, t["bias"], SCALING, **drop)   # plain PyTorch
    base = dict(zip(("x", "lora_A", "lora_B"), torch_path.lora_backward(dy, t["x"], xs_pt, *args, SCALING, **drop)))
    assert_close("y", y, cref.lora_linear_cref(**t, scaling=SCALING, **drop), dtype, y_pt)
    g = cref.lora_linear_backward_cref(dy, t["x"], *args, SCALING, **drop)
    for name, value in (("x", dx), ("lora_A", da), ("lora_B", db)):
        assert_close(f"grad {name}", value, g[name], dtype, base[name])


def test_cpp_refuses_bad_dropout_arguments():
    t = _inputs((5, 7, 4, 3), False, torch.float64, "cpu")
    with pytest.raises(ValueError, match=r"p: expected a probability in \[0, 1\), got 1.0"):
        cref.lora_linear_cref(**t, seed=torch.tensor([1]), dropout_p=1.0)
    with pytest.raises(ValueError, match="seed: dropout p > 0 needs a seed"):
        cref.lora_linear_backward_cref(t["x"][:, :4], t["x"], t["weight"], t["lora_A"], t["lora_B"], dropout_p=0.1)
    with pytest.raises(ValueError, match="out: expected dtype bool, uint8, float32 or float64, got int32"):
        cref.dropout_mask(torch.empty(2, 3, dtype=torch.int32), 1, 0.5)
    with pytest.raises(ValueError, match="out: expected a writeable C-contiguous 2-D array"):
        cref.dropout_mask(torch.empty(3, 2, dtype=torch.float32).t(), 1, 0.5)


def test_cpp_refuses_mismatched_shapes():
    t = _inputs((5, 7, 4, 3), False, torch.float64, "cpu")
    with pytest.raises(ValueError, match=r"lora_B: expected shape \(4, 3\), got \(4, 2\)"):
        cref.lora_linear_cref(t["x"], t["weight"], t["lora_A"], t["lora_B"][:, :2])


def test_cpp_reports_openmp():
    assert isinstance(cref.has_openmp(), bool)
