"""Every path of the "triton" backend, forced one pass at a time (lora_fast.dispatch.forced), against
the float64 reference, in one matrix: y, the kept xs and every gradient (dX, dA, dB, and dW, dbias
where asked) through LoRALinearFunction's autograd, over path pairs x shapes x dtypes x dropout x
bias, with odd sizes, M = 1, K = N = 1, r > 64, an empty batch, 3-D and strided x, strided
weight / adapters / bias, split-K shapes that really split, TMA shapes whose persistent grid walks
several tiles, and subsets of the gradients. Outputs are poisoned (conftest: torch.empty is
NaN-filled), so an element a path leaves unwritten fails assert_close; strided views are cut from
poisoned buffers, so a kernel that reads the gaps fails too.

Then: each forward path alone, as inference runs it (lora_linear without autograd: no xs kept); the
matrix's coverage (every path in every dtype with and without dropout and bias, and on strided
inputs); the forced paths that cannot apply raise ValueError; the split-K plan behind the split-K shapes
(they split) and on an H100 (it fills the GPU); the persistent grid behind the TMA shapes (several
tiles a program); and the GPU-only checks (bit-identical backward, real-model sizes, tf32).

Which paths run for a case is asked of the dispatcher's path table (dispatch.applicable, what
`forced` accepts), and the rule is also stated here (`forward_applies` / `backward_applies`, from
the dispatcher's documentation): test_path_table_is_the_rule holds the table to it on every case of
the matrix and on the rule's edges, test_path asserts it of each pair it runs, and the refusal tests
force what it rules out.
"""
import importlib.util
import itertools
import zlib
from typing import NamedTuple, Optional

import pytest
import torch

from helpers import DEVICE, HAS_CUDA, KERNEL_DTYPES, SHAPES, assert_close, make_inputs
from lora_fast import dispatch, lora_linear
from lora_fast.function import LoRALinearFunction
from lora_fast.kernels.dropout import dropout_mask
from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref

SCALING, P = 1.3, 0.3
FORWARD = ("in_loop", "split", "split_k", "tma", "cublas")
BACKWARD = ("fused", "split", "tma", "cublas")
GRADS = ("x", "weight", "bias", "lora_A", "lora_B")      # LoRALinearFunction's differentiable inputs

# ---------------------------------------------------------------------------------------------
# Which paths apply (lora_fast.dispatch's rule)
RANK_TILE = 64        # in_loop / fused / split_k / tma hold the whole rank in one tile
DECODE_MAX_M = 64     # split_k runs 1 <= M <= 64 rows; tma runs above that
TMA_DEVICE = (not HAS_CUDA or torch.cuda.get_device_capability()[0] >= 9) and \
    importlib.util.find_spec("triton.tools.tensor_descriptor") is not None   # Hopper (or the interpreter)


