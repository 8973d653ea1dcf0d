"""Adapters on disk in PEFT's format: a directory with adapter_config.json and
adapter_model.safetensors, whose keys are ``base_model.model.<module path>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r). PEFT's ``PeftModel.from_pretrained`` loads what `save_adapter`
writes, and `load_adapter` loads what PEFT's ``save_pretrained`` writes (plain LoRA; PEFT features
without a lora_fast equivalent, such as DoRA, aLoRA or per-module ranks, are refused by name).

Nothing half done: `save_adapter` writes temporaries and moves them into place (a failure leaves
the previous adapter as it was), and `load_adapter` checks the config and every tensor against
the model before it changes anything (a failure leaves the model as it was).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import adapter_config, atomic_files
from .inject import inject, lora_layers, require_lora_layers, select_modules, unwrap
from .module import adapter_dtypes, is_conv1d

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
# directory cloned from the Hugging Face Hub is a git repository. save_adapter warns about the rest.
_EXPECTED_FILES = {CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, "README.md",
                   ".git", ".gitattributes", ".gitignore"}

# safetensors metadata key: the hyper-parameters the weights were saved with (JSON). The weights
# are moved into place before the config, so a save interrupted between the two leaves new weights
# beside the old config; load_adapter compares the two and refuses a mix that disagrees.
SAVED_WITH_KEY = "lora_fast_hparams"
_SAVED_HPARAMS = ("r", "lora_alpha", "use_rslora", "lora_dropout")



# --- state dict ---------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)} — the model's own state-dict names for
    its adapter weights, detached. Weights sharded by FSDP2 (DTensor) are gathered whole: that is
    a collective, so every rank must call this.

    Args:
        model: a model with LoRALinear layers (inside DDP / torch.compile wrappers or not).
    """
    return _gathered(require_lora_layers(model, "lora_state_dict"))


def _gathered(layers):
    out = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            tensor = getattr(layer, part).detach()
            if hasattr(tensor, "full_tensor"):   # a DTensor shard (FSDP2)
                tensor = tensor.full_tensor()
            out[f"{name}.{part}"] = tensor
    return out


