"""lora_fast.nf4 against bitsandbytes' own bytes (0.50, CPU) and against a float64 per-element decode.

Comparisons are exact, bit for bit (floats compared as their integer bit patterns, so -0.0, NaN and
subnormals count). The bitsandbytes tests skip when it is not installed; the rest run without it.
Two bitsandbytes CPU traps the tests steer around, each said where it applies:
  * its C++ dequantize_4bit (AVX-512 build) indexes absmax per row, so it decodes wrongly when
    in_features is a multiple of 16 but not of 64: comparisons with it use multiples of 64, and our
    decode is held to the float64 formula at every size instead;
  * a Linear4bit's eval-mode no-grad forward on an AVX512-BF16 CPU repacks its weight in place, so
    tests running bitsandbytes modules set support_avx512bf16_for_cpu = False.
"""
import sys

import pytest
import torch

from lora_fast import nf4

BNB_MISSING = "bitsandbytes does not import (the byte-compatibility checks need it)"


def bnb_module(name="bitsandbytes"):
    """The bitsandbytes module `name`, or a skip: missing, or failing to import (any ImportError)."""
    return pytest.importorskip(name, reason=BNB_MISSING, exc_type=ImportError)


def bnb_functional():
    return bnb_module("bitsandbytes.functional")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def bits(t):
    """t's bit pattern: exact comparison that tells -0.0 from 0.0 and compares NaNs."""
    if t.dtype.is_floating_point:
        return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])
    return t


def assert_same(name, ours, theirs):
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    differ = (bits(ours) != bits(theirs)).sum().item()
    assert differ == 0, f"{name}: {differ} of {ours.numel()} elements differ"


def nf4_midpoints():
    levels = nf4.nf4_levels()
    return (levels[:-1] + levels[1:]) / 2


# --- the weights quantised ------------------------------------------------------------------------

def _with_zeros(shape, g):
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < 0.3] = 0
    return w


def _zero_blocks(shape, g):
    w = torch.randn(shape, generator=g)
    flat = w.view(-1)
    flat[5 * 64:6 * 64] = 0                       # a whole block of zeros
    flat[flat.numel() - flat.numel() % 64:] = 0   # and the short last block
    return w


def _ties(shape, g):
    """Each row: 1.0 (so the block's absmax is 1 and scaling is exact), every NF4 midpoint, the float
    just above each, their negatives, the rest random."""
    w = torch.rand(shape, generator=g) * 2 - 1
    mids = nf4_midpoints()
    w[:, 0] = 1.0
    w[:, 1:16] = mids
    w[:, 16:31] = torch.nextafter(mids, torch.tensor(2.0))
    w[:, 31:46] = -mids
    return w


# (id, shape, dtype, maker): sizes include out·in not a multiple of 64 and block counts not a
# multiple of 256; magnitudes from subnormal (under bitsandbytes' 1e-38 divisor floor) to 1e35.
WEIGHTS = [
    ("normal", (64, 128), torch.float32, lambda s, g: torch.randn(s, generator=g)),
    ("uniform-bf16", (48, 96), torch.bfloat16, lambda s, g: torch.rand(s, generator=g) * 2 - 1),
    ("normal-fp16-ragged", (33, 62), torch.float16, lambda s, g: torch.randn(s, generator=g)),
    ("exact-zeros", (64, 200), torch.float32, _with_zeros),
    ("zero-blocks", (10, 101), torch.float32, _zero_blocks),
    ("ties", (20, 64), torch.float32, _ties),
    ("tiny-subnormal", (40, 130), torch.float32, lambda s, g: torch.randn(s, generator=g) * 1e-39),
    ("huge", (40, 130), torch.float32, lambda s, g: torch.randn(s, generator=g) * 1e35),
    ("magnitudes-1e-30..1e30", (300, 130), torch.float32,
     lambda s, g: torch.randn(s, generator=g) * torch.logspace(-30, 30, s[0])[:, None]),
    ("magnitudes-bf16", (300, 128), torch.bfloat16,
     lambda s, g: torch.randn(s, generator=g) * torch.logspace(-36, 36, s[0])[:, None]),
    ("large", (512, 512), torch.float32, lambda s, g: torch.randn(s, generator=g)),
    ("one-pair", (1, 2), torch.float32, lambda s, g: torch.randn(s, generator=g)),
    ("odd-in", (2, 33), torch.float16, lambda s, g: torch.randn(s, generator=g)),
]


