"""Adapters on disk in PEFT's format: a directory with adapter_config.json and
adapter_model.safetensors, whose keys are ``base_model.model.<module path>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r). PEFT's ``PeftModel.from_pretrained`` loads what `save_adapter`
writes, and `load_adapter` loads what PEFT's ``save_pretrained`` writes (LoRA and DoRA, whose
magnitude is ``...lora_magnitude_vector`` (out,), without ".weight", as PEFT writes it; PEFT features
without a lora_fast equivalent, such as aLoRA or per-module ranks, are refused by name).

Several adapters (lora_fast.add_adapter) are kept on disk as PEFT keeps them: the adapter named
"default" at the root of the directory, every other one in a subfolder named after it, each
folder a complete adapter (its own config; keys without the adapter's name). `save_adapter` writes
that layout, `load_adapter(..., adapter_name=...)` and `load_adapters` read it, and
`load_adapter(..., hotswap=True)` replaces an adapter's weights in place, for a torch.compile'd
model that must not recompile.

Nothing half done: `save_adapter` prepares every adapter's tensors and config, writes them all to
temporaries and only then moves them into place (a failure leaves the previous adapters as they
were), and `load_adapter` checks the config and every tensor against the model before it changes
anything (a failure leaves the model as it was).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import adapter_config, atomic_files, embedding, named_adapters, qlora, sliced, trained_base
from .inject import inject_as, lora_layers, require_lora_layers, select_modules, unwrap
from .module import DEFAULT_ADAPTER, AdapterSettings, adapter_dtypes, check_adapter_name, is_conv1d


class KeyMismatchError(KeyError, ValueError):
    """A weights file whose keys do not fit the model's LoRA layers (a KeyError as before, and a
    ValueError; printed as its message, not as a quoted key)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# What an adapter directory may hold besides the adapter: PEFT writes a model card, and a
# directory cloned from the Hugging Face Hub is a git repository. save_adapter warns about the rest
# (besides the subfolders of the model's other adapters, PEFT's layout).
_EXPECTED_FILES = {CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, "README.md",
                   ".git", ".gitattributes", ".gitignore"}

# safetensors metadata key: the hyper-parameters the weights were saved with (JSON). The weights
# are moved into place before the config, so a save interrupted between the two leaves new weights
# beside the old config; load_adapter compares the two and refuses a mix that disagrees.
SAVED_WITH_KEY = "lora_fast_hparams"
_SAVED_HPARAMS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "use_dora")
MAGNITUDE = "lora_magnitude_vector"   # DoRA's (out,) magnitude: PEFT's key, no ".weight" in its files
_PARTS = ("lora_A", "lora_B", MAGNITUDE)


# an embedding's parts in PEFT's files: its ParameterDicts, so no ".weight"
_EMBEDDING_PARTS = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}


def _file_key(key, embedding=False):
    """PEFT's key in adapter_model.safetensors for lora_state_dict's `key` (`embedding`: of a
    LoRAEmbedding, whose lora_A / lora_B PEFT names lora_embedding_A / lora_embedding_B)."""
    if embedding:
        name, _, part = key.rpartition(".")
        return f"{PREFIX}{name}.{_EMBEDDING_PARTS[part]}"
    return f"{PREFIX}{key}" if key.endswith("." + MAGNITUDE) else f"{PREFIX}{key}.weight"


# --- state dict ---------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)} (and a DoRA adapter's
    "<path>.lora_magnitude_vector" (out,)) of one adapter, detached, for the layers that hold it. For the adapter "default" these are the model's own state-dict names;
    another adapter's weights have the same keys here (its state-dict keys are
    ``<path>.lora_adapters.<name>.lora_A``). Weights sharded by FSDP2 (DTensor) are gathered
    whole: that is a collective, so every rank must call this.

    Args:
        model: a model with LoRALinear layers (inside DDP / torch.compile wrappers or not).
        adapter_name: which adapter; default the active one.
    """
    name, layers = _holding(model, adapter_name, "lora_state_dict")
    return _gathered(layers, name)


def _holding(model, adapter_name, what):
    """(name, {layer name: LoRALinear}) of adapter `adapter_name` (None: the active one) and the
    layers of `model` that hold it; a ValueError naming adapter_name for an unknown name."""
    inner = unwrap(model)
    require_lora_layers(inner, what)
    if adapter_name is None:
        adapter_name = named_adapters.active_adapter(inner)
    else:
        check_adapter_name(adapter_name)
        known = named_adapters.adapter_names(inner)
        if adapter_name not in known:
            raise ValueError(f"adapter_name: the model has no adapter {adapter_name!r}; its "
                             f"adapters are {known}")
    layers = named_adapters.adapter_layers(inner, adapter_name)
    if not layers:
        raise ValueError(f"{what}: no LoRA layer of the model holds adapter {adapter_name!r}")
    return adapter_name, layers


def _gathered(layers, adapter_name):
    return {f"{name}.{part}": _whole(param) for name, layer in layers.items()
            for part, param in zip(_PARTS, layer.adapter_parameters(adapter_name))}


def _whole(param):
    tensor = param.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor   # a DTensor shard (FSDP2)


def _trained_base(model, hparams, layers):
    """{file key without PREFIX: Parameter} of the base parameters the adapter of `hparams` (its
    config: bias, modules_to_save) trains, on `model` with LoRA targets `layers` ({name: module
    with a .bias})."""
    return trained_base.trained_parameters(model, hparams.get("bias", "none"),
                                           hparams.get("modules_to_save"), layers)


# --- save ---------------------------------------------------------------------------------------

class _Planned(NamedTuple):
    """One adapter folder save_adapter writes, everything in it computed before any file is."""
    folder: Path
    tensors: dict
    saved_with: str
    config_text: str


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapters of `model` to directory `path` in PEFT's format; returns the directory.

    With adapter_name None, every adapter, in the layout PEFT's ``save_pretrained`` writes: the
    adapter "default" at the root of `path`, every other one in the subfolder ``path/<name>/``
    (a model whose adapters are all named otherwise writes subfolders only). With an adapter_name,
    that adapter alone, at the root of `path` whatever its name (the folder is the caller's
    choice; load it back with load_adapter(model, path, adapter_name=...)). Each folder holds that
    adapter's adapter_config.json (its r, alpha, dropout, rslora and target_modules) and
    adapter_model.safetensors (PEFT's keys, without the adapter's name) for the layers holding it.

    Every adapter's tensors and config are prepared (and refused, writing nothing, if PEFT's
    format cannot hold them) before any file is written. The files are written to temporaries
    and moved into place only once all of them are written (weights, then config, folder by
    folder): a failure while writing leaves every adapter already in `path` as it was. Only the
    renames come after the last write; one failing among them (rare) leaves every folder whole,
    holding its previous adapter or its new one. A stale adapter_model.bin of
    a previous adapter is removed once the new files are in place. Files that are not an
    adapter's are left alone, with one warning per folder naming them.

    Args:
        model: a model with LoRALinear layers (after `inject` or `load_adapter`). Under
            torch.distributed every rank must call this (sharded weights are gathered) and rank 0
            writes.
        path: the directory, created if needed.
        adapter_name: the adapter to save (written at the root of `path`); None: all of them.
        base_model_name_or_path: recorded in the configs; default the model's
            ``config._name_or_path`` when it has one.
    """
    from safetensors.torch import save_file

    inner = unwrap(model)
    require_lora_layers(inner, "save_adapter")
    names = named_adapters.adapter_names(inner) if adapter_name is None else [adapter_name]
    path = Path(path)
    planned = []
    for name in names:   # _holding refuses a name of the wrong kind or one the model lacks
        name, layers = _holding(inner, name, "save_adapter")
        for layer in layers.values():
            if isinstance(layer, embedding.LoRAEmbedding):
                layer.check_sizes()   # an embedding resized since inject holds no savable adapter
        config = _adapter_config(inner, name, layers, base_model_name_or_path)
        tensors = {_file_key(key, isinstance(layers[key.rpartition(".")[0]], embedding.LoRAEmbedding)):
                   t.cpu().contiguous() for key, t in _gathered(layers, name).items()}
        tensors.update({PREFIX + key: _whole(param).cpu().contiguous()
                        for key, param in _trained_base(inner, config, layers).items()})
        for layer_name, layer in layers.items():   # a sliced layer's B as PEFT holds it: B_full
            if isinstance(layer, sliced.LoRASlicedLinear):
                lora_B = _whole(layer.adapter_weights(name)[1])
                tensors[f"{PREFIX}{layer_name}.lora_B.weight"] = \
                    sliced.block_b(lora_B, layer.slices, layer.enable).cpu().contiguous()
        at_root = adapter_name is not None or name == DEFAULT_ADAPTER
        planned.append(_Planned(
            folder=path if at_root else path / name, tensors=tensors,
            saved_with=json.dumps({key: config[key] for key in _SAVED_HPARAMS}, sort_keys=True),
            config_text=json.dumps(config, indent=2, sort_keys=True) + "\n"))
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() != 0:
        return path
    for folder in [path] + [p.folder for p in planned]:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"path: {str(folder)!r} is a file, expected a directory")
    path.mkdir(parents=True, exist_ok=True)
    created = [p.folder for p in planned if p.folder != path and not p.folder.exists()]
    for folder in created:
        folder.mkdir()
    siblings = set(named_adapters.adapter_names(inner))
    for plan in planned:
        _warn_foreign_files(plan.folder, siblings if plan.folder == path else set())
    try:
        # Every folder's temporaries are written inside the one stack; its exit moves them into
        # place (the last folder first), so no folder changes before every file is written.
        with contextlib.ExitStack() as stack:
            for plan in planned:
                weights_tmp, config_tmp = stack.enter_context(
                    atomic_files.staged(plan.folder, [WEIGHTS_NAME, CONFIG_NAME]))
                save_file(plan.tensors, str(weights_tmp),
                          metadata={"format": "pt", SAVED_WITH_KEY: plan.saved_with})
                config_tmp.write_text(plan.config_text)
    except BaseException:
        for folder in created:   # only folders this call made, and only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for plan in planned:
        _remove_stale(plan.folder / LEGACY_WEIGHTS_NAME)
    return path


def _warn_foreign_files(path, adapter_folders):
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _EXPECTED_FILES
                     and not (p.name in adapter_folders and p.is_dir()))
    if foreign:
        warnings.warn(f"save_adapter: {str(path)!r} also holds {len(foreign)} entries that are not "
                      f"part of an adapter (left alone): {foreign[:10]}", UserWarning, stacklevel=3)


def _remove_stale(path):
    # The previous adapter's weights in PEFT's legacy format: the new config does not describe
    # them. Loaders prefer the safetensors file, so one left behind is misleading, not wrong.
    if path.exists():
        try:
            path.unlink()
        except OSError as err:
            warnings.warn(f"save_adapter: could not remove the previous adapter's {path} ({err}); "
                          f"{WEIGHTS_NAME} beside it is the adapter just saved", UserWarning,
                          stacklevel=3)


