"""Putting LoRALinear into an existing model, and the model-level operations on it.

`inject` replaces matching nn.Linear (and transformers Conv1D) layers in place, sharing their
weights, and records what it did in ``model.lora_fast_config`` (a plain dict: what `save_adapter`
writes to adapter_config.json). Matching follows PEFT's rules exactly, so the same
`target_modules` / `exclude_modules` select the same layers here and in PEFT:
  a str       regular expression, full match against the module's dotted name;
  a list      names matched exactly, or as a dotted suffix ("q_proj" matches "...self_attn.q_proj");
  "all-linear" every linear except the output head (a transformers model's get_output_embeddings(),
              else a module named "lm_head").
"""
import contextlib
import re
from typing import NamedTuple

import torch
from torch import nn

from .module import LoRALinear, _check_hparams, is_conv1d

ALL_LINEAR = "all-linear"


def inject(model, r=8, lora_alpha=8, target_modules=None, lora_dropout=0.0, use_rslora=False,
           exclude_modules=None, adapter_dtype=None):
    """Replace the matching linears of `model` in place by LoRALinear (weights shared, not copied),
    freeze every other parameter, and return the replaced modules' names.

    adapter_dtype: dtype of lora_A/lora_B; default the base weight's dtype, except float32 on a
    float16/bfloat16 base (master adapters, PEFT's default ``autocast_adapter_dtype=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _check_hparams(r, lora_alpha, lora_dropout)
    _check_targets("target_modules", target_modules, allow_none=False)
    _check_targets("exclude_modules", exclude_modules, allow_none=True)
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype)
                                          and adapter_dtype.is_floating_point):
        raise ValueError(f"adapter_dtype: expected a floating torch.dtype or None, got {adapter_dtype!r}")
    existing = lora_layers(model)
    if existing:
        raise RuntimeError(f"inject: model already has {len(existing)} LoRALinear layers (e.g. "
                           f"{next(iter(existing))!r}); call merge_and_unload(model) first, or "
                           "load_adapter(model, path) to load new adapter weights into them")

    names = select_modules(model, target_modules, exclude_modules)
    replaced = {}
    for name in names:
        old = model.get_submodule(name)
        dtype = adapter_dtype or _default_adapter_dtype(old.weight.dtype)
        replaced[id(old)] = LoRALinear.from_linear(old, r=r, lora_alpha=lora_alpha,
                                                   lora_dropout=lora_dropout, use_rslora=use_rslora,
                                                   adapter_dtype=dtype)
    # Replace every reference, so a layer reachable by two names gets one LoRALinear.
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])
    mark_only_lora_as_trainable(model)

    saved_targets = target_modules
    if target_modules == ALL_LINEAR or exclude_modules:
        saved_targets = sorted(names)   # what PEFT itself writes for "all-linear": the full names
    elif not isinstance(target_modules, str):
        saved_targets = list(target_modules)
    model.lora_fast_config = {
        "r": int(r), "lora_alpha": lora_alpha, "lora_dropout": float(lora_dropout),
        "use_rslora": bool(use_rslora), "target_modules": saved_targets,
        "fan_in_fan_out": any(layer.from_conv1d for layer in replaced.values()),
    }
    return names


def select_modules(model, target_modules, exclude_modules=None):
    """Names of the modules `inject` would replace (PEFT's matching; see the module docstring).
    Raises if a matching module is not a linear, or if nothing matches."""
    if target_modules == ALL_LINEAR:
        head = _output_head(model)
        names = [name for name, module in model.named_modules()
                 if _is_linear(module) and module is not head]
    else:
        names = [name for name, _ in model.named_modules() if name and _matches(target_modules, name)]
    names = [name for name in names if not (exclude_modules and _matches(exclude_modules, name))]
    unsupported = [f"{name} ({type(model.get_submodule(name)).__name__})" for name in names
                   if not _is_linear(model.get_submodule(name))]
    if unsupported:
        raise TypeError(f"target_modules: matches modules that are not nn.Linear or Conv1D: "
                        f"{', '.join(unsupported[:5])}; name the linear layers themselves")
    if not names:
        available = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                            if _is_linear(module)})
        raise ValueError(f"target_modules: {target_modules!r} matches no linear layer of "
                         f"{type(model).__name__} (exclude_modules={exclude_modules!r}); "
                         f"its linear layers are named {available[:20]}")
    return names


def lora_layers(model):
    """{name: LoRALinear} of `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def unwrap(model):
    """The model inside DDP / DataParallel and torch.compile wrappers, whose module names are the
    ones adapters use."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def require_lora_layers(model, what):
    """{name: LoRALinear} of the model inside any wrapper (see unwrap); raises, naming `what`, if
    there are none."""
    layers = lora_layers(unwrap(model))
    if not layers:
        raise ValueError(f"{what}: model has no LoRALinear layers; call lora_fast.inject first")
    return layers


def merge(model):
    """Merge every adapter into its base weight (see LoRALinear.merge); unmerge undoes it exactly."""
    for layer in require_lora_layers(model, "merge").values():
        layer.merge()
    return model


def unmerge(model):
    """Restore every merged base weight bit for bit."""
    for layer in require_lora_layers(model, "unmerge").values():
        layer.unmerge()
    return model


def merge_and_unload(model):
    """Merge every adapter and put the plain layers back (nn.Linear, or Conv1D where inject found
    one), in place; returns `model`. The base weights are updated in place, no copy is kept."""
    inner = unwrap(model)   # the layer names are the bare model's
    for name, layer in require_lora_layers(inner, "merge_and_unload").items():
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name), child, layer.to_base())
    inner.__dict__.pop("lora_fast_config", None)
    return model


def mark_only_lora_as_trainable(model):
    """requires_grad on the lora_A/lora_B parameters, off on every other parameter."""
    lora_params = {id(p) for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
    return model


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    def __str__(self):
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {share:.4f}")


def trainable_parameters(model):
    """(trainable, total) parameter counts, each shared tensor counted once; str() prints them as
    PEFT's print_trainable_parameters does."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params))


@contextlib.contextmanager
def disable_adapters(model):
    """Within the block every LoRALinear computes its base linear alone (as PEFT's
    ``disable_adapter()``); the previous state is restored on exit, also on error."""
    layers = list(require_lora_layers(model, "disable_adapters").values())
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.adapter_enabled = enabled


def _matches(spec, name):
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + target) for target in spec)


def _check_targets(arg, spec, allow_none):
    if spec is None and allow_none:
        return
    if isinstance(spec, str):
        if spec == ALL_LINEAR and arg == "target_modules":
            return
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{arg}: {spec!r} is not a valid regular expression ({err})") from None
        return
    if isinstance(spec, (list, tuple, set, frozenset)) and spec \
            and all(isinstance(t, str) and t for t in spec):
        return
    raise ValueError(f"{arg}: expected a regex string, a non-empty list of module names"
                     f"{', or ' + repr(ALL_LINEAR) if arg == 'target_modules' else ''}, got {spec!r}")


def _is_linear(module):
    return (isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)) or is_conv1d(module)


def _output_head(model):
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        return head
    return getattr(model, "lm_head", None)


def _default_adapter_dtype(weight_dtype):
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype
