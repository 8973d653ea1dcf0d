"""Triton kernels of lora_fast, installed as ``lora_fast.kernels`` (never as a top-level ``kernels``).

One file per pass: forward.py (fused forward GEMM), backward.py (fused dX/dA/dB GEMM), skinny.py
(the x @ Aᵀ / dY @ B first pass of the split path), forward_tma.py and backward_tma.py (the split
path's GEMMs with a TMA, persistent main loop, for Hopper), splitk.py (the split-K decode forward),
dropout.py (the in-kernel mask); configs.py holds every block size, autotune list and path
heuristic; lora_fast.dispatch chooses among the paths.
"""
if __name__ == "kernels":
    # Imported as a top-level "kernels": the repository root is on sys.path (`python -m ...` from a
    # checkout) and something probed for the unrelated PyPI package of that name — transformers does,
    # for Hugging Face's hub kernels, by importing it. Look like the empty namespace package such a
    # probe treats as absent (no __file__, no version) and load nothing.
    __file__ = None
else:
    from .backward import lora_backward
    from .forward import lora_forward
    from .forward_tma import lora_forward_tma, tma_eligible
    from .splitk import lora_forward_split_k

    __all__ = ["lora_forward", "lora_backward", "lora_forward_split_k", "lora_forward_tma", "tma_eligible"]
