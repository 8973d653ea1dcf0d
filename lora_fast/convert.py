"""LoRA checkpoints of two implementations people learn LoRA from, read into lora_fast (and
written in PEFT's format), with the scaling mapped so the same logits come out.

Formats (``format=``):

``"loralib"``
    microsoft/LoRA's ``loralib`` (``lora.Linear``), the state dict ``lora.lora_state_dict(model)``
    returns: ``<path>.lora_A`` (r, in) and ``<path>.lora_B`` (out, r), plain parameters (no
    ``.weight``), the layout lora_fast and PEFT use. Its scaling is lora_alpha / r, as lora_fast's;
    the state dict stores neither: r is read from lora_A's shape and ``lora_alpha`` (the value
    given to ``lora.Linear``) must be passed.
``"scratch"``
    "Build a Large Language Model (From Scratch)" (S. Raschka), appendix E: ``LinearWithLoRA``
    holds the base linear as ``<path>.linear`` and its ``LoRALayer`` as ``<path>.lora``, whose
    ``A`` is (in, r) and ``B`` (r, out): keys ``<path>.lora.A``, ``<path>.lora.B`` beside
    ``<path>.linear.weight`` / ``.bias``. The update is s · x @ A @ B with s = alpha in the book's
    printed code and s = alpha / rank in its repository since September 2025; the checkpoint
    cannot tell which, so both ``alpha`` and ``scaling`` ("alpha" or "alpha/rank") must be
    passed, with no default. lora_A = Aᵀ, lora_B = Bᵀ and lora_alpha = alpha·r ("alpha") or
    alpha ("alpha/rank"), so that lora_alpha / r = s.

Functions: `split` separates a checkpoint's adapter from its base model's weights (the book saves
whole models, and its classifier head's base weight exists only there); `load` puts the adapter
into a model; `to_peft` writes it as a PEFT adapter directory, which ``peft.PeftModel`` and
``lora_fast.load_adapter`` load.

`load` goes through ``lora_fast.load_adapter`` (the adapter written to a temporary directory in
PEFT's format), so it loads as load_adapter does: into a plain model the LoRA layers are injected
(exactly the checkpoint's layers, every other parameter frozen); a model with LoRA layers but no
adapter of that name gets it added (not active: set_adapter); an existing adapter gets its
weights replaced. Its layers must then hold the checkpoint's rank and scaling: a different scaling
is refused, naming both, rather than reset (inject with the lora_alpha the error names). Neither
format stores lora_dropout, a training setting: a new adapter gets 0.0, an existing one keeps its.

Refused, naming the argument or key: an unknown format, a missing or misplaced lora_alpha / alpha
/ scaling, keys that are not LoRA factors (`split` them off), a factor without its partner, layers
the model lacks or that are no linear, factors whose shapes do not fit their layer, layers of
different ranks (PEFT's format holds one r), non-finite or non-floating tensors, loralib's
``MergedLinear`` (lora_A with k·r rows for k enabled slices: its parameters are
lora_fast.LoRASlicedLinear's own, so inject with ``slices=`` and load them with load_state_dict;
this converter reads per-layer adapters only). loralib's ``lora.Embedding`` (lora_A (r, num),
lora_B (dim, r)) is read onto an nn.Embedding (a LoRAEmbedding). Everything is checked before
anything changes: a refused call leaves the model and the files as they were.

Initialisation (why learning rates tuned in one do not carry over to a new run in another; a
converted checkpoint continues training identically, same factors and scaling): lora_fast (as
PEFT) draws lora_A (r, in) kaiming-uniform with a = √5, U(±1/√in), and zeros lora_B; loralib's
``lora.Linear`` does the same. The book applies the same kaiming_uniform_ to A stored (in, r), whose
fan_in is then r: U(±1/√r), √(in/r) times wider (7× for in = 768, r = 16), and its printed
scaling alpha is r times alpha / rank.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import adapters, atomic_files, named_adapters, qlora
from .adapters import KeyMismatchError
from .inject import lora_layers, unwrap
from .module import DEFAULT_ADAPTER, AdapterSettings, check_adapter_name, is_conv1d

FORMATS = ("loralib", "scratch")
SCALINGS = ("alpha", "alpha/rank")   # the scratch format's two conventions
# each format's key suffixes of the A and B factors
_SUFFIXES = {"loralib": (".lora_A", ".lora_B"), "scratch": (".lora.A", ".lora.B")}


class _Factors(NamedTuple):
    """One layer's adapter: its keys in the checkpoint, and lora_A (r, in), lora_B (out, r)."""
    keys: tuple
    lora_A: torch.Tensor
    lora_B: torch.Tensor


