"""The autograd Function of the LoRA linear and its functional entry point `lora_linear`.

Saved for backward (W0 frozen): x itself (no copy: the caller's tensor, which autograd usually
keeps alive anyway) and xs = s·x@Aᵀ, an (M, r) tensor in x.dtype, i.e. M·r·itemsize new bytes
(M·16·2 = 32 bytes per token at r=16 in bf16, against 8 KB per token for x at in=4096).
weight, lora_A and lora_B are parameters already held by the module: saving them costs nothing.
Keeping xs saves backward a full pass over x for dB = dYᵀ @ xs.
"""
import torch
from torch.autograd.function import once_differentiable

from . import torch_path
from .backend import resolve_backend
from .checks import check_lora_inputs


def _impl(backend):
    if backend == "triton":
        from lora_fast import kernels  # imports triton; only paid for when the kernels run
        return kernels
    return torch_path


class LoRALinearFunction(torch.autograd.Function):
    """y = x @ weightᵀ + bias + scaling · (x @ lora_Aᵀ) @ lora_Bᵀ, inputs already checked."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, backend):
        x2d = x.reshape(-1, x.shape[-1])  # a view whenever the strides allow; kernels take strides
        y, xs = _impl(backend).lora_forward(x2d, weight, lora_A, lora_B, bias, scaling)
        ctx.save_for_backward(x, xs, weight, lora_A, lora_B)
        ctx.scaling = scaling
        ctx.backend = backend
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, xs, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        x2d = x.reshape(-1, x.shape[-1])
        dy = grad_out.reshape(-1, weight.shape[0])
        dx = da = db = dw = dbias = None
        if need_x or need_a or need_lb:
            dx, da, db = _impl(ctx.backend).lora_backward(
                dy, x2d, xs, weight, lora_A, lora_B, ctx.scaling,
                need_dx=need_x, need_da=need_a, need_db=need_lb)
            if dx is not None:
                dx = dx.view(x.shape)
        # The base weight and bias are normally frozen; their gradients, when asked, are plain ops.
        if need_w:
            dw = torch.mm(dy.t(), x2d)
        if need_b:
            dbias = dy.sum(0)
        return dx, dw, dbias, da, db, None, None


def lora_linear(x, weight, lora_A, lora_B, bias=None, *, scaling=1.0, backend="auto"):
    """LoRA linear: ``x @ weightᵀ + bias + scaling · (x @ lora_Aᵀ) @ lora_Bᵀ``.

    Shapes as in PEFT: x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r), bias (out,).
    All tensors share one device and one floating dtype; x may be any strided view.
    backend: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch" (plain
    PyTorch ops), "auto" (triton on CUDA, torch elsewhere; LORA_FAST_BACKEND overrides it).
    Output: x.dtype, shape (..., out). Gradients flow to every input that requires grad.
    """
    check_lora_inputs(x, weight, lora_A, lora_B, bias, scaling)
    chosen = resolve_backend(backend, x.device, x.dtype)
    scaling = float(scaling)
    tensors = (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, chosen)
    # Inference: no autograd node, and the kernels need not keep xs.
    x2d = x.reshape(-1, x.shape[-1])
    y, _ = _impl(chosen).lora_forward(x2d, weight, lora_A, lora_B, bias, scaling, save_xs=False)
    return y.view(*x.shape[:-1], weight.shape[0])
