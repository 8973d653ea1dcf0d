"""The "torch" backend: the same passes as the kernels, in plain PyTorch ops (the CPU path and the
fallback). Same saved tensors and same intermediates as the Triton path (xs = s·x@Aᵀ, gs = s·dY@B).

Order matters on memory traffic: the skinny product is written first and the big GEMM then
accumulates into it in place (addmm_ with beta=1 reads C inside a compute-bound GEMM), instead of
the big GEMM first and an extra read-modify-write pass over the (M, N) output for the low-rank
term, as `base(x) + lora_B(lora_A(x)) * s` does.
"""
import torch


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True):
    """(y, xs) for 2-D x (M, K); xs = scaling · x @ lora_Aᵀ (M, r) for backward (None unless
    save_xs)."""
    xs = torch.mm(x, lora_A.t()).mul_(scaling)
    if bias is None:
        y = torch.mm(xs, lora_B.t())
    else:
        y = torch.addmm(bias, xs, lora_B.t())
    y.addmm_(x, weight.t())
    return y, (xs if save_xs else None)


def lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, *,
                  need_dx=True, need_da=True, need_db=True):
    """(dX, dA, dB) with W0 frozen, None for those not asked; reuses gs = s·dY@B for dX and dA."""
    dx = da = db = None
    if need_dx or need_da:
        gs = torch.mm(dy, lora_B).mul_(scaling)
        if need_dx:
            dx = torch.mm(gs, lora_A).addmm_(dy, weight)
        if need_da:
            da = torch.mm(gs.t(), x)
    if need_db:
        db = torch.mm(dy.t(), xs)
    return dx, da, db