def _adapter_config(model, adapter_name, layers, base_model_name_or_path):
    """adapter_config.json of adapter `adapter_name`: only keys PEFT knows. One
    r/alpha/dropout/rslora for all its layers (a PEFT config without rank_pattern cannot say more),
    taken from the layers; target_modules as recorded when the adapter was made."""
    def common(attr):
        values = {getattr(layer.adapter_settings[adapter_name], attr) for layer in layers.values()}
        if len(values) != 1:
            raise ValueError(f"save_adapter: the LoRA layers of adapter {adapter_name!r} differ in "
                             f"{attr} ({sorted(values)}); PEFT's format stores one value for all "
                             "layers")
        return values.pop()

    recorded = (model.__dict__.get("lora_fast_adapters") or {}).get(adapter_name)
    if recorded is None and adapter_name == named_adapters.active_adapter(model):
        recorded = model.__dict__.get("lora_fast_config")   # a record from before named adapters
    recorded = recorded or {}
    if base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        base_model_name_or_path = name if isinstance(name, str) else None
    return {
        **_slice_patterns(adapter_name, layers, common("lora_alpha"), common("use_rslora")),
        "peft_type": "LORA",
        "r": common("r"),
        "lora_alpha": common("lora_alpha"),
        "lora_dropout": common("lora_dropout"),
        "use_rslora": common("use_rslora"),
        "use_dora": common("use_dora"),
        "target_modules": recorded.get("target_modules", sorted(layers)),
        "bias": recorded.get("bias", "none"),
        "modules_to_save": recorded.get("modules_to_save"),
        "task_type": recorded.get("task_type"),
        "fan_in_fan_out": any(layer.from_conv1d for layer in layers.values()),
        "base_model_name_or_path": base_model_name_or_path,
    }


def _slice_patterns(adapter_name, layers, lora_alpha, use_rslora):
    """The config keys of the adapter's sliced layers (lora_fast.sliced), none without any: each
    is saved as the rank-k·r adapter it computes (lora_A, B_full), so PEFT reads it through
    rank_pattern (k·r) and alpha_pattern (the alpha keeping the scaling: alpha·k, alpha·√k with
    rslora), keyed by the layer's escaped full name; lora_fast_slices holds each layer's slices and
    enable, which load_adapter needs to rebuild the layer (PEFT ignores the key, with a warning)."""
    layouts = {name: layer for name, layer in layers.items() if isinstance(layer, sliced.LoRASlicedLinear)}
    if not layouts:
        return {}
    r = {layer.adapter_settings[adapter_name].r for layer in layouts.values()}.pop()
    return {
        "rank_pattern": {re.escape(name): sum(layer.enable) * r for name, layer in layouts.items()},
        "alpha_pattern": {re.escape(name): sliced.equivalent_alpha(lora_alpha, sum(layer.enable), use_rslora)
                          for name, layer in layouts.items()},
        SLICES_KEY: {name: {"slices": list(layer.slices), "enable": list(layer.enable)}
                     for name, layer in layouts.items()},
    }


SLICES_KEY = adapter_config.SLICES_KEY


# --- load ---------------------------------------------------------------------------------------

