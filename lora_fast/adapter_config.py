"""adapter_config.json as load_adapter reads it: a JSON object whose every key is classified
(checked here, harmless, or a PEFT feature lora_fast does not implement and so refuses unless off),
with hyper-parameters of the right types. Every error names the file and the key."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

from .checks import short
from .inject import _check_targets
from .sliced import check_slices, equivalent_alpha
from .trained_base import BIAS_MODES

# lora_fast's own key: the slices of per-slice layers (lora_fast.sliced), saved as rank-k·r adapters
# under PEFT's rank_pattern / alpha_pattern
SLICES_KEY = "lora_fast_slices"

# --- how load_adapter treats each LoraConfig field ---------------------------------------------
# Checked by load_adapter itself (_config_hparams, _check_init, fan_in_fan_out; modules_to_save
# against the model).
_CHECKED_FIELDS = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
                   "exclude_modules", "bias", "fan_in_fan_out", "init_lora_weights", "use_dora",
                   "modules_to_save", SLICES_KEY}
# Do not change what a trained adapter computes, whatever their value.
_HARMLESS_FIELDS = {
    "task_type",             # which heads PEFT trains whole: read, and checked via modules_to_save
    "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode",        # bookkeeping: which model and class to load, PEFT's version
    "megatron_core",         # the name of megatron's module; megatron_config is what matters
    "qalora_group_size",     # read only with use_qalora (refused)
    # initialisation settings, read only when init_lora_weights names them (_check_init); the
    # file holds the trained A and B
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "runtime_config",        # runtime placement (ephemeral GPU offload); PEFT does not save it
}
# Change what the adapter computes (or what a continued training would train) and are not
# implemented: refused unless off (None/False/{}/[]).
_REFUSED_FIELDS = {
    "alora_invocation_tokens": "aLoRA (the adapter acts only from its invocation tokens on)",
    "arrow_config": "Arrow (per-token routing among adapters)",
    "velora_config": "VeLoRA (a LoRA variant with a backward of its own)",
    "monteclora_config": "MonteCLoRA (Monte Carlo sampling on the adapters)",
    "kasa_config": "KaSA (a learned diagonal between A and B, and a truncated base weight)",
    "use_bdlora": "BD-LoRA (block-diagonal A or B)",
    "use_qalora": "QA-LoRA (the adapter reads pooled inputs)",
    "layer_replication": "layer replication (the model's layers are repeated)",
    "trainable_token_indices": "trainable tokens (embedding rows trained and saved)",
    "target_parameters": "LoRA on nn.Parameter targets (e.g. MoE experts)",
    "megatron_config": "Megatron's parallel linear layers",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "layers selected by index",
    "layers_pattern": "layers selected by index",
    "lora_bias": "a trained bias on lora_B",
    "ensure_weight_tying": "adapters tied across tied layers",
}
CLASSIFIED_FIELDS = _CHECKED_FIELDS | _HARMLESS_FIELDS | set(_REFUSED_FIELDS)
# PEFT's LoRA variants lora_fast implements (checked, not refused): DoRA (lora_fast.dora)
IMPLEMENTED_VARIANTS = {"use_dora"}

# init_lora_weights only says how A and B started, except for the inits that also rewrite the base
# weight: for those PEFT's from_pretrained recomputes the initial A0, B0 from the base weight and
# subtracts s·B0·A0 from it before loading, which lora_fast does not do.
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal", "lora_ga"}
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_VARIANT_INITS = {"mica": "MiCA (lora_B frozen in training)"}


def read(config_file):
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err}); expected PEFT's adapter config, "
                         "a JSON object") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object (PEFT's adapter config), got "
                         f"{type(config).__name__} {short(config, 80)}")
    return config


def check(config, config_file):
    """The hyper-parameters (checked, plain Python values), or a ValueError naming the file and
    the key: not LoRA, a PEFT feature lora_fast does not implement, an unknown key, a bad value."""
    where = str(config_file)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    _check_init(config.get("init_lora_weights", True), where)
    hparams = _config_hparams(config, where)
    hparams["slices"] = _slices(config, hparams, where)
    # without lora_fast_slices (a sliced adapter PEFT saved again drops the key), the patterns are
    # kept for load_adapter, which takes them only if the model's layers are sliced as they say
    patterns = {key: config.get(key) for key in ("rank_pattern", "alpha_pattern")}
    hparams["patterns"] = patterns if not hparams["slices"] and \
        any(not _is_off(v) for v in patterns.values()) else None
    explained = {"rank_pattern", "alpha_pattern"} if hparams["slices"] or hparams["patterns"] else set()
    used = [f"{key}={short(config[key], 80)} ({why})" for key, why in _REFUSED_FIELDS.items()
            if key in config and not _is_off(config[key]) and key not in explained]
    if used:
        raise ValueError(f"{where}: uses PEFT features lora_fast does not implement: "
                         + "; ".join(used))
    _check_unclassified(config, where)
    return hparams


def _slices(config, hparams, where):
    """{layer name: (sizes, enable)} of lora_fast_slices ({} without), checked, and checked to be
    what rank_pattern and alpha_pattern say (each layer as the rank-k·r adapter it computes): then,
    and only then, those two PEFT keys are taken."""
    entries = config.get(SLICES_KEY)
    if _is_off(entries):
        return {}
    if not isinstance(entries, dict):
        raise ValueError(f"{where}: {SLICES_KEY}={short(entries, 80)}, expected an object "
                         '{layer name: {"slices": [...], "enable": [...]}}')
    out = {}
    for name, entry in entries.items():
        if not (isinstance(entry, dict) and set(entry) == {"slices", "enable"}):
            raise ValueError(f"{where}: {SLICES_KEY}[{name!r}]={short(entry, 80)}, expected "
                             '{"slices": [...], "enable": [...]}')
        try:
            out[name] = check_slices(entry["slices"], entry["enable"])
        except ValueError as err:
            raise ValueError(f"{where}: {SLICES_KEY}[{name!r}]: {err}") from None
    try:
        check_patterns(out, hparams, config.get("rank_pattern"), config.get("alpha_pattern"), f"its {SLICES_KEY}")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return out


def check_patterns(layouts, hparams, rank_pattern, alpha_pattern, what):
    """Raise unless rank_pattern and alpha_pattern are exactly those of the per-slice layers
    `layouts` ({name: (slices, enable)}: each as one rank-k·r adapter, keyed by its escaped name);
    `what` says whose layouts they are."""
    r, alpha = hparams["r"], hparams["lora_alpha"]
    ranks = {re.escape(n): sum(enable) * r for n, (_, enable) in layouts.items()}
    alphas = {re.escape(n): equivalent_alpha(alpha, sum(enable), hparams["use_rslora"])
              for n, (_, enable) in layouts.items()}
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    if not layouts or rank_pattern != ranks or set(alpha_pattern) != set(alphas) or not all(
            isinstance(alpha_pattern[k], (int, float)) and math.isclose(alpha_pattern[k], v, rel_tol=1e-9)
            for k, v in alphas.items()):
        raise ValueError(f"rank_pattern={short(rank_pattern, 80)} and alpha_pattern="
                         f"{short(alpha_pattern, 80)} are not those of {what} (each per-slice layer "
                         f"as one rank-k·r adapter: rank_pattern {short(ranks, 80)}); per-module ranks "
                         "are not available otherwise. An adapter of lora_fast's per-slice layers "
                         "saved again by PEFT has lost its lora_fast_slices: load it into a model that "
                         "has those layers (inject(..., slices=...) first)")


def _check_init(init, where):
    if init is None or (isinstance(init, (bool, str)) and init in _PLAIN_INITS):   # not 1 for True
        return
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights={init!r}: PEFT recomputes this initialisation from the base "
            "weight when it loads the adapter and subtracts it from the base weight, which lora_fast "
            "does not do. Convert the adapter to plain LoRA (PEFT's save_pretrained with "
            "path_initial_model_for_weight_conversion), or set init_lora_weights to true if the "
            "model you load it into already holds the modified base weights")
    if isinstance(init, str) and init.lower() in _VARIANT_INITS:
        raise ValueError(f"{where}: init_lora_weights={init!r} is the LoRA variant "
                         f"{_VARIANT_INITS[init.lower()]}, which lora_fast does not implement")
    raise ValueError(f"{where}: init_lora_weights={init!r} is not an initialisation lora_fast "
                     f"knows; expected one of {sorted(map(str, _PLAIN_INITS))}")


def _check_unclassified(config, where):
    """Keys outside lora_fast's classification, refused by name (PEFT only warns): lora_fast cannot
    know what they compute. A field of the installed PEFT's LoraConfig added since is taken when
    off or at its default (PEFT writes every field); a key that is no field of it is refused
    whatever its value. Without peft installed, keys at an off value are taken."""
    unclassified = [key for key in config if key not in CLASSIFIED_FIELDS]
    if not unclassified:
        return
    fields = _installed_peft_fields()
    refused = []
    for key in unclassified:
        value = config[key]
        if key in fields:
            default, variant = fields[key]
            if not (_is_off(value) or value == default):
                refused.append(f"{key}={short(value, 80)} (a PEFT LoraConfig field lora_fast does not "
                               f"know{', a LoRA variant' if variant else ''})")
        elif fields:   # not a field of the installed PEFT's LoraConfig: refused, whatever its value
            refused.append(f"{key}={short(value, 80)} (not a field of the installed peft's LoraConfig: a "
                           "typo, another method's config, or a newer peft's field; upgrade peft or "
                           "remove the key)")
        elif not _is_off(value):   # without peft, a newer field at its default cannot be told apart
            refused.append(f"{key}={short(value, 80)} (not a LoraConfig field lora_fast knows; peft is "
                           "not installed)")
    if refused:
        raise ValueError(f"{where}: keys lora_fast does not implement: " + "; ".join(refused))


@functools.lru_cache(maxsize=1)
def _installed_peft_fields():
    """{field: (default as JSON would hold it, marked as a LoRA variant)} of the installed PEFT's
    LoraConfig, or {} without PEFT."""
    try:
        from peft import LoraConfig
    except Exception:   # not installed, or broken: the hard-coded classification decides alone
        return {}
    out = {}
    for field in dataclasses.fields(LoraConfig):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        out[field.name] = (default, bool(field.metadata.get("is_lora_variant")))
    return out


def _is_off(value):
    # how PEFT writes a feature that is not used; `is False` so that 0 is not taken for False
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _config_hparams(config, where):
    def bad(key, expected):
        return ValueError(f"{where}: {key}={short(config.get(key), 80)}, expected {expected}")

    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) in (None, [], ""):
            raise ValueError(f"{where}: {key} is missing")
    r = config["r"]
    if type(r) is not int or r <= 0:   # PEFT writes an int; 8.0 or true is not a rank
        raise bad("r", "a positive JSON integer")
    alpha = config["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not (math.isfinite(alpha) and alpha > 0):
        raise bad("lora_alpha", "a positive finite number")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise bad("lora_dropout", "a probability in [0, 1)")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):   # "no" would be truthy
        raise bad("use_rslora", "true or false")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise bad("use_dora", "true or false")
    bias = config.get("bias", "none")
    if bias not in BIAS_MODES:
        raise bad("bias", f"one of {list(BIAS_MODES)}")
    modules_to_save = config.get("modules_to_save")
    if modules_to_save is not None and not (
            isinstance(modules_to_save, list) and all(isinstance(m, str) and m for m in modules_to_save)):
        raise bad("modules_to_save", "null or a list of module names")
    task_type = config.get("task_type")
    if task_type is not None and not isinstance(task_type, str):
        raise bad("task_type", "null or a string (PEFT's task type)")
    fan_in_fan_out = config.get("fan_in_fan_out", False)
    if not isinstance(fan_in_fan_out, bool):
        raise bad("fan_in_fan_out", "true or false")
    for key, allow_none in (("target_modules", False), ("exclude_modules", True)):
        try:
            _check_targets(key, config.get(key), allow_none=allow_none)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "use_rslora": rslora,
            "use_dora": use_dora, "fan_in_fan_out": fan_in_fan_out, "target_modules": config["target_modules"],
            "exclude_modules": config.get("exclude_modules"), "bias": bias,
            "modules_to_save": modules_to_save or None, "task_type": task_type or None}
