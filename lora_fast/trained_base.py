"""Base-model parameters an adapter trains and saves besides lora_A/lora_B, as PEFT's LoraConfig
names them: biases (``bias="all"``: every bias of the model; ``"lora_only"``: the LoRA layers'
own) and whole modules (``modules_to_save``, e.g. a classification head trained in full).

lora_fast trains them in place: the parameters themselves get requires_grad, with no second copy
of the module (PEFT keeps one, ModulesToSaveWrapper). So they keep their trained values inside
``disable_adapters`` and after ``merge_and_unload``, and one model holds them for one adapter.

In PEFT's files they are ``base_model.model.<path>.<param>``, with a LoRA layer's bias as
``<layer>.base_layer.bias`` (the name PEFT's LoRA layer gives its base linear).
"""
from __future__ import annotations

from torch import nn

from .checks import short

BIAS_MODES = ("none", "all", "lora_only")
# PEFT's task type for sequence classification, and the heads PeftModelForSequenceClassification
# trains whole (peft_model.py: classifier_module_names); "all-linear" leaves them out
SEQ_CLS = "SEQ_CLS"
SEQ_CLS_HEADS = ("classifier", "score")
HEAD_TASKS = (SEQ_CLS, "TOKEN_CLS")   # the task types whose PEFT model adds those heads


def check_bias(bias) -> str:
    if not (isinstance(bias, str) and bias in BIAS_MODES):
        raise ValueError(f"bias: expected one of {list(BIAS_MODES)}, got {short(bias, 80)}")
    return bias


def check_modules_to_save(model: nn.Module, modules_to_save, lora_names=()) -> list[str] | None:
    """modules_to_save as recorded (a list of names, or None), after checking that every name
    matches a module of `model` (exactly or as a dotted suffix, PEFT's rule) and that none of the
    matches is, holds or sits inside a LoRA target (`lora_names`)."""
    if modules_to_save is None:
        return None
    if isinstance(modules_to_save, str) or not isinstance(modules_to_save, (list, tuple)) \
            or not all(isinstance(name, str) and name for name in modules_to_save):
        raise ValueError(f"modules_to_save: expected None or a list of module names, got "
                         f"{short(modules_to_save, 80)}")
    names = list(dict.fromkeys(modules_to_save))
    for spec in names:
        if not matching_modules(model, [spec]):
            raise ValueError(f"modules_to_save: {spec!r} matches no module of {type(model).__name__}")
    for name in matching_modules(model, names):
        clash = [t for t in lora_names if t == name or t.startswith(name + ".") or name.startswith(t + ".")]
        if clash:
            raise ValueError(f"modules_to_save: {name!r} is also a LoRA target ({clash[0]!r}); a "
                             "module is trained whole or gets an adapter, not both: exclude it "
                             "from target_modules (exclude_modules) or from modules_to_save")
    return names


def with_heads(model: nn.Module, modules_to_save):
    """modules_to_save plus the classification heads of `model` (seq_cls_heads) not in it yet, as
    PEFT's classification models add them; left as given if it is not a list of names (the check
    then says why)."""
    if modules_to_save is not None and not (isinstance(modules_to_save, (list, tuple))
                                            and all(isinstance(n, str) for n in modules_to_save)):
        return modules_to_save
    return list(dict.fromkeys([*(modules_to_save or ()), *seq_cls_heads(model)])) or None


def matching_modules(model: nn.Module, specs) -> list[str]:
    """Names of the modules of `model` that PEFT's modules_to_save `specs` select: the name
    itself or a dotted suffix, outermost match only."""
    out = []
    for name, _ in model.named_modules():
        if name and any(name == s or name.endswith("." + s) for s in specs) \
                and not any(name.startswith(o + ".") for o in out):
            out.append(name)
    return out


def seq_cls_heads(model: nn.Module) -> list[str]:
    """The sequence-classification heads of `model` PEFT trains whole (its attributes named
    classifier / score), as module names."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(head)] for attr in SEQ_CLS_HEADS
            if isinstance(head := getattr(model, attr, None), nn.Module) and id(head) in names]


def trained_parameters(model: nn.Module, bias: str, modules_to_save, lora_layers) -> dict[str, nn.Parameter]:
    """{file key without PEFT's prefix: Parameter} of what an adapter trains and saves besides
    its LoRA weights: the biases `bias` selects and every parameter of the modules_to_save.

    Args:
        model: the bare model (module names as in the files).
        bias: "none", "all" (every parameter with "bias" in its name, PEFT's rule) or
            "lora_only" (the biases of the LoRA layers).
        modules_to_save: None or names (PEFT's matching, see matching_modules).
        lora_layers: {name: LoRA layer} holding the adapter.
    """
    layer_of_bias = {id(layer.bias): name for name, layer in lora_layers.items() if layer.bias is not None}
    out = {}
    for name in matching_modules(model, modules_to_save or ()):
        for param_name, param in model.get_submodule(name).named_parameters():
            out.setdefault(f"{name}.{param_name}", param)
    if bias != "none":
        taken = {id(param) for param in out.values()}
        for name, param in model.named_parameters():
            if id(param) in layer_of_bias:
                out[f"{layer_of_bias[id(param)]}.base_layer.bias"] = param
            elif bias == "all" and "bias" in name and id(param) not in taken:
                out[name] = param
    return out
