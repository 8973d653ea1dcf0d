"""Which path runs a pass of the "triton" backend, per (device, dtype, shape): measured, not guessed.

Forward paths
  in_loop  one kernel, x·Aᵀ in the GEMM's K-loop (kernels/forward.py)
  split    first pass for xs, then the GEMM with xs·Bᵀ in its epilogue
  split_k  decode (M <= 64): K split across programs, then a fixed-order reduce adding xs·Bᵀ
           (kernels/splitk.py)
  tma      split's design with a TMA, persistent main loop (kernels/forward_tma.py)
  cublas   torch path: xs, then cuBLAS addmm_ of the base GEMM into xs·Bᵀ
Backward paths (W0 frozen)
  fused    one kernel, dY·B in the dX GEMM's N-loop
  split    one pass over dY (gs, dB partials), then the dX GEMM with gs·A and dA in its epilogue
  tma      split's design, its dX GEMM on TMA with a persistent grid (kernels/backward_tma.py)
  cublas   torch path: cuBLAS GEMMs, gs reused
Every path computes the same function with the same saved tensors (x, and xs = s'·d(x)·Aᵀ) and,
with dropout, drops the same elements (the torch path reproduces the kernels' Philox mask,
lora_fast.dropout), so any forward pairs with any backward and each stands in for the others.

The path table (`table()`, one per pass) names each path's launcher and the predicate saying
whether it applies to a call; the dispatcher, `forced` and `lora-fast-check --all-paths` all read
it, and the launchers do what they are told (they neither choose nor re-check). Which paths apply:
in_loop/fused/split_k/tma need the whole rank in one tile (r <= 64); fused and tma need dX;
split_k runs for 1 <= M <= 64; tma needs a Hopper-or-later GPU, fp16/bf16 and TMA-readable
(16-byte-aligned) inputs, and M > 64, and the backward's no DoRA column scale (its dY tiles go
from TMA to the MMA as stored; the forward's scale is in the shared epilogue). DoRA's PEFT dropout
form (a second base product in the K-loop) runs the in_loop and split forwards and the fused and
split backwards with 16-bit operands (fp32 spilled: cublas), and cublas. Which of them are timed (`candidates`): all that apply,
except in_loop/fused above configs.IN_LOOP_CANDIDATE_MAX_M rows (each candidate costs a first step
its compiles), and only cublas for fp32 on a GPU when torch does not allow tf32: the kernels'
"ieee" fp32 dots run on FMAs with small tiles, a correctness path that cuBLAS's SGEMM outruns
(bench/NOTES.md v7).

LORA_FAST_DISPATCH picks how a choice is made:
  measure (default)  the first call of a key on a CUDA device runs every candidate on the call's
                     own inputs — one warm-up run (it also compiles and autotunes), then the median
                     of REPS runs of GPU time (CUDA events; the runs are queued behind a GPU sleep so
                     Python's launch overhead is not in them, L2 flushed before each) — and keeps
                     the fastest for the process and in the cache file. Where timing cannot run
                     (CUDA-graph capture, torch.compile tracing, the interpreter), a cached choice
                     is used if there is one, else the heuristic.
  heuristic          the static rule (`heuristic`, kernels.configs.IN_LOOP_MAX_M): in_loop/fused
                     for M <= 256, split above; never times, never reads the cache file (the same
                     choice on every machine). Read when a key is first met: set it before the
                     first call (choices already kept in the process stay).
A path that raises — while measured (a compile error, out of resources, a TMA launch a driver
refuses) or later, as the kept choice — is dropped for that key with one warning naming it and the
error, remembered in the process and the cache file, and the call runs the next fastest path
(forced paths raise: a benchmark wants to know). Key: device, dtype, pass, M rounded up to a power
of two, N, K, r, dropout on, bias, what is saved or asked. The cache file is lora_fast.cache_file's.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import statistics
import time
import warnings
from typing import Callable, Iterator, NamedTuple

import torch

from . import cache_file, torch_path, weights

FORWARD_PATHS = ("in_loop", "split", "split_k", "tma", "cublas")
BACKWARD_PATHS = ("fused", "split", "tma", "cublas")
# The single-kernel path of each pass: the heuristic's choice at small M.
_SINGLE = {"forward": "in_loop", "backward": "fused"}
MODES = ("measure", "heuristic")
REPS = 5

_choices = {}        # key -> path: measured here or loaded from the cache file
_times = {}          # key -> {path: ms}, for the measured and loaded keys
_failed = {}         # key -> {path: error}: paths that raised for the key (process and file)
# pass -> path, while a `forced` block runs: per thread and per asyncio task (a context variable),
# so another thread's calls keep their own (measured or forced) paths.
_forced = contextvars.ContextVar("lora_fast_forced_paths", default={})
_settled = {}        # key -> path decided without timing for good: one candidate, or a device never timed
_warned = set()      # (pass, path, error type) already warned about in this process


_CONFIGS = []


def _configs():
    """kernels.configs, imported on first use (it imports triton: only when a triton-backend call
    runs) and kept: the predicates read it several times a call."""
    if not _CONFIGS:
        from lora_fast.kernels import configs
        _CONFIGS.append(configs)
    return _CONFIGS[0]


def mode():
    value = os.environ.get("LORA_FAST_DISPATCH", "measure")
    if value not in MODES:
        raise ValueError(f"LORA_FAST_DISPATCH: expected one of {MODES}, got {value!r}")
    return value


class Call:
    """What the path table's predicates read of one call: M (an int, or symbolic under
    torch.compile with dynamic shapes: then compared with nothing, which would guard on it), the
    rank, whether dX is asked, and — computed when a predicate first asks — whether the TMA kernels
    can read its first operand and weight here (`tma_possible`)."""
    __slots__ = ("M", "R", "need_dx", "_operands", "_tma", "packed", "kernels_read_weight", "dora", "peft_form",
                 "kernels_take_form")

    def __init__(self, M, R, need_dx=True, operands=None, tma=None, packed=False, kernels_read_weight=True,
                 dora=False, peft_form=False):
        self.M, self.R, self.need_dx, self._operands, self._tma = M, R, need_dx, operands, tma
        # DoRA's column scale (lora_fast.dora): the TMA backward takes dY as stored, not scaled; its
        # PEFT dropout form's second base product is in the in_loop / split forward's K-loop only
        self.dora, self.peft_form = dora, peft_form
        # ... and 16-bit operands only: its two fp32 accumulators beside fp32 (tf32) x, d(x) and W0
        # tiles spilled in nearly every tile (`python -m lora_fast.aot`, bench/NOTES.md v16)
        self.kernels_take_form = not (peft_form and operands is not None and operands[0].dtype == torch.float32)
        # a 4-bit weight (lora_fast.weights.packed): the kernels decode it in their K-loop if its
        # rows are whole bytes (in_features even), and the TMA kernels do not read it
        self.packed, self.kernels_read_weight = packed, kernels_read_weight

    @property
    def tma(self):
        if self._tma is None:
            self._tma = not self.packed and self._operands is not None and tma_possible(*self._operands)
        return self._tma

    @property
    def one_tile(self):   # the whole rank in one tile: in_loop, fused, split_k, tma
        return self.R <= _configs().IN_LOOP_MAX_R

    @property
    def decode(self):
        return type(self.M) is int and 1 <= self.M <= _configs().SPLIT_K_MAX_M

    @property
    def above_decode(self):
        return type(self.M) is int and self.M > _configs().SPLIT_K_MAX_M


class Path(NamedTuple):
    applies: Callable[[Call], bool]
    launcher: Callable    # the pass's signature: lora_forward's or lora_backward's below


def _always(call):
    return True


def _kernels(call):
    """Whether the kernels can run the call at all: they read its weight, and take its DoRA form."""
    return call.kernels_read_weight and call.kernels_take_form


@functools.cache
def table() -> dict[str, dict[str, Path]]:
    """{pass: {path: Path(applies, launcher)}}, in FORWARD_PATHS / BACKWARD_PATHS order."""
    from lora_fast import kernels   # imports triton: only when a triton-backend call runs
    return {
        "forward": {
            "in_loop": Path(lambda c: c.one_tile and c.kernels_read_weight and c.kernels_take_form,
                            functools.partial(kernels.lora_forward, in_loop=True)),
            "split": Path(_kernels, functools.partial(kernels.lora_forward, in_loop=False)),
            "split_k": Path(lambda c: c.one_tile and c.decode and c.kernels_read_weight and not c.peft_form,
                            kernels.lora_forward_split_k),
            "tma": Path(lambda c: c.one_tile and c.above_decode and c.tma and not c.peft_form, kernels.lora_forward_tma),
            "cublas": Path(_always, torch_path.lora_forward),
        },
        "backward": {
            "fused": Path(lambda c: c.need_dx and c.one_tile and c.kernels_read_weight and c.kernels_take_form,
                          functools.partial(kernels.lora_backward, path="fused")),
            "split": Path(_kernels, functools.partial(kernels.lora_backward, path="split")),
            "tma": Path(lambda c: c.need_dx and c.one_tile and c.above_decode and c.tma and not c.dora,
                        functools.partial(kernels.lora_backward, path="tma")),
            "cublas": Path(_always, torch_path.lora_backward),
        },
    }


def applicable(pass_name: str, call: Call) -> tuple[str, ...]:
    """The paths of `pass_name` that can run `call` (those `forced` accepts)."""
    return tuple(name for name, path in table()[pass_name].items() if path.applies(call))


def candidates(pass_name: str, call: Call, fp32_ieee_gpu: bool = False) -> tuple[str, ...]:
    """The applicable paths the dispatcher times: no single-kernel path (in_loop / fused) above
    IN_LOOP_CANDIDATE_MAX_M rows, only cublas for fp32 "ieee" on a GPU."""
    if fp32_ieee_gpu:
        return ("cublas",)
    big = type(call.M) is int and call.M > _configs().IN_LOOP_CANDIDATE_MAX_M
    return tuple(p for p in applicable(pass_name, call) if not (big and p == _SINGLE[pass_name]))


def heuristic(pass_name: str, call: Call) -> str:
    """The static rule, used where nothing is timed: the single-kernel path up to
    configs.IN_LOOP_MAX_M rows (the GEMM is bound by reading W0 there, and the redundant low-rank
    MMA work is free), split above."""
    single = _SINGLE[pass_name]
    if table()[pass_name][single].applies(call) and call.M <= _configs().IN_LOOP_MAX_M:
        return single
    return _split_or_cublas(pass_name, call)


def _split_or_cublas(pass_name, call):
    """split, which applies to every call the kernels can read the weight of, else cublas."""
    return "split" if table()[pass_name]["split"].applies(call) else "cublas"


def tma_possible(x, weight):
    """Whether the TMA kernels can read x (the forward's x, or the backward's dY) and weight here: a
    Hopper-or-later GPU (or the interpreter, for tests), real tensors (not traced: descriptors are
    built on the host), and kernels.launch.tma_eligible's rules."""
    from lora_fast.kernels import launch
    if launch.INTERPRET:
        device_ok = True
    else:
        device_ok = x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9
    return device_ok and not launch.traced(x) and launch.tma_eligible(x, weight)


