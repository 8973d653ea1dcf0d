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
# PEFT's task types (peft.TaskType), and the heads its model for each trains whole, as
# modules_to_save names (peft_model.py: classifier_module_names, qa_module_names)
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
SEQ_CLS = "SEQ_CLS"
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}
SEQ_CLS_HEADS = TASK_HEADS[SEQ_CLS]   # also what "all-linear" leaves out of a SEQ_CLS model
HEAD_TASKS = tuple(TASK_HEADS)


def check_bias(bias) -> str:
    if not (isinstance(bias, str) and bias in BIAS_MODES):
        raise ValueError(f"bias: expected one of {list(BIAS_MODES)}, got {short(bias, 80)}")
    return bias


def check_task_type(task_type) -> str | None:
    if task_type is not None and not (isinstance(task_type, str) and task_type in TASK_TYPES):
        raise ValueError(f"task_type: expected None or one of PEFT's task types {list(TASK_TYPES)}, "
                         f"got {short(task_type, 80)}")
    return task_type


def check_modules_to_save(model: nn.Module, modules_to_save, lora_names=()) -> list[str] | None:
    """modules_to_save as recorded (a list of names, or None), after checking that every name
    matches a module of `model` (PEFT's rule: the module's name ends with it), that none of the
    matches is, holds or sits inside a LoRA target (`lora_names`), and that none shares a
    parameter with a module outside it (a tied head: trained in place, the embedding would train
    with it)."""
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
    matched = matching_modules(model, names)
    for name in matched:
        clash = [t for t in lora_names if t == name or t.startswith(name + ".") or name.startswith(t + ".")]
        if clash:
            raise ValueError(f"modules_to_save: {name!r} is also a LoRA target ({clash[0]!r}); a "
                             "module is trained whole or gets an adapter, not both: exclude it "
                             "from target_modules (exclude_modules) or from modules_to_save")
    _check_untied(model, matched)
    return names


def _check_untied(model, matched):
    inside = {}
    for name in matched:
        for param in model.get_submodule(name).parameters():
            inside.setdefault(id(param), name)
    for owner, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            holder = inside.get(id(param))
            full = f"{owner}.{param_name}".lstrip(".")
            if holder is not None and not (owner == holder or owner.startswith(holder + ".")):
                raise ValueError(f"modules_to_save: {holder!r} shares a parameter with {full!r} "
                                 "(tied weights): lora_fast trains modules_to_save in place, so that "
                                 "module would train too. Untie them first (e.g. clone the weight), "
                                 "or leave the module out")


def task_heads(model: nn.Module, task_type) -> list[str]:
    """The modules_to_save names PEFT's model for `task_type` adds that match a module of `model`."""
    return [spec for spec in TASK_HEADS.get(task_type, ()) if matching_modules(model, [spec])]


def with_heads(model: nn.Module, modules_to_save, task_type):
    """modules_to_save plus the heads of `task_type` (task_heads) not in it yet, as PEFT's task
    models add them; left as given if it is not a list of names (the check then says why)."""
    if modules_to_save is not None and not (isinstance(modules_to_save, (list, tuple))
                                            and all(isinstance(n, str) for n in modules_to_save)):
        return modules_to_save
    return list(dict.fromkeys([*(modules_to_save or ()), *task_heads(model, task_type)])) or None


def matching_modules(model: nn.Module, specs) -> list[str]:
    """Names of the modules of `model` that PEFT's modules_to_save `specs` select: those whose name
    ends with one of them (PEFT's rule, a plain string suffix: "norm" selects "input_layernorm"),
    outermost match only."""
    out = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(s) for s in specs) and not any(name.startswith(o + ".") for o in out):
            out.append(name)
    return out


def inside(name: str, modules: list[str]) -> bool:
    """Whether module `name` is one of `modules` or sits inside one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def seq_cls_heads(model: nn.Module) -> list[str]:
    """The sequence-classification heads "all-linear" leaves out, as PEFT does: the model's
    attributes named classifier / score, as module names."""
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
    layer_of_bias = {id(layer.bias): name for name, layer in lora_layers.items()
                     if getattr(layer, "bias", None) is not None}   # an embedding has none
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