def make_weight(case, seed=0):
    name, shape, dtype, maker = case
    return maker(shape, gen(seed)).to(dtype)


def reciprocal_vs_division_pair():
    """(a, x), |x| < a, for which x · fp32(1/a) and x / a fall on different sides of an NF4
    midpoint: a full block scales by the reciprocal, the short last block divides."""
    mids = nf4_midpoints()
    a = 1 + torch.rand(4000, generator=gen(7))
    x = (mids[None, :].double() * a[:, None].double()).float()
    split = torch.bucketize(x * a.reciprocal()[:, None], mids) != torch.bucketize(x / a[:, None], mids)
    i, j = split.nonzero()[0].tolist()
    return a[i].item(), x[i, j].item()


# --- the tables -----------------------------------------------------------------------------------

def test_levels_are_sixteen_ascending_with_minus_one_zero_one():
    assert len(nf4.NF4_LEVELS) == 16 and list(nf4.NF4_LEVELS) == sorted(nf4.NF4_LEVELS)
    assert (nf4.NF4_LEVELS[0], nf4.NF4_LEVELS[7], nf4.NF4_LEVELS[15]) == (-1.0, 0.0, 1.0)
    assert nf4.BLOCKSIZE == 64 and nf4.ABSMAX_BLOCKSIZE == 256


def test_levels_are_bitsandbytes_table_bit_for_bit():
    F = bnb_functional()
    assert_same("NF4 levels", nf4.nf4_levels(), F.get_4bit_type("nf4", device="cpu"))


def test_dynamic_map_is_bitsandbytes_bit_for_bit():
    F = bnb_functional()
    assert_same("dynamic map", nf4.dynamic_map(), F.create_dynamic_map(signed=True))


# --- quantize_nf4: bitsandbytes' bytes ------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("case", WEIGHTS, ids=[c[0] for c in WEIGHTS])
def test_quantize_writes_bitsandbytes_bytes(case, double_quant):
    F = bnb_functional()
    weight = make_weight(case)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    w = nf4.quantize_nf4(weight, double_quant=double_quant)
    assert w.shape == state.shape and w.dtype == state.dtype == weight.dtype
    assert w.double_quant == state.nested == double_quant
    assert_same("packed", w.packed, packed)
    assert_same("absmax", w.absmax, state.absmax)
    if double_quant:
        assert_same("absmax_code", w.absmax_code, state.state2.code)
        assert_same("absmax_scale", w.absmax_scale, state.state2.absmax)
        assert_same("absmax_offset", w.absmax_offset, state.offset)


def test_the_short_last_block_divides_where_full_blocks_multiply_by_the_reciprocal():
    a, x = reciprocal_vs_division_pair()
    row = torch.tensor([a, x] + [0.5] * 62 + [a, x])      # a full block, then a block of 2
    w = nf4.quantize_nf4(row.view(1, 66), double_quant=False)
    codes = w.codes()
    assert codes[1] != codes[65], "the same (absmax, x) should get codes one apart in the two blocks"
    F = bnb_functional()
    packed, state = F.quantize_4bit(row.view(1, 66), blocksize=64, quant_type="nf4")
    assert_same("packed", w.packed, packed)


