"""NF4, QLoRA's 4-bit weight format, in plain PyTorch: the bytes bitsandbytes (0.50, CPU) writes.

    NF4_LEVELS, BLOCKSIZE (64), ABSMAX_BLOCKSIZE (256)
    NF4Weight              the packed codes and their statistics, decoded by .dequantize()
    quantize_nf4(weight)   a 2-D float weight to NF4Weight, byte for byte bitsandbytes.functional.
                           quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=...)
    from_bnb(param)        an NF4Weight over a bitsandbytes Params4bit's own tensors (no copy)
    to_bnb_quant_state(w)  bitsandbytes' QuantState over w's tensors (no copy)

The format. The (out, in) weight is flattened row-major and cut into blocks of 64 elements (the last
one shorter when 64 does not divide out·in). Element i gets a 4-bit code c[i] into NF4_LEVELS, and

    W[i] = fp32(NF4_LEVELS[c[i]] · absmax[i // 64])                      rounded once to the dtype

Codes are packed two to a byte, the first element in the high nibble: byte k = c[2k] << 4 | c[2k+1],
a uint8 tensor (out·in/2, 1). With double quantisation the per-block absmax is itself stored in 8
bits: a uint8 code q[j] into a 256-entry signed dynamic map, per 256 absmax values an fp32 scale, and
one fp32 offset (the mean of absmax), decoded as

    absmax[j] = fp32(fp32(absmax_code[q[j]] · absmax_scale[j // 256]) + absmax_offset)

Memory per weight element: 0.5 byte of codes plus 4/64 byte of absmax (0.5625 in all), or with
double quantisation 1/64 + 4/(64·256) byte (≈ 0.516 in all).

Rounding, as bitsandbytes' CPU path does it (tests/test_nf4.py holds each rule to its bytes):
  * 4-bit codes (bitsandbytes' PyTorch kernel): x = w in fp32; a = max |x| over the block, the
    divisor clamped to at least fp32(1e-38) (only that clamp keeps an all-zero block finite); in a
    full block s = x · fp32(1/a), in the short last block s = x / a (a division: the two differ by
    an ulp now and then); s clamped to [-1, 1]; the code is the number of fp32 midpoints
    fp32(L[k] + L[k+1]) / 2 strictly below s: the nearest level (as far as the midpoints' float32
    rounding allows), a tie going to the lower.
    The stored absmax is the block's max |x| itself, except in the short last block, where it is the
    clamped divisor.
  * 8-bit absmax codes (bitsandbytes' C++ kernel) are not the nearest code: the kernel rounds
    s = clamp(y · fp32(1/b), -1, 1) (y = absmax - offset, b = max |y| over 256) to one of 65536 grid
    points, u = trunc(fma((s + 1) · 0.5, 65535, 0.5)), and reads the code from a table built on that
    grid (entry u: the number of map midpoints below fp32(2u/65535) - 1). A scaled value that is NaN
    (0 · inf: a group of zeros, or 1/b overflowing for a tiny b) gets code 0.
"""
from __future__ import annotations

import torch

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023: quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero), as the float32 values bitsandbytes' get_4bit_type("nf4") holds; ascending.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZE = 64            # weight elements per absmax (bitsandbytes' default for 4-bit)
ABSMAX_BLOCKSIZE = 256    # absmax values per fp32 scale under double quantisation (bitsandbytes' fixed choice)

_MIN_DIVISOR = 1e-38      # bitsandbytes' floor under a 4-bit block's divisor
_GRID = 65536             # points of the C++ kernel's grid over [-1, 1] for the 8-bit absmax codes


