"""The C++ reference (csrc/lora_ref.cpp, bound as lora_fast._cref) with torch tensors in and out.

It shares no code with the kernels or the PyTorch paths and accumulates in double; with dropout it
draws the kernels' mask from the seed with its own Philox. That Philox is also the torch path's
mask on the CPU (`dropout_mask`, lora_fast.dropout's "cpp"); the float64 reference rebuilds the
mask in plain PyTorch instead, so the three masks a check meets are three implementations. When
the package was installed without it (LORA_FAST_BUILD_EXT=0, no pybind11, or a failed compile),
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


def _seed(seed):
    """The seed as the C++ reference takes it: a Python int (or None), from the 1-element int64
    tensor the layer draws (a host read: the reference runs on the CPU anyway)."""
    return None if seed is None else int(seed.reshape(()).item())


def lora_linear_cref(x, weight, lora_A, lora_B, bias=None, scaling=1.0, seed=None, dropout_p=0.0):
    """Forward in double: y of shape (..., out), float64 CPU. With dropout_p > 0, `seed` (the
    layer's 1-element int64 tensor) gives the kernels' mask, which the C++ draws itself."""
    _require()
    k = weight.shape[1]
    y = _cref.forward(_np(x, k), _np(weight), _np(lora_A), _np(lora_B),
                      None if bias is None else _np(bias), float(scaling), _seed(seed), float(dropout_p))
    return torch.from_numpy(y).reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_backward_cref(grad_out, x, weight, lora_A, lora_B, scaling=1.0, bias_grad=True, seed=None,
                              dropout_p=0.0):
    """Backward in double with W0 frozen, with the forward's seed and dropout_p: dict of float64
    CPU grads 'x', 'lora_A', 'lora_B' (and 'bias' when bias_grad)."""
    _require()
    n, k = weight.shape
    grads = _cref.backward(_np(grad_out, n), _np(x, k), _np(weight), _np(lora_A), _np(lora_B),
                           float(scaling), bias_grad, _seed(seed), float(dropout_p))
    out = {name: torch.from_numpy(v) for name, v in grads.items()}
    out["x"] = out["x"].reshape(x.shape)
    return out


def dora_linear_cref(x, weight, lora_A, lora_B, magnitude, bias=None, scaling=1.0, seed=None, dropout_p=0.0,
                     dropout="peft"):
    """DoRA's forward in double (csrc/lora_ref.cpp, its own loops): y (..., out), float64 CPU; dropout
    "peft" or "lora" as lora_fast.dora_linear's."""
    _require()
    k = weight.shape[1]
    y = _cref.dora_forward(_np(x, k), _np(weight), _np(lora_A), _np(lora_B), _np(magnitude),
                           None if bias is None else _np(bias), float(scaling), _seed(seed), float(dropout_p),
                           dropout == "peft")
    return torch.from_numpy(y).reshape(*x.shape[:-1], weight.shape[0])


def dora_linear_backward_cref(grad_out, x, weight, lora_A, lora_B, magnitude, scaling=1.0, seed=None,
                              dropout_p=0.0, dropout="peft"):
    """DoRA's gradients in double, the norm a constant: dict of float64 CPU 'x', 'lora_A', 'lora_B',
    'magnitude'."""
    _require()
    n, k = weight.shape
    grads = _cref.dora_backward(_np(grad_out, n), _np(x, k), _np(weight), _np(lora_A), _np(lora_B),
                                _np(magnitude), float(scaling), _seed(seed), float(dropout_p), dropout == "peft")
    out = {name: torch.from_numpy(v) for name, v in grads.items()}
    out["x"] = out["x"].reshape(x.shape)
    return out


def dropout_mask(out, seed, p, row0=0):
    """Write the kernels' keep-mask of rows row0.. into `out`, a contiguous (M, K) CPU tensor of
    bool, uint8, float32 or float64 (1 kept, 0 dropped), for the int `seed`: the C++ Philox
    (lora_fast.dropout's "cpp" implementation)."""
    _require()
    _cref.dropout_mask(out.numpy(), seed, float(p), int(row0))


def dequantize_nf4_cref(w):
    """The float64 (out, in) weight of an nf4.NF4Weight, decoded by the C++ reference (its own
    nibble order, block indexing and double-quantisation arithmetic; only the 16 levels are
    lora_fast.nf4's data)."""
    _require()
    from lora_fast import nf4
    absmax = w.absmax.detach().cpu()
    if w.double_quant:
        absmax = torch.from_numpy(_cref.decode_absmax(
            absmax.numpy(), w.absmax_code.detach().cpu().float().numpy(),
            w.absmax_scale.detach().cpu().float().numpy(), float(w.absmax_offset), nf4.ABSMAX_BLOCKSIZE))
    out, inp = w.shape
    y = _cref.dequantize_nf4(w.packed.detach().cpu().reshape(-1).numpy(),
                             torch.tensor(nf4.NF4_LEVELS, dtype=torch.float32).numpy(),
                             absmax.float().numpy(), out, inp, w.blocksize)
    return torch.from_numpy(y)
