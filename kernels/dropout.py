"""LoRA dropout inside the kernels: the keep-mask of element (m, k) of x is one Philox draw,
tl.rand(seed, m·K + k) >= p, made wherever that element is used — the forward's x·Aᵀ (in the
GEMM's K-loop or the skinny first pass) and the backward's dA and dX epilogues — so neither a mask
nor a dropped copy of x is ever stored. The 1/(1-p) rescale rides on the (M, r) intermediates
(the launchers pass scaling/(1-p)); the kernels only multiply by the 0/1 mask (as F.dropout does:
a dropped NaN stays NaN).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, offs_m, offs_k, K, p):
    """Boolean keep-mask for the rows offs_m and columns offs_k of x (M, K): independent of tiling,
    strides and pass. Offsets are int64 (m·K passes 2**31 on large activations)."""
    return tl.rand(seed, offs_m[:, None] * K + offs_k[None, :]) >= p


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(tl.load(seed_ptr), offs_m, offs_k, K, p)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_mask(seed, M, K, p):
    """The (M, K) keep-mask the kernels use for `seed` (a 1-element int64 tensor), as a bool tensor:
    for tests and debugging; the layer itself never materialises it."""
    out = torch.empty((M, K), device=seed.device, dtype=torch.int8)
    if M and K:
        _dropout_mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](seed, out, M, K, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
