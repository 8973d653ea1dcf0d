"""The one place where inputs of lora_linear are checked; everything below trusts them."""
import math
import numbers

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t):
    return tuple(t.shape)


def check_lora_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p=0.0, training=False):
    """Raise TypeError/ValueError naming the argument, what was expected and what was given."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, "
                            f"float64), got {t.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise TypeError(f"scaling: expected a finite real number, got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {training!r}")

    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-D (out_features, in_features), got shape {_shape(weight)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"weight: expected out_features >= 1 and in_features >= 1, got shape {_shape(weight)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected shape (..., {k}) to match weight's in_features={k}, "
                         f"got {_shape(x)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k or lora_A.shape[0] == 0:
        raise ValueError(f"lora_A: expected shape (r, {k}) with r >= 1 and in_features={k} "
                         f"from weight, got {_shape(lora_A)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape != (n, r):
        raise ValueError(f"lora_B: expected shape ({n}, {r}) = (out_features of weight, r of "
                         f"lora_A), got {_shape(lora_B)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias: expected shape ({n},) = (out_features,), got {_shape(bias)}")

    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x; adapters may also be "
                            f"float32 on a float16/bfloat16 input), got {t.dtype}")
