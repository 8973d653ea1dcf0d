"""The benchmarks, run from the repository root (``python -m bench.<name>``).

That puts the root on sys.path, where the Triton sources' folder ``kernels/`` (installed as
``lora_fast.kernels``) would shadow the Hugging Face hub's ``kernels`` package, which transformers
(5.25 on) imports: so the installed one, if any, is imported here first, from sys.path without
the root, and every later ``import kernels`` gets it from sys.modules."""
import importlib
import os
import sys
from pathlib import Path


def _import_installed_kernels():
    root = Path(__file__).resolve().parents[1]
    if "kernels" in sys.modules:
        return
    shadowing = [p for p in sys.path if Path(p or os.getcwd()).resolve() == root]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in shadowing]
    try:
        importlib.import_module("kernels")
    except Exception:   # not installed (or broken): nothing to protect
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_import_installed_kernels()
