"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) on lora_fast's passes.

    y = c ⊙ (x·W0ᵀ + s·x·Aᵀ·Bᵀ) + b          c = m / ‖W0 + s·B·A‖_row   (out,)

m (out,) is the trainable magnitude; the row norm is a constant in backward (PEFT detaches it,
following the paper). With dropout d(·) in training PEFT computes

    y = x·W0ᵀ + b + (c − 1) ⊙ (d(x)·W0ᵀ) + c ⊙ (s·d(x)·Aᵀ·Bᵀ)

a second base product, on the dropped input: ``dropout="peft"`` (the default) matches it;
``dropout="lora"`` keeps dropout inside the LoRA branch, as for plain LoRA,
y = c ⊙ (x·W0ᵀ + s·d(x)·Aᵀ·Bᵀ) + b: one base product, but not PEFT's function.

The row norms never build W0 + s·B·A (PEFT does, an (out, in) matrix, every call):
‖w_j + s·B_j·A‖² = ‖w_j‖² + 2s·B_j·(A·w_jᵀ) + s²·B_j·(A·Aᵀ)·B_jᵀ, with ‖w_j‖² cached per weight
version, one (r, out) product A·W0ᵀ over row chunks of W0 and the (r, r) Gram matrix A·Aᵀ, in float32
(float64 for a float64 weight). The sum's rounding errors, relative to the norm², are those of its
terms times (Σ|terms|) / norm²; rows where that amplification passes NORM_CANCELLATION (the sum
cancels: an adapter that nearly undoes a row of W0) are computed directly, from their rows of
W0 + s·B·A.

Passes: the LoRA passes lora_linear would run (the kernels' paths, or the torch path) take the
column scale themselves (their `col_scale` argument, COLUMN_SCALE): the forward kernels' epilogue
computes y = c ⊙ z + b in fp32 and rounds it once, z = x·W0ᵀ + s·d(x)·Aᵀ·Bᵀ written beside it;
the backward kernels read c ⊙ dY as they load dY (dX, dA, dB) and sum dm = Σ_rows dY ⊙ z / ‖·‖ from
the same dY tiles (the fused dX GEMM's first column of programs, or the split path's pass over dY),
so a DoRA step launches what a LoRA step does, with no elementwise pass over y or dY
(tests/test_dora_paths.py). The PEFT dropout form's second base product d(x)·W0ᵀ comes from the
forward K-loop's own x and W0 tiles (the in_loop and split paths: twice the MMA work, the same
reads), and its dX term (keep/(1−p) − 1) ⊙ (((c−1)⊙dY)·W0) from the dX GEMM's dY and W0 tiles.
Saved for backward, beside LoRA's x and xs: z (or, in the PEFT form, d(x)·W0ᵀ + s·d(x)·Aᵀ·Bᵀ), one
(M, out) tensor in x's dtype, and c and the norms (out,) in float32. No dropped copy of x is kept
(the mask is regenerated from the seed). A passes module without COLUMN_SCALE (a user's
lora-fast-check --impl) gets the scale applied around its plain passes, as one elementwise pass each way.
Under torch.compile, torch.func transforms and forward-mode AD the same formula runs as plain
differentiable PyTorch ops (_composite); under torch.compile the norms are taken row chunk by row
chunk of the sum itself (weight_norm_direct: no cache, no data-dependent branch for the graph).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from . import dropout as dropout_mod
from . import weights
from .backend import resolve_backend
from .checks import check_dora_inputs, check_lora_inputs, check_tensor_kinds
from .function import (_autocast_dtype, autocast_inputs, cast_master_adapters, decoded_weight, kept_weight,
                       passes, rows)

# The most cancellation (Σ|terms| / norm²) trusted in a row's three-term squared norm: at 64 its
# relative error stays within 64 times that of the terms themselves (fp32: ~1e-5 at the worst, half
# that on the norm, under the fp32 bound 2e-5); rows past it are computed directly (tests/test_dora.py:
# an adapter that cancels a row of W0 to 1e-4 of its norm)
NORM_CANCELLATION = 64.0
# rows of W0 per chunk of the A·W0ᵀ product and of the direct norms: a bounded fp32 temporary
_CHUNK_ELEMENTS = 1 << 22