def test_codes_are_the_nearest_level_ties_going_down():
    weight = make_weight(WEIGHTS[5])                      # ties: absmax 1 in every block
    codes = nf4.quantize_nf4(weight, double_quant=False).codes().view(weight.shape).long()
    assert torch.equal(codes[:, 1:16], torch.arange(15).expand(20, 15))          # a midpoint: the lower
    assert torch.equal(codes[:, 16:31], torch.arange(1, 16).expand(20, 15))      # just above: the upper
    # and everywhere: no level is strictly nearer the scaled value than the chosen one
    weight = torch.randn(64, 192, generator=gen(3))
    w = nf4.quantize_nf4(weight, double_quant=False)
    blocks = weight.view(-1, 64)
    scaled = (blocks * w.absmax.reciprocal()[:, None]).clamp(-1, 1).double().view(-1, 1)
    levels = torch.tensor(nf4.NF4_LEVELS, dtype=torch.float64)
    distance = (scaled - levels).abs()
    chosen = distance.gather(1, w.codes().long()[:, None])
    assert (chosen <= distance.min(dim=1, keepdim=True).values).all()


def test_absmax_codes_follow_bitsandbytes_grid_table_not_the_nearest_code():
    F = bnb_functional()
    code = nf4.dynamic_map()
    # a dense grid over [-1, 1], a 1.0 in every 256 so each group's scale is exactly 1
    grid = torch.linspace(-1, 1, 255 * 2000)
    values = torch.cat([grid.view(-1, 255), torch.ones(2000, 1)], 1).view(-1)
    q, scale = nf4._quantize_dynamic(values, code, 256)
    theirs, state = F.quantize_blockwise(values, blocksize=256)
    assert_same("codes", q, theirs)
    assert_same("scales", scale, state.absmax)
    nearest = torch.bucketize(values, (code[:-1] + code[1:]) * 0.5).to(torch.uint8)
    assert (nearest != q).sum() > 100, "bitsandbytes' grid table should differ from the nearest code somewhere"
    # groups whose scale is 0, or so small its reciprocal overflows: their NaNs get code 0
    values = torch.tensor([1e-40, 0.0, -1e-40, 0.0, 5e-41] * 60 + [0.0] * 300 + [0.5, -0.25, 0.0])
    q, scale = nf4._quantize_dynamic(values, code, 256)
    theirs, state = F.quantize_blockwise(values, blocksize=256)
    assert_same("codes (tiny and zero groups)", q, theirs)
    assert_same("scales (tiny and zero groups)", scale, state.absmax)


def test_a_float64_weight_is_quantised_from_its_float32_values():
    weight = torch.randn(16, 128, generator=gen(4), dtype=torch.float64)
    w, w32 = nf4.quantize_nf4(weight), nf4.quantize_nf4(weight.float())
    assert torch.equal(w.packed, w32.packed) and torch.equal(w.absmax, w32.absmax)
    assert w.dtype == torch.float64 and w.dequantize().dtype == torch.float64
    assert torch.equal(w.dequantize(), w32.dequantize().double())


def test_a_weight_needing_grad_is_quantised_without_touching_autograd():
    linear = torch.nn.Linear(128, 8)
    w = nf4.quantize_nf4(linear.weight)
    assert not w.packed.requires_grad and not w.absmax.requires_grad


# --- decoding ---------------------------------------------------------------------------------------

