"""The "torch" backend: the same passes as the kernels, in plain PyTorch ops (the CPU path and the
fallback). Same saved tensors and same intermediates as the Triton path (xs = s'·d(x)@Aᵀ,
gs = s'·dY@B with s' = s/(1-p)).

Order matters on memory traffic: the skinny product is written first and the big GEMM then
accumulates into it in place (addmm_ with beta=1 reads C inside a compute-bound GEMM), instead of
the big GEMM first and an extra read-modify-write pass over the (M, N) output for the low-rank
term, as `base(x) + lora_B(lora_A(x)) * s` does.

Dropout: the kernels' own keep-mask for the call's seed (lora_fast.dropout: the C++ Philox on the
CPU, the kernels' mask kernel on CUDA), drawn again in backward, so it is not stored either; both
backends drop the same elements for one seed, and on CUDA nothing is read back to the host (the
path can be captured in a CUDA graph). The mask comes as 0/1 in x's dtype: multiplying by it is
then a same-dtype, vectorised product (a bool operand makes torch cast per element: 9x slower
on the CPU at 204 x 384), and backward draws it once for its two uses.

float16: every sum in an fp32 accumulator, rounded once, as in the kernels
(`_fp32_sums`; the base GEMM first, into an fp32 y, then the rank-r term). Rounding the LoRA term
to float16 before the base GEMM is added to it overflows (65504) where the whole is finite:
xs·Bᵀ ≈ 70000 and x·W0ᵀ = -60000 gave inf for 10016 (tests/test_entrance.py).
"""
import torch

from . import dropout
from .weights import dense


def _keep(seed, x, p):
    return dropout.keep_mask(seed, x.shape[0], x.shape[1], p, dtype=x.dtype)


def _fp32_sums(t):
    """Whether t's passes sum in fp32 and round once: float16, whose partial sums can overflow
    (65504) where the whole is finite. bfloat16 keeps the in-place order (float32's range: nothing
    overflows; one more rounding, <= u·|LoRA term|): on the CPU the exact way runs fp32 GEMMs on
    fp32 copies, 5.8x the step of its bf16 (AMX) GEMMs (8.2 -> 47.9 ms, M=2048, 1024->1024, r=16,
    2 threads), and on CUDA it would write y in fp32 first, an output pass the dispatcher's cublas
    path (bf16 is the GPU's main dtype) has not been measured with. float16 on the CPU pays
    1.12-1.17x its in-place step for those copies (forward 1.01x) (its fp16 GEMMs are no faster than fp32)."""
    return t.dtype == torch.float16


# cuBLAS GEMMs that write their fp32 accumulator (aten::mm.dtype, CUDA only; torch >= 2.8)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _operand(t):
    """t as an operand of _mm32: itself on CUDA, whose cuBLAS GEMMs can write their fp32
    accumulator (out_dtype); an fp32 copy elsewhere (the CPU has no such GEMM), made once per pass."""
    return t if t.device.type == "cuda" and _MM_OUT_DTYPE else t.float()


def _mm32(a, b):
    """a @ b in float32, from one fp32 accumulation, for operands from _operand."""
    return torch.mm(a, b) if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)


