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
"""
import torch

from . import dropout


def _keep(seed, x, p):
    return dropout.keep_mask(seed, x.shape[0], x.shape[1], p, dtype=x.dtype)


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0, seed=None):
    """(y, xs) for 2-D x (M, K); xs = scaling/(1-p) · (keep ⊙ x) @ lora_Aᵀ (M, r) for backward (None
    unless save_xs)."""
    x_lora = x
    if dropout_p > 0:
        x_lora = x * _keep(seed, x, dropout_p)
    xs = torch.mm(x_lora, lora_A.t()).mul_(scaling / (1.0 - dropout_p))
    if bias is None:
        y = torch.mm(xs, lora_B.t())
    else:
        y = torch.addmm(bias, xs, lora_B.t())
    y.addmm_(x, weight.t())
    return y, (xs if save_xs else None)


def lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, *,
                  need_dx=True, need_da=True, need_db=True, dropout_p=0.0, seed=None):
    """(dX, dA, dB) with W0 frozen, None for those not asked; reuses gs = s'·dY@B for dX and dA."""
    dx = da = db = None
    keep = _keep(seed, x, dropout_p) if dropout_p > 0 and (need_dx or need_da) else None
    if need_dx or need_da:
        gs = torch.mm(dy, lora_B).mul_(scaling / (1.0 - dropout_p))
        if need_dx:
            dx = torch.mm(gs, lora_A)
            if keep is not None:
                dx.mul_(keep)
            dx.addmm_(dy, weight)
        if need_da:
            da = torch.mm(gs.t(), x if keep is None else x * keep)
    if need_db:
        db = torch.mm(dy.t(), xs)
    return dx, da, db