# --- save ---------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str | os.PathLike,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter of `model` to directory `path` in PEFT's format; returns the directory.

    The files are written to temporaries in `path` and moved into place (weights, then config):
    if anything fails, the temporaries are removed and an adapter already in `path` is left as it
    was. A stale adapter_model.bin of a previous adapter is removed once the new files are in
    place. Files in `path` that are not an adapter's are left alone, with one warning naming them.

    Args:
        model: a model with LoRALinear layers (after `inject` or `load_adapter`). Under
            torch.distributed every rank must call this (sharded weights are gathered) and rank 0
            writes.
        path: the directory, created if needed.
        base_model_name_or_path: recorded in the config; default the model's
            ``config._name_or_path`` when it has one.
    """
    from safetensors.torch import save_file

    layers = require_lora_layers(model, "save_adapter")
    config = _adapter_config(model, layers, base_model_name_or_path)
    tensors = {f"{PREFIX}{key}.weight": t.cpu().contiguous() for key, t in _gathered(layers).items()}
    path = Path(path)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() != 0:
        return path
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"path: {str(path)!r} is a file, expected a directory")
    path.mkdir(parents=True, exist_ok=True)
    _warn_foreign_files(path)
    saved_with = json.dumps({key: config[key] for key in _SAVED_HPARAMS}, sort_keys=True)
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    with atomic_files.staged(path, [WEIGHTS_NAME, CONFIG_NAME]) as (weights_tmp, config_tmp):
        save_file(tensors, str(weights_tmp), metadata={"format": "pt", SAVED_WITH_KEY: saved_with})
        config_tmp.write_text(config_text)
    _remove_stale(path / LEGACY_WEIGHTS_NAME)
    return path


def _warn_foreign_files(path):
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _EXPECTED_FILES)
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


def _adapter_config(model, layers, base_model_name_or_path):
    """adapter_config.json: only keys PEFT knows. One r/alpha/dropout/rslora for all layers (a
    PEFT config without rank_pattern cannot say more)."""
    def common(attr):
        values = {getattr(layer, attr) for layer in layers.values()}
        if len(values) != 1:
            raise ValueError(f"save_adapter: the LoRA layers differ in {attr} ({sorted(values)}); "
                             "PEFT's format stores one value for all layers")
        return values.pop()

    model = unwrap(model)
    recorded = getattr(model, "lora_fast_config", None) or {}
    if base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        base_model_name_or_path = name if isinstance(name, str) else None
    return {
        "peft_type": "LORA",
        "r": common("r"),
        "lora_alpha": common("lora_alpha"),
        "lora_dropout": common("lora_dropout"),
        "use_rslora": common("use_rslora"),
        "target_modules": recorded.get("target_modules", sorted(layers)),
        "bias": "none",
        "fan_in_fan_out": any(layer.from_conv1d for layer in layers.values()),
        "base_model_name_or_path": base_model_name_or_path,
    }


# --- load ---------------------------------------------------------------------------------------

def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load the adapter in directory `path` (written by `save_adapter` or by PEFT) into `model`;
    returns the names of the layers loaded.

    Everything is checked before the model changes: the config (plain LoRA, hyper-parameters of
    the right types), every tensor (floating point, finite, one per layer and part, the right
    shape) against the layers the config selects. Any error raises, naming the file and key, and
    leaves the model as it was. Then LoRALinear layers are injected as the config says if the
    model has none yet (the adapters in the file's dtype where the layers can run with it, else
    inject's default), and the tensors are copied in. Merged layers are unmerged, loaded and
    merged again, so forward uses the new adapter.

    Args:
        model: a model (inside DDP / torch.compile wrappers or not), with LoRALinear layers whose
            r, lora_alpha and use_rslora are the adapter's, or with none. A model already sharded
            by FSDP2 gets each rank's shard (every rank calls this).
        path: the adapter's directory (PEFT saves an adapter not named "default" in a subfolder
            of that name).
    """
    path = Path(path)
    config_file = _config_file(path)
    config = adapter_config.read(config_file)
    hparams = adapter_config.check(config, config_file)
    weights_file, tensors, metadata = _read_weights(path)
    _check_tensor_values(tensors, weights_file)
    _check_saved_with(metadata, hparams, config_file, weights_file)

    module = unwrap(model)
    layers = lora_layers(module)
    if layers:
        _check_layer_hparams(layers, hparams, config_file)
        targets = {name: _Target(layer.out_features, layer.in_features, layer.weight.dtype,
                                 layer.from_conv1d) for name, layer in layers.items()}
    else:
        targets = _targets_to_inject(module, hparams, config_file)
    _check_tensors_fit(targets, tensors, hparams["r"], weights_file, config_file)
    _check_fan_in_fan_out(targets, hparams, config_file)

    with _restored_on_error(module, layers):
        if not layers:
            inject(module, r=hparams["r"], lora_alpha=hparams["lora_alpha"],
                   target_modules=hparams["target_modules"], lora_dropout=hparams["lora_dropout"],
                   use_rslora=hparams["use_rslora"], exclude_modules=hparams["exclude_modules"],
                   adapter_dtype=_usable_file_dtype(targets, tensors))
            layers = lora_layers(module)
        _copy_into(layers, tensors)
    return list(layers)