def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                 hotswap: bool = False) -> list[str]:
    """Load the adapter in directory `path` (written by `save_adapter` or by PEFT) into `model` as
    adapter `adapter_name`; returns the names of the layers loaded.

    Where it goes:
      - a model without LoRA layers: they are injected as the config says, with this adapter
        (the active one); the adapters in the file's dtype where the layers can run with it, else
        inject's default.
      - a model with LoRA layers and no adapter of that name: the adapter is added on the layers
        the config's target_modules select (add_adapter; the file's dtype as above), frozen and
        NOT made active, as PEFT's ``load_adapter`` does: set_adapter(model, adapter_name) to use it.
      - an existing adapter of that name: its weights are replaced in place; its layers' r,
        lora_alpha and use_rslora must be the file's and the file must hold exactly its layers.
        Merged layers are unmerged, loaded and merged again, so forward uses the new weights.

    hotswap=True replaces the weights of an existing adapter in place for a model already
    compiled (torch.compile): values are copied into the same Parameters and nothing torch.compile
    guards on changes, so the model does not recompile. The file may then have a lower rank than
    the adapter (lora_A's extra rows and lora_B's extra columns are zeroed: give the slot adapter
    the largest rank to come, e.g. add_adapter(model, "slot", r=64)) and another lora_alpha or
    use_rslora: the ratio s_file / s_layer of the scalings is folded into lora_B (computed in
    float32, or wider for a wider dtype, and rounded once). The layers keep their recorded r,
    lora_alpha, use_rslora and lora_dropout (and so does the model's record, which save_adapter
    writes), and their s·B·A is the file's adapter. The file's lora_dropout, a training setting
    that PEFT's hot swap refuses to differ, is not taken. Refused: a name the model has no adapter of,
    a higher rank, a file on other layers than the adapter's, an adapter merged into the weights.

    Everything is checked before the model changes: the config (plain LoRA, hyper-parameters of
    the right types), every tensor (floating point, finite, one per layer and part, the right
    shape) against the layers it goes to. Any error raises, naming the file and key, and leaves
    the model as it was (every adapter's weights, its adapters, LoRA layers, records, active
    adapter and requires_grad flags).

    Args:
        model: a model (inside DDP / torch.compile wrappers or not). A model already sharded by
            FSDP2 gets each rank's shard (every rank calls this).
        path: the adapter's directory. If it has no adapter_config.json but its subfolder named
            adapter_name has (PEFT's layout for an adapter not named "default"), that subfolder.
        adapter_name: the name the adapter gets, or has, in the model (letters, digits, '_', '-').
        hotswap: replace an existing adapter's weights in place, without recompiling (above).
    """
    check_adapter_name(adapter_name)
    if not isinstance(hotswap, bool):
        raise ValueError(f"hotswap: expected True or False, got {hotswap!r}")
    folder = _adapter_folder(Path(path), adapter_name)
    config_file = folder / CONFIG_NAME
    config = adapter_config.read(config_file)
    hparams = adapter_config.check(config, config_file)
    weights_file, tensors, metadata = _read_weights(folder)
    _check_tensor_values(tensors, weights_file)
    _check_saved_with(metadata, hparams, config_file, weights_file)

    module = unwrap(model)
    layers = lora_layers(module)
    known = named_adapters.adapter_names(module) if layers else []
    if hotswap and adapter_name not in known:
        has = f"its adapters are {known}" if known else "no LoRA layers"
        raise ValueError(
            f"adapter_name: hotswap=True replaces the weights of an adapter the model has, and it "
            f"has no adapter {adapter_name!r} ({has}); "
            f"load it with hotswap=False first, or make its slot before compiling "
            f"(add_adapter(model, {adapter_name!r}, r=<the largest rank to come>, ...))")
    if not layers:
        targets = _targets(module, hparams, config_file)
    elif adapter_name in known:
        holders = named_adapters.adapter_layers(module, adapter_name)
        if hotswap:
            _check_hotswap(holders, adapter_name, hparams, tensors, weights_file)
        else:
            _check_layer_hparams(holders, adapter_name, hparams, config_file)
        targets = {name: _Target.of(layer) for name, layer in holders.items()}
    else:
        targets = _targets(module, hparams, config_file, lora_too=True)
    if not layers and hparams["task_type"] in trained_base.HEAD_TASKS:   # as inject: none in the heads
        heads = trained_base.matching_modules(module, trained_base.task_heads(module, hparams["task_type"]))
        targets = {name: t for name, t in targets.items() if not trained_base.inside(name, heads)}
    if hparams["patterns"]:   # PEFT's re-save of a per-slice adapter: the model's layers say the slices
        layouts = {name: t.slices for name, t in targets.items() if t.slices}
        try:
            adapter_config.check_patterns(layouts, hparams, *hparams["patterns"].values(),
                                          "the model's per-slice layers")
        except ValueError as err:
            raise ValueError(f"load_adapter: {config_file}: {err}") from None
        hparams["slices"] = layouts
    targets = _with_slices(targets, hparams["slices"], bool(layers), hotswap, config_file)
    modules_to_save = _file_modules_to_save(module, hparams, targets, config_file)
    tensors = _without_wrapper_keys(tensors, trained_base.matching_modules(module, modules_to_save or ()))
    base = _base_targets(module, hparams, modules_to_save, targets, adapter_name, known, config_file)
    # PEFT saves the base weight of a targeted embedding beside its adapter (save_embedding_layers,
    # for a vocabulary resized before training); loaded into it, as PEFT does, when there
    embedding_bases = {key: module.get_submodule(name).weight for name, target in targets.items()
                       if target.embedding and (key := f"{PREFIX}{name}.base_layer.weight") in tensors}
    if embedding_bases and set(known) - {adapter_name}:   # the base is every adapter's: refused if it changes
        changed = [key for key, weight in embedding_bases.items()
                   if tuple(tensors[key].shape) != tuple(weight.shape)
                   or not torch.equal(tensors[key].to(weight.dtype), weight.detach().cpu())]
        if changed:
            raise ValueError(f"load_adapter: {weights_file} holds the base weight of an embedding "
                             f"({changed[0]}, PEFT's save_embedding_layers) that differs from the "
                             f"model's, which its other adapters {sorted(set(known) - {adapter_name})} "
                             "use too: load it into a model without those adapters")
        tensors = {key: t for key, t in tensors.items() if key not in embedding_bases}
        embedding_bases = {}
    base.update(embedding_bases)
    _check_tensors_fit(targets, tensors, hparams["r"], weights_file, config_file, hparams["use_dora"],
                       base)
    _check_fan_in_fan_out(targets, hparams, config_file)
    parts = _PARTS if hparams["use_dora"] else _PARTS[:2]
    incoming = {name: tuple(tensors[_file_key(f"{name}.{part}", target.embedding)] for part in parts)
                for name, target in targets.items()}
    incoming = _per_slice(incoming, targets, hparams["r"], weights_file)
    if hotswap:
        incoming = _padded_and_scaled(holders, adapter_name, hparams, incoming)

    with _restored_on_error(module, layers, base.values()):
        file_dtype = _usable_file_dtype(targets, {key: t for key, t in tensors.items() if key not in base})
        if not layers:
            inject_as(module, hparams["r"], hparams["lora_alpha"], hparams["target_modules"],
                      hparams["lora_dropout"], hparams["use_rslora"], hparams["exclude_modules"],
                      file_dtype, adapter_name, hparams["use_dora"], "peft", hparams["bias"],
                      modules_to_save, hparams["task_type"], False,
                      {name: t.slices for name, t in targets.items() if t.slices} or None)
        elif adapter_name not in known:
            named_adapters.add_adapter(
                module, adapter_name, r=hparams["r"], lora_alpha=hparams["lora_alpha"],
                target_modules=hparams["target_modules"], lora_dropout=hparams["lora_dropout"],
                use_rslora=hparams["use_rslora"], exclude_modules=hparams["exclude_modules"],
                adapter_dtype=file_dtype, use_dora=hparams["use_dora"])
        loaded = named_adapters.adapter_layers(module, adapter_name)
        _copy_into(loaded, _Incoming(adapter_name, incoming))
        _copy_base(base, tensors)
    return list(loaded)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load every adapter of directory `path` in PEFT's layout (what save_adapter or PEFT's
    save_pretrained writes for several adapters) into `model`; returns their names, in the order
    loaded: the adapter at the root of `path` as "default", then each subfolder holding an
    adapter_config.json as its folder's name, sorted. Each is loaded as load_adapter(model,
    folder, adapter_name=name) loads it; into a model without LoRA layers the first one is
    injected and is the active adapter. All or nothing: if one fails, the model is left as it was.

    Args:
        model: a model (inside DDP / torch.compile wrappers or not), with or without LoRA layers.
        path: the directory.
    """
    path = Path(path)
    _check_directory(path)
    entries = [(DEFAULT_ADAPTER, path)] if (path / CONFIG_NAME).is_file() else []
    for folder in sorted(p for p in path.iterdir() if (p / CONFIG_NAME).is_file()):
        try:
            name = check_adapter_name(folder.name)
        except ValueError:
            raise ValueError(f"path: {str(folder)!r} holds an adapter, but its folder name cannot "
                             "name one (letters, digits, '_' and '-'); rename the folder, or load "
                             "it with load_adapter(model, folder, adapter_name=...)") from None
        if entries and name == DEFAULT_ADAPTER:
            raise ValueError(f"path: {str(path)!r} holds an adapter at its root and one in its "
                             f"subfolder {DEFAULT_ADAPTER!r}: both would be named {DEFAULT_ADAPTER!r}")
        entries.append((name, folder))
    if not entries:
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {str(path)!r} nor in any of its "
                                "subfolders")
    module = unwrap(model)
    with _restored_on_error(module, lora_layers(module)):
        for name, folder in entries:
            load_adapter(module, folder, adapter_name=name)
    return [name for name, _ in entries]


def _check_directory(path):
    if path.is_file():
        raise NotADirectoryError(f"path: {str(path)!r} is a file; pass the directory that holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not path.is_dir():
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {str(path)!r} (no such directory)")


def _adapter_folder(path, adapter_name):
    """`path` if it holds an adapter, else its subfolder named adapter_name if that does (PEFT's
    layout), else an error pointing to the adapters it has in subfolders."""
    _check_directory(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / adapter_name / CONFIG_NAME).is_file():
        return path / adapter_name
    nested = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    hint = (f"; PEFT saves an adapter not named 'default' in a subfolder named after it: "
            f"{str(path)!r} has adapters in {nested}, pass one of those folders (or "
            "adapter_name=<its name>; load_adapters(model, path) loads them all)" if nested else "")
    raise FileNotFoundError(f"path: no {CONFIG_NAME} in {str(path)!r} (nor in its subfolder "
                            f"{adapter_name!r}){hint}")


def _read_weights(path):
    """(file, {key: tensor}, safetensors metadata) of the adapter's weights, or an error naming
    the file and what was expected."""
    if (path / WEIGHTS_NAME).is_file():   # preferred, as PEFT does
        from safetensors import SafetensorError, safe_open
        file = path / WEIGHTS_NAME
        try:
            with safe_open(str(file), framework="pt") as f:
                return file, {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    if (path / LEGACY_WEIGHTS_NAME).is_file():   # PEFT with safe_serialization=False
        file = path / LEGACY_WEIGHTS_NAME
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:   # pickle's errors have no common base
            raise ValueError(f"{file}: not a torch state dict that loads with weights_only=True "
                             f"({type(err).__name__}: {err})") from err
        if not isinstance(tensors, dict):
            raise ValueError(f"{file}: expected a dict of tensors, got {type(tensors).__name__}")
        odd = [f"{key!r} ({type(value).__name__})" for key, value in tensors.items()
               if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
        if odd:
            raise ValueError(f"{file}: expected a dict of str keys to tensors; not so for "
                             f"{', '.join(odd[:5])} ({len(odd)} in all)")
        return file, tensors, {}
    raise FileNotFoundError(f"path: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {str(path)!r}")


def _check_tensor_values(tensors, weights_file):
    """Refuse integer, bool and complex tensors (a float copy of them is not an adapter anyone
    trained) and non-finite values (an adapter with inf/NaN makes every output NaN)."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{weights_file}: {key} has dtype {tensor.dtype}, expected a floating "
                             "dtype (adapter weights)")
        checked = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                             torch.float64) else tensor.float()
        bad = int((~torch.isfinite(checked)).sum())
        if bad:
            raise ValueError(f"{weights_file}: {key} holds {bad} non-finite values (inf or NaN) "
                             f"of {tensor.numel()}")


