"""What a launch of an autotuned kernel does before Triton's autotuner sees a new key, so that the
first training step on a GPU does not spend minutes tuning and never tunes where it cannot:

  one config   the pruner keeps one: it is the answer (Triton 3.9 skips timing it too, 3.6 does not)
  on disk      a config tuned for this key in an earlier process (lora_fast.cache_file: the same file
               and device section as the dispatcher's choices) is used as it is, for every kernel —
               Triton's own `cache_results` gives up on configs with a pre_hook, as the TMA ones have
  in capture   inside a CUDA-graph capture nothing can be timed (the autotuner synchronises, which
               fails the capture): the pruner's first config, the predicted best of its list
               (configs.py), runs with a warning to warm up outside the capture; the key is left
               untuned, so an eager call later still tunes it
  otherwise    the kept configs are compiled in parallel threads (Triton's AsyncCompileMode:
               ptxas runs as a subprocess; measured 1.4x on 2 cores for two builds) before the
               autotuner times them one by one; the winner goes to disk.

The key is computed as Triton's autotuner computes it (`key` arguments, then the dtype of every
argument that has one; the same in 3.6 and 3.9), so what is placed in `kernel.cache` is what the
autotuner looks up.
"""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

_warned_capture = set()


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
    """Compile every kept config in parallel threads; errors are left for the autotuner, which
    times a config that fails to build as infinitely slow."""
    import triton
    if not hasattr(triton, "AsyncCompileMode") or os.environ.get("LORA_FAST_PARALLEL_COMPILE") == "0":
        return
    named = dict(zip(kernel.arg_names, args))
    with ThreadPoolExecutor(max_workers=min(len(kept), os.cpu_count() or 1)) as pool, \
            triton.AsyncCompileMode(pool, ignore_errors=True):
        for c in kept:
            if c.pre_hook:       # TMA descriptors take the config's block shape before specialising
                c.pre_hook({**named, **kwargs, **c.all_kwargs()})
            try:
                kernel.fn.warmup(*args, grid=grid, **kwargs, **c.all_kwargs())
            except Exception:    # a compile error surfaces again, handled, when the autotuner runs it
                pass


def run(kernel, grid, args, kwargs):
    """Launch an autotuned kernel with more than one config (see the module docstring)."""
    key = autotune_key(kernel, args, kwargs)
    if key in kernel.cache:
        return kernel[grid](*args, **kwargs)
    kept = kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs) \
        if kernel.early_config_prune else kernel.configs
    device = _device(args)
    chosen = kept[0] if len(kept) == 1 else _from_disk(kernel, key, kept, device)
    if chosen is not None:
        kernel.cache[key] = chosen
        return kernel[grid](*args, **kwargs)
    if _capturing(device):
        if (_name(kernel), key) not in _warned_capture:
            _warned_capture.add((_name(kernel), key))
            warnings.warn(f"lora_fast: {_name(kernel)} has no tuned config for this shape inside a CUDA-graph "
                          f"capture (nothing can be timed there): running its first config. Run the model "
                          "once (every sequence-length bucket) before capturing for tuned tiles",
                          RuntimeWarning, stacklevel=4)
        kernel.cache[key] = kept[0]
        try:
            return kernel[grid](*args, **kwargs)
        finally:
            del kernel.cache[key]
    if device.type == "cuda":
        _precompile(kernel, grid, args, kwargs, kept)
    out = kernel[grid](*args, **kwargs)
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