def _config_file(path):
    if path.is_file():
        raise NotADirectoryError(f"path: {str(path)!r} is a file; pass the directory that holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not path.is_dir():
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {str(path)!r} (no such directory)")
    if not (path / CONFIG_NAME).is_file():
        nested = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
        hint = (f"; PEFT saves an adapter not named 'default' in a subfolder named after it: "
                f"{str(path)!r} has adapters in {nested}, pass one of those folders" if nested else "")
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {str(path)!r}{hint}")
    return path / CONFIG_NAME


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


def _check_layer_hparams(layers, hparams, config_file):
    for name, layer in layers.items():
        for attr in ("r", "lora_alpha", "use_rslora"):
            if getattr(layer, attr) != hparams[attr]:
                raise ValueError(f"load_adapter: layer {name!r} has {attr}={getattr(layer, attr)!r}, "
                                 f"the adapter {attr}={hparams[attr]!r} ({config_file}); inject "
                                 "with the adapter's settings or load into a model without LoRA "
                                 "layers")


class _Target(NamedTuple):
    """What load_adapter needs to know of a layer it fills: sizes, base dtype, Conv1D or not."""
    out_features: int
    in_features: int
    dtype: torch.dtype
    conv1d: bool


def _targets_to_inject(module, hparams, config_file):
    """The layers inject would replace, without replacing them (same selection: select_modules)."""
    try:
        names = select_modules(module, hparams["target_modules"], hparams["exclude_modules"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"load_adapter: {config_file}: {err}") from None
    targets = {}
    for name in names:
        layer = module.get_submodule(name)
        conv1d = is_conv1d(layer)
        in_features, out_features = layer.weight.shape if conv1d else layer.weight.shape[::-1]
        targets[name] = _Target(out_features, in_features, layer.weight.dtype, conv1d)
    return targets


def _check_tensors_fit(targets, tensors, r, weights_file, config_file):
    """One tensor per layer and part, each of the shape the layer will have. Compared from the
    sizes alone, so that a wrong r (even 2**40) is refused before anything is allocated."""
    expected = {}
    for name, target in targets.items():
        expected[f"{PREFIX}{name}.lora_A.weight"] = (r, target.in_features)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (target.out_features, r)
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing or unexpected:
        raise KeyMismatchError(f"load_adapter: {weights_file} does not fit the model's LoRA layers: "
                       f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} "
                       f"({len(unexpected)} in all)")
    for key, shape in expected.items():
        found = tuple(tensors[key].shape)
        if found != shape:
            raise ValueError(f"load_adapter: {key} in {weights_file} has shape {found}, the model "
                             f"expects {shape} (r={r} in {config_file})")


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


@contextlib.contextmanager
def _restored_on_error(module, layers):
    """On any error in the block, put `module` back as it was: its children (undoing an inject),
    every parameter's requires_grad, lora_fast_config, and the adapter weights and merged state
    of the LoRA layers it had (`layers`)."""
    children = [(parent, name, child) for parent in module.modules()
                for name, child in parent.named_children()]
    requires_grad = [(p, p.requires_grad) for p in module.parameters()]
    config = module.__dict__.get("lora_fast_config")
    saved = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.merged)
             for name, layer in layers.items()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for name, layer in layers.items():
                lora_A, lora_B, merged = saved[name]
                if layer.merged:
                    layer.unmerge()
                layer.lora_A.copy_(lora_A)
                layer.lora_B.copy_(lora_B)
                if merged:
                    layer.merge()
        for parent, name, child in children:
            if getattr(parent, name) is not child:
                setattr(parent, name, child)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        if config is None:
            module.__dict__.pop("lora_fast_config", None)
        else:
            module.lora_fast_config = config
        raise


def _copy_into(layers, tensors):
    """Copy the file's tensors into the layers (in the layers' dtype). A merged layer is unmerged
    first and merged again after, so that its weight holds the new adapter."""
    merged = [layer for layer in layers.values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                param = getattr(layer, part)
                value = tensors[f"{PREFIX}{name}.{part}.weight"].to(param.dtype)
                if hasattr(param, "device_mesh"):   # sharded by FSDP2: copy in this rank's shard
                    from torch.distributed.tensor import distribute_tensor
                    value = distribute_tensor(value.to(param.device), param.device_mesh,
                                              param.placements)
                param.copy_(value)
    for layer in merged:
        layer.merge()
