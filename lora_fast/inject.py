"""Putting LoRALinear into an existing model, and the model-level operations on it.

`inject` replaces matching nn.Linear (and transformers Conv1D) layers in place, sharing their
weights, and records what it did in ``model.lora_fast_config`` (a plain dict: what `save_adapter`
writes to adapter_config.json). Matching follows PEFT's rules exactly, so the same
`target_modules` / `exclude_modules` select the same layers here and in PEFT:
  a str       regular expression, full match against the module's dotted name;
  a list      names matched exactly, or as a dotted suffix ("q_proj" matches "...self_attn.q_proj");
  "all-linear" every linear except the output head (a transformers model's get_output_embeddings(),
              else a module named "lm_head"; for sequence classification its score/classifier head,
              which is trained whole instead);
  None        PEFT's default targets for the model's architecture (config.model_type), e.g. q_proj
              and v_proj on Llama, c_attn on GPT-2, query and value on BERT.
"""
from __future__ import annotations

import contextlib
import functools
import re
import warnings
from typing import Iterator, NamedTuple, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import embedding, qlora, sliced, trained_base
from .module import (DEFAULT_ADAPTER, LoRALayer, LoRALinear, _check_adapter_dtype, _check_base, _check_hparams,
                     check_adapter_name, check_dora, default_adapter_dtype, is_conv1d, storage_extent)

ALL_LINEAR = "all-linear"
# target_modules / exclude_modules: a regex, names (exact or dotted suffix), or ALL_LINEAR
Targets = Union[str, Sequence[str], None]


def inject(model: nn.Module, r: int = 8, lora_alpha: float = 8, target_modules: Targets = None,
           lora_dropout: float = 0.0, use_rslora: bool = False, exclude_modules: Targets = None,
           adapter_dtype: torch.dtype | None = None, adapter_name: str = DEFAULT_ADAPTER,
           use_dora: bool = False, dora_dropout: str = "peft", bias: str = "none",
           modules_to_save: Sequence[str] | None = None, task_type: str | None = None,
           merge_weights: bool = False, slices: dict | None = None) -> list[str]:
    """Replace the matching linears of `model` in place by LoRALinear (weights shared, not copied),
    freeze every other parameter, and return the replaced modules' names. Nothing is changed if
    an argument is refused.

    Args:
        model: any nn.Module without LoRALinear layers yet.
        r: the adapters' rank, a positive integer.
        lora_alpha: positive finite number; scaling = lora_alpha / r (or / √r with use_rslora).
        target_modules: which layers (PEFT's matching, see the module docstring): a regular
            expression (full match), a list of names (exact or dotted suffix), "all-linear", or
            None: PEFT's defaults for the model's architecture (default_targets).
        lora_dropout: dropout probability in [0, 1) on the LoRA branch's input, training only.
        use_rslora: rank-stabilised scaling lora_alpha / √r, a bool.
        exclude_modules: the same forms as target_modules (not "all-linear"); matches are skipped.
        adapter_dtype: floating dtype of lora_A/lora_B; default the base weight's dtype, except
            float32 on a float16/bfloat16 base (master adapters, PEFT's default
            ``autocast_adapter_dtype=True``).
        adapter_name: the adapter's name (the active one); more adapters come with add_adapter.
        use_dora: DoRA (PEFT's ``use_dora``): each layer gets a trainable magnitude
            ``lora_magnitude_vector`` (out,), initialised to its W0's row norms (lora_fast.dora).
        dora_dropout: DoRA's dropout form: "peft" (PEFT's function, default) or "lora" (dropout
            inside the LoRA branch only: one base product, but not PEFT's function with dropout).
        bias: which base biases train and are saved with the adapter, as PEFT's: "none", "all"
            (every parameter with "bias" in its name) or "lora_only" (the LoRA layers' biases).
        modules_to_save: names of modules trained whole and saved with the adapter (PEFT's
            matching: exact or dotted suffix), e.g. a classification head; trained in place
            (lora_fast.trained_base).
        task_type: PEFT's task type, recorded for PEFT's loader; None: "SEQ_CLS" for a
            ``...ForSequenceClassification`` model, "TOKEN_CLS" for ``...ForTokenClassification``.
            For both, the score/classifier head is trained whole (added to modules_to_save) as
            PEFT does, and for SEQ_CLS "all-linear" leaves it out.
        merge_weights: loralib's flag: every LoRA layer merges its adapter in eval mode and
            unmerges it (exactly) in train mode (LoRALinear.merge_weights).
        slices: per-slice LoRA on fused projections (loralib's MergedLinear): {name: (sizes,
            enable)}, each name matching target layers as a target_modules list entry does, sizes
            the output rows of each slice and enable which get an adapter, e.g. GPT-2's
            ``{"c_attn": ((768,) * 3, (True, False, True))}``; those layers become
            LoRASlicedLinear (lora_fast.sliced), r per slice.

    Hyper-parameters are recorded as plain Python numbers in ``model.lora_fast_config`` (what
    save_adapter writes), whatever numeric type they came as.
    """
    return inject_as(model, r, lora_alpha, target_modules, lora_dropout, use_rslora, exclude_modules,
                     adapter_dtype, adapter_name, use_dora, dora_dropout, bias, modules_to_save,
                     _task_type(model, task_type), merge_weights, slices)


