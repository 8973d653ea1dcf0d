"""The public API documents itself: every public function and method has a docstring naming each
of its parameters, and type hints on them and on what it returns (issue 14, item 24)."""
import inspect
import re

import pytest

import lora_fast
from lora_fast import dispatch, dropout, reference

SKIP_PARAMS = {"self", "cls"}


def _public_callables():
    seen = {}
    for name in lora_fast.__all__:
        obj = getattr(lora_fast, name)
        if inspect.isfunction(obj):
            seen[f"lora_fast.{name}"] = obj
        elif inspect.isclass(obj):
            # its own methods and those of lora_fast's base classes (LoRALinear's from LoRALayer)
            for cls in [c for c in obj.__mro__ if c.__module__.startswith("lora_fast")]:
                for attr, member in vars(cls).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    member = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if inspect.isfunction(member) and member.__qualname__.startswith(cls.__name__ + "."):
                        seen.setdefault(f"lora_fast.{name}.{attr}", member)
    for module, names in ((dispatch, ("forced", "choices", "failures", "clear")),
                          (dropout, ("keep_mask",)),
                          (reference, ("lora_linear_ref", "lora_linear_backward_ref"))):
        for name in names:
            seen[f"{module.__name__}.{name}"] = getattr(module, name)
    return seen


PUBLIC = _public_callables()
# the autograd Function's forward/backward are torch's protocol, documented by the class
PUBLIC = {k: v for k, v in PUBLIC.items() if not k.startswith("lora_fast.LoRALinearFunction.")}


def test_the_public_api_is_found():
    assert {"lora_fast.inject", "lora_fast.load_adapter", "lora_fast.LoRALinear.merge",
            "lora_fast.LoRALinear.from_linear", "lora_fast.lora_linear"} <= set(PUBLIC)


@pytest.mark.parametrize("qualname", sorted(PUBLIC))
def test_docstring_names_every_parameter(qualname):
    fn = PUBLIC[qualname]
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{qualname}: no docstring"
    params = [p for p in inspect.signature(fn).parameters if p not in SKIP_PARAMS]
    undocumented = [p for p in params if not re.search(rf"(?<![\w.]){re.escape(p)}(?!\w)", doc)]
    assert not undocumented, f"{qualname}: docstring does not mention {undocumented}"


@pytest.mark.parametrize("qualname", sorted(PUBLIC))
def test_type_hints_on_every_parameter_and_the_result(qualname):
    fn = PUBLIC[qualname]
    signature = inspect.signature(fn)
    missing = [name for name, p in signature.parameters.items()
               if name not in SKIP_PARAMS and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{qualname}: no type hint on {missing}"
    if fn.__name__ != "__init__":
        assert signature.return_annotation is not inspect.Signature.empty, f"{qualname}: no return type"
