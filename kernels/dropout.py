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

from .blocks import keep_mask


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, row0, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # rows of out
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(tl.load(seed_ptr), row0 + offs_m, offs_k, K, p)           # rows of x
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_mask(seed, M, K, p, row0=0):
    """The keep-mask the kernels use for `seed` (a 1-element int64 tensor) on rows row0 ..
    row0 + M - 1 of an (·, K) x, as an (M, K) bool tensor: what lora_fast.dropout.keep_mask runs on
    CUDA (the torch path's mask there), and for tests; the kernels never materialise it. row0 lets
    tests reach offsets past 2**32 with a small tensor."""
    out = torch.empty((M, K), device=seed.device, dtype=torch.int8)
    if M and K:
        _dropout_mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](seed, out, M, K, row0, p,
                                                                        BLOCK_M=32, BLOCK_K=32)
    return out.view(torch.bool)