def dequantize_ref(w, dtype):
    """The decode, one element at a time in float64: element i is the nibble (high for even i) of
    byte i // 2, times its block's absmax. A product of two float32 values is exact in float64, so
    rounding it to float32 is the float32 multiply; that is then rounded to dtype."""
    n = w.shape.numel()
    i = torch.arange(n)
    byte = w.packed.reshape(-1)[i // 2].long()
    code = torch.where(i % 2 == 0, byte >> 4, byte & 0x0F)
    j = torch.arange(-(-n // 64))
    if w.double_quant:
        offset = torch.as_tensor(w.absmax_offset, dtype=torch.float64)
        scaled = (w.absmax_code.double()[w.absmax[j].long()] * w.absmax_scale.double()[j // 256]).float()
        absmax = (scaled.double() + offset).float().double()
    else:
        absmax = w.absmax.double()
    levels = torch.tensor(nf4.NF4_LEVELS, dtype=torch.float64)
    return (levels[code] * absmax[i // 64]).float().to(dtype).view(w.shape)


DECODE_SHAPES = [(64, 128), (7, 48), (7, 80), (9, 66), (4, 33), (3, 50), (1, 2), (300, 130)]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=str)
def test_dequantize_matches_the_float64_formula_at_any_size(shape, dtype, double_quant):
    weight = torch.randn(shape, generator=gen(5)) * torch.logspace(-3, 3, shape[0])[:, None]
    w = nf4.quantize_nf4(weight.to(dtype), double_quant=double_quant)
    out = w.dequantize()
    assert out.dtype == dtype
    assert_same("dequantize", out, dequantize_ref(w, dtype))
    assert_same("dequantize(float32)", w.dequantize(torch.float32), dequantize_ref(w, torch.float32))


# bitsandbytes' decode is right for in_features a multiple of 64 (see the module docstring).
BNB_DECODE_SHAPES = [(64, 128), (3, 64), (5, 192), (300, 256)]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", BNB_DECODE_SHAPES, ids=str)
def test_dequantize_matches_bitsandbytes(shape, dtype, double_quant):
    F = bnb_functional()
    weight = (torch.randn(shape, generator=gen(6)) * torch.logspace(-3, 3, shape[0])[:, None]).to(dtype)
    w = nf4.quantize_nf4(weight, double_quant=double_quant)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert_same("dequantize", w.dequantize(), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_dequantize_matches_bitsandbytes_for_subnormal_blocks_in_float32(double_quant):
    # float32 only: bitsandbytes' AVX512-BF16 conversion flushes subnormal bf16 results to zero,
    # where ours (torch's) rounds them to the nearest subnormal
    F = bnb_functional()
    weight = torch.randn(40, 128, generator=gen(8)) * 1e-39
    w = nf4.quantize_nf4(weight, double_quant=double_quant)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert_same("dequantize", w.dequantize(), F.dequantize_4bit(packed, state))


def test_absmax_fp32_is_bitsandbytes_decoded_absmax():
    F = bnb_functional()
    weight = torch.randn(300, 130, generator=gen(9)) * torch.logspace(-20, 20, 300)[:, None]
    w = nf4.quantize_nf4(weight)
    _, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert_same("absmax_fp32", w.absmax_fp32(), theirs)
    plain = nf4.quantize_nf4(weight, double_quant=False)
    assert plain.absmax_fp32() is plain.absmax


def test_codes_unpack_high_nibble_first():
    packed = torch.randint(0, 256, (32, 1), generator=gen(10), dtype=torch.uint8)
    w = nf4.NF4Weight(packed, torch.rand(1, generator=gen(11)), shape=(1, 64))
    codes = w.codes()
    assert codes.dtype == torch.uint8 and codes.shape == (64,)
    assert torch.equal(codes[0::2], packed.view(-1) >> 4) and torch.equal(codes[1::2], packed.view(-1) & 0x0F)


# --- the NF4Weight object -------------------------------------------------------------------------

def test_nbytes_with_double_quant_is_at_most_0_52_per_parameter_at_4096_squared():
    out, inp = 4096, 4096
    n_blocks = out * inp // 64
    w = nf4.NF4Weight(torch.zeros(out * inp // 2, 1, dtype=torch.uint8), torch.zeros(n_blocks, dtype=torch.uint8),
                      nf4.dynamic_map(), torch.ones(n_blocks // 256), 0.0, (out, inp), torch.bfloat16)
    assert w.nbytes == out * inp // 2 + n_blocks + 256 * 4 + n_blocks // 256 * 4 + 4
    assert w.nbytes / (out * inp) <= 0.52
    plain = nf4.NF4Weight(w.packed, torch.ones(n_blocks), shape=(out, inp), dtype=torch.bfloat16)
    assert plain.nbytes / (out * inp) == 0.5625


def test_nbytes_counts_the_tensors_held():
    w = nf4.quantize_nf4(torch.randn(300, 130, generator=gen(12)))
    tensors = (w.packed, w.absmax, w.absmax_code, w.absmax_scale, w.absmax_offset)
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert w.nbytes == held


def test_to_moves_every_tensor_into_a_new_weight():
    w = nf4.quantize_nf4(torch.randn(8, 64, generator=gen(13)))
    same = w.to("cpu")
    assert same is not w and torch.equal(same.dequantize(), w.dequantize())
    meta = w.to("meta")
    assert meta.device.type == "meta" and meta.absmax_offset.device.type == "meta"
    assert meta.shape == w.shape and meta.dtype == w.dtype and meta.double_quant


def test_an_offset_held_as_a_float_decodes_the_same():
    w = nf4.quantize_nf4(torch.randn(8, 640, generator=gen(14)))
    as_float = nf4.NF4Weight(w.packed, w.absmax, w.absmax_code, w.absmax_scale, w.absmax_offset.item(),
                             w.shape, w.dtype)
    assert_same("dequantize", as_float.dequantize(), w.dequantize())


# --- bitsandbytes objects ---------------------------------------------------------------------------

def bnb_param(weight, double_quant, quant_type="nf4"):
    bnb = bnb_module()
    return bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type,
                             compress_statistics=double_quant).to("cpu")


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_from_bnb_shares_the_param_tensors_and_decodes_like_bitsandbytes(dtype, double_quant):
    F = bnb_functional()
    param = bnb_param(torch.randn(64, 192, generator=gen(15)).to(dtype), double_quant)
    state = param.quant_state
    w = nf4.from_bnb(param)
    assert w.packed.data_ptr() == param.data_ptr() and w.absmax.data_ptr() == state.absmax.data_ptr()
    if double_quant:
        assert w.absmax_code.data_ptr() == state.state2.code.data_ptr()
        assert w.absmax_scale.data_ptr() == state.state2.absmax.data_ptr()
        assert w.absmax_offset.data_ptr() == state.offset.data_ptr()
    assert w.shape == (64, 192) and w.dtype == dtype and w.double_quant == double_quant
    assert_same("dequantize", w.dequantize(), F.dequantize_4bit(param.data, state))


def test_from_bnb_refuses_fp4_naming_the_quant_type():
    param = bnb_param(torch.randn(32, 64, generator=gen(16)), False, quant_type="fp4")
    with pytest.raises(ValueError, match="param: quant_type 'fp4' is not supported, expected 'nf4'"):
        nf4.from_bnb(param)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_to_bnb_quant_state_round_trips_through_bitsandbytes(double_quant):
    F = bnb_functional()
    w = nf4.quantize_nf4(torch.randn(48, 320, generator=gen(17)).bfloat16(), double_quant=double_quant)
    state = nf4.to_bnb_quant_state(w)
    assert state.absmax is w.absmax and state.quant_type == "nf4" and state.blocksize == 64
    if double_quant:
        assert state.state2.absmax is w.absmax_scale and state.state2.code is w.absmax_code
        assert state.offset is w.absmax_offset
    assert_same("dequantize", F.dequantize_4bit(w.packed, state), w.dequantize())
    # a real bitsandbytes state: it serialises and loads back as bitsandbytes' own do
    again = F.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    assert_same("dequantize (serialised)", F.dequantize_4bit(w.packed, again), w.dequantize())


def test_to_bnb_quant_state_without_bitsandbytes_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    w = nf4.quantize_nf4(torch.randn(4, 64, generator=gen(18)))
    with pytest.raises(ImportError, match="to_bnb_quant_state needs bitsandbytes"):
        nf4.to_bnb_quant_state(w)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_a_bnb_linear4bit_from_a_random_linear_decodes_the_same(double_quant):
    bnb = bnb_module()
    F = bnb_functional()
    g = gen(19)
    linear = torch.nn.Linear(256, 96)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 256, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(96, generator=g))
    module = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    module.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                      compress_statistics=double_quant, quant_type="nf4").to("cpu")
    module.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    module.support_avx512bf16_for_cpu = False    # else an eval no-grad forward repacks the weight in place
    module.eval()
    x = torch.randn(3, 256, generator=g)
    with torch.no_grad():
        y = module(x)
    w = nf4.from_bnb(module.weight)
    assert_same("dequantize", w.dequantize(), F.dequantize_4bit(module.weight.data, module.weight.quant_state))
    assert torch.equal(w.packed, nf4.quantize_nf4(linear.weight, double_quant=double_quant).packed)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w.dequantize(), linear.bias))


def test_from_bnb_refuses_a_weight_bitsandbytes_repacked_for_its_bf16_cpu_kernel():
    bnb = bnb_module()
    F = bnb_functional()
    if not F.has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on CPUs with AVX512-BF16")
    module = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    module.weight = bnb.nn.Params4bit(torch.randn(64, 128, generator=gen(20)), requires_grad=False,
                                      quant_type="nf4").to("cpu")
    module.eval()
    with torch.no_grad():
        module(torch.randn(2, 128, generator=gen(21)))
    with pytest.raises(ValueError, match="param: its bytes are in bitsandbytes' AVX512-BF16 CPU packing"):
        nf4.from_bnb(module.weight)


# --- refusals, each naming its argument -----------------------------------------------------------

def _weight(shape=(4, 64), dtype=torch.float32):
    return torch.randn(shape, generator=gen(22)).to(dtype)


def _with(value, index):
    w = _weight()
    w.view(-1)[index] = value
    return w


QUANTIZE_REFUSALS = [
    ("not-a-tensor", lambda: ([[1.0, 2.0]],), TypeError, "weight: expected a torch.Tensor, got list"),
    ("1-d", lambda: (_weight((64,)),), ValueError, r"weight: expected a 2-D \(out, in\) tensor, got shape \(64,\)"),
    ("3-d", lambda: (_weight((2, 2, 16)),), ValueError, r"weight: expected a 2-D .*got shape \(2, 2, 16\)"),
    ("integer", lambda: (torch.randint(0, 9, (4, 64), generator=gen(23)),), ValueError,
     "weight: expected a floating dtype, got torch.int64"),
    ("odd-numel", lambda: (_weight((3, 3)),), ValueError, r"weight: expected an even number of elements .*\(3, 3\)"),
    ("empty", lambda: (_weight((0, 64)),), ValueError, r"weight: expected at least one element, got shape \(0, 64\)"),
    ("inf", lambda: (_with(float("inf"), 5),), ValueError, "weight: expected finite values"),
    ("nan", lambda: (_with(float("nan"), 70),), ValueError, "weight: expected finite values"),
    ("blocksize", lambda: (_weight(), True, 128), ValueError, "blocksize: expected 64, got 128"),
    ("double-quant-not-bool", lambda: (_weight(), "yes"), TypeError, "double_quant: expected a bool, got str"),
    ("overflowing-double-quant", lambda: ((torch.rand(40, 130, generator=gen(24)) * 2 - 1) * 3.4e38,), ValueError,
     "weight: too large for double quantisation"),
]


@pytest.mark.parametrize("make_args,error,message", [c[1:] for c in QUANTIZE_REFUSALS],
                         ids=[c[0] for c in QUANTIZE_REFUSALS])
def test_quantize_refuses(make_args, error, message):
    with pytest.raises(error, match=message):
        nf4.quantize_nf4(*make_args())


def test_the_overflowing_weight_is_quantised_without_double_quant():
    weight = (torch.rand(40, 130, generator=gen(24)) * 2 - 1) * 3.4e38
    assert torch.isfinite(nf4.quantize_nf4(weight, double_quant=False).dequantize()).all()


def _parts(**change):
    """NF4Weight arguments for a double-quantised (4, 64) weight (4 blocks), with `change` applied."""
    parts = dict(packed=torch.zeros(128, 1, dtype=torch.uint8), absmax=torch.zeros(4, dtype=torch.uint8),
                 absmax_code=nf4.dynamic_map(), absmax_scale=torch.ones(1), absmax_offset=torch.tensor(0.5),
                 shape=(4, 64), dtype=torch.bfloat16)
    parts.update(change)
    return parts


WEIGHT_REFUSALS = [
    ("packed-dtype", dict(packed=torch.zeros(128, 1, dtype=torch.int8)),
     "packed: expected dtype torch.uint8, got torch.int8"),
    ("packed-size", dict(packed=torch.zeros(64, 1, dtype=torch.uint8)),
     r"packed: expected shape \(128, 1\), got \(64, 1\)"),
    ("packed-not-tensor", dict(packed=b"\0" * 128), "packed: expected a torch.Tensor, got bytes"),
    ("shape-3-d", dict(shape=(2, 2, 64)), r"shape: expected \(out, in\), two positive ints, got \(2, 2, 64\)"),
    ("shape-zero", dict(shape=(0, 64)), r"shape: expected \(out, in\), two positive ints, got \(0, 64\)"),
    ("shape-odd", dict(shape=(3, 3)), r"shape: expected an even number of elements .*\(3, 3\)"),
    ("dtype", dict(dtype=torch.int32), "dtype: expected a floating torch.dtype, got torch.int32"),
    ("absmax-size", dict(absmax=torch.zeros(5, dtype=torch.uint8)), r"absmax: expected shape \(4,\), got \(5,\)"),
    ("absmax-dtype-double-quant", dict(absmax=torch.zeros(4)), "absmax: expected dtype torch.uint8, got torch.float32"),
    ("absmax-dtype-plain", dict(absmax=torch.zeros(4, dtype=torch.float16), absmax_code=None, absmax_scale=None,
                                absmax_offset=None), "absmax: expected dtype torch.float32, got torch.float16"),
    ("statistics-partial", dict(absmax_scale=None), "absmax_code, absmax_scale, absmax_offset: expected all three"),
    ("absmax-code-size", dict(absmax_code=torch.zeros(255)), r"absmax_code: expected shape \(256,\), got \(255,\)"),
    ("absmax-scale-size", dict(absmax_scale=torch.ones(2)), r"absmax_scale: expected shape \(1,\), got \(2,\)"),
    ("absmax-offset-type", dict(absmax_offset=1), "absmax_offset: expected a float or a 0-dim float32 tensor, got int"),
    ("absmax-offset-shape", dict(absmax_offset=torch.zeros(1)), r"absmax_offset: expected shape \(\), got \(1,\)"),
    ("device", dict(absmax_scale=torch.ones(1, device="meta")), "absmax_scale: expected device cpu .*got meta"),
    ("blocksize", dict(blocksize=32), "blocksize: expected 64, got 32"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in WEIGHT_REFUSALS], ids=[c[0] for c in WEIGHT_REFUSALS])
def test_nf4weight_refuses(change, message):
    with pytest.raises((TypeError, ValueError), match=message):
        nf4.NF4Weight(**_parts(**change))


def test_from_bnb_refuses_a_plain_tensor():
    with pytest.raises(TypeError, match="param: expected a quantised bitsandbytes Params4bit .*got Tensor"):
        nf4.from_bnb(torch.zeros(4, 1, dtype=torch.uint8))


def test_to_bnb_quant_state_refuses():
    with pytest.raises(TypeError, match="w: expected an lora_fast.nf4.NF4Weight, got Tensor"):
        nf4.to_bnb_quant_state(torch.zeros(2))
    w = nf4.quantize_nf4(torch.randn(4, 64, generator=gen(25), dtype=torch.float64))
    with pytest.raises(ValueError, match="w: bitsandbytes holds float32, float16 or bfloat16 weights, got dtype "
                                         "torch.float64"):
        nf4.to_bnb_quant_state(w)