def inject_as(model, r, lora_alpha, target_modules, lora_dropout, use_rslora, exclude_modules,
              adapter_dtype, adapter_name, use_dora, dora_dropout, bias, modules_to_save, task_type,
              merge_weights, slices=None):
    """inject with task_type taken as given (None: no task), not inferred from the model's class:
    load_adapter's, whose file says the task."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    r, lora_alpha, lora_dropout, use_rslora = _check_hparams(r, lora_alpha, lora_dropout, use_rslora)
    use_dora, dora_dropout = check_dora(use_dora, dora_dropout)
    bias = trained_base.check_bias(bias)
    if not isinstance(merge_weights, bool):
        raise TypeError(f"merge_weights: expected a bool, got {type(merge_weights).__name__}")
    if target_modules is None:
        target_modules = default_targets(model)
    _check_targets("target_modules", target_modules, allow_none=False)
    _check_targets("exclude_modules", exclude_modules, allow_none=True)
    _check_adapter_dtype(adapter_dtype)
    check_adapter_name(adapter_name)
    existing = lora_layers(model)
    if existing:
        raise RuntimeError(f"inject: model already has {len(existing)} LoRALinear layers (e.g. "
                           f"{next(iter(existing))!r}); call add_adapter(model, name, ...) for "
                           "another adapter, merge_and_unload(model) first, or "
                           "load_adapter(model, path) to load new adapter weights into them")

    task_type = trained_base.check_task_type(task_type)
    names = select_modules(model, target_modules, exclude_modules, task_type=task_type)
    if task_type in trained_base.HEAD_TASKS:   # PEFT's task models train their heads whole...
        modules_to_save = trained_base.with_heads(model, modules_to_save, task_type)
        heads = trained_base.matching_modules(model, trained_base.task_heads(model, task_type))
        kept = [name for name in names if not trained_base.inside(name, heads)]
        if not kept:
            raise ValueError(f"target_modules: {target_modules!r} selects only layers inside the heads "
                             f"{heads} that task_type={task_type!r} trains whole")
        names = kept   # ...and put no adapter inside them (a RoBERTa head's dense / out_proj)
    modules_to_save = trained_base.check_modules_to_save(model, modules_to_save, names)
    if merge_weights:   # eval() will merge: what merge(model) refuses is refused now
        _check_untied(model, {name: model.get_submodule(name) for name in names}, "merge_weights")
        computed = [name for name in names if parametrize.is_parametrized(model.get_submodule(name), "weight")]
        if computed:
            raise RuntimeError(f"merge_weights: layer {computed[0]!r} has its weight computed by a "
                               "parametrization; merging would write into a temporary")
    layouts = slice_layouts(model, slices, names, use_dora)
    for name in names:   # every layer checked before from_linear freezes the first one
        check_wrappable(model.get_submodule(name), adapter_dtype, name, use_dora)
    replaced = {}
    for name in names:
        old = model.get_submodule(name)
        replaced[id(old)] = wrap(old, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                 use_rslora=use_rslora, adapter_dtype=adapter_dtype, adapter_name=adapter_name,
                                 layout=layouts.get(name), **_dora_settings(use_dora, dora_dropout))
    replace_children(model, replaced)
    for layer in replaced.values():
        layer.merge_weights = merge_weights
    record_adapter(model, adapter_name, r, lora_alpha, lora_dropout, use_rslora, target_modules,
                   exclude_modules, names, any(layer.from_conv1d for layer in replaced.values()),
                   use_dora, dora_dropout, bias, modules_to_save, task_type)
    model.lora_fast_config = model.lora_fast_adapters[adapter_name]
    mark_only_lora_as_trainable(model)
    return names


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's default target_modules for the architecture of `model` (its config.model_type): the
    installed peft's table, else DEFAULT_TARGETS; a ValueError naming the architecture if it has
    none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = _peft_default_targets() or DEFAULT_TARGETS
    targets = table.get(model_type) if isinstance(model_type, str) else None
    if targets is None:
        what = (f"model_type {model_type!r}" if isinstance(model_type, str)
                else f"{type(model).__name__} (no config.model_type)")
        raise ValueError(f"target_modules: None picks PEFT's default targets for the model's "
                         f"architecture, and {what} has none (architectures with defaults: "
                         f"{', '.join(sorted(table))}); name the layers (a list, a regex or "
                         f"{ALL_LINEAR!r})")
    return [targets] if isinstance(targets, str) else list(targets)


# The defaults PEFT uses for common architectures (peft.utils.constants'
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21), for when peft is not installed:
# each entry as PEFT's, so that None means the same with or without it
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
    "bloom": ["query_key_value"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "t5": ["q", "v"], "bart": ["q_proj", "v_proj"],
}


@functools.lru_cache(maxsize=1)
def _peft_default_targets():
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table
    except Exception:   # not installed, or broken: the table above
        return None
    return dict(table)


def _task_type(model, task_type):
    if task_type is not None:
        return trained_base.check_task_type(task_type)
    kind = type(model).__name__
    return "SEQ_CLS" if kind.endswith("ForSequenceClassification") else \
        "TOKEN_CLS" if kind.endswith("ForTokenClassification") else None


def _dora_settings(use_dora, dora_dropout):
    """wrap's DoRA keywords: none for plain LoRA (the layers' defaults)."""
    return {"use_dora": True, "dora_dropout": dora_dropout} if use_dora else {}


def check_wrappable(module, adapter_dtype, name, use_dora=False):
    """Raise, naming the layer, unless `wrap` can put an adapter of adapter_dtype (DoRA with
    use_dora) on it."""
    if qlora.is_4bit(module):
        qlora.check_4bit(module, name)
        _check_adapter_dtype(adapter_dtype, qlora.compute_dtype_of(module), name)
    elif isinstance(module, nn.Embedding):
        if use_dora:
            raise ValueError(f"use_dora: {name!r} is an embedding, and DoRA on embeddings is not "
                             "available; exclude it (exclude_modules) or use_dora=False")
        embedding.check_embedding(module, name)
        _check_adapter_dtype(adapter_dtype, module.weight.dtype, name)
    else:
        _check_base(module, name)
        _check_adapter_dtype(adapter_dtype, module.weight.dtype, name)


def wrap(module, adapter_dtype=None, layout=None, **settings):
    """The LoRA layer over a base linear (sharing its weights): a LoRALinear, a LoRALinear4bit
    over a 4-bit one, or with layout (slices, enable) a LoRASlicedLinear; adapters in adapter_dtype,
    default_adapter_dtype of the base's by default."""
    four_bit = qlora.is_4bit(module)
    base_dtype = qlora.compute_dtype_of(module) if four_bit else module.weight.dtype
    make = qlora.LoRALinear4bit.from_4bit if four_bit else LoRALinear.from_linear
    if isinstance(module, nn.Embedding):
        make = embedding.LoRAEmbedding.from_embedding
    if layout is not None:
        make = functools.partial(sliced.LoRASlicedLinear.from_linear, slices=layout[0], enable=layout[1])
    return make(module, adapter_dtype=adapter_dtype or default_adapter_dtype(base_dtype), **settings)