def fp32_ieee_gpu(t):
    """fp32 on a GPU without tf32 (torch's default "highest" precision): the kernels' dots would
    be ieee FMAs."""
    from lora_fast.kernels import launch
    return (t.dtype == torch.float32 and t.device.type == "cuda" and not launch.INTERPRET
            and launch.input_precision(t.dtype) == "ieee")


def _needs_seed(dropout_p, seed):
    if dropout_p > 0 and seed is None:
        raise ValueError("seed: dropout_p > 0 needs a seed tensor (a 1-element int64 tensor on x's device; "
                         "the backward needs the forward's)")


def kernels_read_4bit(device, dtype, in_features):
    """Whether the kernels decode a 4-bit W0 of these: rows of whole bytes (in_features even, and
    below 2**24), and on a GPU a 16-bit compute dtype. fp32 there runs cuBLAS (tf32 or SGEMM) on the decoded weight:
    QLoRA computes in bf16, and 4-bit fp32 builds would add a third of the 4-bit AOT builds
    (tests/test_aot.py) for a path the fp32 "ieee" rule would not take anyway."""
    # in < 2**24: nf4_tile's in-tile offsets (rows · in/2 bytes) are int32
    return in_features % 2 == 0 and in_features < 2 ** 24 and not (device.type == "cuda" and dtype == torch.float32)


