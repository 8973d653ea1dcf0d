"""Several adapters on one base model, by name, as PEFT holds them: add, switch, delete, list.

Every LoRALinear holds the adapters whose target_modules selected it (adapters may differ in rank,
alpha, dropout and targets) and one active adapter name, the same for all layers of a model: the
active adapter is the one forward uses and training updates (its parameters require grad, the
others' do not). A layer without an adapter of the active name computes its base linear, as in
PEFT. ``model.lora_fast_adapters`` records each adapter's settings ({name: config}, what
save_adapter writes) and ``model.lora_fast_config`` is the active adapter's.

Every function checks everything before it changes anything: a refused call leaves the model as it
was.
"""
from __future__ import annotations

import torch
from torch import nn

from .inject import (Targets, _check_targets, _dora_settings, check_wrappable, lora_layers, record_adapter, replace_children,
                     require_lora_layers, select_modules, unwrap, wrap)
from .module import LoRALayer, _check_adapter_dtype, _check_hparams, check_adapter_name, check_dora


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters of `model` (inside DDP / torch.compile wrappers or not), in the
    order they were added."""
    inner = unwrap(model)
    layers = require_lora_layers(inner, "adapter_names")
    names = list(inner.__dict__.get("lora_fast_adapters") or {})
    for layer in layers.values():   # adapters the record does not know (LoRALinear built by hand)
        names += [name for name in layer.adapter_settings if name not in names]
    return names


def active_adapter(model: nn.Module) -> str:
    """The name of the active adapter of `model` (the one forward uses and training updates)."""
    layers = require_lora_layers(model, "active_adapter")
    return next(iter(layers.values())).active_adapter


def add_adapter(model: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                target_modules: Targets = None, lora_dropout: float = 0.0,
                use_rslora: bool = False, exclude_modules: Targets = None,
                adapter_dtype: torch.dtype | None = None, use_dora: bool = False,
                dora_dropout: str = "peft") -> list[str]:
    """Add adapter `adapter_name` to a model that has adapters already (after inject or
    load_adapter); returns the names of the layers it targets. The new adapter starts as a new
    one does (lora_A kaiming-uniform, lora_B zero), frozen and not active: set_adapter(model,
    adapter_name) to train or use it, or name it in batch_adapters. Linears it targets that have
    no adapter yet become LoRALinear layers (computing their base linear while another adapter is
    active).

    Args: r, lora_alpha, target_modules, lora_dropout, use_rslora, exclude_modules,
    adapter_dtype, use_dora, dora_dropout: as inject's (target_modules defaults to the layers of the active adapter);
    adapter_name: a new name (letters, digits, '_' and '-').
    """
    inner = unwrap(model)
    layers = require_lora_layers(inner, "add_adapter")
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(inner):
        raise ValueError(f"adapter_name: the model has an adapter {adapter_name!r} already; "
                         "delete_adapter it first, or load_adapter(..., hotswap=True) to replace "
                         "its weights")
    r, lora_alpha, lora_dropout, use_rslora = _check_hparams(r, lora_alpha, lora_dropout, use_rslora)
    use_dora, dora_dropout = check_dora(use_dora, dora_dropout)
    _check_adapter_dtype(adapter_dtype)
    trains_base = [name for name, record in (inner.__dict__.get("lora_fast_adapters") or {}).items()
                   if record.get("bias", "none") != "none" or record.get("modules_to_save")]
    if trains_base:   # trained in place (lora_fast.trained_base): a second adapter would share them
        raise ValueError(f"add_adapter: adapter {trains_base[0]!r} trains base parameters (bias or "
                         "modules_to_save), which lora_fast trains in place for one adapter per "
                         "model; a second adapter is not available on such a model")
    if target_modules is None:
        active = active_adapter(inner)
        target_modules = [name for name, layer in layers.items() if active in layer.adapter_settings]
    _check_targets("target_modules", target_modules, allow_none=False)
    _check_targets("exclude_modules", exclude_modules, allow_none=True)
    names = select_modules(inner, target_modules, exclude_modules, lora_too=True)
    for name in names:
        module = inner.get_submodule(name)
        if isinstance(module, LoRALayer):
            _check_adapter_dtype(adapter_dtype, module.base_dtype(), name)
            if use_dora and not module.supports_dora:
                raise ValueError(f"use_dora: {name!r} is a {type(module).__name__}, and DoRA on it is not "
                                 "available yet; exclude it (exclude_modules) or use_dora=False")
        else:
            check_wrappable(module, adapter_dtype, name, use_dora)

    active = active_adapter(inner)
    replaced, extended = {}, []
    try:
        for name in names:
            module = inner.get_submodule(name)
            if isinstance(module, LoRALayer):
                module.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype,
                                   **_dora_settings(use_dora, dora_dropout))
                extended.append(module)
            elif id(module) not in replaced:
                layer = wrap(module, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             use_rslora=use_rslora, adapter_name=adapter_name, adapter_dtype=adapter_dtype,
                             **_dora_settings(use_dora, dora_dropout))
                layer.set_adapter(active)   # computes its base linear until adapter_name is active
                replaced[id(module)] = layer
    except BaseException:
        for layer in extended:
            layer.delete_adapter(adapter_name)
        raise
    if layers and all(layer.merge_weights for layer in layers.values()):   # inject's merge_weights
        for layer in replaced.values():
            layer.merge_weights = True
    replace_children(inner, replaced)
    record_adapter(inner, adapter_name, r, lora_alpha, lora_dropout, use_rslora, target_modules,
                   exclude_modules, names,
                   any(inner.get_submodule(name).from_conv1d for name in names), use_dora, dora_dropout)
    return names


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the active adapter of every LoRA layer of `model`: the one forward uses
    and training updates (its parameters require grad, every other adapter's do not). Refused,
    changing nothing, for an unknown name or while a layer is merged (unmerge first)."""
    inner = unwrap(model)
    layers = require_lora_layers(inner, "set_adapter")
    _check_known(inner, adapter_name)
    merged = [name for name, layer in layers.items()   # merge_weights layers switch merged
              if layer.merged and layer.merged_adapter != adapter_name and not layer.merge_weights]
    if merged:
        raise RuntimeError(f"set_adapter: {len(merged)} layers have adapter "
                           f"{layers[merged[0]].merged_adapter!r} merged (e.g. {merged[0]!r}); "
                           "unmerge(model) first")
    for layer in layers.values():
        layer.set_adapter(adapter_name)
    adapters = inner.__dict__.get("lora_fast_adapters") or {}
    if adapter_name in adapters:
        inner.lora_fast_config = adapters[adapter_name]


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name` from every layer of `model`. Refused, changing nothing, for
    an unknown name and for the active adapter (set_adapter to another one first). Layers left
    without adapters stay LoRALinear layers computing their base linear."""
    inner = unwrap(model)
    layers = require_lora_layers(inner, "delete_adapter")
    _check_known(inner, adapter_name)
    if adapter_name == active_adapter(inner):
        others = [name for name in adapter_names(inner) if name != adapter_name]
        raise RuntimeError(f"delete_adapter: {adapter_name!r} is the active adapter; "
                           + (f"set_adapter(model, {others[0]!r}) first" if others else
                              "it is the only one (merge_and_unload(model) removes the LoRA layers)"))
    for layer in layers.values():
        if adapter_name in layer.adapter_settings:
            layer.delete_adapter(adapter_name)
    adapters = dict(inner.__dict__.get("lora_fast_adapters") or {})
    adapters.pop(adapter_name, None)
    inner.lora_fast_adapters = adapters


def _check_known(model, adapter_name):
    known = adapter_names(model)
    if adapter_name not in known:
        raise ValueError(f"adapter_name: the model has no adapter {adapter_name!r}; its adapters "
                         f"are {known}")


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, LoRALayer]:
    """{name: LoRA layer} of the layers of `model` that hold adapter `adapter_name`."""
    return {name: layer for name, layer in lora_layers(unwrap(model)).items()
            if adapter_name in layer.adapter_settings}