def slice_layouts(model, slices, names, use_dora=False):
    """{layer name: (sizes, enable)} of inject's `slices` ({name: (sizes, enable)}) over the target
    layers `names`, checked (each entry matches targets, fits their out_features, a 16-bit base,
    no DoRA) before anything changes."""
    if slices is None:
        return {}
    if not isinstance(slices, dict) or not slices or not all(isinstance(k, str) and k for k in slices):
        raise ValueError(f"slices: expected None or a dict {{layer name: (sizes, enable)}}, got {slices!r}")
    layouts = {}
    for spec, layout in slices.items():
        if not (isinstance(layout, (tuple, list)) and len(layout) == 2):
            raise ValueError(f"slices[{spec!r}]: expected (sizes, enable), e.g. ((768, 768, 768), "
                             f"(True, False, True)), got {layout!r}")
        matched = [name for name in names if _matches([spec], name)]
        if not matched:
            raise ValueError(f"slices: {spec!r} matches none of the target layers ({names[:5]}...); "
                             "name a layer target_modules selects")
        for name in matched:
            module = model.get_submodule(name)
            if name in layouts:
                raise ValueError(f"slices: {name!r} is matched by two entries")
            if use_dora or qlora.is_4bit(module) or isinstance(module, nn.Embedding):
                raise ValueError(f"slices: {name!r}: per-slice LoRA is not available "
                                 f"{'with use_dora' if use_dora else 'on a 4-bit layer or an embedding'}")
            out_features = module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]
            try:
                layouts[name] = sliced.check_slices(*layout, out_features)
            except ValueError as err:
                raise ValueError(f"slices[{spec!r}] (layer {name!r}): {err}") from None
    return layouts