def _weight_kind(weight, K):
    """(packed, whether the kernels can read it, the key's suffix: () for a dense weight, so that
    its keys and cache-file entries are those of before 4-bit weights)."""
    source = weights.packed_source(weight)
    if source is None:
        return False, True, ()
    return True, kernels_read_4bit(weight.device, weight.dtype, K), ("nf4_dq" if source.double_quant else "nf4",)


# The passes take DoRA's column scale (lora_fast.dora; torch_path's COLUMN_SCALE).
COLUMN_SCALE = True


def _check_dora_args(like, N, col_scale, z=None):
    """DoRA's pass arguments, checked before any path runs (the kernels read col_scale as N
    contiguous fp32 values, and z by its strides): ValueError/TypeError naming the argument."""
    if col_scale is None:
        if z is not None:
            raise ValueError("z: the magnitude's product is summed only with col_scale (DoRA); got z without it")
        return
    want = torch.float64 if like.dtype == torch.float64 else torch.float32
    if not isinstance(col_scale, torch.Tensor):
        raise TypeError(f"col_scale: expected a tensor, got {type(col_scale).__name__}")
    if tuple(col_scale.shape) != (N,) or col_scale.dtype != want or col_scale.device != like.device:
        raise ValueError(f"col_scale: expected a ({N},) {want} tensor on {like.device}, got "
                         f"{tuple(col_scale.shape)} {col_scale.dtype} on {col_scale.device}")
    if z is not None and (not isinstance(z, torch.Tensor) or tuple(z.shape) != (like.shape[0], N)
                          or z.dtype != like.dtype or z.device != like.device):
        got = f"{tuple(z.shape)} {z.dtype} on {z.device}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z: expected the forward's ({like.shape[0]}, {N}) {like.dtype} product on {like.device}, "
                         f"got {got}")


