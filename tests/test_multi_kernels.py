"""The mixed-batch kernels (kernels/multi.py: every row its own adapter of a stack) against a float64
reference written row by row: y, the kept xs, dX, dA and dB, forward on both paths ("tiled",
"split_k"), over odd sizes, a one-row segment, adapters with no rows, one adapter for every row, a
different adapter for every row, base-only rows (-1) and whole base-only tiles, ranks 1..64 in one
padded stack, unsorted ids with perm and sorted ids without, dropout with a probability per adapter,
bias or none, strided and transposed views, M = 1 and M = 0, split-K shapes that split, the gradient
subsets; then determinism (bit-identical reruns) and the launch count (fixed, whatever the number
of adapters). Outputs are poisoned (conftest: torch.empty is NaN-filled), so an element a kernel
leaves unwritten fails assert_close; views are cut from poisoned buffers, so reading a gap fails too.
"""
from typing import NamedTuple, Optional

import pytest
import torch

from helpers import DEVICE, KERNEL_DTYPES, assert_close
from lora_fast.dropout import keep_mask
from lora_fast.kernels import multi


class Case(NamedTuple):
    name: str
    M: int
    K: int
    N: int
    ranks: tuple                        # one per adapter of the stack, zero-padded to the largest
    ids: Optional[tuple] = None         # the row -> adapter map; None: drawn (seeded) in [-1, n)
    sort: bool = False                  # ids given sorted, perm None (else perm always given)
    dropout: bool = True
    bias: bool = True
    layout: tuple = ()                  # "x_T", "weight_T", "bias_every2", "dy_rows2"
    split_k: bool = False               # the forward's split-K path too (M <= 64)


def _ids(M, n, pattern):
    return tuple(pattern[i % len(pattern)] for i in range(M)) if pattern else None


CASES = [
    # odd sizes, rows unsorted, an adapter with no rows (2), -1 rows, ranks 3, 16, 1, 8 in one stack
    Case("odd_unsorted", 37, 45, 53, (3, 16, 1, 8), ids=_ids(37, 4, (1, -1, 3, 0, 3, 1, 0, -1, 3)), split_k=True),
    # sorted ids, no perm (no gather), no dropout, no bias
    Case("sorted_no_perm", 37, 45, 53, (3, 16, 1, 8), ids=tuple(sorted(_ids(37, 4, (1, -1, 3, 0, 3, 1)))),
         sort=True, dropout=False, bias=False),
    # one adapter for every row (of three: two empty)
    Case("all_one_adapter", 40, 33, 29, (4, 7, 2), ids=(1,) * 40, dropout=True, bias=False),
    # a different adapter for every row, of a stack of 24 (four of them empty), ranks 1..64 mixed
    Case("every_row_different", 20, 37, 35, tuple((5 * i) % 64 + 1 for i in range(24)),
         ids=tuple((7 * i + 3) % 24 for i in range(20)), split_k=True),
    # a one-row segment (adapter 0), and 20 base-only rows: a whole base-only row tile once sorted
    Case("segment_of_one_and_base_tile", 41, 21, 30, (2, 64, 9),
         ids=(-1,) * 12 + (2, 1, -1, 0) + (-1,) * 8 + (1, 2) * 8 + (2,)),
    # every row base-only: y is the base GEMM, xs and the LoRA gradients zero
    Case("all_base_only", 19, 24, 18, (4, 4), ids=(-1,) * 19, split_k=True),
    # strided and transposed views of x, weight, bias and dY
    Case("strided", 29, 37, 41, (6, 2, 11), ids=_ids(29, 3, (2, 0, -1, 1, 1, 2, 0)),
         layout=("x_T", "weight_T", "bias_every2", "dy_rows2"), split_k=True),
    # one row
    Case("M1", 1, 64, 33, (1, 5), ids=(1,), split_k=True),
    Case("M1_base_only", 1, 20, 17, (3,), ids=(-1,), split_k=True, dropout=False),
]

# split-K shapes that split K (interpreter plan: 16-wide column tiles, 32-wide granules, 8 programs):
# several column tiles, so that the other adapters' passes are dealt round-robin over them
SPLIT_K_CASES = [
    Case("splitk_M7_all_different", 7, 150, 29, (3, 8, 16, 1, 5, 2, 7, 4), ids=(6, 0, 3, 5, 1, 7, 2), split_k=True),
    Case("splitk_M64_unsorted", 64, 97, 50, (16, 3, 1), split_k=True),
    Case("splitk_M5_sorted", 5, 130, 45, (8, 2), ids=(0, 0, 1, 1, 1), sort=True, split_k=True, bias=False),
]


def _seed(*parts):
    return sum(ord(c) * (i + 1) for i, c in enumerate(repr(parts))) % 2**31