def replace_children(model, replaced):
    """Put replaced[id(child)] in place of every reference to child, so that a layer reachable by
    two names gets one LoRALinear."""
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])


def record_adapter(model, adapter_name, r, lora_alpha, lora_dropout, use_rslora, target_modules,
                   exclude_modules, names, fan_in_fan_out, use_dora=False, dora_dropout="peft",
                   bias="none", modules_to_save=None, task_type=None):
    """Record adapter `adapter_name`'s settings in model.lora_fast_adapters (what save_adapter
    writes to its adapter_config.json); model.lora_fast_config is the active adapter's."""
    saved_targets = target_modules
    if target_modules == ALL_LINEAR or exclude_modules:
        saved_targets = sorted(names)   # what PEFT itself writes for "all-linear": the full names
        # ...unless one full name is the dotted suffix of another module's ("fc" of "sub.fc"):
        # PEFT's list matching would then select that one too; an exact regex selects these alone
        if any(_matches(saved_targets, name) for name, _ in model.named_modules()
               if name and name not in names):
            saved_targets = "|".join(re.escape(name) for name in saved_targets)
    elif not isinstance(target_modules, str):
        saved_targets = list(target_modules)
    adapters = dict(model.__dict__.get("lora_fast_adapters") or {})
    adapters[adapter_name] = {
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "use_rslora": use_rslora, "target_modules": saved_targets,
        "fan_in_fan_out": fan_in_fan_out, "use_dora": use_dora, "dora_dropout": dora_dropout,
        "bias": bias, "modules_to_save": modules_to_save, "task_type": task_type,
    }
    model.lora_fast_adapters = adapters