def _dora_tag(col_scale, peft_dropout, dropout_p, dm=False):
    """DoRA's suffix of a key ((), LoRA's keys as before): the column scale, its PEFT dropout form
    (a second base product) and, in backward, the magnitude's sum."""
    if col_scale is None:
        return ()
    return ("dora" + ("_peft" if peft_dropout and dropout_p > 0 else "") + ("_dm" if dm else ""),)


def _forward_call(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0, seed=None,
                  col_scale=None, peft_dropout=False):
    _needs_seed(dropout_p, seed)
    M, K = x.shape
    N, R = lora_B.shape
    packed, readable, kind = _weight_kind(weight, K)
    _check_dora_args(x, N, col_scale)
    tag = _dora_tag(col_scale, peft_dropout, dropout_p)
    # DoRA's keys have a suffix of their own (their epilogue writes z too); LoRA's are as before
    return (Call(M, R, operands=(x, weight), packed=packed, kernels_read_weight=readable, dora=bool(tag),
                 peft_form="_peft" in "".join(tag)), x,
            (M, N, K, R, dropout_p > 0, bias is not None, save_xs) + kind + tag)


def _backward_call(dy, x, xs, weight, lora_A, lora_B, scaling, *, need_dx=True, need_da=True, need_db=True,
                   dropout_p=0.0, seed=None, col_scale=None, z=None, peft_dropout=False):
    _needs_seed(dropout_p, seed)
    M, N = dy.shape
    K, R = x.shape[1], lora_A.shape[0]
    packed, readable, kind = _weight_kind(weight, K)
    _check_dora_args(dy, N, col_scale, z)
    tag = _dora_tag(col_scale, peft_dropout, dropout_p, z is not None)
    return (Call(M, R, need_dx, (dy, weight), packed=packed, kernels_read_weight=readable, dora=bool(tag),
                 peft_form="_peft" in "".join(tag)), dy,
            (M, N, K, R, dropout_p > 0, need_dx, need_da, need_db) + kind + tag)