def compute_dtype(weight_dtype):
    """The dtype the norms are computed in: float64 for a float64 weight, else float32."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _rows_per_chunk(in_features):
    return max(1, _CHUNK_ELEMENTS // max(in_features, 1))


def _row_chunks(out_features, in_features):
    step = _rows_per_chunk(in_features)
    return [(j, min(j + step, out_features)) for j in range(0, out_features, step)]


class FourBit:
    """A 4-bit W0 (an nf4.NF4Weight) as the norms read it: rows decoded a chunk at a time
    (NF4Weight.dequantize_rows), rounded to `dtype` (the compute dtype: the W0 the forward uses)."""

    def __init__(self, source, dtype):
        self.source, self.dtype = source, dtype
        self.shape, self.device = source.shape, source.device

    def rows(self, start, stop, c):
        return self.source.dequantize_rows(start, stop, self.dtype).to(c)


def weight_key(weight) -> tuple:
    """What identifies W0's values for the cached ‖w_j‖²: storage, version, dtype, device and shape
    of a dense weight, or of a 4-bit one's codes and statistics."""
    if isinstance(weight, FourBit):
        w = weight.source
        parts = [t for t in (w.packed, w.absmax, w.absmax_code, w.absmax_scale, w.absmax_offset)
                 if isinstance(t, torch.Tensor)]
        return (weight.dtype, tuple(weight.shape)) + tuple((t.data_ptr(), t._version, t.device) for t in parts)
    return (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))


def _rows(weight, start, stop, c):
    """Rows [start, stop) of W0 in c: a dense weight's slice, a 4-bit one's decoded rows."""
    return weight.rows(start, stop, c) if isinstance(weight, FourBit) else weight[start:stop].to(c)


def _rows_at(weight, index, c):
    """The rows `index` (a 1-D index tensor) of W0 in c."""
    if isinstance(weight, FourBit):
        return torch.cat([weight.rows(j, j + 1, c) for j in index.tolist()])
    return weight[index].to(c)


def _direct(w_rows, b_rows, a, scaling, c):
    """‖w_j + s·B_j·A‖ of the given rows of W0 and B (A and B already in c, the compute dtype)."""
    return torch.linalg.vector_norm(w_rows.to(c) + scaling * (b_rows @ a), dim=1)


@torch.no_grad()
def base_row_norms_sq(weight) -> Tensor:
    """‖w_j‖² (out,) of a dense (out, in) weight, in compute_dtype, without a full upcast copy; of a
    4-bit one (FourBit), from its rows decoded a chunk at a time."""
    c = compute_dtype(weight.dtype)
    if isinstance(weight, FourBit):
        chunks = [torch.linalg.vector_norm(weight.rows(j0, j1, c), dim=1).square()
                  for j0, j1 in _row_chunks(*weight.shape)]
        return torch.cat(chunks) if chunks else torch.zeros((0,), dtype=c, device=weight.device)
    return torch.linalg.vector_norm(weight, dim=1, dtype=c).square()


