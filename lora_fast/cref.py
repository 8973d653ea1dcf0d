"""The C++ reference (csrc/lora_ref.cpp, bound as lora_fast._cref) with torch tensors in and out.

It shares no code with the kernels or the PyTorch paths and accumulates in double. When the
package was installed without it (LORA_FAST_BUILD_EXT=0, no pybind11, or a failed compile),
`available()` is False and `missing_reason()` says why; calling it then raises.
"""
import torch

try:
    from lora_fast import _cref
    _MISSING = None
except ImportError as exc:   # built without the extension: reported, never silently skipped
    _cref = None
    _MISSING = (f"lora_fast._cref is not built ({exc}); reinstall with a C++ compiler and pybind11 "
                "and without LORA_FAST_BUILD_EXT=0")


def available():
    return _cref is not None


def missing_reason():
    return _MISSING


def has_openmp():
    return available() and _cref.has_openmp()


def _np(t, cols=None):
    t = t.detach().to("cpu", torch.float64)
    if cols is not None:
        t = t.reshape(-1, cols)
    return t.contiguous().numpy()


def _require():
    if _cref is None:
        raise RuntimeError(_MISSING)


def lora_linear_cref(x, weight, lora_A, lora_B, bias=None, scaling=1.0):
    """Forward in double: y of shape (..., out), float64 CPU."""
    _require()
    k = weight.shape[1]
    y = _cref.forward(_np(x, k), _np(weight), _np(lora_A), _np(lora_B),
                      None if bias is None else _np(bias), float(scaling))
    return torch.from_numpy(y).reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_backward_cref(grad_out, x, weight, lora_A, lora_B, scaling=1.0, bias_grad=True):
    """Backward in double with W0 frozen: dict of float64 CPU grads 'x', 'lora_A', 'lora_B'
    (and 'bias' when bias_grad)."""
    _require()
    n, k = weight.shape
    grads = _cref.backward(_np(grad_out, n), _np(x, k), _np(weight), _np(lora_A), _np(lora_B),
                           float(scaling), bias_grad)
    out = {name: torch.from_numpy(v) for name, v in grads.items()}
    out["x"] = out["x"].reshape(x.shape)
    return out