def _check_saved_with(metadata, hparams, config_file, weights_file):
    if SAVED_WITH_KEY not in metadata:   # PEFT's file, or one written by hand
        return
    try:
        saved = json.loads(metadata[SAVED_WITH_KEY])
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"{weights_file}: metadata {SAVED_WITH_KEY!r} is not a JSON object")
    for key in _SAVED_HPARAMS:
        if key in saved and saved[key] != hparams[key]:
            raise ValueError(
                f"{config_file} says {key}={hparams[key]!r} but {weights_file} was saved with "
                f"{key}={saved[key]!r}: the two files come from different saves (an interrupted "
                "save_adapter, or a config edited since); save the adapter again")


def _check_layer_hparams(layers, adapter_name, hparams, config_file):
    for name, layer in layers.items():
        settings = layer.adapter_settings[adapter_name]
        for attr in ("r", "lora_alpha", "use_rslora", "use_dora"):
            if getattr(settings, attr) != hparams[attr]:
                raise ValueError(
                    f"load_adapter: layer {name!r} has {attr}={getattr(settings, attr)!r}, the "
                    f"adapter {attr}={hparams[attr]!r} ({config_file}), for adapter_name="
                    f"{adapter_name!r}; load it under another adapter_name, with hotswap=True (a "
                    "lower rank, another alpha), into a model without LoRA layers, or inject with "
                    "the adapter's settings")


