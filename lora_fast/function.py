"""The functional entry point `lora_linear` (checks, backend choice, dropout seed, then the passes)
and LoRALinearFunction, its autograd Function.

Two routes to the same passes (kernels/ or torch_path.py), with the same saved tensors: eagerly,
LoRALinearFunction calls them directly; while torch.compile traces, lora_linear calls the
torch.library operators of lora_fast.ops (whose autograd formula the compiler traces, so there is
no graph break). Eager calls skip the operators because their Python dispatch costs ~30 us a call
(measured on CPU, torch backend, M=1: 58.6 us a call through the operators, 24.1 us direct), the
whole budget of a decode step.

Saved for backward (W0 frozen): x itself (no copy: the caller's tensor, which autograd usually
keeps alive anyway) and xs = s·d(x)@Aᵀ, an (M, r) tensor in x.dtype, i.e. M·r·itemsize new bytes
(M·16·2 = 32 bytes per token at r=16 in bf16, against 8 KB per token for x at in=4096).
weight, lora_A and lora_B are parameters already held by the module: saving them costs nothing.
Keeping xs saves backward a full pass over x for dB = dYᵀ @ xs. With dropout, the same and nothing
more: the keep-mask is regenerated from an 8-byte seed (kept on ctx), never stored, and no dropped
copy of x exists (PEFT keeps dropout(x), a second M·K tensor).

dtypes: x, weight and bias share one dtype; lora_A/lora_B either that dtype or float32 master
weights (cast to x's dtype for the computation; their grads come back in float32). Under
torch.autocast (cuda bf16/fp16, cpu bf16) the inputs are checked, then cast as nn.Linear's are:
float16/bfloat16/float32 tensors to the autocast dtype, float64 ones not at all (autocast never
casts float64); the output is in the dtype computed in, each gradient in its input's own dtype.

torch.func: LoRALinearFunction has the forward / setup_context split that functorch needs (grad,
vjp, jacrev), a vmap rule (one call for a batch of x, a loop otherwise), and a jvp (forward-mode
AD, jacfwd). The forward runs the backend's passes on plain tensors; under those transforms the
backward is the formula in plain out-of-place ops (which every transform handles and can
differentiate again; the kernels take raw pointers), and the jvp always is.
"""
import contextlib
import functools
import math
from typing import Optional

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from . import dropout, ops, torch_path, weights
from .backend import resolve_backend
from .checks import check_lora_inputs, check_tensor_kinds


def passes(backend):
    """The module whose lora_forward / lora_backward run `backend`'s passes: for "triton", the
    dispatcher, which picks the kernels' path (or cuBLAS) per shape by measurement."""
    if backend == "triton":
        from . import dispatch  # imports triton: only paid for when the kernels run
        return dispatch
    return torch_path


def rows(x):
    return x.reshape(-1, x.shape[-1])   # a view whenever the strides allow; the kernels take strides


def run_forward(backend, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, save_xs=True):
    """(y (M, out), xs (M, r) or None) of `backend`'s forward pass, for x of any leading shape."""
    return passes(backend).lora_forward(rows(x), weight, lora_A, lora_B, bias, scaling,
                                        save_xs=save_xs, dropout_p=dropout_p, seed=seed)


def run_backward(backend, dy, x, xs, weight, lora_A, lora_B, scaling, dropout_p, seed,
                 need_dx, need_da, need_db):
    """The asked gradients among [dx (M, in), dA, dB] of `backend`'s backward pass, in that order."""
    grads = passes(backend).lora_backward(dy, rows(x), xs, weight, lora_A, lora_B, scaling,
                                          need_dx=need_dx, need_da=need_da, need_db=need_db,
                                          dropout_p=dropout_p, seed=seed)
    return [g for g in grads if g is not None]


def input_grads(backward_op, dy, x, xs, weight, lora_A, lora_B, scaling, dropout_p, seed,
                need_x, need_w, need_a, need_lb, need_b):
    """(dx in x's shape, dW, dA, dB, dbias) for the 2-D dy, None where not asked; `backward_op` is
    the backward op (lora_fast.ops), or run_backward bound to a backend in eager mode."""
    lora = need_x or need_a or need_lb
    asked = iter(backward_op(dy, x, xs, weight, lora_A, lora_B, scaling, dropout_p, seed,
                             need_x, need_a, need_lb) if lora else ())
    dx = next(asked).view(x.shape) if need_x else None
    da = next(asked) if need_a else None
    db = next(asked) if need_lb else None
    # The base weight and bias are normally frozen; their gradients, when asked, are plain ops.
    dw = torch.mm(dy.t(), rows(x)) if need_w else None
    dbias = dy.sum(0) if need_b else None
    return dx, dw, da, db, dbias


