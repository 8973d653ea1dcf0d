"""DoRA's column scale inside the kernels (issue 18): every forward path of the "triton" backend
applies c = m/‖W0 + s·B·A‖ in its epilogue (y = c ⊙ z + b, z kept for the magnitude's gradient),
and every backward path but tma reads c ⊙ dY as it loads dY; dm = Σ_rows dY ⊙ z comes from the
split path's pass over dY (its tiles), or after the fused kernel in row chunks. Each path is forced (lora_fast.dispatch.forced) through dora_linear's autograd and held
to the float64 reference (reference.dora_linear_ref) for y and the gradients of x, A, B, the
magnitude and the bias, over odd sizes, M = 1, an empty batch, r > 64, split-K shapes that split,
3-D and strided operands, both dropout forms, and subsets of the gradients. Outputs are poisoned
(conftest: torch.empty is NaN-filled), so an element a kernel leaves unwritten (y, z, the dm
partials) fails. Then the passes themselves: z and dm against float64, the launches each path makes
(no elementwise pass over y or dY besides the kernels'), the refusal of a forced TMA backward, and
an --impl module without the column scale still getting DoRA composed around its passes."""
import itertools
import os
import zlib

import pytest
import torch

from helpers import DEVICE, HAS_CUDA, KERNEL_DTYPES, assert_close, make_inputs
from lora_fast import dispatch, dora, torch_path
from lora_fast.reference import dora_linear_ref

pytestmark = pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1" or HAS_CUDA),
                                reason="the kernels need the Triton interpreter or a GPU")

SCALING, P = 0.8, 0.3
FORWARD = ("in_loop", "split", "split_k", "tma", "cublas")
BACKWARD = ("fused", "split", "cublas")          # the TMA backward does not take the column scale
FP16 = (torch.float16,) + ((torch.bfloat16,) if HAS_CUDA else ())


def _seed_of(*parts):
    return zlib.crc32(repr(parts).encode()) % 2**31


def _inputs(shape, dtype, name, bias=True, lead=None, layout=()):
    M, K, N, r = shape
    t = make_inputs(M, K, N, r, dtype, seed=_seed_of(name, str(dtype)), bias=bias)
    g = torch.Generator().manual_seed(_seed_of(name, "m"))
    norms = torch.linalg.vector_norm(t["weight"].double().cpu(), dim=1)
    t["magnitude"] = (norms * (0.7 + 0.6 * torch.rand(N, generator=g, dtype=torch.float64))).to(DEVICE, dtype)
    t["dy"] = make_inputs(M, N, 1, 1, dtype, seed=_seed_of(name, "dy"))["x"]
    if lead is not None:
        t["x"] = t["x"].reshape(*lead, K)
        t["dy"] = t["dy"].reshape(*lead, N)
    for op in layout:   # the values in a strided view cut from a poisoned buffer twice as wide
        v = t[op]
        if v is None:
            continue
        if v.dim() == 1:
            buf = torch.empty(2 * v.shape[0], dtype=v.dtype, device=v.device)[::2]
        else:
            buf = torch.empty(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype, device=v.device)[..., ::2]
        t[op] = buf.copy_(v)
    return t


def _run(t, forward, backward, p, seed, form, grads):
    leaves = {n: t[n].detach().clone().requires_grad_() for n in grads if t.get(n) is not None}
    args = {n: leaves.get(n, t[n]) for n in ("x", "weight", "lora_A", "lora_B", "magnitude", "bias")}
    with dispatch.forced(forward=forward, backward=backward):
        if seed is not None:
            torch.manual_seed(seed)
        y = dora.dora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], args["magnitude"],
                             args["bias"], scaling=SCALING, dropout_p=p, training=p > 0, backend="triton",
                             dropout=form)
        got = torch.autograd.grad(y, list(leaves.values()), t["dy"]) if leaves else ()
    return y, dict(zip(leaves, got))


