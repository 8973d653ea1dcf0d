"""Which implementation runs a call: "triton" (the fused kernels), "torch" (plain PyTorch ops)
or "auto" (triton on CUDA, torch on CPU and for float64). LORA_FAST_BACKEND overrides "auto" only."""
import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_installed():
    """Whether triton imports (imported once, on the first call that could run the kernels)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, device, dtype):
    """Return "triton" or "torch" for tensors on `device` of `dtype`, or raise ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    source = "backend"
    if backend == "auto":
        env = os.environ.get("LORA_FAST_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"LORA_FAST_BACKEND: expected one of {BACKENDS}, got {env!r}")
        backend, source = env, "LORA_FAST_BACKEND"
    if backend == "auto":   # without triton (macOS, Windows: no wheels) the torch path
        return "triton" if device.type == "cuda" and dtype in _TRITON_DTYPES \
            and triton_installed() else "torch"
    if backend == "triton":
        if not triton_installed():
            raise ImportError(f"{source}='triton' needs the triton package, which is not installed "
                              "here (it has wheels for Linux x86_64 and aarch64 only); use "
                              "backend='torch'")
        if dtype not in _TRITON_DTYPES:
            raise ValueError(f"{source}='triton': expected float16, bfloat16 or float32 tensors, "
                             f"got {dtype}; use backend='torch' for float64")
        if device.type == "cpu" and dtype == torch.bfloat16:
            raise ValueError(f"{source}='triton' on CPU tensors runs the Triton interpreter, which does "
                             "no bfloat16 arithmetic (its tl.dot returns garbage); use backend='torch' "
                             "or float16/float32")
        if device.type == "cpu" and not interpreter_enabled():
            raise ValueError(f"{source}='triton' on CPU tensors needs the Triton interpreter: set "
                             "TRITON_INTERPRET=1 before triton is imported, or use backend='torch'")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"{source}='triton': expected CUDA (or CPU with TRITON_INTERPRET=1) "
                             f"tensors, got device {device}")
    return backend


def tf32_allowed():
    """Whether torch lets fp32 matmuls on CUDA use tf32. The legacy flag
    (torch.backends.cuda.matmul.allow_tf32, set by float32_matmul_precision), or torch's newer
    fp32_precision settings: once those were used, reading the legacy flag raises."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        precision = getattr(matmul, "fp32_precision", "none")
        if precision == "none":     # inherit the global setting
            precision = getattr(torch.backends, "fp32_precision", "ieee")
        return precision == "tf32"
