"""What every launcher does before and while it starts a kernel, written once: the launch-time facts
(interpreter, SM count, the dots' fp32 precision, TMA readability), the prologue every pass shares
(the dropout rescale, the seed argument, dummy pointers), and `launch` itself — directly on real
tensors, through torch.library.wrap_triton while torch.compile traces them (lora_fast.ops registers
the passes as triton_ops).

Nothing here chooses a path or checks a shape: lora_fast.checks has checked the call and
lora_fast.dispatch has chosen the path before a launcher runs.
"""
import os
from typing import NamedTuple

import torch
from triton.runtime.autotuner import Autotuner

from lora_fast.backend import tf32_allowed
from lora_fast.weights import packed_source

from . import tuning

try:   # host-side TMA descriptors; with a Triton that has none, the dispatcher runs the other paths
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# While a list, launches are appended to it as (kernel, args, kwargs) instead of running:
# bench.tuning replays the launchers' real autotune calls this way without a GPU.
RECORDER = None


def next_power_of_2(n):
    """triton.next_power_of_2 for an int n >= 1 without its call overhead (~6 us a call in Triton
    3.9, a few of them per launch: the whole budget of a decode step); a symbolic size (torch.compile
    with dynamic shapes) goes to Triton's."""
    if type(n) is int:
        return 1 << (n - 1).bit_length()
    import triton
    return triton.next_power_of_2(n)


def cdiv(a, b):
    """Ceiling division, for ints and symbolic sizes alike, written as triton.cdiv is (whose call
    costs as much as next_power_of_2's)."""
    return (a + b - 1) // b


_SM_COUNT = {}


def sm_count(device):
    """Streaming multiprocessors of a CUDA device (cached); None under the interpreter or on CPU."""
    if device.type != "cuda" or INTERPRET:
        return None
    index = device.index if device.index is not None else 0
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def persistent_programs(device):
    """Programs of a persistent kernel: one per SM (3 under the interpreter, so that test shapes
    give each program several tiles)."""
    return sm_count(device) or 3


def device_capability():
    """Major compute capability of the current CUDA device (0 when there is none)."""
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