def _drop_seed(seed):
    """The dropout seed dora_linear draws first after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.randint(0, 2**62, (1,), device=DEVICE, dtype=torch.int64)


ALL = ("x", "lora_A", "lora_B", "magnitude", "bias")
# (name, shape (M, K, N, r), forward paths, backward paths, dtypes, grads, lead, strided operands)
CASES = [
    ("odd", (19, 21, 23, 3), ("in_loop", "split", "split_k", "cublas"), BACKWARD, (torch.float32,), ALL, None, ()),
    ("one_row", (1, 64, 33, 1), ("in_loop", "split_k", "split"), ("fused", "split"), tuple(KERNEL_DTYPES), ALL,
     None, ()),
    ("r100", (33, 17, 29, 100), ("split",), ("split",), (torch.float32,), ALL, None, ()),
    ("splitk", (5, 150, 37, 16), ("split_k",), ("fused",), tuple(KERNEL_DTYPES), ALL, None, ()),
    ("tma", (70, 32, 24, 8), ("tma",), ("fused", "split"), FP16, ALL, None, ()),
    ("empty", (0, 24, 18, 4), ("in_loop", "split"), ("fused", "split"), (torch.float32,), ALL, None, ()),
    ("x_3d", (21, 45, 53, 5), ("in_loop", "split"), ("fused", "split"), (torch.float16,), ALL, (3, 7), ()),
    ("strided", (29, 37, 41, 6), ("in_loop", "split"), ("fused", "split"), (torch.float32,), ALL, None,
     ("x", "weight", "lora_A", "lora_B", "bias", "dy")),
    ("magnitude_only", (37, 45, 53, 5), ("in_loop",), ("split",), (torch.float32,), ("magnitude",), None, ()),
    ("x_only", (37, 45, 53, 5), ("split",), ("fused",), (torch.float32,), ("x",), None, ()),
]


def _matrix():
    out = []
    for name, shape, fwd, bwd, dtypes, grads, lead, layout in CASES:
        for i, (f, b) in enumerate(itertools.product(fwd, bwd)):
            dtype = dtypes[i % len(dtypes)]
            for p, form in ((0.0, "peft"), (P, "lora"), (P, "peft")):
                if p > 0 and (i + (form == "peft")) % 2:   # dropout forms in turn, not every pair both
                    continue
                # PEFT's form runs in_loop/split and fused/split with 16-bit operands only, else
                # cublas (test_peft_form_*)
                if p > 0 and form == "peft" and (f in ("split_k", "tma") or (
                        dtype == torch.float32 and (f, b) != ("cublas", "cublas"))):
                    continue
                out.append(pytest.param(name, shape, f, b, dtype, grads, lead, layout, p, form,
                                        id=f"{name}-{f}-{b}-{str(dtype)[6:]}-p{p:g}-{form}"))
    return out


@pytest.mark.parametrize("name,shape,forward,backward,dtype,grads,lead,layout,p,form", _matrix())
def test_path_matches_the_float64_reference(name, shape, forward, backward, dtype, grads, lead, layout, p, form):
    t = _inputs(shape, dtype, name, lead=lead, layout=layout)
    if forward == "tma" and not dispatch.tma_possible(t["x"].reshape(-1, shape[1]), t["weight"]):
        pytest.skip("a GPU without TMA (before Hopper)")
    seed = _seed_of(name, forward, backward, p) if p > 0 else None
    y, got = _run(t, forward, backward, p, seed, form, grads)
    y_ref, ref = dora_linear_ref(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["magnitude"], t["bias"], SCALING,
                                 dropout_p=p, seed=_drop_seed(seed) if p > 0 else None, dropout=form,
                                 grad_out=t["dy"])
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert set(got) == set(grads)
    if shape[0] == 0:
        assert got.get("x") is None or got["x"].shape == t["x"].shape
        for n in set(got) - {"x"}:
            assert torch.equal(got[n], torch.zeros_like(got[n])), n
        return
    assert_close("y", y, y_ref, dtype)
    for n, g in got.items():
        assert g.dtype == t[n].dtype, n
        assert_close(f"d{n}", g, ref[n], dtype)


@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("forward,backward", list(itertools.product(("in_loop", "split", "cublas"),
                                                                     ("fused", "split", "cublas"))))
def test_peft_form_runs_both_base_products_in_one_pass(forward, backward, dtype):
    """PEFT's dropout form: the forward kernels' K-loop takes d(x)·W0ᵀ from the x and W0 tiles of
    x·W0ᵀ (k_loop's SECOND 1), the dX GEMM ((c − 1) ⊙ dY)·W0 from its dY and W0 tiles (SECOND 2)."""
    name, shape = "peft_form", (23, 40, 31, 6)
    test_path_matches_the_float64_reference(name, shape, forward, backward, dtype, ALL, (23,), (), P, "peft")


def test_the_peft_form_in_fp32_runs_cublas_and_the_kernels_are_refused():
    """fp32 (tf32) operands: the two accumulators spilled (NOTES v16), so the PEFT form is cuBLAS's
    there; the other form, and fp16, keep the kernels."""
    t, c = _pass_inputs(M=23, K=40, N=31, r=6)
    x, w, dy = t["x"], t["weight"], t["dy"]
    peft = dispatch.Call(23, 6, operands=(x, w), dora=True, peft_form=True)
    assert dispatch.applicable("forward", peft) == ("cublas",)
    assert dispatch.applicable("backward", dispatch.Call(23, 6, True, (dy, w), dora=True, peft_form=True)) == ("cublas",)
    assert "in_loop" in dispatch.applicable("forward", dispatch.Call(23, 6, operands=(x, w), dora=True))
    half = dispatch.Call(23, 6, operands=(x.half(), w.half()), dora=True, peft_form=True)
    assert {"in_loop", "split"} <= set(dispatch.applicable("forward", half))
    seed = torch.tensor([3], dtype=torch.int64)
    for forward in ("in_loop", "split"):
        with dispatch.forced(forward=forward), pytest.raises(ValueError, match=forward):
            dispatch.lora_forward(x, w, t["lora_A"], t["lora_B"], t["bias"], SCALING, dropout_p=P, seed=seed,
                                  col_scale=c, peft_dropout=True)
    test_path_matches_the_float64_reference("peft_fp32", (23, 40, 31, 6), None, None, torch.float32, ALL, None, (),
                                            P, "peft")


@pytest.mark.parametrize("forward", ["split_k", "tma"])
def test_the_peft_form_is_not_offered_to_split_k_or_tma(forward):
    t, c = _pass_inputs(M=70 if forward == "tma" else 9, K=32, N=24, r=8, dtype=torch.float16)
    seed = torch.tensor([5], dtype=torch.int64)
    call = dispatch.Call(t["x"].shape[0], 8, operands=(t["x"], t["weight"]), dora=True, peft_form=True)
    assert forward not in dispatch.applicable("forward", call)
    assert {"in_loop", "split", "cublas"} <= set(dispatch.applicable("forward", call))
    with dispatch.forced(forward=forward), pytest.raises(ValueError, match=forward):
        dispatch.lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING, dropout_p=P,
                              seed=seed, col_scale=c, peft_dropout=True)
    # without dropout the two forms are one function: every path takes it
    with dispatch.forced(forward=forward):
        if forward == "split_k" or dispatch.tma_possible(t["x"], t["weight"]):
            dispatch.lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING, col_scale=c,
                                  peft_dropout=True)