def tma_readable(t):
    """A 2-D tensor a TMA descriptor can read: fp16/bf16, contiguous along the last dim, 16-byte
    aligned base address and row stride."""
    return (t.dtype in (torch.float16, torch.bfloat16) and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


def forward_applies(path, x_rows, weight, r):
    """Whether the forward `path` can run x's rows (M, K) at rank r (split and cublas always can)."""
    M = x_rows.shape[0]
    if path in ("split", "cublas"):
        return True
    if r > RANK_TILE:
        return False
    return {"in_loop": True,
            "split_k": 1 <= M <= DECODE_MAX_M,
            "tma": M > DECODE_MAX_M and TMA_DEVICE and tma_readable(x_rows) and tma_readable(weight)}[path]


def backward_applies(path, dy, weight, r, need_dx):
    """Whether the backward `path` can run for dY (M, N) at rank r (split and cublas always can)."""
    if path in ("split", "cublas"):
        return True
    if r > RANK_TILE or not need_dx:
        return False
    return {"fused": True,
            "tma": dy.shape[0] > DECODE_MAX_M and TMA_DEVICE and tma_readable(dy) and tma_readable(weight)}[path]


# ---------------------------------------------------------------------------------------------
# Cases
def _view(t, how):
    """t's values in a strided layout cut from a poisoned (NaN) buffer: "T" column-major storage,
    "rows2" every second row of a buffer twice as tall, "cols2" every second column of one twice as
    wide, "every2" every second element (1-D), "offset1" one element past an aligned address."""
    if how is None:
        return t
    if how == "T":
        return t.T.contiguous().T
    if how == "offset1":
        view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    else:
        wide = list(t.shape)
        wide[1 if how == "cols2" else 0] *= 2
        buf = torch.empty(wide, dtype=t.dtype, device=t.device)
        view = buf[:, ::2] if how == "cols2" else buf[::2]
    return view.copy_(t)


def _x_3d(x, lead, how):
    """x (M, K) as (B, T, K) = lead + (K,): "3d" contiguous, "3d_sliced" the first K columns of a
    (B, T, 2K) buffer (its rows are a strided view), "3d_transposed" a (T, B, K) buffer transposed
    (its rows are no view: reshaped by a copy)."""
    B, T = lead
    K = x.shape[1]
    values = x.reshape(B, T, K)
    if how == "3d":
        return values.clone()
    if how == "3d_sliced":
        view = torch.empty(B, T, 2 * K, dtype=x.dtype, device=x.device)[..., :K]
    else:
        view = torch.empty(T, B, K, dtype=x.dtype, device=x.device).transpose(0, 1)
    return view.copy_(values)


class Case(NamedTuple):
    name: str
    shape: tuple                          # (M, K, N, r), M the rows of x
    layout: dict = {}                     # {operand (x, weight, lora_A, lora_B, bias, dy): _view / _x_3d layout}
    lead: Optional[tuple] = None          # (B, T) for a 3-D x
    forward: tuple = FORWARD              # the paths tested, of those that apply
    backward: tuple = BACKWARD
    dtypes: tuple = tuple(KERNEL_DTYPES)
    grads: tuple = GRADS                  # the inputs that require grad
    product: bool = False                 # every forward x every backward path; else paired in turn
    pairs: Optional[int] = None           # at most this many of those pairs a dtype (taken in turn)
    variants: tuple = ()                  # (dropout_p, bias) variants, one a pair in turn (default VARIANTS)
    every_variant: bool = False           # every variant for every pair instead


VARIANTS = ((0.0, True), (P, False), (0.0, False), (P, True))      # (dropout_p, bias)
SPLIT_K_SHAPES = [(1, 150, 37, 16), (5, 97, 50, 3), (37, 130, 45, 64), (64, 70, 17, 1), (3, 20, 33, 8)]
FP16 = (torch.float16,) + ((torch.bfloat16,) if HAS_CUDA else ())   # what TMA reads
F32 = (torch.float32,)

CASES = [
    # helpers.SHAPES: odd sizes, M = 1 (r = 1), r = 64 (one full rank tile), r = 100 (only split and
    # cublas apply), K = N = 1; every applicable path in both directions, paired in turn, each pair
    # in one dtype (half of them in each)
    *[Case(f"M{M}_K{K}_N{N}_r{r}", (M, K, N, r), pairs=2) for M, K, N, r in SHAPES],
    # every forward x every backward path on a small odd shape; dropout with and without bias on r > 64
    # (and each path meets every variant across the cases: test_matrix_covers_every_path)
    Case("odd_product", (19, 21, 23, 3), product=True, dtypes=F32),
    Case("r100_dropout_bias", SHAPES[3], forward=("split",), backward=("split",), variants=((P, True), (P, False)),
         every_variant=True, dtypes=F32),
    # split-K decode shapes: K split in several ranges (test_split_k_shapes_split), M = 1 and M = 64,
    # the last below one granule (a single split); the dtypes in turn, the backward cuBLAS's (which
    # reads the xs split_k kept for dB; split_k with the kernels' backwards: odd_product)
    *[Case(f"splitk_M{M}_K{K}_N{N}_r{r}", (M, K, N, r), forward=("split_k",), backward=("cublas",),
           dtypes=(KERNEL_DTYPES[i % len(KERNEL_DTYPES)],)) for i, (M, K, N, r) in enumerate(SPLIT_K_SHAPES)],
    Case("splitk_strided", (7, 150, 29, 5), layout={"x": "T", "weight": "T"}, forward=("split_k",),
         backward=("cublas",)),
    # TMA (M > 64, fp16/bf16, K a multiple of 8): tma with every path of the other pass (the pairs
    # without tma: odd_product); M = 130, whose persistent grid walks several tiles a program
    # (test_persistent_grid_walks_several_tiles); N = 8, r = 1; N = 33, which rules out the backward's
    # TMA (dY rows of 66 bytes); a row-strided x and dY that TMA can still read; dX alone
    Case("tma_forward_pairs", (70, 32, 24, 8), forward=("tma",), dtypes=FP16, product=True),
    Case("tma_backward_pairs", (70, 32, 24, 8), forward=("in_loop", "split", "cublas"), backward=("tma",),
         dtypes=FP16, product=True),
    Case("tma_M130_K24_N40_r64", (130, 24, 40, 64), forward=("tma",), backward=("tma",), dtypes=FP16,
         variants=((P, False),)),
    Case("tma_M67_K40_N8_r1", (67, 40, 8, 1), forward=("tma",), backward=("tma",), dtypes=FP16),
    Case("tma_M70_K56_N33_r16", (70, 56, 33, 16), forward=("tma",), backward=("split",), dtypes=FP16),
    Case("tma_x_rows_strided", (70, 32, 24, 8), layout={"x": "rows2", "dy": "rows2"},
         forward=("tma",), backward=("tma",), dtypes=FP16, variants=((P, True),)),
    Case("tma_grads_x", (70, 32, 24, 8), grads=("x",), forward=("cublas",), backward=("tma",), dtypes=FP16,
         variants=((P, False),)),
    # an empty batch: y and dX empty, dA and dB exactly zero
    Case("empty_batch", (0, 24, 18, 4)),
    # strided and 3-D x (column-major x: operands_strided)
    Case("x_cols_strided", (29, 37, 41, 6), layout={"x": "cols2"}, pairs=1),
    Case("x_3d", (21, 45, 53, 5), layout={"x": "3d"}, lead=(3, 7), dtypes=(torch.float16,), pairs=2),
    Case("x_3d_sliced", (21, 45, 53, 5), layout={"x": "3d_sliced"}, lead=(3, 7), dtypes=F32, pairs=1),
    Case("x_3d_transposed", (70, 40, 24, 8), layout={"x": "3d_transposed"}, lead=(7, 10), dtypes=F32, pairs=1),
    # strided operands: x transposed, weight every second column, lora_A and lora_B column-major,
    # bias every second element, dY every second row
    Case("operands_strided", (29, 37, 41, 6),
         layout={"x": "T", "weight": "cols2", "lora_A": "T", "lora_B": "T", "bias": "every2", "dy": "rows2"},
         variants=((0.0, True), (P, True)), pairs=2),
    # subsets of the gradients (every backward path; the forward is cuBLAS's): dX not asked rules
    # out fused and tma; no LoRA gradient runs no LoRA backward at all (dW and dbias alone)
    *[Case(f"grads_{'_'.join(g)}", (37, 45, 53, 5), grads=g, forward=("cublas",), dtypes=F32,
           variants=((0.0, True),))
      for g in [("lora_A", "lora_B"), ("lora_A",), ("lora_B",), ("x",), ("x", "lora_B"),
                ("x", "lora_A", "lora_B"), ("weight", "bias"), ("lora_A", "bias")]],
]


def _seed_of(*parts):
    return zlib.crc32(repr(parts).encode()) % 2**31


def _build(case, dtype, bias, device=DEVICE):
    """The case's inputs {x, weight, lora_A, lora_B, bias, dy} in its layouts."""
    M, K, N, r = case.shape
    t = make_inputs(M, K, N, r, dtype, device=device, seed=_seed_of(case.name, str(dtype)), bias=bias)
    t["dy"] = make_inputs(M, N, 1, 1, dtype, device=device, seed=_seed_of(case.name, "dy"))["x"]
    for name, how in case.layout.items():
        if t.get(name) is None:
            continue
        t[name] = _x_3d(t[name], case.lead, how) if how.startswith("3d") else _view(t[name], how)
    return t


def table_applicable(t, r, need_dx):
    """(forward paths, backward paths) the dispatcher's path table says apply to the inputs t."""
    rows = t["x"].reshape(-1, t["x"].shape[-1])      # what the Function hands the dispatcher
    return (dispatch.applicable("forward", dispatch.Call(rows.shape[0], r, True, (rows, t["weight"]))),
            dispatch.applicable("backward", dispatch.Call(t["dy"].shape[0], r, need_dx, (t["dy"], t["weight"]))))


def rule_applicable(t, r, need_dx):
    """The same, by the rule stated above."""
    rows = t["x"].reshape(-1, t["x"].shape[-1])
    return (tuple(p for p in FORWARD if forward_applies(p, rows, t["weight"], r)),
            tuple(p for p in BACKWARD if backward_applies(p, t["dy"], t["weight"], r, need_dx)))


def _applicable(case, dtype):
    """(forward paths, backward paths) of the case's that apply to its inputs (built at collection)."""
    fwd, bwd = table_applicable(_build(case, dtype, bias=True), case.shape[3], "x" in case.grads)
    fwd = [p for p in case.forward if p in fwd]
    bwd = [p for p in case.backward if p in bwd]
    if not any(g in case.grads for g in ("x", "lora_A", "lora_B")):
        bwd = [None]       # no LoRA gradient: the backward pass does not run
    return fwd, bwd


def _matrix():
    """(case, forward, backward, dtype, dropout_p, bias) to run: per case and dtype, the applicable
    paths paired in turn (the longer list once through, the shorter one cycled) or, for `product`
    cases, all pairs (at most `pairs` of them a dtype, the next ones for the next dtype); each
    pair with every one of the case's variants, or with one: the next in turn for its forward path
    and dtype (so each path meets every dropout x bias variant across the cases)."""
    out, turn = [], {}    # turn: how many pairs each (forward path, dtype) has had
    for c, case in enumerate(CASES):
        for d, dtype in enumerate(case.dtypes):
            fwd, bwd = _applicable(case, dtype)
            if not (fwd and bwd):     # a TMA case on a GPU without TMA
                assert not TMA_DEVICE and "tma" in case.forward + case.backward, (case.name, dtype)
                continue
            if case.product:
                pairs = list(itertools.product(fwd, bwd))
            else:
                n = max(len(fwd), len(bwd))
                pairs = [(fwd[i % len(fwd)], bwd[i % len(bwd)]) for i in range(n)]
            if case.pairs:
                pairs = [pairs[(c + d * case.pairs + j) % len(pairs)] for j in range(min(case.pairs, len(pairs)))]
            variants = case.variants or VARIANTS
            for f, b in pairs:
                turn[f, dtype] = turn.get((f, dtype), -1) + 1
                for p, bias in variants if case.every_variant else (variants[turn[f, dtype] % len(variants)],):
                    out.append(pytest.param(case, f, b, dtype, p, bias,
                                            id=f"{case.name}-{f}-{b}-{dtype}-p{p:g}-{'bias' if bias else 'nobias'}"))
    return out


MATRIX = _matrix()


def _run(t, forward, backward, p, seed, grads, scaling=SCALING):
    """y, xs and the asked gradients {name: grad} of the forced paths through LoRALinearFunction."""
    leaves = {}
    for name in GRADS:
        if name in grads and t.get(name) is not None:
            leaves[name] = t[name].detach().requires_grad_()
    args = {name: leaves.get(name, t[name]) for name in ("x", "weight", "bias", "lora_A", "lora_B")}
    with dispatch.forced(forward=forward, backward=backward):
        y, xs = LoRALinearFunction.apply(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"],
                                         scaling, "triton", p, seed)
        got = torch.autograd.grad(y, list(leaves.values()), t["dy"]) if leaves else ()
    return y, xs, dict(zip(leaves, got))


def _references(t, p, seed, scaling=SCALING):
    """float64 y, xs = s/(1-p) · (keep ⊙ x) @ Aᵀ and every gradient, with the kernels' mask for seed."""
    x = t["x"]
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    keep = dropout_mask(seed, rows.shape[0], K, p) if p > 0 else None
    y = lora_linear_ref(x, t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling, keep, p)
    dropped = rows.double().cpu() if keep is None else rows.double().cpu() * keep.double().cpu() / (1 - p)
    xs = scaling * dropped @ t["lora_A"].double().cpu().T
    g = lora_linear_backward_ref(t["dy"], x, t["weight"], t["lora_A"], t["lora_B"], scaling, keep, p)
    return y.reshape(-1, t["weight"].shape[0]), xs, g


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("case,forward,backward,dtype,p,bias", MATRIX)
def test_path(case, forward, backward, dtype, p, bias):
    t = _build(case, dtype, bias)
    rows, r = t["x"].reshape(-1, t["x"].shape[-1]), case.shape[3]
    assert forward_applies(forward, rows, t["weight"], r)
    assert backward is None or backward_applies(backward, t["dy"], t["weight"], r, "x" in case.grads)
    seed = _seed(_seed_of(case.name, forward, backward)) if p > 0 else None
    y, xs, grads = _run(t, forward, backward, p, seed, case.grads)
    y_ref, xs_ref, g_ref = _references(t, p, seed)
    assert y.dtype == dtype and xs.dtype == dtype
    assert_close("y", y, y_ref, dtype)
    assert_close("xs", xs, xs_ref, dtype)
    assert set(grads) == {g for g in case.grads if t.get(g) is not None}
    for name, grad in grads.items():
        assert grad.dtype == t[name].dtype, name
        assert_close(f"d{name}", grad, g_ref[name], dtype)


# Inference (no autograd: the public entry runs the forward alone, keeping no xs), each forward
# path once, one of them on a 3-D x and the split-K one on column-major x and weight without bias
INFERENCE = [(Case("inference_odd", SHAPES[0], layout={"x": "3d"}, lead=(1, 37)), torch.float32, "in_loop"),
             (Case("inference_odd", SHAPES[0]), torch.float16, "split"),
             (Case("inference_splitk", (7, 150, 29, 5), layout={"x": "T", "weight": "T"}), torch.float32, "split_k"),
             (Case("inference_r100", SHAPES[3]), torch.float16, "cublas"),
             (Case("inference_tma", (70, 32, 24, 8)), FP16[-1], "tma")]


@pytest.mark.parametrize("case,dtype,forward",
                         [pytest.param(c, dt, f, id=f"{c.name}-{f}-{dt}") for c, dt, f in INFERENCE
                          if f in _applicable(c, dt)[0]])
def test_inference_path(case, dtype, forward):
    t = _build(case, dtype, bias=forward != "split_k")
    with torch.no_grad(), dispatch.forced(forward=forward):
        y = lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling=SCALING,
                        backend="triton")
    assert y.dtype == dtype
    assert_close("y", y, lora_linear_ref(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], SCALING), dtype)


