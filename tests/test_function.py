"""lora_linear end to end through autograd, on both backends: leading dims, strided inputs,
gradients of any subset of inputs, inference mode, backend choice and input checks."""
import pytest
import torch

from helpers import DEVICE, assert_close, make_inputs
from lora_fast import lora_linear
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref

BACKENDS = ["torch", "triton"]
SCALING = 0.75


def _leaf(t, requires_grad=True):
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


def _run(inputs, backend, grad_out):
    leaves = {k: _leaf(v) for k, v in inputs.items()}
    y = lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], leaves["bias"],
                    scaling=SCALING, backend=backend)
    y.backward(grad_out)
    return y, leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_kind", ["3d", "3d_transposed", "2d_transposed", "1d"])
def test_all_gradients_any_layout(backend, x_kind):
    """Every gradient (base weight and bias too) for 3-D, non-contiguous and 1-D inputs."""
    K, N, r = 27, 22, 5
    t = make_inputs(30, K, N, r, torch.float32, seed=21)
    x = t["x"]
    if x_kind == "3d":
        x = x.reshape(5, 6, K)
    elif x_kind == "3d_transposed":
        x = x.reshape(6, 5, K).transpose(0, 1)            # needs a copy to flatten: still correct
    elif x_kind == "2d_transposed":
        x = x.T.contiguous().T                           # strided view, no copy needed
    else:
        x = x[0]
    t["x"] = x
    grad_out = make_inputs(30, N, 1, 1, torch.float32, seed=22)["x"][: x.numel() // K].reshape(*x.shape[:-1], N)
    y, leaves = _run(t, backend, grad_out)
    assert y.shape == (*x.shape[:-1], N)
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), torch.float32)
    ref = lora_linear_backward_ref(grad_out, x, t["weight"], t["lora_A"], t["lora_B"], SCALING)
    for name in ("x", "weight", "bias", "lora_A", "lora_B"):
        assert_close(f"grad {name}", leaves[name].grad, ref[name], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", [("lora_A", "lora_B"), ("x",), ("lora_B",), ("x", "lora_A")])
def test_gradient_subsets(backend, trainable):
    """Frozen inputs get no .grad; the trainable ones get the reference gradient."""
    t = make_inputs(13, 19, 17, 4, torch.float32, seed=23)
    leaves = {k: _leaf(v, k in trainable) for k, v in t.items()}
    y = lora_linear(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], leaves["bias"],
                    scaling=SCALING, backend=backend)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    ref = lora_linear_backward_ref(grad_out, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    for name, leaf in leaves.items():
        if name in trainable:
            assert_close(f"grad {name}", leaf.grad, ref[name], torch.float32)
        else:
            assert leaf.grad is None, f"{name} is frozen but got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_inference_mode(backend):
    t = make_inputs(9, 12, 10, 3, torch.float32, seed=24)
    ref = lora_linear_ref(**t, scaling=SCALING)
    params = {k: _leaf(v) for k, v in t.items()}
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = lora_linear(**params, scaling=SCALING, backend=backend)
        assert y.grad_fn is None
        assert_close("y", y, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_zero_lora_grads(backend):
    t = {k: _leaf(v) for k, v in make_inputs(0, 12, 10, 3, torch.float32, seed=25).items()}
    y = lora_linear(t["x"].reshape(0, 4, 12), t["weight"], t["lora_A"], t["lora_B"], t["bias"],
                    scaling=SCALING, backend=backend)
    assert y.shape == (0, 4, 10)
    y.sum().backward()
    assert torch.equal(t["lora_A"].grad, torch.zeros_like(t["lora_A"]))
    assert torch.equal(t["lora_B"].grad, torch.zeros_like(t["lora_B"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_repeats_backward(backend):
    """Saved tensors are never overwritten: a second backward through the same graph doubles the grads."""
    t = {k: _leaf(v) for k, v in make_inputs(11, 14, 9, 3, torch.float32, seed=26).items()}
    y = lora_linear(**t, scaling=SCALING, backend=backend)
    grad_out = torch.randn_like(y)
    y.backward(grad_out, retain_graph=True)
    first = {k: v.grad.clone() for k, v in t.items()}
    y.backward(grad_out)
    for k, v in t.items():
        torch.testing.assert_close(v.grad, 2 * first[k], rtol=1e-6, atol=1e-6)


def test_gradcheck_torch_path_float64():
    t = make_inputs(6, 7, 5, 3, torch.float64, device="cpu", seed=27)
    leaves = tuple(_leaf(t[k]) for k in ("x", "weight", "lora_A", "lora_B", "bias"))
    fn = lambda x, w, a, b, bias: lora_linear(x, w, a, b, bias, scaling=SCALING, backend="torch")
    assert torch.autograd.gradcheck(fn, leaves)


def test_backends_agree_3d_fp16():
    """The fused kernels and the torch path compute the same function (fp16, 3-D input)."""
    t = make_inputs(2 * 19, 33, 26, 7, torch.float16, device=DEVICE, seed=28)
    t["x"] = t["x"].reshape(2, 19, 33)
    ref = lora_linear_ref(**t, scaling=SCALING)
    for backend in BACKENDS:
        y = lora_linear(**t, scaling=SCALING, backend=backend)
        assert_close(f"y {backend}", y, ref, torch.float16)


def test_backend_choice(monkeypatch):
    t = make_inputs(4, 8, 6, 2, torch.float64, device="cpu", seed=29)
    monkeypatch.setenv("LORA_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LORA_FAST_BACKEND"):
        lora_linear(**t)
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    with pytest.raises(ValueError, match="float64"):
        lora_linear(**t)                                  # env overrides auto: triton, no fp64
    lora_linear(**t, backend="torch")                     # an explicit backend ignores the env
    with pytest.raises(ValueError, match="backend"):
        lora_linear(**t, backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    t = make_inputs(4, 8, 6, 2, torch.float32, device="cpu", seed=30)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lora_linear(**t, backend="triton")


@pytest.mark.parametrize("change,error,match", [
    (lambda t: t.update(x=t["x"][:, :-1]), ValueError, r"x: expected shape \(\.\.\., 8\)"),
    (lambda t: t.update(lora_A=t["lora_A"][:, :-1]), ValueError, r"lora_A: expected shape \(r, 8\)"),
    (lambda t: t.update(lora_B=t["lora_B"][:, :-1]), ValueError, r"lora_B: expected shape \(6, 2\)"),
    (lambda t: t.update(lora_B=t["lora_B"][:-1]), ValueError, r"lora_B: expected shape \(6, 2\)"),
    (lambda t: t.update(bias=t["bias"][:-1]), ValueError, r"bias: expected shape \(6,\)"),
    (lambda t: t.update(weight=t["weight"][0]), ValueError, "weight: expected 2-D"),
    (lambda t: t.update(x=t["x"].to(torch.int64)), TypeError, "x: expected a floating dtype"),
    (lambda t: t.update(lora_A=t["lora_A"].to(torch.complex64)), TypeError, "lora_A: expected a floating"),
    (lambda t: t.update(lora_B=t["lora_B"].double()), TypeError, "lora_B: expected dtype torch.float32"),
    (lambda t: t.update(x=t["x"].to("meta")), ValueError, "weight: expected device meta"),
    (lambda t: t.update(bias=[0.0] * 6), TypeError, "bias: expected a torch.Tensor"),
])
def test_bad_inputs_are_refused(change, error, match):
    t = make_inputs(4, 8, 6, 2, torch.float32, device="cpu", seed=31)
    change(t)
    with pytest.raises(error, match=match):
        lora_linear(**t, backend="torch")


@pytest.mark.parametrize("scaling", [float("nan"), "1.0", True, None])
def test_bad_scaling_is_refused(scaling):
    t = make_inputs(4, 8, 6, 2, torch.float32, device="cpu", seed=32)
    with pytest.raises(TypeError, match="scaling"):
        lora_linear(**t, scaling=scaling, backend="torch")