# --- public -------------------------------------------------------------------------------------

def split(state_dict: Mapping[str, torch.Tensor], format: str) -> tuple[dict, dict]:
    """(adapter, base) of a checkpoint: its LoRA factors as they are (what `load` and `to_peft`
    take), and every other entry under the name the plain model has (for ``model.load_state_dict``).

    "scratch": ``<path>.linear.weight`` / ``.bias`` of each LinearWithLoRA become ``<path>.weight``
    / ``.bias`` (other modules named "linear" keep their names). "loralib": names unchanged, so a
    ``lora_state_dict(model, bias="all")``'s trained biases go to base. A loralib state dict saved
    from a model in eval mode with ``merge_weights=True`` (its default) holds merged weights
    W0 + s·B·A: loading those and the adapter counts it twice, so take the base weights from the
    pretrained checkpoint then.

    Args:
        state_dict: the checkpoint, a mapping of str keys to tensors (tensors are not copied).
        format: "loralib" or "scratch".
    """
    _check_format(format)
    _check_state_dict(state_dict)
    suffixes = _SUFFIXES[format]
    adapter = {key: value for key, value in state_dict.items() if key.endswith(suffixes)}
    paths = {_layer_path(key, suffixes) for key in adapter}
    base = {}
    for key, value in state_dict.items():
        if key in adapter:
            continue
        prefix, sep, rest = key.rpartition(".linear.")
        if format == "scratch" and sep and prefix in paths and "." not in rest:
            key = f"{prefix}.{rest}"   # LinearWithLoRA's base linear is the plain model's layer itself
        base[key] = value
    return adapter, base


