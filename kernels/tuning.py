"""What a launch of an autotuned kernel does before Triton's autotuner sees a new key, so that the
first training step on a GPU does not spend minutes tuning and never tunes where it cannot:

  one config   the pruner keeps one: it is the answer (Triton 3.9 skips timing it too, 3.6 does not)
  on disk      a config tuned for this key in an earlier process (lora_fast.cache_file: the same file
               and device section as the dispatcher's choices) is used as it is, for every kernel —
               Triton's own `cache_results` gives up on configs with a pre_hook, as the TMA ones have
  in capture   inside a CUDA-graph capture nothing can be timed (the autotuner synchronises) nor a
               first launch load its module: both fail and invalidate the capture, so an untuned
               key raises a clear error asking for an eager warm-up first
  otherwise    the kept configs are compiled in parallel threads (Triton's AsyncCompileMode:
               ptxas runs as a subprocess; measured 1.4x on 2 cores for two builds), those that
               fail to build are left out, the autotuner times the rest; the winner goes to disk.

The key is computed as Triton's autotuner computes it (`key` arguments, then the dtype of every
argument that has one; the same in 3.6 and 3.9), so what is placed in `kernel.cache` is what the
autotuner looks up. That costs 14 µs a launch of the forward kernel (this 2-core CPU, `timeit`): a
launch first asks a cheaper key of its own (1.8 µs) whether it was met before, and only a new one pays.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import torch


def autotune_key(kernel, args, kwargs):
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in kernel.arg_names}
    key = [named[k] for k in kernel.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _name(kernel):
    return kernel.fn.__name__


def _entry_key(kernel, key):
    return f"autotune|{_name(kernel)}|{key!r}"


def _config_record(config):
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _from_disk(kernel, key, kept, device):
    from lora_fast import cache_file
    entry = cache_file.read_section(device).get(_entry_key(kernel, key))
    if not isinstance(entry, dict):
        return None
    for c in kept:       # the kept config object itself: it carries the pre_hook a record cannot
        if _config_record(c) == {k: entry.get(k) for k in ("kwargs", "num_warps", "num_stages")}:
            return c
    return None          # tuned among configs this version no longer has: tune again


def _precompile(kernel, grid, args, kwargs, kept):
    """Compile every kept config in parallel threads; returns those that built (all of them where
    Triton has no AsyncCompileMode, or LORA_FAST_PARALLEL_COMPILE=0: the autotuner compiles them
    then). A config that fails to build is left out of the timing: Triton's autotuner survives only
    some compile errors (out of resources, ptxas), and any other would end the whole kernel's
    tuning — and the dispatcher would drop the path."""
    import triton
    if not hasattr(triton, "AsyncCompileMode") or os.environ.get("LORA_FAST_PARALLEL_COMPILE") == "0":
        return kept
    named = dict(zip(kernel.arg_names, args))
    futures = []
    with ThreadPoolExecutor(max_workers=min(len(kept), os.cpu_count() or 1)) as pool, \
            triton.AsyncCompileMode(pool, ignore_errors=True):
        for c in kept:
            if c.pre_hook:       # TMA descriptors take the config's block shape before specialising
                c.pre_hook({**named, **kwargs, **c.all_kwargs()})
            try:
                futures.append((c, kernel.fn.warmup(*args, grid=grid, **kwargs, **c.all_kwargs())))
            except Exception as e:
                futures.append((c, e))
    built = [c for c, f in futures if not isinstance(f, Exception) and getattr(f, "kernel", f) is not None]
    if not built:
        errors = [f for _, f in futures if isinstance(f, Exception)]
        raise errors[0] if errors else RuntimeError(f"{_name(kernel)}: no config of {len(kept)} compiled")
    return built


def _fast_key(kernel, args, kwargs):
    """The tuning key's values without Triton's string work (the dtypes as objects, of the positions
    that held tensors when this argument count was first seen): only to ask whether this launch's
    key was met before, on the hot path of every launch. 1-2 µs against the exact key's 14."""
    plan = getattr(kernel, "_lora_fast_key_plan", None)
    if plan is None or plan[0] != len(args):
        index = {n: i for i, n in enumerate(kernel.arg_names)}
        plan = (len(args), tuple(index[k] for k in kernel.keys if index[k] < len(args)),
                tuple(k for k in kernel.keys if index[k] >= len(args)),
                tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)))
        kernel._lora_fast_key_plan = plan
    try:
        dtypes = tuple([args[i].dtype for i in plan[3]])
    except AttributeError:       # a tensor position holds something else this time: the full scan
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
    return (tuple([args[i] for i in plan[1]]), tuple([kwargs.get(k) for k in plan[2]]), dtypes)


def run(kernel, grid, args, kwargs):
    """Launch an autotuned kernel with more than one config (see the module docstring)."""
    seen = getattr(kernel, "_lora_fast_seen", None)
    if seen is None or seen[0] is not kernel.cache or len(kernel.cache) < seen[2]:
        seen = kernel._lora_fast_seen = [kernel.cache, set(), 0]   # a new, replaced or cleared cache
    fast = _fast_key(kernel, args, kwargs)
    if fast in seen[1]:
        return kernel[grid](*args, **kwargs)
    key = autotune_key(kernel, args, kwargs)
    out = kernel[grid](*args, **kwargs) if key in kernel.cache else _tune(kernel, grid, args, kwargs, key)
    seen[1].add(fast)
    seen[2] = len(kernel.cache)
    return out


def _tune(kernel, grid, args, kwargs, key):
    """A new key: its config placed in kernel.cache without timing where it is known (the only one
    kept, or the one tuned in an earlier process: the cache file), else tuned (the kept configs
    compiled in parallel first) and the winner kept on disk; inside a CUDA-graph capture, refused
    clearly. Launches the kernel once and returns what the launch returns."""
    kept = kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs) \
        if kernel.early_config_prune else kernel.configs
    if not kept:
        raise RuntimeError(f"{_name(kernel)}: its pruner keeps no config for {sorted(kwargs.items())}")
    device = _device(args)
    chosen = kept[0] if len(kept) == 1 else _from_disk(kernel, key, kept, device)
    if chosen is not None:
        kernel.cache[key] = chosen
        return kernel[grid](*args, **kwargs)
    if _capturing(device):
        # Timing synchronises and a first launch loads a module: both fail a capture (and
        # invalidate it), so nothing untuned can run there
        raise RuntimeError(f"lora_fast: {_name(kernel)} has no tuned config for this shape (autotune key "
                           f"{key}) inside a CUDA-graph capture, where nothing can be compiled or timed: "
                           "run the model once eagerly (a step per sequence-length bucket) before capturing")
    built = _precompile(kernel, grid, args, kwargs, kept) if device.type == "cuda" else kept
    if len(built) == 1:
        kernel.cache[key] = built[0]
        return kernel[grid](*args, **kwargs)
    # The autotuner times the configs that built (the pruner is not asked again), keeps the fastest
    prune = kernel.early_config_prune
    kernel.early_config_prune = lambda configs, named_args, **kw: built
    try:
        out = kernel[grid](*args, **kwargs)
    finally:
        kernel.early_config_prune = prune
    if key in kernel.cache:
        from lora_fast import cache_file
        cache_file.write(device, {_entry_key(kernel, key): _config_record(kernel.cache[key])})
    return out


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device(args):
    """The device of the launch's first tensor argument (a CPU one under the interpreter)."""
    for a in args:
        t = getattr(a, "base", a)        # a TMA descriptor's tensor
        if isinstance(t, torch.Tensor):
            return t.device
    raise ValueError("an autotuned launch without a tensor argument")