def _empty_forward(x, weight, lora_A, lora_B, *args, col_scale=None, **kwargs):
    empty = (x.new_empty((0, lora_B.shape[0])), x.new_empty((0, lora_B.shape[1])))
    return empty if col_scale is None else (*empty, x.new_empty((0, lora_B.shape[0])))


def _empty_backward(dy, x, xs, weight, lora_A, lora_B, scaling, *, need_dx=True, need_da=True, need_db=True,
                    col_scale=None, z=None, **kwargs):
    grads = (dy.new_empty((0, x.shape[1])) if need_dx else None,
             torch.zeros_like(lora_A) if need_da else None, torch.zeros_like(lora_B) if need_db else None)
    if col_scale is None:
        return grads
    return (*grads, None if z is None else torch.zeros_like(col_scale))


_PASSES = {"forward": (_forward_call, _empty_forward), "backward": (_backward_call, _empty_backward)}


def run(pass_name, *args, **kwargs):
    """Run one pass of the "triton" backend on its key's path: args as lora_forward's or
    lora_backward's. A kept path is a dict lookup (decode sizes have a few µs to spare); a new key
    is chosen first (`choose`); a kept path that raises falls back to the next. M = 0 runs nothing
    (after a forced path is checked: forcing one that cannot apply is an error whatever M)."""
    describe, empty = _PASSES[pass_name]
    call, like, shape = describe(*args, **kwargs)
    paths = table()[pass_name]

    def on(path):   # the call, on one path of the table
        return paths[path].launcher(*args, **kwargs)
    forced_paths = _forced.get()
    key = _key(pass_name, like, shape)
    path = None if forced_paths else _choices.get(key) or _settled.get(key)
    if path is None:
        path = choose(pass_name, key, like, call, shape, on)
    elif not paths[path].applies(call):
        # the key chose tma, but these tensors' alignment (or a trace) rules it out
        path = _split_or_cublas(pass_name, call)
    if shape[0] == 0:
        return empty(*args, **kwargs)
    try:
        return on(path)
    except Exception as error:
        if forced_paths.get(pass_name):
            raise
        _raise_unless_path_failure(pass_name, path, error, like)
        return _fall_back(pass_name, key, like, call, path, error, on)


# The module-level face of the passes (lora_fast.torch_path's signatures), as `--impl` modules have.
lora_forward = functools.partial(run, "forward")
lora_backward = functools.partial(run, "backward")


# The base linear alone (a 4-bit linear without an adapter) is a call of rank 0: every path computes
# it (the epilogues' rank loops run no iteration, the in-loop rank tiles are masked), so it is chosen,
# timed and fallen back from on the same table, under keys of its own (r = 0). The adapter arguments
# are empty views of the first operand, never read.
def _no_adapter(t, n, k):
    return t[:0, :1].expand(0, k), t[:1, :0].expand(n, 0)


def base_forward(x, weight, bias):
    """y = x @ weightᵀ + bias for 2-D x (M, K) of any strides; weight dense or a 4-bit stand-in."""
    return run("forward", x, weight, *_no_adapter(x, *weight.shape), bias, 0.0, save_xs=False)[0]


def base_backward(dy, weight):
    """dX = dy @ weight for 2-D dy (M, N) of any strides."""
    N, K = weight.shape
    x = dy[:1, :1].expand(dy.shape[0], K)   # dA is not asked: x is never read
    return run("backward", dy, x, None, weight, *_no_adapter(dy, N, K), 0.0, need_da=False, need_db=False)[0]


def _key(pass_name, t, shape):
    """(device, dtype, pass, M rounded up to a power of two, the rest of shape); None for M = 0
    (it shares no key with M = 1) and for a symbolic M (torch.compile with dynamic shapes)."""
    M = shape[0]
    if type(M) is not int or M == 0:
        return None
    return (t.device, t.dtype, pass_name, _configs().m_bucket(M)) + shape[1:]