def _strided(t, how):
    """t's values in a layout cut from a poisoned (NaN) buffer."""
    if how == "T":
        return t.T.contiguous().T
    if how == "every2":
        return torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2].copy_(t)
    if how == "rows2":
        return torch.empty(2 * t.shape[0], t.shape[1], dtype=t.dtype, device=t.device)[::2].copy_(t)
    raise ValueError(how)


def build(case, dtype):
    """The case's inputs, as the launchers take them."""
    g = torch.Generator().manual_seed(_seed(case.name, str(dtype)))
    n, R = len(case.ranks), max(case.ranks)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    A = torch.zeros(n, R, case.K, dtype=torch.float64)
    B = torch.zeros(n, case.N, R, dtype=torch.float64)
    for a, r in enumerate(case.ranks):
        A[a, :r] = rand(r, case.K, scale=case.K ** -0.5)
        B[a, :, :r] = rand(case.N, r, scale=r ** -0.5)
    ids = torch.tensor(case.ids if case.ids is not None else
                       torch.randint(-1, n, (case.M,), generator=g).tolist(), dtype=torch.int32)
    assert ids.shape == (case.M,), f"{case.name}: {ids.shape[0]} ids for {case.M} rows"
    t = {
        "x": rand(case.M, case.K).to(DEVICE, dtype),
        "weight": rand(case.N, case.K, scale=case.K ** -0.5).to(DEVICE, dtype),
        "bias": rand(case.N).to(DEVICE, dtype) if case.bias else None,
        "dy": rand(case.M, case.N).to(DEVICE, dtype),
        "A": A.to(DEVICE, dtype), "B": B.to(DEVICE, dtype),
        "scale": (0.5 + 1.5 * torch.rand(n, generator=g)).to(DEVICE, torch.float32),
        "dropout_p": ((0.6 * torch.rand(n, generator=g)).to(DEVICE, torch.float32) if case.dropout else None),
        "seed": torch.tensor([_seed(case.name)], dtype=torch.int64, device=DEVICE) if case.dropout else None,
        "ids": ids.to(DEVICE),
        "perm": None if case.sort else torch.sort(ids, stable=True).indices.to(DEVICE, torch.int32),
    }
    if case.sort:
        assert bool((ids[1:] >= ids[:-1]).all()), "sorted cases need non-decreasing ids"
    for name, how in (("x", "T"), ("weight", "T"), ("bias", "every2"), ("dy", "rows2")):
        if f"{name}_{how}" in case.layout and t[name] is not None:
            t[name] = _strided(t[name], how)
    return t


def reference(t):
    """Float64, row by row: {y, xs, dx, dA, dB}. keep_mask(seed, 1, K, p[a], row0=m) is row m's mask."""
    f = lambda v: v.detach().to("cpu", torch.float64)
    x, w, dy, A, B = (f(t[k]) for k in ("x", "weight", "dy", "A", "B"))
    M, K = x.shape
    y = x @ w.T + (f(t["bias"]) if t["bias"] is not None else 0.0)
    xs = torch.zeros(M, A.shape[1], dtype=torch.float64)
    dx, dA, dB = dy @ w, torch.zeros_like(A), torch.zeros_like(B)
    for m in range(M):
        a = int(t["ids"][m])
        if a < 0:
            continue
        s = float(t["scale"][a])
        keep = (torch.ones(K, dtype=torch.float64) if t["dropout_p"] is None else
                keep_mask(t["seed"].cpu(), 1, K, float(t["dropout_p"][a]), row0=m, dtype=torch.float64)[0])
        xd = keep * x[m]
        xs[m] = s * (A[a] @ xd)
        y[m] += B[a] @ xs[m]
        gs = s * (dy[m] @ B[a])
        dx[m] += keep * (gs @ A[a])
        dA[a] += torch.outer(gs, xd)
        dB[a] += torch.outer(dy[m], xs[m])
    return {"y": y, "xs": xs, "dx": dx, "dA": dA, "dB": dB}


def forward(t, **kwargs):
    return multi.multi_forward(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["scale"], t["dropout_p"],
                               t["seed"], t["ids"], t["perm"], **kwargs)


def backward(t, xs, **kwargs):
    return multi.multi_backward(t["dy"], t["x"], xs, t["weight"], t["A"], t["B"], t["scale"], t["dropout_p"],
                                t["seed"], t["ids"], t["perm"], **kwargs)


def _check_lora_grads(t, ref, dA, dB, dtype):
    """dA and dB against the reference, and exactly zero where they must be: adapters with no rows,
    the padded rank rows of dA and columns of dB."""
    for name, out in (("dA", dA), ("dB", dB)):
        if out is None:
            continue
        assert out.dtype == dtype and out.shape == ref[name].shape
        if ref[name].abs().max() > 0:
            assert_close(name, out, ref[name], dtype)
        assert (out.cpu()[ref[name] == 0] == 0).all(), f"{name}: non-zero where the gradient is exactly zero"


