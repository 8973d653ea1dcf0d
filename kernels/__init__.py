"""Triton kernels of lora_fast, installed as ``lora_fast.kernels`` (never as a top-level ``kernels``).

One file per pass: forward.py (fused forward GEMM), backward.py (fused dX/dA/dB GEMM),
skinny.py (the x @ Aᵀ / dY @ B first pass of the split path); configs.py holds every block
size, autotune list and path heuristic.
"""
from .backward import lora_backward
from .forward import lora_forward

__all__ = ["lora_forward", "lora_backward"]