def kept_weight(ctx, weight):
    """What a Function saves of `weight` (lora_fast.weights.kept): None for a 4-bit one."""
    return weights.kept(ctx, weight)


def decoded_weight(ctx, weight, dtype):
    """The saved weight, or the 4-bit one kept_weight did not save, made again (weights.restored)."""
    return weights.restored(ctx, weight, dtype)


def autocast_inputs(dtype, x, weight, *rest):
    """x, weight and rest as autocast casts nn.Linear's inputs (float64 ones and None not at all), a
    4-bit weight's source kept on its cast (weights.cast)."""
    cast = [t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in (x, *rest)]
    w = weight if weight.dtype == torch.float64 else weights.cast(weight, dtype)
    return [cast[0], w, *cast[1:]]


def saved(ctx):
    """(x, xs, weight, lora_A, lora_B) kept by the forward, the weight decoded again if it was not kept."""
    x, xs, weight, lora_A, lora_B = ctx.saved_tensors
    return x, xs, decoded_weight(ctx, weight, x.dtype), lora_A, lora_B


class LoRALinearFunction(torch.autograd.Function):
    """(y, xs): y = x @ weightᵀ + bias + scaling · (d(x) @ lora_Aᵀ) @ lora_Bᵀ as 2-D rows (M, out)
    for x (..., in), and xs = scaling/(1-p) · d(x) @ lora_Aᵀ (M, r), non-differentiable, the tensor
    kept for backward (the same pair as the lora_fast::*_forward ops). Inputs already checked
    (lora_linear's job). lora_linear reshapes y to (..., out) outside the Function, so in-place ops
    on the result (y += residual) are allowed, as on nn.Linear's output."""

    @classmethod
    def apply(cls, *args):
        """torch's Function.apply, less its per-call inspect.signature binding of default arguments
        (there are none here), which a setup_context makes it run: measured ~65 us a call on this
        CPU, three times a whole decode-size call. Under torch.func transforms, torch's apply."""
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, scaling, backend, dropout_p, seed):
        return passes(backend).lora_forward(rows(x), weight, lora_A, lora_B, bias, scaling,
                                            dropout_p=dropout_p, seed=seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, backend, dropout_p, seed = inputs
        xs = output[1]
        ctx.mark_non_differentiable(xs)
        kept = kept_weight(ctx, weight)   # a weight decoded from 4 bits is decoded again in backward
        ctx.save_for_backward(x, xs, kept, lora_A, lora_B)
        # jvp's tensors only while forward-mode AD can be on (inside a dual level, which
        # torch.func.jvp enters too): ctx outlives backward as long as y does, and would keep x.
        if forward_ad._current_level >= 0:
            ctx.save_for_forward(x, xs, kept, lora_A, lora_B)
        ctx.scaling, ctx.backend, ctx.dropout_p = scaling, backend, dropout_p
        ctx.seed = seed   # 8 bytes, not an activation: on ctx, not among the saved tensors
        # dispatch.forced() paths of the forward's thread, for the backward: autograd runs a CUDA
        # backward on its device thread, which does not see the caller's context variables
        ctx.forced = passes(backend).forced_paths() if backend == "triton" else None

    @staticmethod
    def backward(ctx, grad_out, _):
        if torch._C._are_functorch_transforms_active():
            return _transform_backward(ctx, grad_out)
        return _backward(ctx, grad_out)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, lora_A, lora_B, scaling, backend, dropout_p, seed):
        """torch.func.vmap: a batch of x alone (no dropout) is more rows for one call; batched
        weights, adapters or bias, or dropout, run one call per batch element, so that each
        element's dropout mask is a loop's (one seed for all with randomness="same", its own with
        "different")."""
        args = (x, weight, bias, lora_A, lora_B, scaling, backend, dropout_p, seed)
        if seed is None and all(d is None for d in in_dims[1:]):
            xb = x.movedim(in_dims[0], 0)
            y, xs = LoRALinearFunction.apply(xb, *args[1:])
            lead = (info.batch_size, math.prod(xb.shape[1:-1]))
            return (y.view(*lead, y.shape[1]), xs.view(*lead, xs.shape[1])), (0, 0)
        outs = [LoRALinearFunction.apply(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                for i in range(info.batch_size)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0, 0)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, lora_A_t, lora_B_t, *_):
        """Forward-mode AD: y is linear in each input, so its tangent is the sum of the forward's
        terms with one factor replaced by its tangent (plain PyTorch ops, on either backend)."""
        x, xs, weight, lora_A, lora_B = saved(ctx)
        weight = weights.dense(weight)   # plain ops: a 4-bit weight's values
        x, s, drop = rows(x), *_dropout(ctx, x)
        # Out of place: under jacfwd / hessian the tangents are batched and the saved tensors not.
        y_t = x.new_zeros((x.shape[0], weight.shape[0]))
        if x_t is not None:
            x_t = rows(x_t)
            y_t = y_t + x_t @ weight.t() + s * ((drop(x_t) @ lora_A.t()) @ lora_B.t())
        if weight_t is not None:
            y_t = y_t + x @ weight_t.t()
        if lora_A_t is not None:
            y_t = y_t + s * ((drop(x) @ lora_A_t.t()) @ lora_B.t())
        if lora_B_t is not None:
            y_t = y_t + xs @ lora_B_t.t()
        if bias_t is not None:
            y_t = y_t + bias_t
        return y_t, None