def nf4_levels(device=None) -> torch.Tensor:
    """NF4_LEVELS as a float32 tensor (16,) on `device`."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """The 256-entry signed dynamic map double quantisation codes absmax into (bitsandbytes'
    create_dynamic_map(signed=True)), float32, ascending: for each decade 10^-6 .. 10^0, ±10^e times
    the midpoints of 2^(e+6) + 1 points spaced evenly over [0.1, 1], then 0 and 1. Built with the
    same float32 operations as bitsandbytes', so every entry has the same bits."""
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        scaled = 10.0 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2.0)
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _check_tensor(name, t, dtype, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


class NF4Weight:
    """An (out, in) weight in NF4: `packed` uint8 (out·in/2, 1), two codes a byte (first element in
    the high nibble); `absmax` one per 64-element block, float32 (n_blocks,), or with double
    quantisation uint8 codes (n_blocks,) into `absmax_code` (float32 (256,)), scaled per 256 by
    `absmax_scale` (float32 (ceil(n_blocks/256),)) and shifted by `absmax_offset` (a float or a 0-dim
    float32 tensor); all three None without it. `shape` is (out, in), `dtype` the original weight's
    dtype (what dequantize() returns by default). The tensors are held, not copied."""

    def __init__(self, packed, absmax, absmax_code=None, absmax_scale=None, absmax_offset=None,
                 shape=None, dtype=torch.float32, blocksize=BLOCKSIZE):
        if shape is None or len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"shape: expected (out, in), two positive ints, got {shape!r}")
        shape = torch.Size(shape)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        if blocksize != BLOCKSIZE:
            raise ValueError(f"blocksize: expected {BLOCKSIZE}, got {blocksize!r}")
        numel = shape.numel()
        if numel % 2:
            raise ValueError(f"shape: expected an even number of elements (two codes a byte), got {tuple(shape)}")
        _check_tensor("packed", packed, torch.uint8, (numel // 2, 1))
        n_blocks = -(-numel // blocksize)
        statistics = (absmax_code, absmax_scale, absmax_offset)
        if all(s is None for s in statistics):
            _check_tensor("absmax", absmax, torch.float32, (n_blocks,))
        elif any(s is None for s in statistics):
            given = [None if s is None else type(s).__name__ for s in statistics]
            raise ValueError("absmax_code, absmax_scale, absmax_offset: expected all three (double "
                             f"quantisation) or none, got {given}")
        else:
            _check_tensor("absmax", absmax, torch.uint8, (n_blocks,))
            _check_tensor("absmax_code", absmax_code, torch.float32, (256,))
            _check_tensor("absmax_scale", absmax_scale, torch.float32, (-(-n_blocks // ABSMAX_BLOCKSIZE),))
            if isinstance(absmax_offset, torch.Tensor):
                _check_tensor("absmax_offset", absmax_offset, torch.float32, ())
            elif not isinstance(absmax_offset, float):
                raise ValueError(f"absmax_offset: expected a float or a 0-dim float32 tensor, "
                                 f"got {type(absmax_offset).__name__}")
        for name, t in (("absmax", absmax), ("absmax_code", absmax_code), ("absmax_scale", absmax_scale),
                        ("absmax_offset", absmax_offset)):
            if isinstance(t, torch.Tensor) and t.device != packed.device:
                raise ValueError(f"{name}: expected device {packed.device} (packed's), got {t.device}")
        self.packed, self.absmax = packed, absmax
        self.absmax_code, self.absmax_scale, self.absmax_offset = statistics
        self.shape, self.dtype, self.blocksize = shape, dtype, blocksize

    @property
    def double_quant(self) -> bool:
        """Whether absmax is stored in 8 bits (bitsandbytes' compress_statistics)."""
        return self.absmax_code is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored format: codes, absmax and, with double quantisation, the map, the
        scales and 4 for the offset."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.absmax_code.numel() * 4 + self.absmax_scale.numel() * 4 + 4
        return total

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax, float32 (n_blocks,): `absmax` itself, or decoded from its 8-bit codes
        (map entry × its group's scale, then + offset: two float32 roundings, as bitsandbytes)."""
        if not self.double_quant:
            return self.absmax
        values = self.absmax_code[self.absmax.int()]
        n = values.numel()
        full = n - n % ABSMAX_BLOCKSIZE
        values[:full].view(-1, ABSMAX_BLOCKSIZE).mul_(self.absmax_scale[:full // ABSMAX_BLOCKSIZE, None])
        values[full:].mul_(self.absmax_scale[-1])
        return values.add_(self.absmax_offset)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes, uint8 (out·in,), element order (high nibble first)."""
        flat = self.packed.reshape(-1)
        return torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: the original dtype): level × block absmax in
        float32, rounded once to dtype. Holds out·in float32 values (plus the int32 codes) while
        decoding."""
        return self.dequantize_rows(0, self.shape[0], dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of the weight, (stop − start, in), decoded as dequantize() decodes them
        (bit for bit) from their own bytes and blocks: a bounded temporary for code that walks the
        weight in row chunks (lora_fast.dora's norms of a 4-bit W0)."""
        out_features, in_features = self.shape
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= out_features):
            raise ValueError(f"start, stop: expected 0 <= start <= stop <= {out_features}, got {start!r}, {stop!r}")
        if start == stop:
            return torch.empty((0, in_features), dtype=dtype or self.dtype, device=self.device)
        e0, e1 = start * in_features, stop * in_features
        b0 = e0 // self.blocksize                      # whole blocks around the rows (even bounds: whole bytes)
        lo, hi = b0 * self.blocksize, min(-(-e1 // self.blocksize) * self.blocksize, self.shape.numel())
        flat = self.packed.reshape(-1)[lo // 2:hi // 2]
        values = nf4_levels(self.device)[torch.stack((flat >> 4, flat & 0x0F), dim=1).reshape(-1).int()]
        absmax = self.absmax_fp32()[b0:b0 + -(-(hi - lo) // self.blocksize)]
        n = values.numel()
        full = n - n % self.blocksize
        values[:full].view(-1, self.blocksize).mul_(absmax[:full // self.blocksize, None])
        values[full:].mul_(absmax[-1])
        return values[e0 - lo:e1 - lo].view(stop - start, in_features).to(dtype or self.dtype)

    def to(self, device) -> "NF4Weight":
        """A new NF4Weight with every tensor on `device` (the same tensors where they are there)."""
        move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
        return NF4Weight(move(self.packed), move(self.absmax), move(self.absmax_code), move(self.absmax_scale),
                         move(self.absmax_offset), self.shape, self.dtype, self.blocksize)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, double_quant={self.double_quant}, "
                f"device={self.device}, nbytes={self.nbytes})")


# --- quantising -----------------------------------------------------------------------------------

def _check_weight(weight):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out, in) tensor, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight: expected a floating dtype, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight: expected at least one element, got shape {tuple(weight.shape)}")
    if weight.numel() % 2:
        raise ValueError(f"weight: expected an even number of elements (two 4-bit codes a byte), "
                         f"got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight: expected finite values, got inf or NaN")


def _quantize_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n,) -> (packed uint8 (n/2, 1), absmax float32 (n_blocks,)): the rule in the module
    docstring, first bullet."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.empty_like(flat)
    scaled[:full].view(-1, blocksize).copy_(blocks * absmax.clamp(min=_MIN_DIVISOR).reciprocal()[:, None])
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=_MIN_DIVISOR)
        scaled[full:] = flat[full:] / tail_max
        absmax = torch.cat((absmax, tail_max[None]))
    levels = nf4_levels(flat.device)
    midpoints = (levels[:-1] + levels[1:]) / 2
    # bucketize (right=False) counts the midpoints strictly below each value: ties go down
    codes = torch.bucketize(scaled.clamp_(-1, 1), midpoints, out_int32=True).to(torch.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1), absmax


def _dynamic_code_table(code: torch.Tensor) -> torch.Tensor:
    """uint8 (65536,): for each grid point fp32(2u/65535) - 1 of [-1, 1], the number of code
    midpoints strictly below it (bitsandbytes' C++ quantiser reads codes from this table)."""
    midpoints = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(_GRID, dtype=torch.float32, device=code.device) * 2 / (_GRID - 1) - 1
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def _quantize_dynamic(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n,) -> (uint8 codes into `code` (n,), float32 scale per block): the rule in the
    module docstring, second bullet."""
    n = values.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    scale = blocks.abs().amax(dim=1)
    scaled = (blocks * scale.reciprocal()[:, None]).clamp_(-1, 1)
    # (s + 1)·0.5 is a multiple of 2⁻²⁵ in [0, 1], so ·65535 + 0.5 is exact in float64: rounding
    # that to float32 once is the kernel's fused multiply-add (a float32 multiply, then add, gives
    # the same index at every grid boundary, so no test can tell the two apart)
    grid = (((scaled + 1) * 0.5).double() * (_GRID - 1) + 0.5).float()
    index = torch.where(torch.isnan(grid), 0, grid).long()   # float -> int truncates, as the kernel's cast
    return _dynamic_code_table(code)[index.view(-1)[:n]], scale   # indexed after the cut: no padding kept


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True, blocksize: int = BLOCKSIZE) -> NF4Weight:
    """`weight` (out, in), any floating dtype (quantised from its float32 values), as NF4 in 64-element
    blocks: the bytes bitsandbytes.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4",
    compress_statistics=double_quant) returns on a CPU, on weight's device. Needs an even out·in and
    finite values, and with double_quant block absmax values whose float32 sum stays finite
    (bitsandbytes takes their mean). Temporaries: up to about 16 bytes per element."""
    _check_weight(weight)
    if blocksize != BLOCKSIZE:
        raise ValueError(f"blocksize: expected {BLOCKSIZE}, got {blocksize!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant: expected a bool, got {type(double_quant).__name__}")
    flat = weight.detach().reshape(-1).float()
    packed, absmax = _quantize_4bit(flat, blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, shape=weight.shape, dtype=weight.dtype)
    offset = absmax.mean()
    code = dynamic_map(weight.device)
    q, scale = _quantize_dynamic(absmax - offset, code, ABSMAX_BLOCKSIZE)
    w = NF4Weight(packed, q, code, scale, offset, weight.shape, weight.dtype)
    # bitsandbytes returns these bytes too, and then decodes NaN or inf weights from them
    if not torch.isfinite(w.absmax_fp32()).all():
        raise ValueError("weight: too large for double quantisation (the float32 mean or the decoded "
                         "block absmax overflows); quantise it with double_quant=False")
    return w


# --- bitsandbytes ---------------------------------------------------------------------------------

def from_bnb(param) -> NF4Weight:
    """An NF4Weight over a quantised bitsandbytes Params4bit (`param.data` and `param.quant_state`),
    holding the same tensors (nothing copied), with or without compress_statistics."""
    state = getattr(param, "quant_state", None)
    if not isinstance(param, torch.Tensor) or state is None:
        raise TypeError(f"param: expected a quantised bitsandbytes Params4bit (with a quant_state), "
                        f"got {type(param).__name__}")
    if state.quant_type != "nf4":
        raise ValueError(f"param: quant_type {state.quant_type!r} is not supported, expected 'nf4'")
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' AVX512-BF16 CPU path reorders the bytes in place on an eval no-grad forward
        raise ValueError("param: its bytes are in bitsandbytes' AVX512-BF16 CPU packing, not NF4's layout; "
                         "set module.support_avx512bf16_for_cpu = False before running the module")
    if state.blocksize != BLOCKSIZE:
        raise ValueError(f"param: expected blocksize {BLOCKSIZE}, got {state.blocksize}")
    if state.nested:
        inner = state.state2
        if inner.blocksize != ABSMAX_BLOCKSIZE:
            raise ValueError(f"param: expected nested blocksize {ABSMAX_BLOCKSIZE}, got {inner.blocksize}")
        return NF4Weight(param.data, state.absmax, inner.code, inner.absmax, state.offset,
                         tuple(state.shape), state.dtype)
    return NF4Weight(param.data, state.absmax, shape=tuple(state.shape), dtype=state.dtype)


def to_bnb_quant_state(w: NF4Weight):
    """bitsandbytes' QuantState for w, over w's tensors (the offset made a 0-dim tensor if it is a
    float), so that bitsandbytes.functional.dequantize_4bit(w.packed, state) decodes w. (On a CPU,
    bitsandbytes 0.50's AVX-512 decode is wrong when in_features is a multiple of 16 but not of 64:
    it reads absmax per row; w.dequantize() is right at every size.)"""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w: expected an lora_fast.nf4.NF4Weight, got {type(w).__name__}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"w: bitsandbytes holds float32, float16 or bfloat16 weights, got dtype {w.dtype}")
    try:
        from bitsandbytes.functional import QuantState
    except ImportError as err:
        raise ImportError("to_bnb_quant_state needs bitsandbytes (pip install bitsandbytes)") from err
    common = dict(shape=w.shape, code=nf4_levels(w.device), blocksize=w.blocksize, quant_type="nf4", dtype=w.dtype)
    if not w.double_quant:
        return QuantState(w.absmax, **common)
    offset = w.absmax_offset
    if not isinstance(offset, torch.Tensor):
        offset = torch.tensor(offset, dtype=torch.float32, device=w.device)
    inner = QuantState(w.absmax_scale, code=w.absmax_code, blocksize=ABSMAX_BLOCKSIZE, dtype=torch.float32)
    return QuantState(w.absmax, offset=offset, state2=inner, **common)
