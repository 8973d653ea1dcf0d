"""Which path runs a pass of the "triton" backend, per (device, dtype, shape): measured, not guessed.

Forward paths
  in_loop  one kernel, x·Aᵀ in the GEMM's K-loop (kernels/forward.py)
  split    first pass for xs, then the GEMM with xs·Bᵀ in its epilogue
  split_k  decode (M <= 64): K split across programs, then a fixed-order reduce adding xs·Bᵀ
           (kernels/splitk.py)
  tma      split's design with a TMA, persistent main loop (kernels/forward_tma.py)
  cublas   torch path: xs, then cuBLAS addmm_ of the base GEMM into xs·Bᵀ (dropout 0 only)
Backward paths (W0 frozen)
  fused    one kernel, dY·B in the dX GEMM's N-loop
  split    one pass over dY (gs, dB partials), then the dX GEMM with gs·A and dA in its epilogue
  tma      split's design, its dX GEMM on TMA with a persistent grid (kernels/backward_tma.py)
  cublas   torch path: cuBLAS GEMMs, gs reused (dropout 0 only)
in_loop/fused/split_k/tma need the whole rank in one tile (r <= 64); fused and tma need dX; tma
needs a Hopper-or-later GPU, fp16/bf16 and TMA-readable (16-byte-aligned) inputs, and runs for
M > 64; cublas runs only at dropout 0, because the torch path's keep-mask is a different random
stream from the kernels' and the forward and backward choices are made separately. Every path
computes the same function with the same saved tensors (x, and xs = s'·d(x)·Aᵀ), so any forward
pairs with any backward.

LORA_FAST_DISPATCH picks how a choice is made:
  measure (default)  the first call of a key on a CUDA device runs every applicable path on the
                     call's own inputs — one warm-up run (it also compiles and autotunes), then the
                     median of REPS runs timed with CUDA events, L2 flushed before each — and keeps
                     the fastest for the process and in the cache file. Where timing cannot run
                     (CUDA-graph capture, torch.compile tracing, the interpreter), a cached choice
                     is used if there is one, else the heuristic.
  heuristic          the static rule (kernels.configs.IN_LOOP_MAX_M): in_loop/fused for
                     M <= 256, split above; never times, never reads the cache file (the same
                     choice on every machine). Read when a key is first met: set it before the
                     first call (choices already kept in the process stay).
Key: device, dtype, pass, M rounded up to a power of two, N, K, r, dropout on, bias, what is saved
or asked. The cache file (LORA_FAST_DISPATCH_CACHE, default ~/.cache/lora_fast/dispatch.json; an
empty value keeps choices in the process only) has one section per device name and torch / triton /
lora_fast version, and the measured times beside each choice.
"""
import contextlib
import json
import os
import statistics
import warnings
from pathlib import Path

import torch

from . import torch_path

FORWARD_PATHS = ("in_loop", "split", "split_k", "tma", "cublas")
BACKWARD_PATHS = ("fused", "split", "tma", "cublas")
MODES = ("measure", "heuristic")
REPS = 5

_choices = {}        # key -> path: measured here or loaded from the cache file
_times = {}          # key -> {path: ms}, for the measured and loaded keys
_file_sections = {}  # device -> its section of the cache file, read on the first miss
_forced = {}         # pass -> path, while a `forced` block runs
_settled = {}        # key -> path decided without timing for good: one candidate, or a device never timed


def _kernels():
    from lora_fast import kernels   # imports triton: only when a triton-backend call runs
    return kernels


def _configs():
    from lora_fast.kernels import configs
    return configs


def mode():
    value = os.environ.get("LORA_FAST_DISPATCH", "measure")
    if value not in MODES:
        raise ValueError(f"LORA_FAST_DISPATCH: expected one of {MODES}, got {value!r}")
    return value


def forward_paths(M, R, dropout_p, tma=False):
    """The forward paths that apply to M rows, rank R and dropout_p (tma: whether the inputs allow
    the TMA kernel, `tma_possible`). A symbolic M (torch.compile, dynamic shapes) is not compared
    with anything, which would guard on it: no split_k or tma then."""
    configs = _configs()
    one_tile = R <= configs.IN_LOOP_MAX_R
    known = type(M) is int
    decode = known and 1 <= M <= configs.SPLIT_K_MAX_M
    return (("in_loop",) if one_tile else ()) + ("split",) + (("split_k",) if one_tile and decode else ()) + \
        (("tma",) if tma and one_tile and known and M > configs.SPLIT_K_MAX_M else ()) + \
        (("cublas",) if dropout_p == 0 else ())