def test_matrix_covers_every_path():
    """The pruned matrix still runs each forward and backward path in each kernel dtype, with and
    without dropout, and each forward path with and without bias (tma: in fp16/bf16, where it can)."""
    runs = [(param.values[1], param.values[2], param.values[3], param.values[4] > 0, param.values[5])
            for param in MATRIX]
    for dtype in KERNEL_DTYPES:
        tma = {"tma"} if TMA_DEVICE and dtype != torch.float32 else set()
        for path in {"in_loop", "split", "split_k", "cublas"} | tma:
            assert {(d, b) for f, _, dt, d, b in runs if f == path and dt == dtype} >= \
                {(d, b) for d in (False, True) for b in (False, True)} - {(True, True)}, (path, dtype)
        for path in {"fused", "split", "cublas"} | tma:
            assert {d for _, bw, dt, d, _ in runs if bw == path and dt == dtype} == {False, True}, (path, dtype)
    for path in {"in_loop", "split", "split_k", "cublas"} | ({"tma"} if TMA_DEVICE else set()):
        assert any(f == path and d and b for f, _, _, d, b in runs), path    # dropout and bias together
    # and each kernel path on a strided x (dY), and on strided weight, adapters and bias
    strided = [param.values for param in MATRIX
               if param.values[0].layout.get("x") in ("T", "cols2", "rows2", "3d_sliced")]
    tma = {"tma"} if TMA_DEVICE else set()
    assert {"in_loop", "split", "split_k"} | tma <= {v[1] for v in strided}
    assert {"fused", "split"} | tma <= {v[2] for v in strided}
    operands = [param.values for param in MATRIX if param.values[0].name == "operands_strided"]
    assert {v[1] for v in operands} >= {"in_loop", "split", "split_k"}
    assert {v[2] for v in operands} >= {"fused", "split"}