def check_case(case, dtype, path):
    t = build(case, dtype)
    ref = reference(t)
    y, xs = forward(t, path=path)
    assert y.dtype == dtype and xs.dtype == dtype and xs.shape == ref["xs"].shape
    assert_close("y", y, ref["y"], dtype)
    if ref["xs"].abs().max() > 0:
        assert_close("xs", xs, ref["xs"], dtype)
    assert (xs.cpu()[ref["xs"] == 0] == 0).all(), "xs: non-zero on base-only rows or padded rank columns"
    dx, dA, dB = backward(t, xs)
    assert dx.dtype == dtype
    assert_close("dx", dx, ref["dx"], dtype)
    _check_lora_grads(t, ref, dA, dB, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tiled(case, dtype):
    check_case(case, dtype, "tiled")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.split_k] + SPLIT_K_CASES, ids=lambda c: c.name)
def test_split_k(case, dtype):
    check_case(case, dtype, "split_k")


def test_split_k_cases_split():
    """The split-K shapes split K in several ranges over several column tiles (interpreter plan)."""
    from lora_fast.kernels import configs
    for case in SPLIT_K_CASES:
        block_m, block_n, splits, _ = configs.split_k_plan(case.M, case.N, case.K, configs.split_k_target_programs(DEVICE))
        assert splits > 1 and case.N > block_n, case.name


def test_no_dropout_and_bias_variants():
    """The case list meets dropout and bias each with and without, and both perm forms."""
    all_cases = CASES + SPLIT_K_CASES
    assert {(c.dropout, c.bias) for c in all_cases} == {(True, True), (True, False), (False, True), (False, False)}
    assert {c.sort for c in all_cases} == {True, False}


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True), (True, True, False)],
                         ids=lambda n: "_".join(g for g, on in zip(("dx", "dA", "dB"), n) if on))
def test_gradient_subsets(need):
    case = CASES[0]
    t = build(case, torch.float32)
    ref = reference(t)
    xs = forward(t)[1] if need[2] else None          # dB alone reads xs
    dx, dA, dB = backward(t, xs, need_dx=need[0], need_da=need[1], need_db=need[2])
    assert (dx is not None, dA is not None, dB is not None) == need
    if need[0]:
        assert_close("dx", dx, ref["dx"], torch.float32)
    _check_lora_grads(t, ref, dA, dB, torch.float32)
    assert backward(t, xs, need_dx=False, need_da=False, need_db=False) == (None, None, None)


def test_save_xs_false():
    for path in ("tiled", "split_k"):
        t = build(CASES[0], torch.float32)
        y, xs = forward(t, save_xs=False, path=path)
        assert xs is None
        assert_close("y", y, reference(t)["y"], torch.float32)


def _count_launches(monkeypatch):
    names = []
    real = multi.launch

    def counting(kernel, grid, like):
        names.append(getattr(kernel, "fn", kernel).__name__)
        return real(kernel, grid, like)
    monkeypatch.setattr(multi, "launch", counting)
    return names


def test_empty_batch_launches_nothing(monkeypatch):
    names = _count_launches(monkeypatch)
    t = build(Case("empty", 0, 24, 18, (4, 2), ids=()), torch.float32)
    for path in ("tiled", "split_k"):
        y, xs = forward(t, path=path)
        assert y.shape == (0, 18) and xs.shape == (0, 4)
    dx, dA, dB = backward(t, xs)
    assert dx.shape == (0, 24)
    assert torch.equal(dA, torch.zeros_like(t["A"])) and torch.equal(dB, torch.zeros_like(t["B"]))
    assert names == []


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: f"{len(c.ranks)}_adapters")
def test_launches_per_pass_are_fixed(case, monkeypatch):
    """One launch for the tiled forward, two for split-K, and the backward's GEMM plus one reducer
    per LoRA gradient: the same for 4 adapters as for 24 (no loop over adapters on the host)."""
    names = _count_launches(monkeypatch)
    t = build(case, torch.float32)
    xs = forward(t)[1]
    forward(t, path="split_k")
    backward(t, xs)
    assert names == ["_multi_forward_kernel", "_multi_split_k_partial_kernel", "_multi_split_k_reduce_kernel",
                     "_multi_backward_kernel", "_multi_reduce_kernel", "_multi_reduce_kernel"]


def test_deterministic():
    """Two runs of every pass are bit-identical (fixed-order reductions, no atomics)."""
    t = build(CASES[3], torch.float32)
    runs = []
    for _ in range(2):
        y, xs = forward(t)
        y_k, xs_k = forward(t, path="split_k")
        runs.append((y, xs, y_k, xs_k) + backward(t, xs))
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