def _check_hotswap(holders, adapter_name, hparams, tensors, weights_file):
    """What hotswap cannot do in place: a merged adapter, other layers, a higher rank."""
    merged = [name for name, layer in holders.items() if layer.merged_adapter == adapter_name]
    if merged:
        raise ValueError(f"hotswap: adapter {adapter_name!r} is merged into the weights of "
                         f"{len(merged)} layers (e.g. {merged[0]!r}); unmerge(model) first")
    in_file = {key[len(PREFIX):].rsplit(".", 2)[0] for key in tensors
               if key.startswith(PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))}
    in_file |= {key[len(PREFIX):].rsplit(".", 1)[0] for key in tensors
                if key.startswith(PREFIX) and key.endswith(tuple("." + p for p in _EMBEDDING_PARTS.values()))}
    missing, extra = sorted(set(holders) - in_file), sorted(in_file - set(holders))
    if missing or extra:
        raise ValueError(
            f"hotswap: {weights_file} holds an adapter on other layers than adapter "
            f"{adapter_name!r}: {len(missing)} of its layers missing {missing[:5]}, {len(extra)} "
            f"layers it does not have {extra[:5]}; a hot swap replaces weights only (new LoRA "
            "layers would change what torch.compile traced): load it with hotswap=False under "
            "another adapter_name")
    dora = sorted(name for name, layer in holders.items()
                  if layer.adapter_settings[adapter_name].use_dora != hparams["use_dora"])
    if dora:
        raise ValueError(f"hotswap: the file's use_dora={hparams['use_dora']} differs from adapter "
                         f"{adapter_name!r}'s on {len(dora)} layers (e.g. {dora[0]!r}); a hot swap "
                         "replaces weights only: load it with hotswap=False under another adapter_name")
    for name, layer in holders.items():
        slot = layer.adapter_settings[adapter_name].r
        if hparams["r"] > slot:
            raise ValueError(
                f"hotswap: the file's r={hparams['r']} is higher than adapter {adapter_name!r}'s "
                f"r={slot} (layer {name!r}); a hot swap can only zero-pad a lower rank: create the "
                f"slot with the largest rank to come (add_adapter(model, {adapter_name!r}, "
                f"r={hparams['r']}, ...)) before compiling")


def _padded_and_scaled(holders, adapter_name, hparams, incoming):
    """The file's (A, B) of each layer as the layer's adapter holds them for a hot swap: the rank
    zero-padded to the layer's, and lora_B times s_file / s_layer (float32 or wider, rounded once
    to the parameter's dtype), so that s_layer·B'·A' = s_file·B·A."""
    s_file = AdapterSettings(hparams["r"], hparams["lora_alpha"], hparams["lora_dropout"],
                             hparams["use_rslora"]).scaling
    out = {}
    for name, (lora_A, lora_B, *magnitude) in incoming.items():   # a DoRA magnitude: taken as it is
        layer = holders[name]
        param_A, param_B = layer.adapter_weights(adapter_name)
        ratio = s_file / layer.adapter_settings[adapter_name].scaling
        if ratio != 1.0:
            compute = torch.promote_types(torch.promote_types(lora_B.dtype, param_B.dtype),
                                          torch.float32)
            lora_B = (lora_B.to(compute) * ratio).to(param_B.dtype)
        r = lora_A.shape[0]
        if r < param_A.shape[0]:
            padded_A = torch.zeros(tuple(param_A.shape), dtype=param_A.dtype)
            padded_B = torch.zeros(tuple(param_B.shape), dtype=param_B.dtype)
            padded_A[:r] = lora_A
            padded_B[:, :r] = lora_B
            lora_A, lora_B = padded_A, padded_B
        out[name] = (lora_A, lora_B, *magnitude)
    return out


class _Target(NamedTuple):
    """What load_adapter needs to know of a layer it fills: sizes, base dtype, Conv1D or not, and
    for a per-slice layer (lora_fast.sliced) its (slices, enable)."""
    out_features: int
    in_features: int
    dtype: torch.dtype
    conv1d: bool
    slices: tuple | None = None
    embedding: bool = False   # an embedding: out = embedding_dim, in = num_embeddings

    @classmethod
    def of(cls, layer):
        """The target a LoRA layer is (a LoRALinear's weight is (out, in), also when made from a Conv1D)."""
        layout = (layer.slices, layer.enable) if isinstance(layer, sliced.LoRASlicedLinear) else None
        return cls(layer.out_features, layer.in_features, layer.base_dtype(), layer.from_conv1d, layout,
                   isinstance(layer, embedding.LoRAEmbedding))

    @property
    def rank_factor(self):
        """k: the file's rank is k·r on this layer (k enabled slices; 1 for a plain layer)."""
        return sum(self.slices[1]) if self.slices else 1


def _with_slices(targets, layouts, has_lora_layers, hotswap, config_file):
    """targets with the file's per-slice layouts ({name: (slices, enable)}) on theirs: a layer
    the model already has must have the file's layout (or none, for a plain adapter); a new one
    takes it (inject makes it a LoRASlicedLinear)."""
    unknown = sorted(set(layouts) - set(targets))
    if unknown:
        raise ValueError(f"load_adapter: {config_file}: {adapter_config.SLICES_KEY} names layers its "
                         f"target_modules do not select: {unknown[:5]}")
    if hotswap and (layouts or any(t.slices for t in targets.values())):
        raise ValueError("hotswap: per-slice layers (lora_fast.sliced) are not hot-swapped yet; load "
                         "with hotswap=False")
    out = {}
    for name, target in targets.items():
        layout = layouts.get(name)
        if layout is not None:
            try:
                layout = sliced.check_slices(*layout, target.out_features)
            except ValueError as err:
                raise ValueError(f"load_adapter: {config_file}: layer {name!r}: {err}") from None
        if has_lora_layers and layout != target.slices:
            raise ValueError(f"load_adapter: {config_file} has layer {name!r} "
                             f"{'with slices ' + str(layout) if layout else 'without slices'}, the "
                             f"model's {'has slices ' + str(target.slices) if target.slices else 'has none'}"
                             "; load it into a model without LoRA layers")
        out[name] = target._replace(slices=layout)
    return out