def tma_possible(x, weight):
    """Whether the TMA kernels can read x (the forward's x, or the backward's dY) and weight here: a
    Hopper-or-later GPU (or the interpreter, for tests), real tensors (not traced: descriptors are
    built on the host), and kernels.tma_eligible's rules."""
    from lora_fast.kernels.launch import _traced
    configs = _configs()
    if configs.INTERPRET:
        device_ok = True
    else:
        device_ok = x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9
    return device_ok and not _traced(x) and _kernels().tma_eligible(x, weight)


def backward_paths(R, dropout_p, need_dx, M=None, tma=False):
    """The backward paths that apply (tma: whether dY and the weight allow the TMA kernel,
    `tma_possible`; it also needs a known M > 64)."""
    configs = _configs()
    one_tile = R <= configs.IN_LOOP_MAX_R
    big = type(M) is int and M > configs.SPLIT_K_MAX_M
    return (("fused",) if need_dx and one_tile else ()) + ("split",) + \
        (("tma",) if tma and need_dx and one_tile and big else ()) + (("cublas",) if dropout_p == 0 else ())


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, *, save_xs=True, dropout_p=0.0, seed=None):
    """kernels.lora_forward or the torch path, whichever this (device, dtype, shape) runs fastest."""
    M, K = x.shape
    N, R = lora_B.shape

    def run(path):
        if path == "cublas":
            return torch_path.lora_forward(x, weight, lora_A, lora_B, bias, scaling, save_xs=save_xs)
        if path == "split_k":
            return _kernels().lora_forward_split_k(x, weight, lora_A, lora_B, bias, scaling,
                                                   save_xs=save_xs, dropout_p=dropout_p, seed=seed)
        if path == "tma":
            if tma_possible(x, weight):
                return _kernels().lora_forward_tma(x, weight, lora_A, lora_B, bias, scaling,
                                                   save_xs=save_xs, dropout_p=dropout_p, seed=seed)
            path = "split"  # the key's choice, but these tensors' alignment (or a trace) rules TMA out
        return _kernels().lora_forward(x, weight, lora_A, lora_B, bias, scaling, save_xs=save_xs,
                                       in_loop=path == "in_loop", dropout_p=dropout_p, seed=seed)

    def heuristic():
        return "in_loop" if _kernels().forward.xs_in_loop(M, R) else "split"

    shape = (M, N, K, R, dropout_p > 0, bias is not None, save_xs)
    key = _key("forward", x, shape) if M != 0 else None   # M = 0 shares no key with M = 1
    path = None if _forced else _choices.get(key) or _settled.get(key)
    if path is None:
        candidates = forward_paths(M, R, dropout_p, tma=key is not None and tma_possible(x, weight))
        path = choose("forward", key, x, shape, candidates, heuristic, run)
    return run(path)


def lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, *,
                  need_dx=True, need_da=True, need_db=True, dropout_p=0.0, seed=None):
    """kernels.lora_backward or the torch path, whichever this (device, dtype, shape) runs fastest."""
    M, N = dy.shape
    K, R = x.shape[1], lora_A.shape[0]

    def run(path):
        if path == "cublas":
            return torch_path.lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling,
                                            need_dx=need_dx, need_da=need_da, need_db=need_db)
        # a key that chose tma, on tensors TMA cannot read (or traced), runs split
        tma = path == "tma" and tma_possible(dy, weight)
        return _kernels().lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, need_dx=need_dx,
                                        need_da=need_da, need_db=need_db, fused=path == "fused",
                                        tma=tma, dropout_p=dropout_p, seed=seed)

    def heuristic():
        return "fused" if need_dx and _kernels().backward.g_in_loop(M, R) else "split"

    shape = (M, N, K, R, dropout_p > 0, need_dx, need_da, need_db)
    key = _key("backward", dy, shape) if M != 0 else None
    path = None if _forced else _choices.get(key) or _settled.get(key)
    if path is None:
        candidates = backward_paths(R, dropout_p, need_dx, M, tma=key is not None and tma_possible(dy, weight))
        path = choose("backward", key, dy, shape, candidates, heuristic, run)
    return run(path)


def _key(pass_name, t, shape):
    """(device, dtype, pass, M rounded up to a power of two, the rest of shape); None for a
    symbolic M (torch.compile with dynamic shapes), which has no key."""
    M = shape[0]
    if type(M) is not int:
        return None
    return (t.device, t.dtype, pass_name, _configs().m_bucket(M)) + shape[1:]