@once_differentiable
def _backward(ctx, grad_out):
    """The backend's backward passes (once differentiable: the kernels' are opaque)."""
    need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
    x, xs, weight, lora_A, lora_B = saved(ctx)
    # the forward's forced paths, if any; else those of the thread calling backward (on the CPU)
    forcing = passes(ctx.backend).forcing(ctx.forced) if ctx.forced else contextlib.nullcontext()
    with forcing:
        dx, dw, da, db, dbias = input_grads(
            functools.partial(run_backward, ctx.backend), grad_out, x, xs, weight, lora_A, lora_B,
            ctx.scaling, ctx.dropout_p, ctx.seed, need_x, need_w, need_a, need_lb, need_b)
    return dx, dw, dbias, da, db, None, None, None, None



def _transform_backward(ctx, dy):
    """The backward under torch.func (vmap of grad, jacrev, hessian): the formula in plain,
    out-of-place PyTorch ops, which every transform handles (functorch wrappers, batched tensors;
    the kernels would read raw pointers) and differentiates again. xs is recomputed from x and
    lora_A: the saved one is a non-differentiable output, so dB would not depend on lora_A."""
    need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
    x, _, weight, lora_A, lora_B = saved(ctx)
    weight = weights.dense(weight)   # plain ops: a 4-bit weight's values
    x2d, (s, drop) = rows(x), _dropout(ctx, x)
    gs = s * (dy @ lora_B)
    dx = (dy @ weight + drop(gs @ lora_A)).view(x.shape) if need_x else None
    da = gs.t() @ drop(x2d) if need_a else None
    db = dy.t() @ (s * (drop(x2d) @ lora_A.t())) if need_lb else None
    dw = dy.t() @ x2d if need_w else None
    dbias = dy.sum(0) if need_b else None
    return dx, dw, dbias, da, db, None, None, None, None