def _edge_inputs():
    """Inputs at every edge of the rule: M = 0, 1, 64, 65; r = 64, 65; fp32 and fp16; x and dY
    contiguous, transposed or one element off an aligned address; dX asked or not."""
    for M, r, dtype, layout, need_dx in itertools.product(
            (0, 1, 64, 65), (64, 65), (torch.float32, torch.float16),
            ({}, {"x": "T", "dy": "T"}, {"x": "offset1", "dy": "offset1"}), (True, False)):
        yield f"M{M}_r{r}_{dtype}_{layout}_dx{need_dx}", \
            _build(Case("edge", (M, 16, 8, r), layout=layout), dtype, bias=False), r, need_dx


def test_path_table_is_the_rule():
    """The dispatcher's path table (what the matrix is generated from and `forced` accepts) says
    what the rule stated here says, on every case and dtype of the matrix and at the rule's edges."""
    inputs = [(f"{c.name} {dtype}", _build(c, dtype, bias=True), c.shape[3], "x" in c.grads)
              for c in CASES for dtype in c.dtypes]
    for name, t, r, need_dx in inputs + list(_edge_inputs()):
        assert table_applicable(t, r, need_dx) == rule_applicable(t, r, need_dx), name


# ---------------------------------------------------------------------------------------------
# Forced paths that cannot apply
REFUSALS = {
    # name: (shape, dtype, layout, forward, backward, grads)
    "in_loop r=65": ((5, 8, 8, 65), torch.float32, {}, "in_loop", None, GRADS),
    "split_k r=65": ((4, 20, 10, 65), torch.float32, {}, "split_k", None, GRADS),
    "split_k M=0": ((0, 20, 10, 4), torch.float32, {}, "split_k", None, GRADS),
    "split_k M=65": ((65, 20, 10, 4), torch.float32, {}, "split_k", None, GRADS),
    "tma fp32": ((72, 40, 16, 4), torch.float32, {}, "tma", None, GRADS),
    "tma K=41: rows of 82 bytes": ((72, 41, 16, 4), torch.float16, {}, "tma", None, GRADS),
    "tma x transposed": ((72, 40, 16, 4), torch.float16, {"x": "T"}, "tma", None, GRADS),
    "tma x offset by one element": ((72, 40, 16, 4), torch.float16, {"x": "offset1"}, "tma", None, GRADS),
    "tma weight strided": ((72, 40, 16, 4), torch.float16, {"weight": "cols2"}, "tma", None, GRADS),
    "tma M=64": ((64, 40, 16, 4), torch.float16, {}, "tma", None, GRADS),
    "tma r=65": ((72, 40, 16, 65), torch.float16, {}, "tma", None, GRADS),
    "fused r=65": ((5, 8, 8, 65), torch.float32, {}, "cublas", "fused", GRADS),
    "fused dX not asked": ((5, 8, 8, 4), torch.float32, {}, "cublas", "fused", ("lora_A", "lora_B")),
    "tma backward dY rows of 52 bytes": ((70, 48, 26, 4), torch.float16, {}, "cublas", "tma", GRADS),
    "tma backward dX not asked": ((70, 48, 32, 4), torch.float16, {}, "cublas", "tma", ("lora_A", "lora_B")),
    "tma backward M=64": ((64, 48, 32, 4), torch.float16, {}, "cublas", "tma", GRADS),
    "tma backward fp32": ((70, 48, 32, 4), torch.float32, {}, "cublas", "tma", GRADS),
    "tma backward dY transposed": ((70, 48, 32, 4), torch.float16, {"dy": "T"}, "cublas", "tma", GRADS),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_forced_path_that_cannot_apply_raises(name):
    """The rule above says no, and the dispatcher refuses the forced path by name (forward: before any
    kernel runs; backward: when autograd reaches it) instead of running another path."""
    shape, dtype, layout, forward, backward, grads = REFUSALS[name]
    case = Case(name, shape, layout=layout, grads=grads)
    t = _build(case, dtype, bias=True)
    rows, r = t["x"].reshape(-1, shape[1]), shape[3]
    if backward is None:
        assert not forward_applies(forward, rows, t["weight"], r)
        match = f"forward path '{forward}'"
    else:
        assert forward_applies(forward, rows, t["weight"], r)
        assert not backward_applies(backward, t["dy"], t["weight"], r, "x" in grads)
        match = f"backward path '{backward}'"
    with pytest.raises(ValueError, match=match):
        _run(t, forward, backward, 0.0, None, grads)


def test_forced_paths_the_rule_rules_out_all_raise():
    """At the rule's edges, every forward and backward path it rules out raises when forced (the
    forward before any kernel runs; the backward after a cuBLAS forward, when autograd reaches it)."""
    for name, t, r, need_dx in _edge_inputs():
        fwd, bwd = rule_applicable(t, r, need_dx)
        grads = ("x", "lora_A") if need_dx else ("lora_A",)
        for path in set(FORWARD) - set(fwd):
            with pytest.raises(ValueError, match=f"forward path '{path}'"):
                _run(t, path, None, 0.0, None, ())
        for path in set(BACKWARD) - set(bwd):
            with pytest.raises(ValueError, match=f"backward path '{path}'"):
                _run(t, "cublas", path, 0.0, None, grads)


# ---------------------------------------------------------------------------------------------
# The plans behind the shapes (kernel configuration: imported here, not by the matrix)
def test_split_k_shapes_split():
    """The split-K shapes of the matrix split K in several ranges (so the cross-split reduction runs),
    all but the one whose K is below one granule."""
    from lora_fast.kernels import configs
    for M, K, N, r in SPLIT_K_SHAPES + [(7, 150, 29, 5)]:
        splits = configs.split_k_plan(M, N, K, configs.split_k_target_programs(DEVICE))[2]
        assert (splits > 1) == (K > configs.SPLIT_K_GRANULE), ((M, K, N, r), splits)
    assert any(K <= configs.SPLIT_K_GRANULE for _, K, _, _ in SPLIT_K_SHAPES)


def test_split_k_plan_fills_the_gpu():
    """With an H100's 132 SMs (264 programs wanted) and the GPU's tile and granule, a 4096→1024
    decode gets about two programs per SM, each split a whole number of granules and none empty;
    a wide layer splits little or not at all."""
    from lora_fast.kernels import configs
    block_m, block_n, splits, k_per = configs.split_k_plan(1, 1024, 4096, 264, block_n=64, granule=256)
    assert block_m == 16 and splits == 16 and 1024 // block_n * splits == 256
    assert k_per % 256 == 0 and (splits - 1) * k_per < 4096 <= splits * k_per
    assert configs.split_k_plan(8, 14336, 4096, 264, block_n=64, granule=256)[2] == 2
    assert configs.split_k_plan(1, 28672, 8192, 264, block_n=64, granule=256)[2] == 1
    assert configs.split_k_plan(1, 64, 300, 264, block_n=64, granule=256)[2:] == (2, 256)


def test_persistent_grid_walks_several_tiles():
    """Under the interpreter the persistent TMA kernels run 3 programs over 16-wide tiles: the
    matrix's largest TMA shape gives each program several tiles of y (M x N, forward) and of dX
    (M x K, backward; at most 32 rows a tile), so the persistent loop (not only its first iteration)
    is what it checks: a tile the loop skipped would stay poisoned."""
    if HAS_CUDA:
        pytest.skip("the GPU's grid is its SM count; this is about the interpreter's")
    from lora_fast.kernels import launch
    programs = launch.persistent_programs(DEVICE)
    case = next(c for c in CASES if c.name == "tma_M130_K24_N40_r64")
    M, K, N, _ = case.shape
    assert case.forward == ("tma",) and case.backward == ("tma",)
    assert -(-M // 16) * -(-N // 16) >= 3 * programs
    assert -(-M // 32) * -(-K // 16) >= 3 * programs


# ---------------------------------------------------------------------------------------------
# GPU only
gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backward", ["fused", "split"] + (["tma"] if TMA_DEVICE else []))
def test_backward_deterministic_gpu(backward):
    """Bit-identical gradients run to run: partial sums are reduced in a fixed order, no atomics."""
    case = Case("deterministic", (1000, 384, 320, 16), grads=("x", "lora_A", "lora_B"))
    t = _build(case, torch.bfloat16, bias=False)
    first = _run(t, "split", backward, 0.0, None, case.grads)[2]
    for _ in range(3):
        again = _run(t, "split", backward, 0.0, None, case.grads)[2]
        assert all(torch.equal(first[k], again[k]) for k in first)


def _large_cases():
    out = []
    for shape in [(4096, 4096, 4096, 16), (8, 4096, 1024, 64), (333, 1000, 3000, 128)]:
        case = Case("M{}_K{}_N{}_r{}".format(*shape), shape)
        if HAS_CUDA:
            fwd, bwd = _applicable(case, torch.bfloat16)
            n = max(len(fwd), len(bwd))
            out += [pytest.param(case, fwd[i % len(fwd)], bwd[i % len(bwd)],
                                 id=f"{case.name}-{fwd[i % len(fwd)]}-{bwd[i % len(bwd)]}") for i in range(n)]
        else:
            out.append(pytest.param(case, "split", "split", id=case.name))
    return out


_LARGE_REFERENCE = {}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case,forward,backward", _large_cases())
def test_large_shapes_gpu(case, forward, backward):
    """Real-model sizes in bf16, every applicable path, every output and gradient (the float64
    reference, seconds on the CPU at 4096³, computed once a shape: its pairs run one after another)."""
    t = _build(case, torch.bfloat16, bias=True)
    y, xs, grads = _run(t, forward, backward, 0.0, None, case.grads)
    if case.name not in _LARGE_REFERENCE:
        _LARGE_REFERENCE.clear()
        _LARGE_REFERENCE[case.name] = _references(t, 0.0, None)
    y_ref, xs_ref, g_ref = _LARGE_REFERENCE[case.name]
    assert_close("y", y, y_ref, torch.bfloat16)
    assert_close("xs", xs, xs_ref, torch.bfloat16)
    for name, grad in grads.items():
        assert_close(f"d{name}", grad, g_ref[name], torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("forward,backward", [("in_loop", "fused"), ("split", "split"), ("cublas", "cublas")])
def test_tf32_follows_torch_setting_gpu(forward, backward):
    """fp32 uses tf32 tensor cores only when torch allows tf32 matmuls, and then within the tf32 bound."""
    case = Case("tf32", (512, 1024, 768, 16), grads=("x", "lora_A", "lora_B"))
    t = _build(case, torch.float32, bias=True)
    y_ref, _, g_ref = _references(t, 0.0, None)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, bound in ((True, "tf32"), (False, torch.float32)):
            torch.backends.cuda.matmul.allow_tf32 = allow
            y, _, grads = _run(t, forward, backward, 0.0, None, case.grads)
            assert_close(f"y {bound}", y, y_ref, bound)
            for name, grad in grads.items():
                assert_close(f"d{name} {bound}", grad, g_ref[name], bound)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