def choose(pass_name, key, t, shape, candidates, heuristic, run):
    """The path for a call whose key has no kept choice (the callers look there first: a dict
    lookup, as decode sizes have a few µs to spare): forced, the only candidate, the cache file's,
    measured, or the heuristic."""
    forced = _forced.get(pass_name)
    if forced is not None:
        if forced not in candidates:
            raise ValueError(f"forced {pass_name} path {forced!r} does not apply to this call "
                             f"(M, N, K, r = {shape[:4]}, dropout {shape[4]}): expected one of {candidates}")
        return forced
    if key is None:
        return heuristic()
    if len(candidates) == 1:
        _settled[key] = candidates[0]
        return candidates[0]
    if mode() == "heuristic":
        return heuristic()
    path = _from_cache_file(key, candidates)
    if path is not None:
        return path
    if not can_measure(t):
        path = heuristic()
        if t.device.type != "cuda":     # never timed on this device (CPU, the interpreter): decide once
            _settled[key] = path
        return path
    times = {p: timer(lambda p=p: run(p), t.device) for p in candidates}
    path = min(times, key=times.get)
    _choices[key], _times[key] = path, times
    _save(t.device, key)
    return path


def can_measure(t):
    """Timing runs on CUDA tensors, eagerly, outside a CUDA-graph capture."""
    from lora_fast.kernels.launch import _traced
    return (t.device.type == "cuda" and not _configs().INTERPRET
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
            and not _traced(t))


def timer(fn, device):
    """Median time (ms) of fn over REPS runs after one warm-up run, CUDA events around each, L2
    flushed before each (the layer's weight is not in L2 when a model runs it)."""
    fn()
    flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.uint8,
                        device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(REPS)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


@contextlib.contextmanager
def forced(forward=None, backward=None):
    """Run the block with the given paths (a benchmark's fixed design, a test): neither measured nor
    cached. A forced path that does not apply to a call raises ValueError."""
    for name, value, allowed in (("forward", forward, FORWARD_PATHS), ("backward", backward, BACKWARD_PATHS)):
        if value is not None and value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed} or None, got {value!r}")
    previous = dict(_forced)
    _forced.update({k: v for k, v in (("forward", forward), ("backward", backward)) if v is not None})
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def choices():
    """{key string: {"path": ..., "ms": {path: time}}} for every key decided by measurement or the
    cache in this process, under each device's section name."""
    out = {}
    for key, path in _choices.items():
        out.setdefault(_section(key[0]), {})[_key_string(key)] = {"path": path, "ms": _times.get(key, {})}
    return out


def clear():
    """Forget every choice of this process (the cache file is left as it is)."""
    _choices.clear()
    _times.clear()
    _file_sections.clear()
    _settled.clear()


def cache_path():
    value = os.environ.get("LORA_FAST_DISPATCH_CACHE")
    if value is None:
        root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(root) / "lora_fast" / "dispatch.json"
    return Path(value) if value else None


def _section(device):
    import triton
    from lora_fast import __version__
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} | torch {torch.__version__} | triton {triton.__version__} | lora_fast {__version__}"


def _key_string(key):
    _, dtype, pass_name, bucket, *rest = key
    return "|".join([pass_name, str(dtype).replace("torch.", ""), str(bucket), *map(str, rest)])


def _read(path):
    """The cache file's contents ({} if it does not exist); a file that is not a cache is warned
    about and treated as empty (it is rewritten by the next measurement)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"LORA_FAST_DISPATCH_CACHE: {path} is not a readable dispatch cache ({e}); "
                      "measuring again and rewriting it", RuntimeWarning, stacklevel=3)
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        warnings.warn(f"LORA_FAST_DISPATCH_CACHE: {path} is not a dispatch cache (expected an object "
                      "of sections); measuring again and rewriting it", RuntimeWarning, stacklevel=3)
        return {}
    return data


def _from_cache_file(key, candidates):
    """The cache file's choice for key if it names one of candidates (else None); the device's
    section is read once, on its first miss."""
    device = key[0]
    section = _file_sections.get(device)
    if section is None:
        path = cache_path()
        section = _file_sections[device] = _read(path).get(_section(device), {}) if path is not None else {}
    if not section:
        return None
    entry = section.get(_key_string(key))
    if not isinstance(entry, dict) or entry.get("path") not in candidates:
        return None
    _choices[key], _times[key] = entry["path"], entry.get("ms", {})
    return entry["path"]


def _save(device, key):
    path = cache_path()
    if path is None:
        return
    data = _read(path)
    data.setdefault(_section(device), {})[_key_string(key)] = {"path": _choices[key], "ms": _times[key]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)   # atomic: a concurrent reader sees the old file or the new one