def _raise_unless_path_failure(pass_name, path, error, t):
    """Re-raise what another path would not cure: out of memory (the caller's to handle, as with
    any op), an error inside a CUDA-graph capture (the capture is invalidated: every other path
    would fail too) or a trace, and a CUDA context that no longer works (a sticky error)."""
    if isinstance(error, torch.OutOfMemoryError) or torch.compiler.is_compiling():
        raise error
    if t.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"lora_fast: the {pass_name} path {path!r} failed inside a CUDA-graph "
                               f"capture ({type(error).__name__}: {error}). Nothing can be compiled, "
                               "tuned or timed there: run the model once eagerly (a step per "
                               "sequence-length bucket) before capturing") from error
        try:
            torch.cuda.synchronize(t.device)
        except Exception:
            raise error from None


def choose(pass_name, key, t, call, shape, run):
    """The path for a call whose key has no kept choice: forced, the only candidate, the cache
    file's, measured, or the heuristic. run(path) runs the call on a path (to time it)."""
    forced = _forced.get().get(pass_name)
    if forced is not None:
        paths = applicable(pass_name, call)
        if forced not in paths:
            why = (" (a 4-bit weight: no TMA path, and only cublas where the kernels cannot read it: "
                   "odd or >= 2**24 in_features, fp32 on a GPU)") if call.packed else ""
            raise ValueError(f"forced {pass_name} path {forced!r} does not apply to this call "
                             f"(M, N, K, r = {shape[:4]}, dropout {shape[4]}){why}: expected one of {paths}")
        return forced
    if key is None:
        return heuristic(pass_name, call)
    timed = _usable(key, candidates(pass_name, call, fp32_ieee_gpu(t)))
    if len(timed) == 1:
        _settled[key] = timed[0]
        return timed[0]
    if mode() == "heuristic":
        return _preferred(heuristic(pass_name, call), timed)
    path = _from_cache_file(key, timed)
    if path is not None:
        return path
    if not can_measure(t):
        path = _preferred(heuristic(pass_name, call), timed)
        if t.device.type != "cuda":     # never timed on this device (CPU, the interpreter): decide once
            _settled[key] = path
        return path
    times = {}
    for p in timed:
        try:
            times[p] = timer(lambda p=p: run(p), t.device)
        except Exception as error:      # this path cannot run here: the others still can
            _raise_unless_path_failure(pass_name, p, error, t)
            _record_failure(pass_name, key, p, error)
    if not times:
        raise RuntimeError(f"lora_fast: every {pass_name} path failed for M, N, K, r = {shape[:4]}: "
                           f"{_failed.get(key)}")
    path = min(times, key=times.get)
    _choices[key], _times[key] = path, times
    _save(t.device, key)
    return path


def _usable(key, candidates):
    failed = _failed.get(key, {})
    return tuple(p for p in candidates if p not in failed) or candidates


def _preferred(path, candidates):
    """The heuristic's path if it is a candidate, else the first candidate (a path that failed)."""
    return path if path in candidates else candidates[0]


def _fall_back(pass_name, key, t, call, path, error, run):
    """`path` raised on this call: drop it for the key and run the next — the fastest measured one
    that is left, else the heuristic's, else the first applicable (cublas last) — until one runs;
    when none is left, the last error is raised."""
    tried = set()
    preferred = heuristic(pass_name, call)
    while True:
        tried.add(path)
        _record_failure(pass_name, key, path, error)
        failed = _failed.get(key, {})
        left = [p for p in candidates(pass_name, call, fp32_ieee_gpu(t)) + applicable(pass_name, call)
                if p not in tried and p not in failed]
        if not left:
            raise error
        measured = _times.get(key, {})
        path = min(left, key=lambda p: (p not in measured, measured.get(p, 0.0), p != preferred,
                                        p == "cublas"))
        if key is not None:
            _settled.pop(key, None)
            _choices[key] = path
            _times[key] = dict(measured)
            _save(t.device, key)
        try:
            return run(path)
        except Exception as again:
            _raise_unless_path_failure(pass_name, path, again, t)
            error = again


def _record_failure(pass_name, key, path, error):
    message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    if key is not None:
        _failed.setdefault(key, {})[path] = message
        _choices.pop(key, None)
        _times.get(key, {}).pop(path, None)
    if (pass_name, path, type(error).__name__) not in _warned:
        _warned.add((pass_name, path, type(error).__name__))
        warnings.warn(f"lora_fast: the {pass_name} path {path!r} failed and is dropped for this shape "
                      f"({message}); running the other paths", RuntimeWarning, stacklevel=4)