def _dropout(ctx, x):
    """(s' = scaling / (1 - p), the call's dropout as a function of (rows, in) tensors: the keep
    mask regenerated from the seed, or the identity without dropout)."""
    p = ctx.dropout_p
    if p == 0:
        return ctx.scaling, lambda t: t
    # Under torch.func, the mask in plain int64 ops (bit for bit the kernels'): the C++ one writes
    # through a raw pointer, which functorch's wrapped tensors do not have.
    impl = "torch" if torch._C._are_functorch_transforms_active() else None
    keep = dropout.keep_mask(ctx.seed, math.prod(x.shape[:-1]), x.shape[-1], p, dtype=x.dtype, impl=impl)
    return ctx.scaling / (1.0 - p), lambda t: t * keep


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                bias: Optional[Tensor] = None, *, scaling: float = 1.0, dropout_p: float = 0.0,
                training: bool = False, backend: str = "auto") -> Tensor:
    """LoRA linear: ``x @ weightᵀ + bias + scaling · (dropout(x) @ lora_Aᵀ) @ lora_Bᵀ``.

    Shapes as in PEFT: x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r), bias (out,)
    or None; scaling: the finite factor s on the LoRA term (a LoRALinear's lora_alpha / r).
    Dense (strided) tensors on one device (meta tensors too, on the torch backend: shapes only); x,
    weight and bias share a floating dtype, the adapters that dtype or float32 (master weights). x
    may be any strided view. Dropout (p = dropout_p, on the LoRA branch's input only, as PEFT)
    applies when `training`; its seed is drawn from torch's generator of x's device, so
    torch.manual_seed makes it reproducible. Under torch.autocast the inputs are cast as
    nn.Linear's: float16/bfloat16/float32 ones to the autocast dtype, float64 ones not at all.
    backend: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch" (plain
    PyTorch ops), "auto" (triton on CUDA, torch elsewhere; LORA_FAST_BACKEND overrides it).
    Output: shape (..., out), in the dtype computed in (x's, or the autocast dtype).

    Range: float32 adapters on a float16 input are rounded to float16, and xs = scaling · d(x) @
    lora_Aᵀ, the (M, r) tensor kept for backward, is float16 too (on both backends): where |xs|
    passes 65504 the output is inf or NaN, where PEFT, which computes the LoRA branch in
    float32, stays finite; in backward the same holds for gs = scaling · dY @ lora_B (M, r),
    which both backends keep in float16 too (dX and dA are then inf where |gs| passes 65504).
    The sums themselves run in float32 and are rounded once, so no partial sum overflows (on the
    bfloat16 torch path the LoRA term is rounded once more before the base GEMM adds to it:
    bfloat16 has float32's range).
    """
    autocast = _autocast_dtype(x)
    check_tensor_kinds(x, weight, lora_A, lora_B, bias)   # before any cast: autocast's or the adapters'
    if autocast is not None:
        x, weight, lora_A, lora_B, bias = autocast_inputs(autocast, x, weight, lora_A, lora_B, bias)
    lora_A, lora_B = cast_master_adapters(x, lora_A, lora_B)
    check_lora_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p, training, autocast)
    chosen = resolve_backend(backend, x.device, x.dtype)
    scaling = float(scaling)
    p = float(dropout_p) if training else 0.0
    seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64) if p > 0 else None
    tensors = (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())
    training_step = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # Under autocast the passes run on the cast tensors with autocast off (as nn.Linear's matmul).
    with torch.autocast(x.device.type, enabled=False) if autocast is not None else contextlib.nullcontext():
        if torch.compiler.is_compiling():
            op = ops.OPS[chosen]
            if training_step:
                y, _ = op.forward(x, weight, lora_A, lora_B, bias, scaling, p, seed)
            else:
                y = op.inference(x, weight, lora_A, lora_B, bias, scaling, p, seed)
        elif training_step or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
            # torch.func and forward-mode AD too: the Function's rules (vmap, jvp), not the kernels'
            # raw pointers on wrapped or dual tensors
            y, _ = LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, chosen, p, seed)
        else:   # no autograd node, and the kernels need not keep xs
            y, _ = run_forward(chosen, x, weight, lora_A, lora_B, bias, scaling, p, seed, save_xs=False)
    # Reshaped here, outside the op or Function, with _unsafe_view as torch.matmul does (same
    # storage, not a view to autograd): in-place ops on the output (y += residual) are allowed, and
    # FSDP2 does not warn that they would drop its pre-backward hook on a module's output.
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))


def _autocast_dtype(x):
    """The dtype autocast casts lora_linear's inputs to here, or None (off, or x not a CPU/CUDA tensor)."""
    if (isinstance(x, torch.Tensor) and x.device.type in ("cuda", "cpu")
            and torch.is_autocast_enabled(x.device.type)):
        return torch.get_autocast_dtype(x.device.type)
    return None


def cast_master_adapters(x, lora_A, lora_B):
    """float32 adapters (master weights) on a float16/bfloat16 input are cast to the input's dtype,
    with autograd, so their gradients come back in float32. Other dtypes are left to the checks."""
    low = (torch.float16, torch.bfloat16)
    if not all(isinstance(t, torch.Tensor) for t in (x, lora_A, lora_B)) or x.dtype not in low:
        return lora_A, lora_B
    return tuple(t.to(x.dtype) if t.dtype == torch.float32 else t for t in (lora_A, lora_B))
