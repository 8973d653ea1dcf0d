"""What lora_linear's entrance does with inputs that used to come out silently wrong or fail
obscurely (issue 14): strided bias on every forward path, float16 partial sums that overflow,
autocast checked before it casts and as nn.Linear casts, tensors that are not dense, a scaling that
changes under torch.compile, torch.func transforms, and dispatch.forced in one thread only."""
import contextlib
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from helpers import DEVICE, HAS_CUDA, KERNEL_DTYPES, assert_close, make_inputs
from lora_fast import LoRALinearFunction, dispatch, lora_linear
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref

SCALING = 0.75


def _leaves(t, names=("x", "weight", "lora_A", "lora_B", "bias")):
    return {k: (v.detach().clone().requires_grad_(k in names) if v is not None else None) for k, v in t.items()}


def _strided_bias(N, dtype, seed):
    """A fresh random bias viewed with stride 2 (every other element of a 2N vector)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * N, generator=g, dtype=torch.float64).to(DEVICE, dtype)[::2]


# --- 1. strided bias --------------------------------------------------------------------------

# (forward path, M): split_k runs M <= 64 rows, tma M > 64 (and 16-byte rows: K a multiple of 8)
FORWARD_CASES = [("in_loop", 37), ("split", 37), ("split_k", 9), ("cublas", 37), ("tma", 70)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("path,M", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_strided_bias_every_forward_path(path, M, dtype):
    """The kernels read bias as contiguous values: bias[::2] gave every other element of the
    wrong vector (~50% error) on in_loop, split, split_k and tma."""
    K, N, r = 40, 45, 5
    t = make_inputs(M, K, N, r, dtype, seed=101)
    t["bias"] = _strided_bias(N, dtype, seed=102)
    assert not t["bias"].is_contiguous()
    if path == "tma" and not dispatch.tma_possible(t["x"], t["weight"]):
        pytest.skip("TMA needs fp16/bf16, a Triton with host descriptors and sm_90+ (or the interpreter)")
    with dispatch.forced(forward=path):   # a forced path runs, or raises: never falls back
        y = lora_linear(**t, scaling=SCALING, backend="triton")
    assert_close(f"y {path}", y, lora_linear_ref(**t, scaling=SCALING), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_strided_bias_torch_backend(dtype):
    t = make_inputs(23, 19, 17, 4, dtype, seed=103)
    t["bias"] = _strided_bias(17, dtype, seed=104)
    y = lora_linear(**t, scaling=SCALING, backend="torch")
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_bias_gradient(backend):
    """A strided view of a trainable vector as bias: the view's forward and its gradient (dy summed
    over rows into every other element of the vector, the rest zero)."""
    M, K, N, r = 13, 11, 9, 3
    t = make_inputs(M, K, N, r, torch.float32, seed=105)
    base = torch.randn(2 * N, generator=torch.Generator().manual_seed(106)).to(DEVICE).requires_grad_(True)
    y = lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], base[::2], scaling=SCALING, backend=backend)
    assert_close("y", y, lora_linear_ref(**{**t, "bias": base[::2]}, scaling=SCALING), torch.float32)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(107)).to(DEVICE)
    y.backward(dy)
    ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALING)
    assert_close("grad bias", base.grad[::2], ref["bias"], torch.float32)
    assert torch.equal(base.grad[1::2], torch.zeros(N, device=DEVICE))


# --- 8. float16 sums rounded once ---------------------------------------------------------------

def _overflow_case(dtype=torch.float16):
    """Column 0 of y: x·W0ᵀ = -60000 and s·xs·Bᵀ = +70016 (each within float16's 65504 but the LoRA
    term is not), so the exact y[0, 0] is 10016; the same numbers make dX[0, 0] = 10016 for
    dY = e₀₀. The other entries are small random numbers."""
    M, K, N, r = 3, 4, 5, 2
    t = make_inputs(M, K, N, r, torch.float32, seed=108)
    t["x"][0] = torch.tensor([1.0, 0, 0, 0])
    t["weight"][0], t["weight"][:, 0] = 0.0, 0.0
    t["weight"][0, 0] = -60000.0
    t["lora_A"][0], t["lora_A"][:, 0] = 0.0, 0.0
    t["lora_A"][0, 0] = 2.0
    t["lora_B"][0], t["lora_B"][:, 0] = 0.0, 0.0
    t["lora_B"][0, 0] = 35008.0
    t["bias"][0] = 0.0
    dy = torch.zeros(M, N)
    dy[0, 0] = 1.0
    return {k: v.to(DEVICE, dtype) for k, v in t.items()}, dy.to(DEVICE, dtype)


@pytest.mark.parametrize("backend,paths", [("torch", None), ("triton", ("cublas", "cublas")),
                                           ("triton", ("in_loop", "fused")), ("triton", ("split", "split"))],
                         ids=["torch", "triton-cublas", "triton-in_loop-fused", "triton-split"])
def test_float16_partial_sums_do_not_overflow(backend, paths):
    """The torch path (and so the dispatcher's cublas path) rounded the LoRA term to float16 before
    adding the base GEMM: inf where the kernels and a merged nn.Linear give 10016 (forward and dX)."""
    t, dy = _overflow_case()
    leaves = _leaves(t, names=("x",))
    with dispatch.forced(*paths) if paths else contextlib.nullcontext():
        y = lora_linear(**leaves, scaling=1.0, backend=backend)
        y.backward(dy)
    assert y[0, 0].item() == 10016.0
    assert_close("y", y, lora_linear_ref(**t, scaling=1.0), torch.float16)
    ref = lora_linear_backward_ref(dy, t["x"], t["weight"], t["lora_A"], t["lora_B"], 1.0)
    assert leaves["x"].grad[0, 0].item() == 10016.0
    assert_close("grad x", leaves["x"].grad, ref["x"], torch.float16)
    merged_weight = (t["weight"].float() + t["lora_B"].float() @ t["lora_A"].float()).half()   # as merge()
    merged = F.linear(t["x"], merged_weight, t["bias"])
    assert merged[0, 0].item() == 10016.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_adapters_on_float16_keep_xs_in_float16(backend):
    """Documented (lora_linear's docstring, "Range"): float32 adapters on a float16 input are rounded
    to float16 and so is xs = s·x·Aᵀ, so |xs| > 65504 gives inf where PEFT, computing the LoRA branch
    in float32, stays finite. Pinned here so that a change of this behaviour is a decision."""
    x = torch.full((2, 3), 100.0, device=DEVICE, dtype=torch.float16)
    weight = torch.full((4, 3), 0.5, device=DEVICE, dtype=torch.float16)
    lora_A = torch.full((2, 3), 400.0, device=DEVICE)          # float32 masters: x·Aᵀ = 120000
    lora_B = torch.full((4, 2), 1e-3, device=DEVICE)
    y = lora_linear(x, weight, lora_A, lora_B, scaling=1.0, backend=backend)
    peft = (F.linear(x, weight).float() + (x.float() @ lora_A.t()) @ lora_B.t()).half()   # 150 + 240
    assert torch.isfinite(peft).all() and not torch.isfinite(y).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float16_backward_keeps_gs_in_float16(backend):
    """Documented beside xs: gs = s·dY·B (M, r) is float16 too, so |gs| > 65504 makes dX inf where
    PEFT (dY·B in float32 with float32 adapters) stays finite. Pinned: changing it is a decision."""
    x = torch.full((2, 3), 1.0, device=DEVICE, dtype=torch.float16, requires_grad=True)
    weight = torch.full((4, 3), 0.5, device=DEVICE, dtype=torch.float16)
    lora_A = torch.full((2, 3), 1e-3, device=DEVICE)
    lora_B = torch.full((4, 2), 400.0, device=DEVICE)   # float32 masters: dY·B = 4 · 100 · 400 = 160000
    dy = torch.full((2, 4), 100.0, device=DEVICE, dtype=torch.float16)
    lora_linear(x, weight, lora_A, lora_B, scaling=1.0, backend=backend).backward(dy)
    peft = ((dy.float() @ lora_B) @ lora_A + dy.float() @ weight.float()).half()   # 480 + 200
    assert torch.isfinite(peft).all() and not torch.isfinite(x.grad).any()


# --- 10. autocast: check, then cast as nn.Linear does --------------------------------------------

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("w_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("x_dtype", FLOATS, ids=str)
def test_autocast_follows_nn_linear(x_dtype, w_dtype):
    """Under CPU autocast (bf16) the output dtype is F.linear's for the same x and weight dtypes
    (float64 is never cast), values to that dtype's bound; where F.linear raises, a TypeError names
    the argument."""
    t = make_inputs(6, 10, 7, 3, torch.float64, device="cpu", seed=109)
    t = {k: v.to(x_dtype if k == "x" else w_dtype) for k, v in t.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            expected = F.linear(t["x"], t["weight"], t["bias"]).dtype
        except RuntimeError:
            expected = None
        if expected is None:
            with pytest.raises(TypeError, match=r"expected dtype .*torch\.autocast"):
                lora_linear(**t, scaling=SCALING, backend="torch")
            return
        y = lora_linear(**t, scaling=SCALING, backend="torch")
    assert y.dtype == expected
    cast = {k: v.to(expected) for k, v in t.items()}   # what autocast computed on
    assert_close("y", y, lora_linear_ref(**cast, scaling=SCALING), expected)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.update(weight=t["weight"].to(torch.int64)), "weight: expected a floating dtype"),
    (lambda t: t.update(lora_A=t["lora_A"].to(torch.int32)), "lora_A: expected a floating dtype"),
    (lambda t: t.update(weight="W0"), "weight: expected a torch.Tensor"),
    (lambda t: t.update(bias=[0.0] * 7), "bias: expected a torch.Tensor"),
])
def test_autocast_checks_before_casting(change, match):
    """Autocast cast integer tensors to bf16 (accepted) and met a string with AttributeError."""
    t = make_inputs(6, 10, 7, 3, torch.float32, device="cpu", seed=110)
    change(t)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=match):
        lora_linear(**t, backend="torch")


def test_autocast_master_adapters_get_float32_gradients():
    t = _leaves(make_inputs(6, 10, 7, 3, torch.float32, device="cpu", seed=111), names=("lora_A", "lora_B"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(**t, scaling=SCALING, backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert t["lora_A"].grad.dtype == t["lora_B"].grad.dtype == torch.float32


# --- 17. tensors that are not dense; meta tensors -----------------------------------------------

def _jagged(K):
    return torch.nested.nested_tensor([torch.randn(2, K), torch.randn(3, K)], layout=torch.jagged)


def _nested(K):
    return torch.nested.nested_tensor([torch.randn(2, K), torch.randn(3, K)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,make,kind", [
    ("x", lambda t: t["x"].to_sparse(), "sparse_coo"),
    ("x", lambda t: t["x"].to_sparse_csr(), "sparse_csr"),
    ("x", lambda t: _jagged(t["x"].shape[1]), r"nested \(jagged\)"),
    ("x", lambda t: _nested(t["x"].shape[1]), r"nested \(strided\)"),
    ("x", lambda t: t["x"].to_mkldnn(), "_mkldnn"),
    ("weight", lambda t: t["weight"].to_sparse(), "sparse_coo"),
    ("lora_A", lambda t: t["lora_A"].to_sparse_csr(), "sparse_csr"),
    ("bias", lambda t: t["bias"].to_sparse(), "sparse_coo"),
], ids=["x-coo", "x-csr", "x-jagged", "x-nested", "x-mkldnn", "weight-coo", "lora_A-csr", "bias-coo"])
def test_layouts_other_than_dense_are_refused_by_name(name, make, kind, backend):
    t = make_inputs(4, 6, 5, 2, torch.float32, device="cpu", seed=112)
    t[name] = make(t)
    with pytest.raises(TypeError, match=rf"{name}: expected a dense \(strided\) tensor, got a {kind} tensor"):
        lora_linear(**t, backend=backend)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_meta_tensors_give_shapes_only(dropout_p):
    """All-meta inputs (deferred initialisation) run the torch path as nn.Linear does: meta output
    and gradients of the right shapes and dtypes; the kernels refuse the device by name."""
    t = _leaves(make_inputs(2 * 3, 8, 5, 2, torch.float32, device="cpu", seed=113))
    t = {k: v.detach().to("meta").requires_grad_(True) for k, v in t.items()}
    y = lora_linear(t["x"].view(2, 3, 8), t["weight"], t["lora_A"], t["lora_B"], t["bias"],
                    dropout_p=dropout_p, training=True)
    assert y.device.type == "meta" and y.shape == (2, 3, 5) and y.dtype == torch.float32
    y.sum().backward()
    for v in t.values():
        assert v.grad.device.type == "meta" and v.grad.shape == v.shape
    with pytest.raises(ValueError, match="device meta"):
        lora_linear(**t, backend="triton")


# --- 18. torch.compile with a changing scaling --------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_with_changing_scaling(backend):
    """A scaling that changes between calls becomes a symbolic float, which math.isfinite could not
    trace (fullgraph=True raised on the second value)."""
    torch._dynamo.reset()
    t = make_inputs(6, 8, 5, 2, torch.float32, seed=114)
    A = t["lora_A"].clone().requires_grad_(True)

    def step(x, scaling):
        return lora_linear(x, t["weight"], A, t["lora_B"], t["bias"], scaling=scaling, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    try:
        for scaling in (2.0, 3.0, 0.5):
            y = compiled(t["x"], scaling)
            (g,) = torch.autograd.grad(y.square().sum(), A)
            y_e = step(t["x"], scaling)
            (g_e,) = torch.autograd.grad(y_e.square().sum(), A)
            assert_close(f"y at scaling {scaling}", y, y_e, torch.float32)
            assert_close(f"grad A at scaling {scaling}", g, g_e, torch.float32)
    finally:
        torch._dynamo.reset()


# --- 19. torch.func ---------------------------------------------------------------------------

FUNC_BACKENDS = [("torch", torch.float64), ("triton", torch.float32)]


def _func_inputs(dtype, seed, M=5, K=7, N=6, r=3):
    device = "cpu" if dtype == torch.float64 else DEVICE
    return make_inputs(M, K, N, r, dtype, device=device, seed=seed)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("backend,dtype", FUNC_BACKENDS, ids=["torch", "triton"])
def test_func_grad_matches_autograd(backend, dtype, dropout_p):
    t = _func_inputs(dtype, seed=115)

    def loss(x, A, B):
        torch.manual_seed(7)          # the same dropout seed for both
        return lora_linear(x, t["weight"], A, B, t["bias"], scaling=SCALING, dropout_p=dropout_p,
                           training=True, backend=backend).square().sum()

    grads = torch.func.grad(loss, argnums=(0, 1, 2))(t["x"], t["lora_A"], t["lora_B"])
    leaves = [t[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B")]
    loss(*leaves).backward()
    for name, g, leaf in zip(("x", "lora_A", "lora_B"), grads, leaves):
        assert_close(f"grad {name}", g, leaf.grad, dtype)


@pytest.mark.parametrize("trainable", [False, True], ids=["inference", "trainable_adapters"])
@pytest.mark.parametrize("batched", ["x", "lora_A", "x_and_lora_B"])
@pytest.mark.parametrize("backend,dtype", FUNC_BACKENDS, ids=["torch", "triton"])
def test_vmap_matches_a_loop(backend, dtype, batched, trainable):
    """The vmap rule: x alone batched folds into more rows of one call, anything else loops; the
    kernels run on plain tensors (no path fails and falls back)."""
    t = _func_inputs(dtype, seed=116)
    if trainable:
        t = _leaves(t, names=("lora_A", "lora_B"))
    g = torch.Generator().manual_seed(117)
    names = batched.split("_and_")
    stacks = {k: torch.randn(4, *t[k].shape, generator=g, dtype=torch.float64).to(t[k]) for k in names}

    def f(*tensors):
        kw = {**t, **dict(zip(names, tensors))}
        return lora_linear(**kw, scaling=SCALING, backend=backend)

    dispatch.clear()
    y = torch.func.vmap(f)(*stacks.values())
    assert dispatch.failures() == {}
    loop = torch.stack([f(*(s[i] for s in stacks.values())) for i in range(4)])
    assert_close("vmap y", y, loop, dtype)


@pytest.mark.parametrize("backend,dtype", FUNC_BACKENDS, ids=["torch", "triton"])
def test_per_sample_gradients_vmap_of_grad(backend, dtype):
    t = _func_inputs(dtype, seed=118)
    xb = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(119), dtype=torch.float64).to(t["x"])

    def loss(A, x):
        return lora_linear(x, t["weight"], A, t["lora_B"], t["bias"], scaling=SCALING, backend=backend).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(t["lora_A"], xb)
    for i in range(4):
        ref = lora_linear_backward_ref(2 * lora_linear_ref(xb[i], t["weight"], t["lora_A"], t["lora_B"], t["bias"],
                                                           SCALING),
                                       xb[i], t["weight"], t["lora_A"], t["lora_B"], SCALING)["lora_A"]
        assert_close(f"sample {i} grad A", per_sample[i], ref, dtype)


def test_vmap_dropout_same_randomness_is_a_loop_with_one_seed():
    t = _func_inputs(torch.float64, seed=120)
    xb = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(121), dtype=torch.float64)
    f = lambda x: lora_linear(x, t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling=SCALING,
                              dropout_p=0.5, training=True, backend="torch")
    torch.manual_seed(3)
    y = torch.func.vmap(f, randomness="same")(xb)
    loop = []
    for x in xb:
        torch.manual_seed(3)
        loop.append(f(x))
    assert_close("vmap y", y, torch.stack(loop), torch.float64)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(f)(xb)        # vmap's default randomness="error" refuses the seed's draw


def _tangent_ref(t, tangents):
    """y's tangent in float64: y is linear in each of x, W0, A, B, b."""
    ref = lambda **kw: lora_linear_ref(**{**t, "bias": None, **kw}, scaling=SCALING)
    return (ref(x=tangents["x"]) + ref(weight=tangents["weight"], lora_A=tangents["lora_A"])
            + ref(weight=torch.zeros_like(t["weight"]), lora_B=tangents["lora_B"]) + tangents["bias"].double())


@pytest.mark.parametrize("trainable", [False, True], ids=["inference", "trainable_adapters"])
@pytest.mark.parametrize("backend,dtype", FUNC_BACKENDS, ids=["torch", "triton"])
def test_jvp_and_forward_ad(backend, dtype, trainable):
    """The Function's jvp (torch.func.jvp, and forward-mode AD on dual tensors) on either backend."""
    t = _func_inputs(dtype, seed=122)
    if trainable:
        t = _leaves(t, names=("lora_A", "lora_B"))
    tangents = {k: v for k, v in _func_inputs(dtype, seed=123).items()}
    names = ("x", "weight", "lora_A", "lora_B", "bias")
    f = lambda *a: lora_linear(*a[:4], a[4], scaling=SCALING, backend=backend)
    dispatch.clear()
    y, y_t = torch.func.jvp(f, tuple(t[k] for k in names), tuple(tangents[k] for k in names))
    assert_close("y", y, lora_linear_ref(**t, scaling=SCALING), dtype)
    assert_close("jvp tangent", y_t, _tangent_ref(t, tangents), dtype)
    with forward_ad.dual_level():
        dual = {k: forward_ad.make_dual(t[k], tangents[k]) for k in names}
        out = forward_ad.unpack_dual(f(*(dual[k] for k in names))).tangent
    assert_close("forward-AD tangent", out, _tangent_ref(t, tangents), dtype)
    assert dispatch.failures() == {}


@pytest.mark.parametrize("backend,dtype", FUNC_BACKENDS, ids=["torch", "triton"])
def test_second_order_transforms(backend, dtype):
    """jacrev of jacrev and hessian (jacfwd of jacrev): the backward is differentiated again under
    torch.func (once_differentiable's no_grad had made jacrev(jacrev) silently zero)."""
    t = _func_inputs(dtype, seed=124)
    loss = lambda A: lora_linear(t["x"], t["weight"], A, t["lora_B"], t["bias"], scaling=SCALING,
                                 backend=backend).square().sum()
    x, w, B, b = (t[k].double().cpu() for k in ("x", "weight", "lora_B", "bias"))
    exact = torch.autograd.functional.hessian(
        lambda A: (x @ w.T + SCALING * (x @ A.T) @ B.T + b).square().sum(), t["lora_A"].double().cpu())
    assert_close("jacrev(jacrev)", torch.func.jacrev(torch.func.jacrev(loss))(t["lora_A"]), exact, dtype)
    assert_close("hessian", torch.func.hessian(loss)(t["lora_A"]), exact, dtype)


def test_eager_saves_x_and_xs_only_and_nothing_for_forward_ad():
    """The setup_context split keeps eager autograd as it was: the saved tensors are x itself, xs
    (M·r values) and the parameters themselves, and nothing is kept for forward-mode AD."""
    t = _leaves(make_inputs(8, 6, 5, 2, torch.float32, seed=125), names=("lora_A", "lora_B"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        y = lora_linear(**t, scaling=SCALING)
    new = [s for s in saved if all(s.data_ptr() != t[k].data_ptr() for k in ("x", "weight", "lora_A", "lora_B"))]
    assert len(saved) == 5 and [tuple(s.shape) for s in new] == [(8, 2)]
    node = y.grad_fn.next_functions[0][0]            # y is an _unsafe_view of the Function's output
    assert type(node).__name__ == "LoRALinearFunctionBackward"
    assert getattr(node, "saved_for_forward", None) is None


def test_function_apply_under_transforms_returns_y_and_xs():
    t = _func_inputs(torch.float64, seed=126)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, "torch", 0.0, None)
    y, xs = LoRALinearFunction.apply(*args)
    yv, xsv = torch.func.vmap(lambda x: LoRALinearFunction.apply(x, *args[1:]))(t["x"][None])
    assert_close("y", yv[0], y, torch.float64)
    assert_close("xs", xsv[0], xs, torch.float64)


# --- 20. dispatch.forced in one thread ----------------------------------------------------------

def test_forced_paths_are_local_to_their_thread():
    """A thread in a forced(forward="split_k") block (split_k: M <= 64) and another running 80 rows
    at the same time: the other thread is not forced (it raised "does not apply"), the first is."""
    big = make_inputs(80, 16, 12, 2, torch.float32, seed=127)
    small = make_inputs(8, 16, 12, 2, torch.float32, seed=128)
    entered, other_done, errors = threading.Event(), threading.Event(), []

    def forced_thread():
        try:
            with dispatch.forced(forward="split_k"):
                entered.set()
                assert other_done.wait(120)
                assert_close("forced y", lora_linear(**small, backend="triton"),
                             lora_linear_ref(**small), torch.float32)
                with pytest.raises(ValueError, match="forced forward path 'split_k' does not apply"):
                    lora_linear(**big, backend="triton")
        except BaseException as error:   # noqa: BLE001 - reported by the main thread
            errors.append(error)
        finally:
            entered.set()

    def other_thread():
        try:
            assert entered.wait(120)
            assert_close("other y", lora_linear(**big, backend="triton"), lora_linear_ref(**big), torch.float32)
        except BaseException as error:   # noqa: BLE001
            errors.append(error)
        finally:
            other_done.set()

    threads = [threading.Thread(target=forced_thread), threading.Thread(target=other_thread)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors


@pytest.mark.parametrize("scaling", [10**400, -10**400], ids=["huge", "minus-huge"])
def test_an_integer_scaling_beyond_float_range_is_refused(scaling):
    t = make_inputs(3, 8, 5, 2, torch.float32)
    with pytest.raises(TypeError, match=r"scaling: expected a finite real number, got -?10000.*characters"):
        lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], scaling=scaling)


def test_forced_backward_holds_when_autograd_runs_backward_on_another_thread():
    """On CUDA autograd runs backward on a device thread of its own, which does not see the
    forward's context: the Function keeps the forward's forced paths. Stood in for here by a
    backward called from a new thread: tma does not apply to float32, so it must raise there."""
    t = make_inputs(9, 16, 12, 2, torch.float32, seed=131)
    x = t["x"].requires_grad_()
    with dispatch.forced(backward="tma"):
        y = lora_linear(x, t["weight"], t["lora_A"], t["lora_B"], t["bias"], backend="triton")
    errors = []

    def run():
        try:
            y.sum().backward()
        except BaseException as error:   # noqa: BLE001 - checked by the main thread
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert len(errors) == 1 and "forced backward path 'tma' does not apply" in str(errors[0]), errors


def test_bfloat16_on_the_triton_interpreter_is_refused():
    """The interpreter does no bfloat16 arithmetic (its tl.dot returns garbage): refused, not a
    silently wrong answer."""
    if HAS_CUDA:
        pytest.skip("on a GPU the kernels run compiled")
    t = make_inputs(5, 16, 12, 2, torch.float32)
    bf16 = {k: v.to(torch.bfloat16) for k, v in t.items()}
    with pytest.raises(ValueError, match="does no bfloat16 arithmetic"):
        lora_linear(**bf16, backend="triton")
    y = lora_linear(**bf16, backend="torch")
    assert_close("torch backend", y, lora_linear_ref(**bf16), torch.bfloat16)
