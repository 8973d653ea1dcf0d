"""The kernels' dropout mask outside the kernels: keep(m, k) = tl.rand(seed, m·K + k) >= p
(kernels/dropout.py), reproduced bit for bit, so that the torch path drops the same elements as the
kernels and the references can check the kernels' dropout element for element.

tl.rand for an int64 offset (triton/language/random.py): Philox4x32-10 with counter
(c0, c1, c2, c3) = (offset mod 2³², offset >> 32, 0, 0) and key (k0, k1) = (seed mod 2³², seed >> 32);
its first output word read as an int32 w, folded onto [0, 2³¹) as v = w if w >= 0 else -w - 1, then
u = fp32(fp32(v) · S) with S the float32 nearest 4.6566127342e-10 ((2²⁴ - 1)/2⁵⁵), compared with p
as a float32. Both roundings are monotonic, so keep ⇔ v >= T(p) for an integer threshold T found
once per p on the host (`threshold`; the tests check it against Triton's own conversion around T).

    keep_mask(seed, M, K, p, row0=0, dtype=torch.bool, impl=None) -> (M, K) on seed's device

Rows row0 .. row0 + M - 1 of an (·, K) activation (row0 lets tests reach offsets past 2³² without
huge tensors); 1 kept, 0 dropped, in `dtype`. Implementations (`impl`), chosen automatically:
  "triton"  the kernels' own mask kernel (kernels.dropout.dropout_mask): CUDA, when triton imports;
            (on CPU only under TRITON_INTERPRET=1, for tests)
  "cpp"     the C++ extension's Philox (csrc/lora_ref.cpp, OpenMP, vectorised): CPU, when built
  "torch"   plain PyTorch int64 ops: any device; no host sync (nothing is read back from the seed
            tensor), so it can be captured in a CUDA graph. The fallback of the other two.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

IMPLS = ("torch", "cpp", "triton")

_SCALE = np.float32(4.6566127342e-10)           # Triton rounds its Python-float scale to fp32
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57       # Philox4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85           # Philox4x32 key increments (Weyl sequence)
_LOW32 = 0xFFFFFFFF
_ROUNDS = 10


@functools.lru_cache(maxsize=64)
def threshold(p):
    """The least v in [0, 2³¹] with fp32(fp32(v)·S) >= fp32(p) (2³¹: none, keep nothing): keep ⇔ v >= T."""
    p32 = np.float32(p)
    lo, hi = 0, 2**31   # invariant: every v < lo is dropped, hi is kept (or is 2³¹)
    while lo < hi:
        mid = (lo + hi) // 2
        if np.float32(mid) * _SCALE >= p32:
            hi = mid
        else:
            lo = mid + 1
    return lo


def keep_mask(seed: torch.Tensor, M: int, K: int, p: float, row0: int = 0,
              dtype: torch.dtype = torch.bool, impl: str | None = None) -> torch.Tensor:
    """The kernels' keep-mask of rows row0 .. row0 + M - 1 of an (·, K) x for `seed` (a 1-element
    int64 tensor) and p (the drop probability, in [0, 1)), as an (M, K) tensor of `dtype`
    (1 kept, 0 dropped) on seed's device. impl: one of IMPLS, or None for the fastest that
    applies (see the module docstring)."""
    if not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1):
        raise TypeError(f"seed: expected a 1-element int64 tensor, got {_describe(seed)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a probability in [0, 1), got {p!r}")
    if M < 0 or K < 0 or row0 < 0:
        raise ValueError(f"M, K, row0: expected >= 0, got {M}, {K}, {row0}")
    seed = seed.reshape(())             # (1,), (1, 1), (): one value; the key schedule broadcasts on it
    impl = impl or _auto(seed.device)
    if impl == "torch":
        return _torch_mask(seed, M, K, p, row0).to(dtype)
    if impl == "cpp":
        return _cpp_mask(seed, M, K, p, row0, dtype)
    if impl == "triton":
        from .kernels.dropout import dropout_mask
        return dropout_mask(seed, M, K, p, row0=row0).to(dtype)
    raise ValueError(f"impl: expected one of {IMPLS} or None, got {impl!r}")


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"a {tuple(t.shape)} {t.dtype} tensor"
    return type(t).__name__


def _auto(device):
    if device.type == "cuda" and _triton_available():
        return "triton"
    if device.type == "cpu":
        from . import cref
        if cref.available():
            return "cpp"
    return "torch"


def _triton_available():
    try:
        from .kernels import dropout  # noqa: F401
    except ImportError:
        return False
    return True


def _cpp_mask(seed, M, K, p, row0, dtype):
    from . import cref
    if seed.device.type != "cpu":
        raise ValueError(f"impl='cpp': expected a CPU seed, got one on {seed.device}")
    out_dtype = dtype if dtype in (torch.bool, torch.uint8, torch.float32, torch.float64) else torch.float32
    out = torch.empty((M, K), dtype=out_dtype)
    cref.dropout_mask(out, int(seed.item()), p, row0)   # the C++ writes into out's memory
    return out.to(dtype)


def _mulhilo(a, c):
    """(hi, lo) 32-bit words of the 64-bit product of the constant a < 2³² and the int64 tensor c
    of 32-bit words, without leaving int64: a = ah·2¹⁶ + al, so both partial products are < 2⁴⁸."""
    ah, al = a >> 16, a & 0xFFFF
    p_hi, p_lo = c * ah, c * al
    t = p_lo + ((p_hi & 0xFFFF) << 16)          # < 2⁴⁸ + 2⁴⁸: the low 48 bits, with a carry
    return (p_hi >> 16) + (t >> 32), t & _LOW32


def _torch_mask(seed, M, K, p, row0):
    device = seed.device
    rows = torch.arange(row0, row0 + M, device=device, dtype=torch.int64)
    offset = (rows[:, None] * K + torch.arange(K, device=device, dtype=torch.int64)[None, :]).reshape(-1)
    c0, c1 = offset & _LOW32, offset >> 32       # offsets are >= 0: the shift brings no sign bits
    c2 = c3 = torch.zeros_like(c0)
    # key schedule, one value per round, on the device: reading the seed on the host would sync
    k = torch.arange(_ROUNDS, device=device, dtype=torch.int64)
    k0 = ((seed & _LOW32) + k * _KEY_A) & _LOW32
    k1 = (((seed >> 32) & _LOW32) + k * _KEY_B) & _LOW32   # masked: >> of a negative seed sign-extends
    for r in range(_ROUNDS):
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0[r], lo_b, hi_a ^ c3 ^ k1[r], lo_a
    v = torch.where(c0 >= 2**31, _LOW32 - c0, c0)   # int32 w < 0 is c0 - 2³²; -w - 1 = 2³² - 1 - c0
    return (v >= threshold(p)).reshape(M, K)