def load(model: nn.Module, state_dict: Mapping[str, torch.Tensor], format: str, *,
         lora_alpha: float | None = None, alpha: float | None = None, scaling: str | None = None,
         adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Load a loralib or "LLMs from scratch" adapter into `model` as adapter `adapter_name`;
    returns the names of the layers loaded (see the module docstring for where it goes).

    Args:
        model: the base model (plain, or with LoRA layers from lora_fast.inject; inside DDP /
            torch.compile wrappers or not), its layers named as in the checkpoint's model.
        state_dict: the adapter's factors only (`split` separates a whole checkpoint's).
        format: "loralib" or "scratch".
        lora_alpha: format "loralib": the lora_alpha given to lora.Linear (required).
        alpha: format "scratch": the alpha given to replace_linear_with_lora (required).
        scaling: format "scratch": "alpha" (the book's printed LoRALayer, s = alpha) or
            "alpha/rank" (its repository since September 2025) (required).
        adapter_name: the adapter's name in the model. If the model has it, its layers must be
            exactly the checkpoint's, with its rank and scaling (lora_alpha / r, or / √r with
            use_rslora, equal up to rounding).
    """
    check_adapter_name(adapter_name)
    module = _module(model)
    tensors, config = _plan(module, state_dict, format, lora_alpha, alpha, scaling, adapter_name)
    with tempfile.TemporaryDirectory(prefix="lora_fast_convert_") as folder:
        _write(Path(folder), tensors, config)
        return adapters.load_adapter(model, folder, adapter_name=adapter_name)


def to_peft(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
            format: str, *, lora_alpha: float | None = None, alpha: float | None = None,
            scaling: str | None = None) -> Path:
    """Write a loralib or "LLMs from scratch" adapter to directory `path` in PEFT's format
    (adapter_config.json and adapter_model.safetensors); returns the directory. The checkpoint is
    checked against `model` first, which is not changed: the layers must exist and fit, and
    decide fan_in_fan_out (transformers Conv1D). The config's target_modules is a regular
    expression naming exactly the checkpoint's layers (a list of names would also match as dotted
    suffixes), its r the checkpoint's and its lora_alpha the one giving its scaling. The files are
    written to temporaries and moved into place only once both are written: a failure leaves
    `path` as it was.

    Args:
        model: the base model the adapter belongs to (plain or with LoRA layers).
        state_dict, format, lora_alpha, alpha, scaling: as for `load`.
        path: the directory, created if needed.
    """
    module = _module(model)
    tensors, config = _plan(module, state_dict, format, lora_alpha, alpha, scaling, None)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"path: {str(path)!r} is a file, expected a directory")
    _write(path, tensors, config)
    return path


# --- arguments and checkpoint -------------------------------------------------------------------

def _module(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return unwrap(model)


def _check_format(format):
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")


def _check_scaling_args(format, lora_alpha, alpha, scaling):
    """The alpha given (lora_alpha or alpha, a plain int or float), once each format's own
    arguments are there and none of the other's (a value passed under the other format's name
    would be a silent misreading)."""
    _check_format(format)
    if format == "loralib":
        if alpha is not None or scaling is not None:
            raise ValueError("alpha, scaling: arguments of format='scratch'; a loralib checkpoint "
                             "takes lora_alpha (the value given to lora.Linear)")
        if lora_alpha is None:
            raise ValueError("lora_alpha: required for format='loralib': the lora_alpha given to "
                             "lora.Linear (loralib's state dict does not store it)")
        return _check_positive("lora_alpha", lora_alpha)
    if lora_alpha is not None:
        raise ValueError("lora_alpha: an argument of format='loralib'; a scratch checkpoint takes "
                         "alpha (the one given to replace_linear_with_lora) and scaling")
    if alpha is None:
        raise ValueError("alpha: required for format='scratch': the alpha given to "
                         "replace_linear_with_lora (the checkpoint does not store it)")
    alpha = _check_positive("alpha", alpha)
    if not isinstance(scaling, str) or scaling not in SCALINGS:
        raise ValueError(
            f"scaling: required for format='scratch', one of {SCALINGS}: 'alpha' for the book's "
            "printed LoRALayer (alpha * (x @ A @ B)), 'alpha/rank' for its repository's since "
            f"September 2025 ((alpha / rank) * (x @ A @ B)); got {scaling!r}")
    return alpha


def _check_positive(arg, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{arg}: expected a positive finite number, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)   # JSON can hold it


def _check_state_dict(state_dict):
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of str keys to tensors (a state_dict()), "
                        f"got {type(state_dict).__name__}")
    odd = [f"{key!r} ({type(value).__name__})" for key, value in state_dict.items()
           if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
    if odd:
        raise TypeError(f"state_dict: expected str keys and tensor values; not so for "
                        f"{', '.join(odd[:5])} ({len(odd)} in all)")


def _layer_path(key, suffixes):
    return next(key[:-len(s)] for s in suffixes if key.endswith(s))


def _factors(state_dict, format):
    """{layer path: _Factors} of a checkpoint holding LoRA factors only, each checked on its own
    (floating, finite, 2-D, the two of one rank)."""
    _check_state_dict(state_dict)
    suffixes = _SUFFIXES[format]
    other = [key for key in state_dict if not key.endswith(suffixes)]
    if other:
        bias = "; loralib's trained biases (bias='all'/'lora_only') are the base model's" \
            if format == "loralib" else ""
        raise KeyMismatchError(
            f"state_dict: {len(other)} keys are not {format} LoRA factors (<path>{suffixes[0]}, "
            f"<path>{suffixes[1]}), e.g. {other[:5]}: convert.split(state_dict, {format!r}) "
            f"separates the base model's weights (load those with model.load_state_dict){bias}")
    if not state_dict:
        raise ValueError(f"state_dict: holds no {format} LoRA factors (it is empty)")
    paths = sorted({_layer_path(key, suffixes) for key in state_dict})
    lone = [f"{path}{mine} without {path}{partner}" for path in paths
            for mine, partner in (suffixes, suffixes[::-1])
            if path + mine in state_dict and path + partner not in state_dict]
    if lone:
        raise KeyMismatchError(f"state_dict: LoRA factors without their partner: {lone[:5]} "
                               f"({len(lone)} in all)")
    out = {}
    for path in paths:
        keys = tuple(path + s for s in suffixes)
        for key in keys:
            _check_tensor(key, state_dict[key])
        a, b = (state_dict[key] for key in keys)
        if format == "loralib":
            if a.shape[0] != b.shape[1]:
                raise ValueError(_merged_linear_message(keys, a, b))
            out[path] = _Factors(keys, a, b)
        else:
            if a.shape[1] != b.shape[0]:
                raise ValueError(f"state_dict: {keys[0]} {tuple(a.shape)} and {keys[1]} "
                                 f"{tuple(b.shape)}: expected A (in, rank) and B (rank, out) of one rank")
            out[path] = _Factors(keys, a.t(), b.t())
    return out


def _check_tensor(key, tensor):
    if not tensor.is_floating_point():
        raise ValueError(f"state_dict: {key} has dtype {tensor.dtype}, expected a floating dtype")
    if tensor.dim() != 2 or tensor.numel() == 0:
        raise ValueError(f"state_dict: {key} has shape {tuple(tensor.shape)}, expected a non-empty "
                         "matrix")
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(f"state_dict: {key} holds {bad} non-finite values (inf or NaN) of "
                         f"{tensor.numel()}")


def _merged_linear_message(keys, a, b):
    rows, r = a.shape[0], b.shape[1]
    slices = f" ({rows // r} enabled slices of rank {r})" if rows % r == 0 and rows > r else ""
    return (f"state_dict: {keys[0]} has {rows} rows but {keys[1]} {r} columns{slices}: the layout "
            "of loralib's MergedLinear (enable_lora), whose slices each have their own LoRA, which "
            "this converter does not read (no per-slice LoRA in its formats): its parameters are "
            "LoRASlicedLinear's own, so inject(model, ..., slices={name: (sizes, enable)}) and "
            "load them with model.load_state_dict(..., strict=False)")


# --- against the model --------------------------------------------------------------------------

def _plan(module, state_dict, format, lora_alpha, alpha, scaling, adapter_name):
    """({PEFT key: tensor}, adapter_config) of the checkpoint, checked against `module` (and
    against its adapter `adapter_name` when it has one; None: not compared)."""
    given = _check_scaling_args(format, lora_alpha, alpha, scaling)
    factors = _factors(state_dict, format)
    r = _common_rank(factors)
    conv1d, embeddings = _check_fits(module, factors, format)
    # lora_alpha / r is lora_fast's scaling: the checkpoint's s for this r
    settings = AdapterSettings(r, given * r if scaling == "alpha" else given, 0.0, False)
    if adapter_name is not None and lora_layers(module) \
            and adapter_name in named_adapters.adapter_names(module):
        settings = _existing_settings(module, factors, adapter_name, settings,
                                      _scaling_source(format, lora_alpha, alpha, scaling, r))
    return _peft_files(module, factors, settings, conv1d, embeddings)


def _common_rank(factors):
    ranks = {path: f.lora_A.shape[0] for path, f in factors.items()}
    if len(set(ranks.values())) != 1:
        sample = ", ".join(f"{path!r}: {r}" for path, r in list(ranks.items())[:4])
        raise ValueError(f"state_dict: its layers have different ranks ({sample}; {len(ranks)} "
                         "layers); PEFT's format (and load_adapter) holds one r for an adapter: "
                         "convert the layers of each rank separately, under different adapter names")
    return next(iter(ranks.values()))


def _peft_files(module, factors, settings, conv1d, embeddings=()):
    """({key: tensor} of adapter_model.safetensors, adapter_config.json's dict); `embeddings`: the
    paths that are embeddings (PEFT's lora_embedding_A / _B keys)."""
    tensors = {}
    for path, f in factors.items():
        # copies, contiguous (the scratch factors are transposed views), never the caller's storage
        for part, tensor in (("lora_A", f.lora_A), ("lora_B", f.lora_B)):
            key = adapters._file_key(f"{path}.{part}", path in embeddings)
            tensors[key] = tensor.detach().to(
                "cpu", copy=True, memory_format=torch.contiguous_format)
    name = getattr(getattr(module, "config", None), "_name_or_path", None)
    config = {
        "peft_type": "LORA", "r": settings.r, "lora_alpha": settings.lora_alpha,
        "lora_dropout": 0.0, "use_rslora": settings.use_rslora, "use_dora": False, "bias": "none",
        # exactly these layers: a list of names would match as dotted suffixes too (PEFT's rule)
        "target_modules": "|".join(re.escape(path) for path in factors),
        "fan_in_fan_out": conv1d,
        "base_model_name_or_path": name if isinstance(name, str) and name else None,
    }
    return tensors, config


def _check_fits(module, factors, format):
    """Every layer the checkpoint names is a linear of `module` (or, for loralib, an nn.Embedding)
    whose sizes fit its factors; returns (whether the linears are transformers Conv1D, PEFT's
    fan_in_fan_out; the embeddings' paths)."""
    modules = dict(module.named_modules())
    unknown = [f.keys[0] for path, f in factors.items() if not path or path not in modules]
    if unknown:
        linears = [name for name, m in modules.items() if _linear_shape(m) is not None]
        raise KeyMismatchError(
            f"state_dict: keys name layers {type(module).__name__} does not have: {unknown[:5]} "
            f"({len(unknown)} in all); its linear layers are named e.g. {linears[:10]}")
    conv1d, embeddings = set(), set()
    for path, f in factors.items():
        layer = modules[path]
        if isinstance(layer, nn.Embedding) and format == "loralib":   # lora.Embedding: A (r, num), B (dim, r)
            embeddings.add(path)
            shape = tuple(layer.weight.shape[::-1])
            if tuple(f.lora_A.shape) != (f.lora_A.shape[0], shape[1]) or \
                    tuple(f.lora_B.shape) != (shape[0], f.lora_A.shape[0]):
                raise ValueError(_misfit_message(format, path, f, shape))
            continue
        shape = _linear_shape(layer)
        if shape is None:
            raise ValueError(f"state_dict: {f.keys[0]} is for {path!r}, a {type(layer).__name__}, "
                             "expected a linear layer (nn.Linear, transformers Conv1D, 4-bit linear)")
        (out_features, in_features), r = shape, f.lora_A.shape[0]
        if tuple(f.lora_A.shape) != (r, in_features) or tuple(f.lora_B.shape) != (out_features, r):
            raise ValueError(_misfit_message(format, path, f, shape))
        conv1d.add(is_conv1d(layer) or getattr(layer, "from_conv1d", False))
    return conv1d == {True}, embeddings


def _linear_shape(layer):
    """(out, in) of a layer lora_fast puts LoRA on, else None."""
    if isinstance(layer, nn.Linear):   # a LoRALinear too
        return layer.out_features, layer.in_features
    if is_conv1d(layer):   # weight (in, out)
        return tuple(layer.weight.shape[::-1])
    if qlora.is_4bit(layer):
        return qlora.decoded_shape(layer)
    return None


def _misfit_message(format, path, f, shape):
    out_features, in_features = shape
    r = f.lora_A.shape[0]
    a, b = (tuple(f.lora_A.shape), tuple(f.lora_B.shape)) if format == "loralib" \
        else (tuple(f.lora_A.shape[::-1]), tuple(f.lora_B.shape[::-1]))
    want = ((r, in_features), (out_features, r)) if format == "loralib" \
        else ((in_features, r), (r, out_features))
    slices = out_features // f.lora_B.shape[0]
    hint = (f"; lora_B covers 1/{slices} of the outputs, as a loralib MergedLinear with one "
            "enabled slice does: inject it with slices= (LoRASlicedLinear) and load_state_dict it"
            if format == "loralib" and f.lora_B.shape[0] < out_features
            and out_features % f.lora_B.shape[0] == 0 and f.lora_A.shape[1] == in_features else "")
    return (f"state_dict: {f.keys[0]} {a} and {f.keys[1]} {b} do not fit layer {path!r} "
            f"({in_features} in, {out_features} out): expected {want[0]} and {want[1]}{hint}")


def _scaling_source(format, lora_alpha, alpha, scaling, r):
    if format == "loralib":
        return f"lora_alpha={lora_alpha} / r={r}"
    return f"alpha={alpha}" if scaling == "alpha" else f"alpha={alpha} / rank={r}"


def _existing_settings(module, factors, adapter_name, settings, source):
    """The settings of the model's adapter `adapter_name` (what the config must then say, for
    load_adapter), once it is shown to be on exactly the checkpoint's layers with its rank and
    scaling (equal up to rounding: alpha·r / r may differ from alpha in the last bit)."""
    holders = named_adapters.adapter_layers(module, adapter_name)
    missing, extra = sorted(set(holders) - set(factors)), sorted(set(factors) - set(holders))
    if missing or extra:
        raise KeyMismatchError(
            f"state_dict: adapter {adapter_name!r} of the model is on other layers than the "
            f"checkpoint: {len(missing)} of its layers have no factors {missing[:5]}, "
            f"{len(extra)} layers have factors but not the adapter {extra[:5]}; inject with the "
            "checkpoint's layers, or load under another adapter_name")
    mine = {name: layer.adapter_settings[adapter_name] for name, layer in holders.items()}
    for name, theirs in mine.items():
        if theirs.use_dora:
            raise ValueError(f"adapter_name: adapter {adapter_name!r} is a DoRA adapter (layer "
                             f"{name!r}); the checkpoint is plain LoRA: load it under another "
                             "adapter_name")
        if theirs.r != settings.r:
            raise ValueError(f"state_dict: the checkpoint's rank is {settings.r}, adapter "
                             f"{adapter_name!r} of the model has r={theirs.r} (layer {name!r}); "
                             f"inject with r={settings.r}")
        if not math.isclose(theirs.scaling, settings.scaling, rel_tol=1e-12):
            rule = f"lora_alpha={theirs.lora_alpha} / {'√' if theirs.use_rslora else ''}r={theirs.r}"
            raise ValueError(
                f"lora_alpha: the checkpoint's scaling is {settings.scaling:g} ({source}), adapter "
                f"{adapter_name!r} of the model has {theirs.scaling:g} ({rule}, layer {name!r}); "
                f"inject with lora_alpha={settings.lora_alpha:g} (r={settings.r}), or load into "
                "the plain model (load injects the LoRA layers with the checkpoint's scaling)")
    return next(iter(mine.values()))


# --- files --------------------------------------------------------------------------------------

def _write(path, tensors, config):
    """adapter_model.safetensors and adapter_config.json into `path`, both or neither."""
    from safetensors.torch import save_file
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_files.staged(path, [adapters.WEIGHTS_NAME, adapters.CONFIG_NAME]) as (
                weights_tmp, config_tmp):
            save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
            config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except BaseException:
        if created:   # only the folder this call made, and only if still empty
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