def _per_slice(incoming, targets, r, weights_file):
    """incoming (A, B, ...) with a per-slice layer's B_full (out, k·r) as its lora_B (Σ enabled
    out_i, r); refused if B_full has non-zero entries outside the slices' blocks."""
    out = dict(incoming)
    for name, target in targets.items():
        if target.slices:
            lora_A, lora_B, *rest = incoming[name]
            try:
                out[name] = (lora_A, sliced.blocks_from_full(lora_B, *target.slices, r), *rest)
            except ValueError as err:
                raise ValueError(f"load_adapter: {weights_file}: {PREFIX}{name}.lora_B.weight: "
                                 f"{err}") from None
    return out


def _targets(module, hparams, config_file, lora_too=False):
    """The layers inject (or add_adapter, lora_too) would give the adapter, without changing
    anything (the same selection: select_modules)."""
    try:
        names = select_modules(module, hparams["target_modules"], hparams["exclude_modules"],
                               lora_too=lora_too)
    except (TypeError, ValueError) as err:
        raise type(err)(f"load_adapter: {config_file}: {err}") from None
    targets = {}
    for name in names:
        layer = module.get_submodule(name)
        if hasattr(layer, "adapter_settings"):   # a LoRALinear: add_adapter extends it
            targets[name] = _Target.of(layer)
            continue
        if qlora.is_4bit(layer):   # its weight is the packed codes: the decoded shape and dtype
            targets[name] = _Target(*qlora.decoded_shape(layer), qlora.compute_dtype_of(layer), False)
            continue
        if isinstance(layer, nn.Embedding):
            num, dim = layer.weight.shape
            targets[name] = _Target(dim, num, layer.weight.dtype, False, embedding=True)
            continue
        conv1d = is_conv1d(layer)
        in_features, out_features = layer.weight.shape if conv1d else layer.weight.shape[::-1]
        targets[name] = _Target(out_features, in_features, layer.weight.dtype, conv1d)
    return targets


def _check_tensors_fit(targets, tensors, r, weights_file, config_file, use_dora=False, base=None):
    """One tensor per layer and part (a DoRA adapter's magnitude too), and one per trained base
    parameter (`base`: {file key: Parameter}), each of the shape the layer or parameter will have.
    Compared from the sizes alone, so that a wrong r (even 2**40) is refused before anything is
    allocated."""
    expected = {key: tuple(param.shape) for key, param in (base or {}).items()}
    for name, target in targets.items():
        rank = target.rank_factor * r   # a per-slice layer's file holds the rank-k·r adapter
        expected[_file_key(f"{name}.lora_A", target.embedding)] = (rank, target.in_features)
        expected[_file_key(f"{name}.lora_B", target.embedding)] = (target.out_features, rank)
        if use_dora:
            expected[_file_key(f"{name}.{MAGNITUDE}")] = (target.out_features,)
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing or unexpected:
        magnitudes = [key for key in missing + unexpected if key.endswith("." + MAGNITUDE)]
        hint = (f"; {config_file} says use_dora={use_dora}, and a DoRA adapter holds one {MAGNITUDE} "
                "per layer, a LoRA one none" if magnitudes else "")
        if any(not any(f".{part}" in key for part in _PARTS) for key in missing + unexpected):
            hint += (f"; besides the LoRA weights the file holds the base parameters its config's "
                     f"bias and modules_to_save select ({len(base or {})} on this model)")
        raise KeyMismatchError(f"load_adapter: {weights_file} does not fit the model's LoRA layers: "
                       f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} "
                       f"({len(unexpected)} in all){hint}")
    for key, shape in expected.items():
        found = tuple(tensors[key].shape)
        if found != shape:
            raise ValueError(f"load_adapter: {key} in {weights_file} has shape {found}, the model "
                             f"expects {shape} (r={r} in {config_file})")


def _file_modules_to_save(module, hparams, targets, config_file):
    """The config's modules_to_save, checked against `module` (each name a module, none a LoRA
    target). PEFT's classification models record both head names ("classifier", "score") whichever
    the model has: one matching nothing is dropped there, any other such name is an error."""
    specs = hparams["modules_to_save"]
    if specs and hparams["task_type"] in trained_base.HEAD_TASKS:
        specs = [s for s in specs if s not in trained_base.TASK_HEADS[hparams["task_type"]]
                 or trained_base.matching_modules(module, [s])] or None
    try:
        return trained_base.check_modules_to_save(module, specs, list(targets))
    except ValueError as err:
        raise ValueError(f"load_adapter: {config_file}: {err}") from None


def _without_wrapper_keys(tensors, saved_modules):
    """tensors without the keys of PEFT's ModulesToSaveWrapper internals, which its bias="all"
    files also hold (every key with "bias" in it): ``<m>.original_module.<p>`` (the frozen
    original, dropped) and ``<m>.modules_to_save[.<adapter>].<p>`` (the trained copy, which is
    ``<m>.<p>`` too: kept under that name if that key is missing)."""
    out = dict(tensors)
    for m in saved_modules:
        head = f"{PREFIX}{m}."
        for key in [k for k in out if k.startswith(head + "original_module.")]:
            del out[key]
        for key in [k for k in out if k.startswith(head + "modules_to_save.")]:
            rest = key[len(head + "modules_to_save."):]
            rest = rest.removeprefix("default.") if rest.startswith("default.") else rest
            value = out.pop(key)
            out.setdefault(head + rest, value)
    return out


