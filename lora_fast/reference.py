"""Float64 reference of the LoRA linear, written plainly from the formula.

    y  = x @ W0ᵀ + b + s · (d(x) @ Aᵀ) @ Bᵀ          d(x) = keep ⊙ x / (1 - p)  (LoRA dropout)
    dX = dY @ W0 + s · (keep / (1 - p)) ⊙ ((dY @ B) @ A)
    dA = s · (dY @ B)ᵀ @ d(x)      dB = s · dYᵀ @ (d(x) @ Aᵀ)      dW0 = dYᵀ @ x      db = Σ_rows dY

Everything is computed in float64 on the CPU whatever the inputs' dtype and device, so it is
the yardstick for every kernel and backend (tests, users' own checks). x may have any leading
shape (..., in). Dropout, with `dropout_p`: either `dropout_mask` (bool, x's shape), or `seed` (the
layer's 1-element int64 tensor), from which the kernels' mask is rebuilt here by
lora_fast.dropout's plain-PyTorch implementation (not the C++ or Triton one the backends use);
with neither there is none. Results come back as float64 CPU tensors.
"""
from typing import Optional

import torch
from torch import Tensor

from .dropout import keep_mask


def _f64(t):
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


def _mask(x, dropout_mask, seed, dropout_p):
    """The keep-mask as float64 (rows of x, in), or None without dropout."""
    if dropout_mask is not None and seed is not None:
        raise ValueError("dropout_mask, seed: expected at most one of them, got both")
    if seed is not None and dropout_p > 0:
        k = x.shape[-1]
        dropout_mask = keep_mask(seed.cpu(), x.numel() // k if k else 0, k, dropout_p, impl="torch")
    return None if dropout_mask is None else _f64(dropout_mask).reshape(-1, x.shape[-1])


def _dropped(x, keep, dropout_p):
    return x if keep is None else x * keep.reshape(x.shape) / (1.0 - dropout_p)


def lora_linear_ref(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    bias: Optional[Tensor] = None, scaling: float = 1.0,
                    dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                    seed: Optional[Tensor] = None) -> Tensor:
    """Forward in float64: returns y of shape (..., out), a float64 CPU tensor.

    Args:
        x: (..., in), any dtype and device (copied to float64 on the CPU, as every operand).
        weight: (out, in) base weight W0; bias: (out,) or None.
        lora_A: (r, in); lora_B: (out, r); scaling: the factor s on the LoRA term.
        dropout_mask: a bool keep-mask of x's shape, or None; dropout_p: the dropout probability
            (the kept elements are scaled by 1 / (1 - dropout_p)).
        seed: instead of dropout_mask, the 1-element int64 seed a layer drew: the kernels' mask
            is rebuilt from it (lora_fast.dropout, plain PyTorch).
    """
    keep = _mask(x, dropout_mask, seed, dropout_p)
    x, weight, lora_A, lora_B, bias = map(_f64, (x, weight, lora_A, lora_B, bias))
    y = x @ weight.T + scaling * ((_dropped(x, keep, dropout_p) @ lora_A.T) @ lora_B.T)
    if bias is not None:
        y = y + bias
    return y


def lora_linear_backward_ref(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor,
                             lora_B: Tensor, scaling: float = 1.0,
                             dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                             seed: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Backward in float64: returns dict with grads 'x', 'weight', 'bias', 'lora_A', 'lora_B'
    (the base weight and bias gradients are given even though LoRA training freezes them).

    Args:
        grad_out: dY, (..., out), the gradient of the loss with respect to y.
        x, weight, lora_A, lora_B, scaling, dropout_mask, dropout_p, seed: as for
            lora_linear_ref (the same mask or seed as the forward being checked).
    """
    in_shape = x.shape
    keep = _mask(x, dropout_mask, seed, dropout_p)
    dy, x, weight, lora_A, lora_B = map(_f64, (grad_out, x, weight, lora_A, lora_B))
    dy = dy.reshape(-1, weight.shape[0])
    x = x.reshape(-1, weight.shape[1])
    xd = _dropped(x, keep, dropout_p)
    dy_b = dy @ lora_B
    dx_lora = scaling * dy_b @ lora_A
    if keep is not None:
        dx_lora = dx_lora * keep / (1.0 - dropout_p)
    return {
        "x": (dy @ weight + dx_lora).reshape(in_shape),
        "weight": dy.T @ x,
        "bias": dy.sum(0),
        "lora_A": scaling * dy_b.T @ xd,
        "lora_B": scaling * dy.T @ (xd @ lora_A.T),
    }


def dora_linear_ref(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                    bias: Optional[Tensor] = None, scaling: float = 1.0,
                    dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                    seed: Optional[Tensor] = None, dropout: str = "peft",
                    grad_out: Optional[Tensor] = None):
    """DoRA in float64, from its definition (PEFT's formula): the row norm n = ‖W0 + s·B·A‖ of the
    (out, in) sum itself, c = m / n (n a constant for gradients),

        dropout "peft":  y = x·W0ᵀ + b + (c − 1) ⊙ (d(x)·W0ᵀ) + c ⊙ (s·d(x)·Aᵀ·Bᵀ)
        dropout "lora":  y = c ⊙ (x·W0ᵀ + s·d(x)·Aᵀ·Bᵀ) + b

    (the same without dropout). Returns y (..., out); with grad_out (dY), (y, grads) where grads
    holds 'x', 'lora_A', 'lora_B', 'magnitude', 'bias', 'weight' by float64 autograd of that
    formula (an oracle independent of the backward the library writes by hand)."""
    keep = _mask(x, dropout_mask, seed, dropout_p)
    shape = x.shape
    x, weight, lora_A, lora_B, magnitude, bias = (
        t.clone().requires_grad_(grad_out is not None) if t is not None else None
        for t in map(_f64, (x, weight, lora_A, lora_B, magnitude, bias)))
    with torch.enable_grad():
        x2 = x.reshape(-1, weight.shape[1])
        xd = _dropped(x2, keep, dropout_p)
        norm = (weight + scaling * (lora_B @ lora_A)).norm(dim=1).detach()
        c = magnitude / norm
        lora = scaling * ((xd @ lora_A.T) @ lora_B.T)
        if dropout == "peft":
            y = x2 @ weight.T + (c - 1) * (xd @ weight.T) + c * lora
        else:
            y = c * (x2 @ weight.T + lora)
        if bias is not None:
            y = y + bias
        y = y.reshape(*shape[:-1], weight.shape[0])
        if grad_out is None:
            return y.detach()
        leaves = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}
        if bias is not None:
            leaves["bias"] = bias
        grads = torch.autograd.grad(y, list(leaves.values()), _f64(grad_out))
    return y.detach(), dict(zip(leaves, grads))


def mixed_lora_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: dict,
                          names: list) -> Tensor:
    """Float64 output of a mixed batch, one row at a time: row m of x (M, in) computed with the
    adapter names[m] of `adapters` ({name: (lora_A, lora_B, scaling)}), or the base alone for
    None (or a name not in `adapters`: a layer without that adapter). No dropout."""
    x64, w64, b64 = _f64(x), _f64(weight), _f64(bias)
    out = []
    for m, name in enumerate(names):
        y = x64[m] @ w64.t() + (0 if b64 is None else b64)
        if name in adapters:
            lora_A, lora_B, scaling = adapters[name]
            y = y + scaling * ((x64[m] @ _f64(lora_A).t()) @ _f64(lora_B).t())
        out.append(y)
    return torch.stack(out) if out else x64.new_zeros((0, weight.shape[0]))


def dequantize_nf4_ref(w) -> Tensor:
    """The float64 (out, in) weight of an nf4.NF4Weight, decoded here from its bytes: element i's code
    is the high nibble of byte i // 2 for even i, the low one for odd i; its value the float32
    rounding of level · absmax[i // 64] (a float64 product of two float32 values is exact, so
    rounding it once gives the float32 product the format defines), with double quantisation
    absmax[j] = fp32(fp32(code2[q[j]] · scale[j // 256]) + offset)."""
    from .nf4 import ABSMAX_BLOCKSIZE, NF4_LEVELS
    out, inp = w.shape
    packed = w.packed.detach().cpu().reshape(-1).to(torch.int64)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)
    if w.double_quant:
        q = w.absmax.detach().cpu().to(torch.int64)
        scale = w.absmax_scale.detach().cpu().double()[torch.arange(q.numel()) // ABSMAX_BLOCKSIZE]
        scaled = (w.absmax_code.detach().cpu().double()[q] * scale).float().double()
        absmax = (scaled + float(w.absmax_offset)).float().double()
    else:
        absmax = w.absmax.detach().cpu().double()
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    values = levels[codes] * absmax[torch.arange(out * inp) // w.blocksize]
    return values.float().double().reshape(out, inp)