# The passes take DoRA's column scale (lora_fast.dora); an --impl module without this flag gets
# DoRA composed around its plain passes instead.
COLUMN_SCALE = True


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0, seed=None,
                 col_scale=None, peft_dropout=False):
    """(y, xs) for 2-D x (M, K); xs = scaling/(1-p) · (keep ⊙ x) @ lora_Aᵀ (M, r) for backward (None
    unless save_xs). A packed 4-bit weight (lora_fast.weights) is decoded first.

    col_scale (N,) float32 or float64 (DoRA): y = col_scale ⊙ z + bias, z = x @ weightᵀ + xs @
    lora_Bᵀ rounded to x's dtype, scaled and biased in col_scale's dtype and rounded once; returns
    (y, xs, z). With peft_dropout too (dropout_p > 0): DoRA's PEFT dropout form, y = x @ weightᵀ +
    bias + (c − 1) ⊙ z + xs @ lora_Bᵀ with z = d(x) @ weightᵀ + xs @ lora_Bᵀ (one more GEMM)."""
    if col_scale is not None:
        z, xs = lora_forward(x, weight, lora_A, lora_B, None, scaling, save_xs=True, dropout_p=dropout_p,
                             seed=seed)
        if peft_dropout and dropout_p > 0:   # side = d(x)·W0ᵀ + xs·Bᵀ; y = z + b + (c − 1) ⊙ side
            side = torch.mm(x * _keep(seed, x, dropout_p) / (1.0 - dropout_p), dense(weight).t())
            side.addmm_(xs, lora_B.t())
            y = torch.addcmul(z.to(col_scale.dtype), side.to(col_scale.dtype), col_scale - 1)
            if bias is not None:
                y.add_(bias.to(col_scale.dtype))
            return y.to(x.dtype), (xs if save_xs else None), side
        xs = xs if save_xs else None
        zc = z.to(col_scale.dtype)
        y = zc * col_scale if bias is None else torch.addcmul(bias.to(col_scale.dtype), zc, col_scale)
        return y.to(x.dtype), xs, z
    weight = dense(weight)
    x_lora = x
    if dropout_p > 0:
        x_lora = x * _keep(seed, x, dropout_p)
    s = scaling / (1.0 - dropout_p)
    if _fp32_sums(x):
        x_op = _operand(x)
        x_lora_op = x_op if x_lora is x else _operand(x_lora)
        xs = _mm32(x_lora_op, _operand(lora_A).t()).mul_(s).to(x.dtype)   # rounded once, as the kernels'
        y = _mm32(x_op, _operand(weight).t()).addmm_(xs.float(), lora_B.float().t())   # rank r, in fp32
        if bias is not None:
            y += bias
        return y.to(x.dtype), (xs if save_xs else None)
    xs = torch.mm(x_lora, lora_A.t()).mul_(s)
    if bias is None:
        y = torch.mm(xs, lora_B.t())
    else:
        y = torch.addmm(bias, xs, lora_B.t())
    y.addmm_(x, weight.t())
    return y, (xs if save_xs else None)


def lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, *,
                  need_dx=True, need_da=True, need_db=True, dropout_p=0.0, seed=None, col_scale=None, z=None,
                  peft_dropout=False):
    """(dX, dA, dB) with W0 frozen, None for those not asked; reuses gs = s'·dY@B for dX and dA.

    col_scale (DoRA, lora_forward's): the gradients of y = col_scale ⊙ z + bias, from dY·c rounded
    to dY's dtype, and (dX, dA, dB, dm) with dm = Σ_rows dY ⊙ z (N,) in col_scale's dtype when z
    is given, else None. With peft_dropout (the forward's), dX also has (keep/(1−p) − 1) ⊙
    (((c − 1) ⊙ dY) @ weight), the gradient through the second base product on d(x)."""
    if col_scale is not None:
        dy_c = dy.to(col_scale.dtype)
        dx, da, db = lora_backward((dy_c * col_scale).to(dy.dtype), x, xs, weight, lora_A, lora_B, scaling,
                                   need_dx=need_dx, need_da=need_da, need_db=need_db, dropout_p=dropout_p,
                                   seed=seed)
        if need_dx and peft_dropout and dropout_p > 0:
            e = (dy_c * (col_scale - 1)).to(dy.dtype)
            dx = dx + (_keep(seed, x, dropout_p) / (1.0 - dropout_p) - 1) * (e @ dense(weight))
        dm = None if z is None else (dy_c * z.to(col_scale.dtype)).sum(0)   # out of place: dy_c may be dY
        return dx, da, db, dm
    weight = dense(weight) if need_dx else weight
    dx = da = db = None
    keep = _keep(seed, x, dropout_p) if dropout_p > 0 and (need_dx or need_da) else None
    if need_dx or need_da:
        s = scaling / (1.0 - dropout_p)
        exact = _fp32_sums(dy)
        dy_op = _operand(dy) if exact else None
        gs = _mm32(dy_op, _operand(lora_B)).mul_(s).to(dy.dtype) if exact else torch.mm(dy, lora_B).mul_(s)
        if need_dx:
            dx = torch.mm(gs.float(), lora_A.float()) if exact else torch.mm(gs, lora_A)
            if keep is not None:
                dx.mul_(keep)
            dx = _mm32(dy_op, _operand(weight)).add_(dx).to(dy.dtype) if exact else dx.addmm_(dy, weight)
        if need_da:
            da = torch.mm(gs.t(), x if keep is None else x * keep)
    if need_db:
        db = torch.mm(dy.t(), xs)
    return dx, da, db


