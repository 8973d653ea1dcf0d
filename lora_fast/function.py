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
torch.autocast (cuda bf16/fp16, cpu bf16) every input is cast to the autocast dtype first, as
nn.Linear does: the output is in the autocast dtype, each gradient in its input's own dtype.
"""
import functools

import torch
from torch.autograd.function import once_differentiable

from .backend import resolve_backend
from .checks import check_lora_inputs
from .ops import OPS, input_grads, run_backward, run_forward


class LoRALinearFunction(torch.autograd.Function):
    """y = x @ weightᵀ + bias + scaling · (x @ lora_Aᵀ) @ lora_Bᵀ, inputs already checked, returned
    as 2-D rows (M, out) for x (..., in): lora_linear reshapes it to (..., out) outside the Function,
    so in-place ops on the result (y += residual) are allowed, as on nn.Linear's output."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, backend, dropout_p, seed):
        y, xs = run_forward(backend, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)
        ctx.save_for_backward(x, xs, weight, lora_A, lora_B)
        ctx.scaling, ctx.backend, ctx.dropout_p = scaling, backend, dropout_p
        ctx.seed = seed   # 8 bytes, not an activation: on ctx, not among the saved tensors
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        x, xs, weight, lora_A, lora_B = ctx.saved_tensors
        dx, dw, da, db, dbias = input_grads(
            functools.partial(run_backward, ctx.backend), grad_out, x, xs, weight, lora_A, lora_B, ctx.scaling,
            ctx.dropout_p, ctx.seed, need_x, need_w, need_a, need_lb, need_b)
        return dx, dw, dbias, da, db, None, None, None, None


def lora_linear(x, weight, lora_A, lora_B, bias=None, *, scaling=1.0, dropout_p=0.0, training=False,
                backend="auto"):
    """LoRA linear: ``x @ weightᵀ + bias + scaling · (dropout(x) @ lora_Aᵀ) @ lora_Bᵀ``.

    Shapes as in PEFT: x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r), bias (out,).
    One device; x, weight and bias share a floating dtype, the adapters that dtype or float32
    (master weights). x may be any strided view. Dropout (p = dropout_p, on the LoRA branch's input
    only, as PEFT) applies when `training`; its seed is drawn from torch's generator of x's device,
    so torch.manual_seed makes it reproducible. Under torch.autocast the inputs are cast to the
    autocast dtype. backend: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1),
    "torch" (plain PyTorch ops), "auto" (triton on CUDA, torch elsewhere; LORA_FAST_BACKEND
    overrides it). Output: shape (..., out), dtype of x (or the autocast dtype).
    """
    if (isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type in ("cuda", "cpu")
            and torch.is_autocast_enabled(x.device.type)):
        dtype = torch.get_autocast_dtype(x.device.type)
        cast = [None if t is None else t.to(dtype) for t in (x, weight, lora_A, lora_B, bias)]
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(*cast[:4], cast[4], scaling=scaling, dropout_p=dropout_p,
                               training=training, backend=backend)
    lora_A, lora_B = cast_master_adapters(x, lora_A, lora_B)
    check_lora_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p, training)
    chosen = resolve_backend(backend, x.device, x.dtype)
    scaling = float(scaling)
    p = float(dropout_p) if training else 0.0
    seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64) if p > 0 else None
    tensors = (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())
    training_step = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():
        ops = OPS[chosen]
        if training_step:
            y, _ = ops.forward(x, weight, lora_A, lora_B, bias, scaling, p, seed)
        else:
            y = ops.inference(x, weight, lora_A, lora_B, bias, scaling, p, seed)
    elif training_step:
        y = LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, chosen, p, seed)
    else:   # no autograd node, and the kernels need not keep xs
        y, _ = run_forward(chosen, x, weight, lora_A, lora_B, bias, scaling, p, seed, save_xs=False)
    # Reshaped here, outside the op or Function, with _unsafe_view as torch.matmul does (same
    # storage, not a view to autograd): in-place ops on the output (y += residual) are allowed, and
    # FSDP2 does not warn that they would drop its pre-backward hook on a module's output.
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))


def cast_master_adapters(x, lora_A, lora_B):
    """float32 adapters (master weights) on a float16/bfloat16 input are cast to the input's dtype,
    with autograd, so their gradients come back in float32. Other dtypes are left to the checks."""
    low = (torch.float16, torch.bfloat16)
    if not all(isinstance(t, torch.Tensor) for t in (x, lora_A, lora_B)) or x.dtype not in low:
        return lora_A, lora_B
    return tuple(t.to(x.dtype) if t.dtype == torch.float32 else t for t in (lora_A, lora_B))
