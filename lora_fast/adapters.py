"""Adapters on disk in PEFT's format: a directory with adapter_config.json and
adapter_model.safetensors, whose keys are ``base_model.model.<module path>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r). PEFT's ``PeftModel.from_pretrained`` loads what `save_adapter`
writes, and `load_adapter` loads what PEFT's ``save_pretrained`` writes (plain LoRA; PEFT features
without a lora_fast equivalent, such as DoRA or per-module ranks, are refused by name).
"""
import json
from pathlib import Path

import torch

from .inject import inject, lora_layers, require_lora_layers, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# PEFT config keys that change what the adapter computes and that lora_fast does not implement:
# loading an adapter that sets one would silently compute something else, so it is refused.
_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                "layer_replication", "lora_bias", "target_parameters", "trainable_token_indices",
                "use_qalora", "use_bdlora", "megatron_config")


def lora_state_dict(model):
    """{"<path>.lora_A": (r, in), "<path>.lora_B": (out, r)} — the model's own state-dict names for
    its adapter weights, detached. Weights sharded by FSDP2 (DTensor) are gathered whole: that is
    a collective, so every rank must call this."""
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


def save_adapter(model, path, base_model_name_or_path=None):
    """Write the adapter of `model` (after `inject` or `load_adapter`) to directory `path` in PEFT's
    format; returns the directory. Under torch.distributed every rank must call it (sharded
    weights are gathered) and rank 0 writes."""
    from safetensors.torch import save_file

    layers = require_lora_layers(model, "save_adapter")
    config = _adapter_config(model, layers, base_model_name_or_path)
    tensors = {f"{PREFIX}{key}.weight": t.cpu().contiguous() for key, t in _gathered(layers).items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() != 0:
        return Path(path)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def load_adapter(model, path):
    """Load the adapter in directory `path` (written by `save_adapter` or by PEFT) into `model`,
    injecting LoRALinear layers as its config says if the model has none yet; returns the names
    of the layers loaded. A model already sharded by FSDP2 gets each rank's shard (every rank
    calls this). Every layer must find its two tensors with the right shapes, and every
    tensor a layer: anything else raises, naming the key."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {str(path)!r}")
    config = json.loads((path / CONFIG_NAME).read_text())
    _check_config(config, path)
    tensors = _read_weights(path)

    module = unwrap(model)
    if not lora_layers(module):
        inject(module, r=config["r"], lora_alpha=config["lora_alpha"],
               target_modules=config["target_modules"],
               lora_dropout=config.get("lora_dropout", 0.0), use_rslora=config.get("use_rslora", False),
               exclude_modules=config.get("exclude_modules"),
               adapter_dtype=_saved_dtype_if_usable(module, tensors))
    layers = lora_layers(module)
    for name, layer in layers.items():
        for attr in ("r", "lora_alpha", "use_rslora"):
            if getattr(layer, attr) != config.get(attr, False):
                raise ValueError(f"load_adapter: layer {name!r} has {attr}={getattr(layer, attr)!r}, "
                                 f"the adapter {attr}={config.get(attr, False)!r}; inject with the "
                                 "adapter's settings or load into a model without LoRA layers")
    expected = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            expected[f"{PREFIX}{name}.{part}.weight"] = getattr(layer, part)
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing or unexpected:
        raise KeyError(f"load_adapter: {path / WEIGHTS_NAME} does not fit the model's LoRA layers: "
                       f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} "
                       f"({len(unexpected)} in all)")
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(f"load_adapter: {key} has shape {tuple(tensors[key].shape)}, the model "
                             f"expects {tuple(param.shape)} (r={config['r']} in the adapter)")
    with torch.no_grad():
        for key, param in expected.items():
            value = tensors[key].to(param.dtype)
            if hasattr(param, "device_mesh"):   # sharded by FSDP2: copy in this rank's shard
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            param.copy_(value)
    module.lora_fast_config = {key: config[key] for key in
                               ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                                "fan_in_fan_out") if key in config}
    return list(layers)


def _saved_dtype_if_usable(model, tensors):
    """Keep the adapter in the dtype it was saved in (so a round trip is exact) when the layers
    can run with it: float32, or the dtype of every base weight. Otherwise inject's default."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    base = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtype if dtype == torch.float32 or base == {dtype} else None


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


def _check_config(config, path):
    where = str(path / CONFIG_NAME)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) in (None, [], ""):
            raise ValueError(f"{where}: {key} is missing")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} (trained biases) is not supported; "
                         "expected 'none'")
    used = [key for key in _UNSUPPORTED if config.get(key) not in (None, False, {}, [], "")]
    if used:
        raise ValueError(f"{where}: uses PEFT features lora_fast does not implement: "
                         + ", ".join(f"{key}={config[key]!r}" for key in used))


def _read_weights(path):
    if (path / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file
        return load_file(str(path / WEIGHTS_NAME))
    if (path / LEGACY_WEIGHTS_NAME).is_file():   # PEFT with safe_serialization=False
        return torch.load(path / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"path: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {str(path)!r}")