def _base_targets(module, hparams, modules_to_save, targets, adapter_name, known, config_file):
    """{file key: Parameter} of the base parameters the file's adapter trains (bias,
    modules_to_save), after checking that this load can give them: a model holds them for one
    adapter (they are trained in place), and an existing adapter must have the file's."""
    config = {"bias": hparams["bias"], "modules_to_save": modules_to_save}
    if adapter_name in known or (known and (config["bias"] != "none" or modules_to_save)):
        record = (module.__dict__.get("lora_fast_adapters") or {}).get(adapter_name) or {}
        mine = {"bias": record.get("bias", "none"), "modules_to_save": record.get("modules_to_save")}
        if adapter_name not in known:
            raise ValueError(f"load_adapter: {config_file} trains base parameters (bias="
                             f"{config['bias']!r}, modules_to_save={modules_to_save}), which lora_fast "
                             "trains in place for one adapter per model; the model has adapters "
                             f"{known} already: load it into a model without LoRA layers")
        same = mine["bias"] == config["bias"] and \
            trained_base.matching_modules(module, mine["modules_to_save"] or ()) == \
            trained_base.matching_modules(module, modules_to_save or ())
        if not same:
            raise ValueError(f"load_adapter: {config_file} has bias={config['bias']!r}, "
                             f"modules_to_save={modules_to_save}; adapter {adapter_name!r} of the "
                             f"model has bias={mine['bias']!r}, modules_to_save="
                             f"{mine['modules_to_save']}: load it into a model without LoRA layers")
    layers = {name: module.get_submodule(name) for name in targets}
    return {PREFIX + key: param for key, param in _trained_base(module, config, layers).items()}


def _copy_base(base, tensors):
    """Copy the file's trained base parameters into the model's (their dtype; this rank's shard of
    an FSDP2 parameter)."""
    with torch.no_grad():
        for key, param in base.items():
            value = tensors[key].to(param.dtype)
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            param.copy_(value)


def _check_fan_in_fan_out(targets, hparams, config_file):
    # The tensors are (r, in) and (out, r) whatever the flag says, so a flag that disagrees with
    # the layers changes nothing here; PEFT warns and corrects it too. Said, since it hints at an
    # adapter trained on another architecture.
    kinds = {target.conv1d for target in targets.values()}
    if len(kinds) == 1 and hparams["fan_in_fan_out"] != kinds.pop():
        warnings.warn(f"load_adapter: {config_file} has fan_in_fan_out="
                      f"{hparams['fan_in_fan_out']}, but the layers it selects are "
                      f"{'not ' if hparams['fan_in_fan_out'] else ''}transformers Conv1D; the "
                      "adapter is loaded all the same (its tensors do not depend on the flag)",
                      UserWarning, stacklevel=3)


def _usable_file_dtype(targets, tensors):
    """The file's dtype, so that a round trip is exact, when every layer can run with it: the base
    weight's dtype, or float32 adapters on a float16/bfloat16 base. Otherwise None: inject's
    default (the base dtype, float32 on a half base), which holds the file's values exactly when
    they are of lower precision (a float32 file into a float64 model gets float64 adapters)."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    usable = all(dtype in adapter_dtypes(target.dtype) for target in targets.values())
    return dtype if usable else None


class _LayerState(NamedTuple):
    """What a load may change in a LoRALinear it had: which adapters, their weights, the active
    one, merged or not."""
    weights: dict
    active: str
    merged: bool


@contextlib.contextmanager
def _restored_on_error(module, layers, base_params=()):
    """On any error in the block, put `module` back as it was: its children (undoing an inject or
    the LoRA layers add_adapter made), every parameter's requires_grad, lora_fast_config and
    lora_fast_adapters, and for the LoRA layers it had (`layers`) their adapters (ones added since
    removed), every adapter's weights, the active adapter and the merged state. The copies of
    the weights cost the adapters' size once, for the block's duration; so do the values of
    `base_params` (the trained base parameters a load copies into), restored too."""
    children = [(parent, name, child) for parent in module.modules()
                for name, child in parent.named_children()]
    requires_grad = [(p, p.requires_grad) for p in module.parameters()]
    records = {key: module.__dict__.get(key) for key in ("lora_fast_config", "lora_fast_adapters")}
    saved = {name: _LayerState(
                 {adapter: tuple(p.detach().clone() for p in layer.adapter_parameters(adapter))
                  for adapter in layer.adapter_settings},
                 layer.active_adapter, layer.merged)
             for name, layer in layers.items()}
    base_values = [(p, p.detach().clone()) for p in base_params]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for param, value in base_values:
                param.copy_(value)
            for name, layer in layers.items():
                state = saved[name]
                if layer.merged:
                    layer.unmerge()
                layer.set_adapter(state.active)
                for added in [a for a in layer.adapter_settings if a not in state.weights]:
                    layer.delete_adapter(added)
                for adapter, values in state.weights.items():
                    for param, value in zip(layer.adapter_parameters(adapter), values):
                        param.copy_(value)
                if state.merged:   # merge() folds the active adapter, the one merged before
                    layer.merge()
        for parent, name, child in children:
            if getattr(parent, name) is not child:
                setattr(parent, name, child)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        for key, value in records.items():
            if value is None:
                module.__dict__.pop(key, None)
            else:
                setattr(module, key, value)
        raise


class _Incoming(NamedTuple):
    """The values load_adapter copies: adapter name, {layer name: (lora_A, lora_B)}."""
    adapter_name: str
    tensors: dict


def _copy_into(layers, incoming):
    """Copy incoming's tensors into adapter incoming.adapter_name of the layers (in the layers'
    dtype), into the same Parameters. A layer with that adapter merged is unmerged first and
    merged again after, so that its weight holds the new adapter."""
    merged = [layer for layer in layers.values() if layer.merged_adapter == incoming.adapter_name]
    for layer in merged:
        layer.unmerge()
    with torch.no_grad():
        for name, layer in layers.items():
            for param, value in zip(layer.adapter_parameters(incoming.adapter_name),
                                    incoming.tensors[name], strict=True):
                value = value.to(param.dtype)
                if hasattr(param, "device_mesh"):   # sharded by FSDP2: copy in this rank's shard
                    from torch.distributed.tensor import distribute_tensor
                    value = distribute_tensor(value.to(param.device), param.device_mesh,
                                              param.placements)
                param.copy_(value)
    for layer in merged:
        layer.merge()