@torch.no_grad()
def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                base_sq: Tensor | None = None) -> Tensor:
    """‖W0 + s·B·A‖ per row (out,), in compute_dtype(W0's), never forming the (out, in) sum.

    weight: dense (out, in), or a 4-bit W0 (FourBit, read a row chunk at a time); base_sq: its
    cached ‖w_j‖² (base_row_norms_sq), or None."""
    c = compute_dtype(weight.dtype)
    out_features, in_features = weight.shape
    a, b = lora_A.detach().to(c), lora_B.detach().to(c)
    if base_sq is None:
        base_sq = base_row_norms_sq(weight)
    aw = torch.empty((a.shape[0], out_features), dtype=c, device=weight.device)   # A·W0ᵀ (r, out)
    for j0, j1 in _row_chunks(out_features, in_features):
        aw[:, j0:j1] = a @ _rows(weight, j0, j1, c).t()
    s = float(scaling)
    cross = 2 * s * (b * aw.t()).sum(1)
    quad = s * s * ((b @ (a @ a.t())) * b).sum(1)
    sq = base_sq + cross + quad
    size = base_sq + cross.abs() + quad
    suspect = ~(sq * NORM_CANCELLATION >= size) | ~(sq > 0)   # NaN-safe: a non-positive sum is suspect too
    norm = sq.clamp_min(0).sqrt()
    if bool(suspect.any()):
        rows_ = suspect.nonzero().flatten()
        step = _rows_per_chunk(in_features)
        for i0 in range(0, rows_.numel(), step):
            idx = rows_[i0:i0 + step]
            norm[idx] = _direct(_rows_at(weight, idx, c), b[idx], a, s, c)
    return norm