def _pass_inputs(M=37, K=45, N=53, r=5, dtype=torch.float32, bias=True):
    t = _inputs((M, K, N, r), dtype, "passes", bias=bias)
    norm = dora.weight_norm(t["weight"], t["lora_A"], t["lora_B"], SCALING)
    c = (t["magnitude"].float() / norm).contiguous()
    return t, c


@pytest.mark.parametrize("forward", ["in_loop", "split", "split_k", "cublas"])
def test_forward_pass_returns_the_scaled_output_and_the_unscaled_product(forward):
    t, c = _pass_inputs(M=9)
    with dispatch.forced(forward=forward):
        y, xs, z = dispatch.lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING,
                                         col_scale=c)
    x, w, a, b = (t[n].double() for n in ("x", "weight", "lora_A", "lora_B"))
    z_ref = x @ w.T + SCALING * (x @ a.T) @ b.T
    assert_close("z", z, z_ref, torch.float32)
    assert_close("y", y, c.double() * z_ref + t["bias"].double(), torch.float32)
    assert_close("xs", xs, SCALING * x @ a.T, torch.float32)


@pytest.mark.parametrize("backward", BACKWARD)
@pytest.mark.parametrize("with_z", [True, False])
def test_backward_pass_reads_scaled_dy_and_sums_the_magnitude_product(backward, with_z):
    t, c = _pass_inputs()
    z = make_inputs(37, 53, 1, 1, torch.float32, seed=11)["x"]
    xs = make_inputs(37, 5, 1, 1, torch.float32, seed=12)["x"]
    with dispatch.forced(backward=backward):
        dx, da, db, dm = dispatch.lora_backward(t["dy"], t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING,
                                                col_scale=c, z=z if with_z else None)
    dz = t["dy"].double() * c.double()
    x, w, a, b = (t[n].double() for n in ("x", "weight", "lora_A", "lora_B"))
    assert_close("dx", dx, dz @ w + SCALING * (dz @ b) @ a, torch.float32)
    assert_close("da", da, SCALING * (dz @ b).T @ x, torch.float32)
    assert_close("db", db, dz.T @ xs.double(), torch.float32)
    if with_z:
        assert dm.dtype == torch.float32
        assert_close("dm", dm, (t["dy"].double() * z.double()).sum(0), torch.float32)
    else:
        assert dm is None