def select_modules(model: nn.Module, target_modules: Targets, exclude_modules: Targets = None,
                   lora_too: bool = False, task_type: str | None = None) -> list[str]:
    """Names of the modules `inject` would replace (PEFT's matching; see the module docstring).
    Raises if a matching module is not a linear, or if nothing matches.

    Args:
        model: the model to search, by its dotted module names.
        target_modules: a regular expression (full match), a list of names (exact or dotted
            suffix), or "all-linear" (every linear but the output head).
        exclude_modules: None, or a regex / list as above; matching names are left out.
        lora_too: LoRALinear layers count as linears (add_adapter's targets).
        task_type: PEFT's task type; with "SEQ_CLS", "all-linear" leaves out the classification
            head of a model without output embeddings, as PEFT does.
    """
    is_linear = functools.partial(_is_linear, lora_too=lora_too)
    if target_modules == ALL_LINEAR:
        heads = {id(_output_head(model))}
        if task_type == trained_base.SEQ_CLS and _output_head(model) is None:
            heads |= {id(model.get_submodule(name)) for name in trained_base.seq_cls_heads(model)}
        names = [name for name, module in model.named_modules()
                 if is_linear(module) and id(module) not in heads]
    else:
        names = [name for name, _ in model.named_modules() if name and _matches(target_modules, name)]
    names = [name for name in names if not (exclude_modules and _matches(exclude_modules, name))]
    # embeddings when named (PEFT's "all-linear" leaves them out too)
    unsupported = [f"{name} ({type(model.get_submodule(name)).__name__})" for name in names
                   if not (is_linear(model.get_submodule(name))
                           or _is_embedding(model.get_submodule(name), lora_too))]
    if unsupported:
        raise TypeError(f"target_modules: matches modules that are not nn.Linear, Conv1D or "
                        f"nn.Embedding: {', '.join(unsupported[:5])}; name the layers themselves")
    if not names:
        available = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                            if is_linear(module)})
        raise ValueError(f"target_modules: {target_modules!r} matches no linear layer of "
                         f"{type(model).__name__} (exclude_modules={exclude_modules!r}); "
                         f"its linear layers are named {available[:20]}")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """{name: LoRA layer} of `model` (an nn.Module; not unwrapped), in module order: LoRALinear
    (and its 4-bit and per-slice kinds) and LoRAEmbedding."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel and torch.compile wrappers of `model`, whose module
    names are the ones adapters use."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def require_lora_layers(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    """{name: LoRALinear} of `model` inside any wrapper (see unwrap); raises a ValueError whose
    message starts with `what` (the caller's name) if there are none."""
    layers = lora_layers(unwrap(model))
    if not layers:
        raise ValueError(f"{what}: model has no LoRALinear layers; call lora_fast.inject first")
    return layers


def active_layers(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    """{name: LoRALinear} of the layers of `model` that hold its active adapter (the ones merge
    and unmerge act on); a ValueError starting with `what` if there are none."""
    layers = require_lora_layers(model, what)
    active = {name: layer for name, layer in layers.items() if layer.settings is not None}
    if not active:
        name = next(iter(layers.values())).active_adapter
        raise ValueError(f"{what}: no LoRA layer of the model holds the active adapter {name!r}")
    return active


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter of `model` (an nn.Module, or DDP / torch.compile wrapping one) into
    its base weight (see LoRALinear.merge); unmerge undoes it exactly. Every layer is checked
    first (none merged already, no parametrized weight, no weight tied to another parameter of
    the model); if one is refused, or a merge fails, no layer stays merged. Returns `model`."""
    layers = active_layers(model, "merge")
    _check_mergeable(unwrap(model), layers, "merge")
    done = []
    try:
        for layer in layers.values():
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged base weight of `model` bit for bit; raises, changing nothing, if a
    layer is not merged. Returns `model`."""
    layers = active_layers(model, "unmerge")
    unmerged = [name for name, layer in layers.items() if not layer.merged]
    if unmerged:
        raise RuntimeError(f"unmerge: {len(unmerged)} of {len(layers)} LoRA layers are not merged "
                           f"(e.g. {unmerged[0]!r})")
    for layer in layers.values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Merge every adapter of `model` and put the plain layers back (nn.Linear, or Conv1D where
    inject found one), in place; returns `model`. The base weights are updated in place, no copy is kept.
    Merged layers keep their merged weight; the others are checked first as merge() checks them,
    and nothing is changed if one is refused. A 4-bit layer (qlora.LoRALinear4bit) becomes a 16-bit
    nn.Linear (its decoded weight plus the delta, rounded once), or with requantize=True a
    qlora.Linear4bit of that weight (NF4's rounding error on the merged weight)."""
    if not isinstance(requantize, bool):
        raise TypeError(f"requantize: expected a bool, got {type(requantize).__name__}")
    inner = unwrap(model)   # the layer names are the bare model's
    layers = require_lora_layers(inner, "merge_and_unload")
    _check_mergeable(inner, {name: layer for name, layer in layers.items()
                             if not layer.merged and layer.settings is not None}, "merge_and_unload")
    # 4-bit layers' bases first: they change nothing, so a failure (a non-finite merged weight to
    # requantize) leaves the model as it was
    bases = {}
    for name, layer in layers.items():
        if isinstance(layer, qlora.LoRALinear4bit):
            try:
                bases[name] = layer.to_base(requantize)
            except (ValueError, RuntimeError) as err:
                raise type(err)(f"merge_and_unload: layer {name!r}: {err}") from None
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name), child, bases[name] if name in bases else layer.to_base())
    inner.__dict__.pop("lora_fast_config", None)
    inner.__dict__.pop("lora_fast_adapters", None)
    return model


def _check_mergeable(model, layers, what):
    """Raise, changing nothing, unless every layer of {name: LoRALinear} can fold its adapter into
    its weight: one layer at a time (LoRALinear.check_mergeable), and no weight that shares memory
    with another parameter of the model (tied weights: one tensor cannot hold two layers' deltas,
    and a delta folded into a tied head would change the embedding too)."""
    for name, layer in layers.items():
        try:
            layer.check_mergeable()
        except RuntimeError as err:
            raise RuntimeError(f"{what}: layer {name!r}: {str(err).removeprefix('merge: ')}") from None
    _check_untied(model, layers, what)


def _check_untied(model, layers, what):
    """Raise unless no weight of {name: layer} shares memory with another parameter of the model."""
    # Every (module, parameter) pair, a tied parameter once per module holding it: another
    # module's reference to the very same Parameter object is a tie too.
    by_storage = {}   # (device, storage address) -> [(first byte, end byte, name, owner)]
    for owner_name, owner in model.named_modules(remove_duplicate=False):
        for param_name, param in owner.named_parameters(recurse=False):
            extent = storage_extent(param)
            if extent is not None:
                by_storage.setdefault(extent[:2], []).append(
                    (*extent[2:], f"{owner_name}.{param_name}".lstrip("."), owner))
    for name, layer in layers.items():
        extent = storage_extent(layer.weight)
        for start, end, other_name, owner in by_storage.get(extent[:2] if extent else None, ()):
            if owner is not layer and start < extent[3] and extent[2] < end:
                raise RuntimeError(f"{what}: layer {name!r} has its weight tied to {other_name!r} "
                                   "(they share memory): merging would add the adapter into both. "
                                   "Untie them first (e.g. clone one), or keep the adapter unmerged")


def mark_only_lora_as_trainable(model: nn.Module, bias: str | None = None) -> nn.Module:
    """requires_grad on the active adapter's lora_A/lora_B (and DoRA magnitude) parameters of
    `model`, and on the base parameters it trains (lora_fast.trained_base: its modules_to_save and
    the biases of its bias mode), off on every other parameter (the other adapters' too); returns
    `model`.

    Args:
        model: the model (not wrapped).
        bias: "none", "all" or "lora_only" (loralib's and PEFT's modes); None: the active
            adapter's, as inject recorded it ("none" if none was). Given, it becomes the active
            adapter's bias mode, which save_adapter then saves.
    """
    layers = lora_layers(model)
    record = model.__dict__.get("lora_fast_config")
    if bias is not None:
        bias = trained_base.check_bias(bias)
        adapters = model.__dict__.get("lora_fast_adapters") or {}
        if bias != "none" and len(adapters) > 1:
            raise ValueError(f"bias: {bias!r} trains base biases, which lora_fast trains in place for "
                             f"one adapter per model, and the model has adapters {list(adapters)}")
        if record is not None and record.get("bias", "none") != bias:
            record["bias"] = bias   # the active adapter's record (lora_fast_config is that dict)
    elif record is not None:
        bias = record.get("bias", "none")
    active = {name: layer for name, layer in layers.items() if layer.settings is not None}
    trained = trained_base.trained_parameters(model, bias or "none",
                                              (record or {}).get("modules_to_save"), active)
    keep = {id(p) for layer in layers.values() for p in layer.adapter_parameters()}
    keep |= {id(p) for p in trained.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


class ParameterCount(NamedTuple):
    """(trainable, total) parameter counts; str() formats them as PEFT does."""
    trainable: int
    total: int

    def __str__(self):
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {share:.4f}")


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """(trainable, total) parameter counts of `model`, each shared tensor counted once; str()
    prints them as PEFT's print_trainable_parameters does."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params))


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """A context manager: within the block every LoRALinear of `model` computes its base linear
    alone, merged or not (a merged layer uses the copy of its base weight that merge() keeps),
    as PEFT's ``disable_adapter()``; the previous state is restored on exit, also on error."""
    layers = list(require_lora_layers(model, "disable_adapters").values())
    record = unwrap(model).__dict__.get("lora_fast_config") or {}
    if record.get("bias", "none") != "none" or record.get("modules_to_save"):
        warnings.warn(f"disable_adapters: the adapter trains base parameters in place (bias="
                      f"{record.get('bias', 'none')!r}, modules_to_save={record.get('modules_to_save')}); "
                      "they keep their trained values inside the block, so its output is not the "
                      "base model's", UserWarning, stacklevel=3)
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


def _is_linear(module, lora_too=False):
    return (isinstance(module, nn.Linear) and (lora_too or not isinstance(module, LoRALinear))) \
        or is_conv1d(module) or isinstance(module, qlora.Linear4bit)


def _is_embedding(module, lora_too=False):
    return isinstance(module, nn.Embedding) and (lora_too or not isinstance(module, LoRALayer))


def _output_head(model):
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        return head
    return getattr(model, "lm_head", None)