# --- mixed batches: rows with their own adapters (lora_fast.mixed) ---------------------------------
# The same passes as kernels/multi.py, as one grouped product per adapter segment. ids: (M,) adapter
# index per row (-1: the base alone); perm: the rows stably sorted by ids, or None when ids is sorted
# already (then each segment is a slice: no gather, and its dropout mask is drawn for its rows alone).

def _segments(ids, perm, n):
    """[(adapter, rows)] of the adapters with rows: a slice of x's rows, or an index tensor."""
    counts = torch.bincount(ids.long() + 1, minlength=n + 1).tolist()   # -1 rows sort first
    out, start = [], counts[0]
    for a in range(n):
        end = start + counts[a + 1]
        if end > start:
            out.append((a, slice(start, end) if perm is None else perm[start:end].long()))
        start = end
    return out


def _rows_keep(seed, x, rows, p, masks):
    """The kernels' keep-mask of `rows` of x at drop probability p, in x's dtype."""
    if isinstance(rows, slice):
        return dropout.keep_mask(seed, rows.stop - rows.start, x.shape[1], p, row0=rows.start,
                                 dtype=x.dtype)
    if p not in masks:   # rows anywhere in x: one whole mask per distinct p, shared by the segments
        masks[p] = _keep(seed, x, p)
    return masks[p][rows]


def _compute_dtype(t):
    # float16: every sum in fp32, rounded once (the kernels' way; see _fp32_sums)
    return torch.float32 if _fp32_sums(t) else t.dtype


def multi_forward(x, weight, bias, A, B, scale, dropout_p, seed, ids, perm, *, save_xs=True):
    """(y (M, N), xs (M, R) or None) for rows of x with their own adapters: A (n, R, K) and B
    (n, N, R) stacks (zero-padded ranks), scale (n,) = s/(1-p) per adapter, dropout_p (n,) or None."""
    cd = _compute_dtype(x)
    xc = x.to(cd)
    y = torch.mm(xc, weight.to(cd).t()) if bias is None else torch.addmm(bias.to(cd), xc, weight.to(cd).t())
    xs = x.new_zeros((x.shape[0], A.shape[1]))
    scales = scale.tolist()
    ps = dropout_p.tolist() if dropout_p is not None else [0.0] * len(scales)
    masks = {}
    for a, rows in _segments(ids, perm, A.shape[0]):
        x_a = xc[rows]
        if ps[a] > 0:
            x_a = x_a * _rows_keep(seed, xc, rows, ps[a], masks)
        xs_a = torch.mm(x_a, A[a].to(cd).t()).mul_(scales[a]).to(x.dtype)   # rounded as the kernels'
        xs[rows] = xs_a
        if isinstance(rows, slice):
            y[rows].addmm_(xs_a.to(cd), B[a].to(cd).t())
        else:
            y.index_add_(0, rows, torch.mm(xs_a.to(cd), B[a].to(cd).t()))
    return y.to(x.dtype), (xs if save_xs else None)


def multi_backward(dy, x, xs, weight, A, B, scale, dropout_p, seed, ids, perm, *,
                   need_dx=True, need_da=True, need_db=True):
    """(dX, dA (n, R, K), dB (n, N, R)) for multi_forward, None for those not asked."""
    cd = _compute_dtype(dy)
    dyc, xc = dy.to(cd), x.to(cd)
    dx = torch.mm(dyc, weight.to(cd)) if need_dx else None
    da = torch.zeros_like(A) if need_da else None
    db = torch.zeros_like(B) if need_db else None
    scales = scale.tolist()
    ps = dropout_p.tolist() if dropout_p is not None else [0.0] * len(scales)
    masks = {}
    for a, rows in _segments(ids, perm, A.shape[0]):
        dy_a = dyc[rows]
        keep = _rows_keep(seed, xc, rows, ps[a], masks) if ps[a] > 0 and (need_dx or need_da) else None
        if need_dx or need_da:
            gs = torch.mm(dy_a, B[a].to(cd)).mul_(scales[a]).to(dy.dtype).to(cd)
        if need_dx:
            t = torch.mm(gs, A[a].to(cd))
            if keep is not None:
                t.mul_(keep)
            if isinstance(rows, slice):
                dx[rows] += t
            else:
                dx.index_add_(0, rows, t)
        if need_da:
            x_a = xc[rows] if keep is None else xc[rows] * keep
            da[a] = torch.mm(gs.t(), x_a)
        if need_db:
            db[a] = torch.mm(dy_a.t(), xs[rows].to(cd))
    return (None if dx is None else dx.to(dy.dtype)), da, db