def can_measure(t):
    """Timing runs on CUDA tensors, eagerly, outside a CUDA-graph capture."""
    from lora_fast.kernels import launch
    return (t.device.type == "cuda" and not launch.INTERPRET
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
            and not launch.traced(t))


_SLEEP_CYCLES_PER_MS = {}


def _sleep_cycles_per_ms(device):
    """GPU clock cycles of torch.cuda._sleep per millisecond, measured once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SLEEP_CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        start.record()
        torch.cuda._sleep(1_000_000)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_MS[index] = 1_000_000 / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_CYCLES_PER_MS[index]


def timer(fn, device):
    """Median GPU time (ms) of fn over REPS runs after one warm-up run, CUDA events around each, L2
    flushed before each (the layer's weight is not in L2 when a model runs it).

    The REPS (flush, start, fn, end) sequences are queued behind a GPU sleep twice as long as the
    host takes to queue them (measured on one run), so the GPU runs them back to back: an event pair
    brackets the kernels' own time, not the Python launch overhead between them, which at decode
    sizes is as long as the kernels (~10 µs). If the sleep was over before the last run was queued
    (an event recorded after it has completed by then), they are timed again behind a longer one. tests/test_dispatch.py's GPU test times a path that
    sleeps 2 ms on the host and launches 10 µs of work."""
    with torch.cuda.device(device):
        fn()
        torch.cuda.synchronize(device)
        flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.uint8,
                            device=device)
        host = time.perf_counter()
        flush.zero_()
        fn()
        host = time.perf_counter() - host
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(REPS)]
        ahead_ms = 2 * REPS * host * 1e3
        for _ in range(4):
            torch.cuda.synchronize(device)
            slept = torch.cuda.Event()
            torch.cuda._sleep(int(min(ahead_ms, 1000.0) * _sleep_cycles_per_ms(device)))
            slept.record()
            for start, end in events:
                flush.zero_()
                start.record()
                fn()
                end.record()
            # the sleep over before the host had queued every run (the clock was low when the
            # sleep was calibrated, or the host slower than its first run): gaps were timed, again
            late = slept.query()
            torch.cuda.synchronize(device)
            if not late or ahead_ms >= 1000.0:
                break
            ahead_ms *= 4
    return statistics.median(start.elapsed_time(end) for start, end in events)


@contextlib.contextmanager
def forced(forward: str | None = None, backward: str | None = None) -> Iterator[None]:
    """Run the block with the given paths (a benchmark's fixed design, a test): neither measured nor
    cached, and not replaced when they raise. forward: one of FORWARD_PATHS, or None (chosen as
    usual); backward: one of BACKWARD_PATHS, or None. A forced path that does not apply to a call raises
    ValueError. Local to the thread (and asyncio task) that enters it: other threads' calls are
    not forced."""
    for name, value, allowed in (("forward", forward, FORWARD_PATHS), ("backward", backward, BACKWARD_PATHS)):
        if value is not None and value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed} or None, got {value!r}")
    paths = {k: v for k, v in (("forward", forward), ("backward", backward)) if v is not None}
    token = _forced.set({**_forced.get(), **paths})   # a new dict: the default is never mutated
    try:
        yield
    finally:
        _forced.reset(token)


def forced_paths() -> dict[str, str]:
    """{pass: path} forced in this thread or task now (empty: none). The autograd Function keeps
    it from forward for its backward: on CUDA, autograd runs backward on a device thread of its
    own, which does not see the caller's context (see forcing)."""
    return _forced.get()


@contextlib.contextmanager
def forcing(paths: dict[str, str]) -> Iterator[None]:
    """Run the block with exactly `paths` forced (a forced_paths() result), nothing else."""
    token = _forced.set(paths)
    try:
        yield
    finally:
        _forced.reset(token)


def choices() -> dict[str, dict[str, dict]]:
    """{section: {key string: {"path": ..., "ms": {path: time}, "failed": {path: error}}}} for every
    key decided by measurement, the cache file or a fallback in this process."""
    out = {}
    for key, path in _choices.items():
        entry = {"path": path, "ms": _times.get(key, {})}
        if _failed.get(key):
            entry["failed"] = dict(_failed[key])
        out.setdefault(cache_file.section_name(key[0]), {})[_key_string(key)] = entry
    return out


def failures() -> dict[str, dict[str, str]]:
    """{key string: {path: error}} of the paths dropped in this process."""
    return {_key_string(key): dict(paths) for key, paths in _failed.items()}


def clear() -> None:
    """Forget every choice and failure of this process, and what it read of the cache file (the
    file is left as it is)."""
    _choices.clear()
    _times.clear()
    _failed.clear()
    cache_file.clear()
    _settled.clear()
    _warned.clear()


def cache_path():
    return cache_file.path()


def _key_string(key):
    _, dtype, pass_name, bucket, *rest = key
    return "|".join([pass_name, str(dtype).replace("torch.", ""), str(bucket), *map(str, rest)])


def _from_cache_file(key, candidates):
    """The cache file's choice for key if it names one of candidates (else None), with the paths it
    records as failed (cache_file reads the device's section once)."""
    entry = cache_file.read_section(key[0]).get(_key_string(key))
    if not isinstance(entry, dict) or entry.get("path") not in candidates:
        return None
    if isinstance(entry.get("failed"), dict) and entry["failed"]:
        _failed[key] = {str(p): str(e) for p, e in entry["failed"].items()}
    ms = entry.get("ms")
    ms = {p: v for p, v in ms.items() if isinstance(v, (int, float))} if isinstance(ms, dict) else {}
    _choices[key], _times[key] = entry["path"], ms
    return entry["path"]


def _save(device, key):
    entry = {"path": _choices[key], "ms": _times.get(key, {})}
    if _failed.get(key):
        entry["failed"] = dict(_failed[key])
    cache_file.write(device, {_key_string(key): entry})


# --- mixed batches (lora_fast.mixed): rows with their own adapters ----------------------------------
# One kernel design per pass, so nothing is timed: decode sizes (M <= MIXED_SPLIT_K_MAX_M rows, each
# possibly with its own adapter) split the base GEMM over K as split_k does for one adapter (the
# same reason: too few row tiles to fill the GPU); larger batches run the grouped row tiles.
MIXED_SPLIT_K_MAX_M = 64


def multi_forward(x, weight, bias, A, B, scale, dropout_p, seed, ids, perm, *, save_xs=True):
    """The "triton" backend's mixed-batch forward (kernels/multi.py); torch_path.multi_forward's
    signature."""
    from lora_fast.kernels import multi
    _needs_seed(1.0 if dropout_p is not None else 0.0, seed)
    if fp32_ieee_gpu(x):   # FMA tiles: cuBLAS's SGEMM outruns them, as in candidates()
        return torch_path.multi_forward(x, weight, bias, A, B, scale, dropout_p, seed, ids, perm, save_xs=save_xs)
    path = "split_k" if x.shape[0] <= MIXED_SPLIT_K_MAX_M else "tiled"
    return multi.multi_forward(x, weight, bias, A, B, scale.float(), dropout_p, seed, ids, perm,
                               save_xs=save_xs, path=path)


def multi_backward(dy, x, xs, weight, A, B, scale, dropout_p, seed, ids, perm, *,
                   need_dx=True, need_da=True, need_db=True):
    """The "triton" backend's mixed-batch backward (kernels/multi.py)."""
    from lora_fast.kernels import multi
    _needs_seed(1.0 if dropout_p is not None else 0.0, seed)
    if fp32_ieee_gpu(dy):
        return torch_path.multi_backward(dy, x, xs, weight, A, B, scale, dropout_p, seed, ids, perm,
                                         need_dx=need_dx, need_da=need_da, need_db=need_db)
    return multi.multi_backward(dy, x, xs, weight, A, B, scale.float(), dropout_p, seed, ids, perm,
                                need_dx=need_dx, need_da=need_da, need_db=need_db)