def input_precision(dtype):
    """tl.dot precision for fp32 operands, following torch's own matmul setting: tf32 only
    when torch allows it (lora_fast.backend.tf32_allowed: float32_matmul_precision != "highest")."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def tma_eligible(x, weight):
    """Whether TMA can read x (M, K) and weight (N, K): a Triton with host descriptors, fp16/bf16,
    contiguous along K, 16-byte aligned base addresses and row strides (the descriptors' rules)."""
    if TensorDescriptor is None:
        return False
    for t in (x, weight):
        if (t.dtype not in (torch.float16, torch.bfloat16) or t.stride(1) != 1
                or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16):
            return False
    return True


def descriptor(t):
    """A TMA descriptor of t with placeholder block shapes (no config has them): the autotuner's
    pre-hook sets each config's."""
    return TensorDescriptor.from_tensor(t, [8, 8])


class Prologue(NamedTuple):
    """What every pass computes before its launches, the same way."""
    scale: float                  # s / (1 - p): the dropout rescale rides on the (M, r) products
    dropout: bool
    dropout_p: float
    seed: torch.Tensor            # the seed, or a dummy pointer (never read: DROPOUT=False)
    precision: str                # tl.dot input precision (input_precision)


def prologue(like, scaling, dropout_p, seed):
    """The shared prologue of a pass whose first operand is `like` (x, or dY in backward)."""
    dropout = dropout_p > 0
    return Prologue(scaling / (1.0 - dropout_p), dropout, dropout_p, seed if dropout else like,
                    input_precision(like.dtype))


def optional(t, dummy):
    """A pointer argument that may be absent: `dummy` stands in (never read: its constexpr is off)."""
    return dummy if t is None else t


def strides(t):
    """The two strides of a 2-D operand, or (0, 0) for an absent one."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def bias_arg(bias, y):
    """The bias pointer argument of the forward kernels: they read bias as N contiguous values
    (bias_ptr + offs_n), so a strided view (bias[::2], an expanded scalar) is copied first — N
    values, against reading its stride in every epilogue; y stands in for an absent bias (never
    read: HAS_BIAS=False)."""
    return y if bias is None else bias.contiguous()


def launch(kernel, grid, like):
    """``kernel[grid]``, traceable. While a graph is being traced — `like` (any tensor argument) is
    a fake or functional tensor, as in a triton_op's fake implementation or its decomposition under
    torch.compile — the launch goes through wrap_triton, which records it as a graph node (autotune
    and config pruning included). On real tensors the kernel is called itself: wrap_triton's own
    eager path builds a new pruned autotuner, and so tunes again, on every call. The interpreter's
    kernels are not JIT functions and cannot be traced (lora_fast.ops makes them opaque ops).
    An autotuned kernel goes through kernels/tuning.py first (disk, capture, parallel compiles)."""
    if RECORDER is not None:
        return lambda *args, **kwargs: RECORDER.append((kernel, args, kwargs))
    if not INTERPRET and traced(like):
        return torch.library.wrap_triton(kernel)[grid]
    if isinstance(kernel, Autotuner) and len(kernel.configs) > 1:
        return lambda *args, **kwargs: tuning.run(kernel, grid, args, kwargs)
    return kernel[grid]


def traced(t):
    """Whether t is a fake or functional tensor (a graph being traced), not a real one."""
    if type(t) is torch.Tensor:   # fake and functional tensors are subclasses: a plain one is real
        return False
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor
    return is_fake(t) or isinstance(t, FunctionalTensor)


def empty(like, rows, cols, dtype=None):
    """An uninitialised (rows, cols) output on like's device, in like's dtype unless given."""
    return torch.empty((rows, cols), device=like.device, dtype=dtype or like.dtype)



class WeightArgs(NamedTuple):
    """A base weight as the GEMM kernels take it (their w_ptr, statistics pointers, W0 strides,
    double_quant flag and WEIGHT constexpr)."""
    ptr: torch.Tensor
    statistics: tuple             # absmax_ptr, qabsmax_ptr, code_ptr, scale_ptr, offset_ptr, levels_ptr
    strides: tuple                # W0's (row, column) strides: elements, or for NF4 bytes
    double_quant: int             # 1: NF4 absmax as 8-bit codes (qabsmax_ptr, code_ptr, scale_ptr, offset_ptr)
    kind: str                     # "dense" or "nf4"


_LEVELS = {}   # device -> the 16 NF4 levels, float32


def weight_args(weight):
    """The kernels' view of `weight`: a dense tensor itself (it also stands in for the statistics,
    never read), or a packed NF4 stand-in's codes and statistics (lora_fast.weights: the source
    is a lora_fast.nf4.NF4Weight, in even; 16-byte-aligned bytes per row when in % 32 == 0).
    Pointers a format does not use are stand-ins of the same dtype (fp32 ones for absmax, code,
    scale and offset, the codes for qabsmax), so both formats share one build."""
    w = packed_source(weight)
    if w is None:
        return WeightArgs(weight, (weight,) * 6, (weight.stride(0), weight.stride(1)), 0, "dense")
    if not all(t.is_contiguous() for t in (w.packed, w.absmax) + ((w.absmax_code, w.absmax_scale)
                                                                 if w.double_quant else ())):
        w = _contiguous(w)   # the kernels index the bytes and statistics as flat arrays
    device = w.device
    if device not in _LEVELS:
        from lora_fast.nf4 import nf4_levels
        _LEVELS[device] = nf4_levels(device)
    levels = _LEVELS[device]
    strides = (w.shape[1] // 2, 1)
    if not w.double_quant:
        return WeightArgs(w.packed, (w.absmax, w.packed, levels, levels, levels, levels), strides, 0, "nf4")
    offset = w.absmax_offset
    # a tensor as bitsandbytes keeps it (no host sync to read it); a float filled on the device
    offset = offset.reshape(1) if isinstance(offset, torch.Tensor) else torch.full(
        (1,), offset, dtype=torch.float32, device=device)
    return WeightArgs(w.packed, (levels, w.absmax, w.absmax_code, w.absmax_scale, offset, levels), strides, 1,
                      "nf4")


def _contiguous(w):
    """An NF4Weight over contiguous copies of w's tensors (a strided view of bitsandbytes' bytes)."""
    from lora_fast.nf4 import NF4Weight
    same = (lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t)
    return NF4Weight(same(w.packed), same(w.absmax), same(w.absmax_code), same(w.absmax_scale), w.absmax_offset,
                     tuple(w.shape), w.dtype, w.blocksize)


class DoRAOutput(NamedTuple):
    """A forward launch's DoRA arguments (lora_fast.dora: y = c ⊙ z + bias, blocks.y_epilogue's
    COL_SCALE): the column scales c and the unscaled output z, or y standing in for both (never
    read or written: COL_SCALE is off)."""
    on: bool
    c: torch.Tensor
    z: torch.Tensor
    z_strides: tuple

    def result(self, y, xs):
        """The forward launcher's return value: (y, xs), and z after them for DoRA."""
        return (y, xs, self.z) if self.on else (y, xs)


def dora_output(col_scale, y):
    """DoRAOutput for a forward writing y (M, N): z allocated like y when col_scale (N,) fp32 is given."""
    if col_scale is None:
        return DoRAOutput(False, y, y, (0, 0))
    z = torch.empty_like(y)
    # the epilogue reads c as N contiguous values (c_ptr + offs_n), as it reads the bias
    return DoRAOutput(True, col_scale.contiguous(), z, (z.stride(0), z.stride(1)))


def peft_form(col_scale, peft_dropout, dropout_p):
    """Whether a DoRA launch runs the PEFT dropout form's second base product (blocks.k_loop's
    SECOND): with the column scale, peft_dropout and dropout on; without dropout the two forms are
    one function."""
    return col_scale is not None and bool(peft_dropout) and dropout_p > 0
