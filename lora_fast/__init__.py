"""lora_fast: a fused LoRA linear layer (Triton kernels forward and backward) with a float64
reference and a plain-PyTorch path. Public API:

    lora_linear(x, weight, lora_A, lora_B, bias=None, *, scaling=1.0, backend="auto")
    LoRALinear(in_features, out_features, r=8, lora_alpha=8, ...), LoRALinear.from_linear(...)
    reference.lora_linear_ref / reference.lora_linear_backward_ref (float64)
"""
from . import reference
from .function import LoRALinearFunction, lora_linear
from .module import LoRALinear

__version__ = "0.1.0"
__all__ = ["lora_linear", "LoRALinear", "LoRALinearFunction", "reference", "__version__"]
