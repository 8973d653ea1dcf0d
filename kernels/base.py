"""The base linear alone — y = x·W0ᵀ + bias, and dX = dY·W0 — on the LoRA kernels at rank 0: what a
4-bit linear without an adapter runs (a layer that is no LoRA target, or one whose adapters are
off), so that its W0 tiles are decoded in the K-loop as a LoRA layer's are (lora_fast.qlora).

Rank 0 is the LoRA kernels' own case, not a special one: the epilogue's rank loop ("chunks") runs no
iteration and the split-K kernels' rank tile is all masked (one 16-wide MMA of zeros per tile, under
the read of W0). The adapter arguments are empty views of x, never read. Decode rows (M <= 64) take
the split-K forward, as a LoRA layer's decode does; the dX GEMM is the split backward's.
"""
from . import configs
from .backward import lora_backward
from .forward import lora_forward
from .splitk import lora_forward_split_k


def _no_adapter(t, n, k):
    """lora_A (0, k) and lora_B (n, 0): empty views of t (a real pointer, never read)."""
    return t[:0, :1].expand(0, k), t[:1, :0].expand(n, 0)


def base_forward(x, weight, bias):
    """y = x @ weightᵀ + bias for 2-D x (M >= 1, K) of any strides; weight dense or a packed 4-bit
    stand-in (lora_fast.weights)."""
    lora_A, lora_B = _no_adapter(x, *weight.shape)
    if x.shape[0] <= configs.SPLIT_K_MAX_M:
        return lora_forward_split_k(x, weight, lora_A, lora_B, bias, 0.0, save_xs=False)[0]
    return lora_forward(x, weight, lora_A, lora_B, bias, 0.0, save_xs=False, in_loop=False)[0]


def base_backward(dy, weight):
    """dX = dy @ weight for 2-D dy (M >= 1, N) of any strides."""
    M, K = dy.shape[0], weight.shape[1]
    lora_A, lora_B = _no_adapter(dy, *weight.shape)
    stand_in_x = dy[:1, :1].expand(M, K)   # dA is not asked: x is never read
    return lora_backward(dy, stand_in_x, None, weight, lora_A, lora_B, 0.0, need_da=False, need_db=False,
                         path="split")[0]
