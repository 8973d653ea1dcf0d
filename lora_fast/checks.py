"""The one place where inputs of lora_linear are checked; everything below trusts them."""
import numbers
import sys

import torch

_FLOAT_MAX = sys.float_info.max
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# DoRA's dropout forms (lora_fast.dora): PEFT's function, or dropout in the LoRA branch only
DORA_DROPOUT_FORMS = ("peft", "lora")


def _shape(t):
    return tuple(t.shape)


def _named(x, weight, lora_A, lora_B, bias):
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    return named


def check_tensor_kinds(x, weight, lora_A, lora_B, bias):
    """Each input a dense (strided, not nested) floating tensor; TypeError naming the one that is
    not. Run before anything touches them (autocast's cast included)."""
    for name, t in _named(x, weight, lora_A, lora_B, bias).items():
        _check_kind(name, t)


def _check_kind(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    # Sparse (COO, CSR, ...), mkldnn and nested tensors have no strides for the kernels (nor
    # a row view for the torch path): refused here by name, not deep inside a GEMM.
    if t.is_nested or t.layout != torch.strided:
        if t.is_nested:
            kind = f"nested ({str(t.layout).replace('torch.', '')})"
            hint = ("pass its values() (the rows of a jagged tensor) and rebuild the result "
                    "with torch.nested.nested_tensor_from_jagged(y, x.offsets())")
        else:
            kind, hint = str(t.layout).replace("torch.", ""), "convert it with .to_dense()"
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a {kind} tensor: {hint}")
    if t.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, "
                        f"float64), got {t.dtype}")


def check_dora_inputs(x, weight, magnitude, norm, dropout):
    """dora_linear's own arguments beside lora_linear's (checked by the two functions above): the
    magnitude (and norm, when given) dense floating (out,) tensors on x's device, dropout one of
    DORA_DROPOUT_FORMS; a TypeError/ValueError naming the argument."""
    if dropout not in DORA_DROPOUT_FORMS:
        raise ValueError(f"dropout: expected one of {DORA_DROPOUT_FORMS}, got {dropout!r}")
    for name, t in (("magnitude", magnitude), ("norm", norm)):
        if t is None:
            continue
        _check_kind(name, t)
        if _shape(t) != (weight.shape[0],) or t.device != x.device:
            raise ValueError(f"{name}: expected shape ({weight.shape[0]},) on {x.device}, got "
                             f"{_shape(t)} on {t.device}")


def check_lora_inputs(x, weight, lora_A, lora_B, bias, scaling, dropout_p=0.0, training=False,
                      autocast=None):
    """Raise TypeError/ValueError naming the argument, what was expected and what was given; after
    check_tensor_kinds. autocast: the dtype autocast cast the inputs to (None: no autocast), for
    the dtype error."""
    named = _named(x, weight, lora_A, lora_B, bias)
    # `scaling - scaling == 0` is False for NaN and ±inf, like math.isfinite, and unlike it traces:
    # torch.compile turns a scaling that changes between calls into a symbolic float.
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not scaling - scaling == 0 \
            or (type(scaling) is int and abs(scaling) > _FLOAT_MAX):   # an int beyond float's range
        raise TypeError(f"scaling: expected a finite real number, got {short(scaling)}")
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
        if t.dtype != x.dtype:
            cast = "" if autocast is None else (
                f"; under torch.autocast float16/bfloat16/float32 inputs are cast to {autocast} and "
                "float64 ones are not, as for nn.Linear")
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x; adapters may also be "
                            f"float32 on a float16/bfloat16 input{cast}), got {t.dtype}")


def short(value, limit=40):
    """repr(value) for an error message, cut to `limit` characters with its length said."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit // 2]}...({len(text)} characters)"