def test_the_tma_backward_is_refused_for_dora_and_kept_for_lora():
    t, c = _pass_inputs(M=70, K=32, N=24, r=8, dtype=torch.float16)
    xs = t["x"] @ t["lora_A"].T
    call = dispatch.Call(70, 8, True, (t["dy"], t["weight"]), dora=True)
    assert "tma" not in dispatch.applicable("backward", call)
    if dispatch.tma_possible(t["dy"], t["weight"]):
        assert "tma" in dispatch.applicable("backward", dispatch.Call(70, 8, True, (t["dy"], t["weight"])))
    with dispatch.forced(backward="tma"), pytest.raises(ValueError, match="tma"):
        dispatch.lora_backward(t["dy"], t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING, col_scale=c.float())


def _launches(fn):
    """Names of the Triton kernels fn launches (their run methods, recorded)."""
    from triton.runtime.interpreter import InterpretedFunction
    seen = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        seen.append(self.fn.__name__)
        return original(self, *args, **kwargs)
    InterpretedFunction.run = run
    try:
        fn()
    finally:
        InterpretedFunction.run = original
    return seen


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts the interpreter's launches")
@pytest.mark.parametrize("p,form", [(0.0, "peft"), (P, "peft"), (P, "lora")])
def test_a_dora_step_on_the_kernels_runs_no_torch_pass_over_y_or_dy(p, form):
    """The forward is the LoRA forward kernel alone (the scale and the bias in its epilogue; PEFT's
    dropout form's second base product in its K-loop), the split backward its two kernels (c ⊙ dY
    on their loads, the form's dX term in the dX GEMM, dm partials from the pass over dY's tiles):
    no torch op on an (M, out) or (M, in) tensor besides them (no GEMM, no mask, no copy of x)."""
    t, _ = _pass_inputs(M=24, K=40, N=36, r=4, dtype=torch.float16)   # 16-bit: the PEFT form's kernels
    leaves = [t[n].requires_grad_() for n in ("x", "lora_A", "lora_B", "magnitude")]
    from torch.utils._python_dispatch import TorchDispatchMode

    class BigOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(o, torch.Tensor) and o.dim() == 2 and tuple(o.shape) in ((24, 36), (24, 40))
                   for o in outs):
                self.ops.append(func.__name__)
            return out

    def step():
        with dispatch.forced(forward="in_loop", backward="split"):
            y = dora.dora_linear(t["x"], t["weight"], leaves[1], leaves[2], leaves[3], t["bias"], scaling=SCALING,
                                 backend="triton", dropout_p=p, training=p > 0, dropout=form)
            y.backward(t["dy"])

    mode = BigOps()
    with mode:
        launched = _launches(step)
    assert launched == ["_lora_forward_kernel", "_lora_skinny_kernel", "_lora_backward_kernel"]
    # the kernels' own outputs (y, z) are the only (M, out) tensors made: allocations and views (and
    # the interpreter's copy-back, set_), nothing computed by torch
    metadata = {"empty.memory_format", "empty_like.default", "empty.default", "view.default", "detach.default",
                "set_.source_Storage_storage_offset", "as_strided.default", "_reshape_alias.default"}
    assert "empty.memory_format" in mode.ops or "empty_like.default" in mode.ops   # the mode sees them
    assert set(mode.ops) <= metadata, sorted(set(mode.ops) - metadata)
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)