@torch.no_grad()
def weight_norm_direct(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W0 + s·B·A‖ per row (out,) from the sum itself, row chunk by row chunk (a bounded
    temporary, no data-dependent branch: what runs under torch.compile), in compute_dtype."""
    c = compute_dtype(weight.dtype)
    a, b = lora_A.detach().to(c), lora_B.detach().to(c)
    chunks = [_direct(_rows(weight, j0, j1, c), b[j0:j1], a, float(scaling), c)
              for j0, j1 in _row_chunks(*weight.shape)]
    return torch.cat(chunks) if chunks else torch.zeros((0,), dtype=c, device=weight.device)


def _scale(magnitude, norm):
    """c = m / ‖·‖ (out,) in the norms' dtype."""
    return magnitude.detach().to(norm.dtype) / norm


_COMPOSED = contextvars.ContextVar("lora_fast_dora_composed", default=False)


@contextlib.contextmanager
def composed_scale():
    """Run the block's DoRA forwards (and so their backwards) with the column scale as elementwise
    passes around plain LoRA passes, as a passes module without COLUMN_SCALE gets it: the design
    before the kernels took the scale, for a benchmark's A/B in one run (bench.dora's
    dora_composed) or to rule the kernels' DoRA epilogue in or out of a suspect result."""
    token = _COMPOSED.set(True)
    try:
        yield
    finally:
        _COMPOSED.reset(token)


def _keep(seed, x2d, p):
    return dropout_mod.keep_mask(seed, x2d.shape[0], x2d.shape[1], p, dtype=x2d.dtype)


def _composed_forward(run, x2d, weight, bias, lora_A, lora_B, c, scaling, dropout_p, seed, two_products):
    """(y in c's dtype, side, xs) of DoRA on plain LoRA passes: their forward without bias gives
    z = x·W0ᵀ + xs·Bᵀ, then y = c ⊙ z + b, or in PEFT's dropout form the second base product
    side = d(x)·W0ᵀ + xs·Bᵀ and y = z + b + (c − 1) ⊙ side; side (z in the first case) is kept."""
    z, xs = run.lora_forward(x2d, weight, lora_A, lora_B, None, scaling, dropout_p=dropout_p, seed=seed)
    if two_products:
        side = F.linear(x2d * _keep(seed, x2d, dropout_p) / (1.0 - dropout_p), weights.dense(weight))
        side.addmm_(xs, lora_B.t())   # a fresh tensor of ours: in place, before it is saved
        y = torch.addcmul(z.to(c.dtype), side.to(c.dtype), c - 1)
        if bias is not None:
            y.add_(bias.to(c.dtype))
        return y, side, xs
    y = c * z.to(c.dtype) if bias is None else torch.addcmul(bias.to(c.dtype), z.to(c.dtype), c)
    return y, z, xs


class DoRALinearFunction(torch.autograd.Function):
    """y (M, out) for x (..., in): DoRA's forward (module docstring) on `backend`'s LoRA passes;
    norm (out,) is the detached row norm of W0 + s·B·A (weight_norm); inputs already checked."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, backend, dropout_p, seed,
                peft_dropout):
        # backend: a backend's name, or a module with the passes' interface (lora-fast-check --impl)
        run = passes(backend) if isinstance(backend, str) else backend
        x2d = rows(x)
        c = _scale(magnitude, norm)
        two_products = peft_dropout and dropout_p > 0
        # passes that take the column scale (COLUMN_SCALE: torch_path, the dispatcher's kernels) apply
        # it, and the bias, where they round y (the kernels' epilogue) and read c ⊙ dY as they load dY
        # (not a 4-bit W0: the NF4 kernels have no DoRA builds; its LoRA passes run, the scale around them)
        scaled = getattr(run, "COLUMN_SCALE", False) and not _COMPOSED.get() and weights.packed_source(weight) is None
        if scaled:   # y = c ⊙ z + b (or PEFT's dropout form) in the forward pass itself, z (side) kept
            y, xs, side = run.lora_forward(x2d, weight, lora_A, lora_B, bias, scaling, dropout_p=dropout_p,
                                           seed=seed, col_scale=c, peft_dropout=two_products)
        else:   # plain passes (an --impl, composed_scale): the scale and the bias around them
            y, side, xs = _composed_forward(run, x2d, weight, bias, lora_A, lora_B, c, scaling, dropout_p, seed,
                                            two_products)
            y = y.to(x.dtype)
        ctx.save_for_backward(x, xs, side, kept_weight(ctx, weight), lora_A, lora_B, c, norm)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.two_products, ctx.scaled = two_products, scaled
        ctx.magnitude_dtype = magnitude.dtype
        ctx.run = run
        ctx.forced = run.forced_paths() if hasattr(run, "forced_paths") else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_x, need_w, need_b, need_a, need_lb, need_m = ctx.needs_input_grad[:6]
        x, xs, side, weight, lora_A, lora_B, c, norm = ctx.saved_tensors
        weight = decoded_weight(ctx, weight, x.dtype)
        x2d = rows(x)
        dy = dy.reshape(-1, dy.shape[-1])
        run = ctx.run
        scaled = ctx.scaled
        # the column scales' dtype (float32, float64): cast once, where dY·c is formed here (the
        # passes form it themselves when scaled: here only for the frozen weight's gradient)
        dy_c = dy.to(c.dtype) if not scaled or need_w else None
        dz = (dy_c * c).to(x.dtype) if dy_c is not None else None
        # the PEFT form's base product on d(x): its dY is (c − 1) ⊙ dY, its input d(x)
        e = (dy_c * (c - 1)).to(x.dtype) if ctx.two_products and dy_c is not None and (need_x or need_w) else None
        keep = (_keep(ctx.seed, x2d, ctx.dropout_p) / (1.0 - ctx.dropout_p)) if e is not None else None
        dx = da = db = dw = dbias = dm = None
        forcing = run.forcing(ctx.forced) if ctx.forced else contextlib.nullcontext()
        if scaled and (need_x or need_a or need_lb or need_m):
            # dX, dA, dB from c ⊙ dY and Σ_rows dY ⊙ side (the magnitude's) in the passes over dY
            with forcing:
                dx, da, db, dm_sum = run.lora_backward(dy, x2d, xs, weight, lora_A, lora_B, ctx.scaling,
                                                       need_dx=need_x, need_da=need_a, need_db=need_lb,
                                                       dropout_p=ctx.dropout_p, seed=ctx.seed, col_scale=c,
                                                       z=side if need_m else None, peft_dropout=ctx.two_products)
            if need_m:
                dm = (dm_sum.to(norm.dtype) / norm).to(ctx.magnitude_dtype)
        elif need_x or need_a or need_lb:
            with forcing:
                grads = run.lora_backward(dz, x2d, xs, weight, lora_A, lora_B, ctx.scaling,
                                          need_dx=need_x, need_da=need_a, need_db=need_lb,
                                          dropout_p=ctx.dropout_p, seed=ctx.seed)
            dx, da, db = grads
        if need_x and e is not None and not scaled:   # (keep/(1−p) − 1) ⊙ ((c−1)⊙dY)·W0
            dx = dx + (keep - 1) * (e @ weights.dense(weight))
        if need_x:
            dx = dx.view(x.shape)
        if need_m and not scaled:
            dm = ((dy_c * side.to(c.dtype)).sum(0) / norm).to(ctx.magnitude_dtype)
        if need_w:   # the frozen base weight, when asked: c ⊙ dY (and the PEFT form's term) against x
            dw = dz.t() @ x2d if e is None else dy.t() @ x2d + e.t() @ (x2d * keep)
        if need_b:
            dbias = dy.sum(0)
        return dx, dw, dbias, da, db, dm, None, None, None, None, None, None


def _composite(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed, peft_dropout):
    """The same function as plain differentiable ops (torch.compile, torch.func, forward AD)."""
    dense = weights.dense(weight)
    x2d = rows(x)
    c = (magnitude.to(norm.dtype) / norm).to(x.dtype)
    if dropout_p > 0:
        xd = x2d * _keep(seed, x2d, dropout_p) / (1.0 - dropout_p)
    else:
        xd = x2d
    lora = scaling * ((xd @ lora_A.t()) @ lora_B.t())
    if peft_dropout and dropout_p > 0:
        y = F.linear(x2d, dense) + (c - 1) * F.linear(xd, dense) + c * lora
    else:
        y = c * (F.linear(x2d, dense) + lora)
    return y if bias is None else y + bias


def dora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                bias: Tensor | None = None, *, scaling: float = 1.0, dropout_p: float = 0.0,
                training: bool = False, backend: str = "auto", dropout: str = "peft",
                norm: Tensor | None = None) -> Tensor:
    """DoRA linear (module docstring): ``c ⊙ (x·W0ᵀ + s·d(x)·Aᵀ·Bᵀ) + b`` with c = m / ‖W0 + s·B·A‖_row.

    Args:
        x, weight, lora_A, lora_B, bias: as for lora_linear (x (..., in), weight (out, in), lora_A
            (r, in), lora_B (out, r), bias (out,) or None).
        magnitude: m (out,), a floating tensor on x's device (float32 master or the adapters'
            dtype), trainable: DoRA's lora_magnitude_vector.
        scaling, dropout_p, training, backend: as for lora_linear.
        dropout: "peft" (PEFT's function with dropout: the base product on the dropped input as
            well) or "lora" (dropout inside the LoRA branch only: differs from PEFT when dropout applies).
        norm: the detached row norms ‖W0 + s·B·A‖ (out,) if the caller has them (weight_norm; a
            LoRALinear keeps W0's part cached), else computed here.
    Returns y (..., out) in the dtype computed in (x's, or the autocast dtype)."""
    autocast = _autocast_dtype(x)
    check_tensor_kinds(x, weight, lora_A, lora_B, bias)
    check_dora_inputs(x, weight, magnitude, norm, dropout)
    if autocast is not None:
        x, weight, lora_A, lora_B, bias = autocast_inputs(autocast, x, weight, lora_A, lora_B, bias)
    lora_A, lora_B = cast_master_adapters(x, lora_A, lora_B)
    check_lora_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p, training, autocast)
    out_features = weight.shape[0]
    scaling = float(scaling)
    if norm is None:
        norm = (weight_norm_direct if torch.compiler.is_compiling() else weight_norm)(
            weights.dense(weight), lora_A, lora_B, scaling)
    norm = norm.detach()
    chosen = resolve_backend(backend, x.device, x.dtype)
    p = float(dropout_p) if training else 0.0
    seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64) if p > 0 else None
    peft = dropout == "peft"
    with torch.autocast(x.device.type, enabled=False) if autocast is not None else contextlib.nullcontext():
        if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or forward_ad._current_level >= 0):
            y = _composite(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, p, seed, peft)
        else:
            y = DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, chosen,
                                         p, seed, peft)
    return y.view(*x.shape[:-1], out_features)