def test_an_impl_without_the_column_scale_gets_dora_composed_around_its_passes():
    """A passes module without COLUMN_SCALE (a user's --impl) runs DoRA as before: plain passes and
    the scale applied around them; the same results as the torch path's own."""
    class Plain:
        lora_forward = staticmethod(lambda *a, **k: torch_path.lora_forward(*a, **k))
        lora_backward = staticmethod(lambda *a, **k: torch_path.lora_backward(*a, **k))

    t, _ = _pass_inputs(dtype=torch.float64)
    norm = dora.weight_norm(t["weight"], t["lora_A"], t["lora_B"], SCALING)
    outs = []
    for passes in (Plain, torch_path):
        leaves = [t[n].detach().clone().requires_grad_() for n in ("x", "lora_A", "lora_B", "magnitude")]
        y = dora.DoRALinearFunction.apply(leaves[0], t["weight"], t["bias"], leaves[1], leaves[2], leaves[3], norm,
                                          SCALING, passes, 0.0, None, True)
        y.backward(t["dy"])
        outs.append([y.detach()] + [leaf.grad for leaf in leaves])
    assert not hasattr(Plain, "COLUMN_SCALE") and torch_path.COLUMN_SCALE
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("forward,backward", [("in_loop", "fused"), ("split", "split"), ("split_k", "cublas")])
def test_a_strided_col_scale_is_read_as_its_values(forward, backward):
    """The kernels read c as N contiguous values: a strided view is copied first (as the bias is),
    never read by its storage."""
    t, c = _pass_inputs(M=9)
    buf = torch.empty(2 * c.shape[0], dtype=c.dtype)
    strided = buf[::2].copy_(c)
    xs = t["x"] @ t["lora_A"].T
    z = make_inputs(9, 53, 1, 1, torch.float32, seed=11)["x"]
    outs = []
    for scale in (c, strided):
        with dispatch.forced(forward=forward, backward=backward):
            fwd = dispatch.lora_forward(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING, col_scale=scale)
            bwd = dispatch.lora_backward(t["dy"], t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING,
                                         col_scale=scale, z=z)
        outs.append(list(fwd) + list(bwd))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_dora_pass_arguments_are_refused_by_name():
    t, c = _pass_inputs(M=9)
    args = (t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING)
    for bad in (c[:-1], c.double(), c.half(), c[None]):
        with pytest.raises(ValueError, match="col_scale"):
            dispatch.lora_forward(*args, col_scale=bad)
    with pytest.raises(TypeError, match="col_scale"):
        dispatch.lora_forward(*args, col_scale=c.tolist())
    xs = t["x"] @ t["lora_A"].T
    back = (t["dy"], t["x"], xs, t["weight"], t["lora_A"], t["lora_B"], SCALING)
    with pytest.raises(ValueError, match="z"):
        dispatch.lora_backward(*back, col_scale=c, z=t["dy"][:, :-1])
    with pytest.raises(ValueError, match="z"):
        dispatch.lora_backward(*back, z=t["dy"])
    from lora_fast.kernels import backward as kernel_backward   # the launcher itself, not only the table
    with pytest.raises(ValueError, match="tma"):
        kernel_backward.lora_backward(*back, col_scale=c, path="tma")


@pytest.mark.parametrize("dtype,shape,p", [("fp16", "80x32x48", "0.3"), ("fp32", "9x16x12", "0.2")])
def test_check_cli_dora_on_every_path_pair(dtype, shape, p, capsys):
    """lora-fast-check --dora --all-paths offers DoRA's calls only the pairs that take them (no TMA
    backward; with PEFT's dropout form no split_k or tma forward, and cuBLAS alone for fp32)."""
    from lora_fast import check
    code = check.main(["--dora", "--all-paths", "--shapes", shape, "--ranks", "4", "--dtypes", dtype,
                       "--dropout", "0", p])
    out = capsys.readouterr().out
    assert code == 0, out
    # the rows' paths column (M K N r dtype p paths out ...), per dropout p
    pairs = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) > 7 and "/" in cols[6] and cols[0].isdigit():
            pairs.setdefault(cols[5], set()).add(tuple(cols[6].split("/")))
    assert set(pairs) == {"0", p}
    assert all(b != "tma" for ps in pairs.values() for _, b in ps)
    assert not {f for f, _ in pairs[p]} & {"split_k", "tma"}
    if dtype == "fp32":
        assert pairs[p] == {("cublas", "cublas")} and ("in_loop", "fused") in pairs["0"]
    else:
        assert {("in_loop", "fused"), ("split", "split")} <= pairs[p]
        assert ("tma", "fused") in pairs["0"]   # the interpreter reads TMA: its forward takes DoRA
