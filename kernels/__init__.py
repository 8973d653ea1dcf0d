"""Triton kernels of lora_fast, installed as ``lora_fast.kernels`` (never as a top-level ``kernels``).

One file per pass, each holding its kernel's grid and program mapping and its launcher:
forward.py (fused forward GEMM), backward.py (fused dX/dA/dB GEMM), skinny.py (the x @ Aᵀ / dY @ B
first pass of the split path), forward_tma.py and backward_tma.py (the split path's GEMMs with a
TMA, persistent main loop, for Hopper), splitk.py (the split-K decode forward); at rank 0 each is
the base linear alone (a 4-bit linear without an adapter: dispatch.base_forward). They are built
from blocks.py (the shared K-loop, the NF4 tile decode, epilogues and dropout mask); launch.py holds what every
launcher does before a launch; configs.py every block size, autotune list and register limit;
dropout.py the mask as a tensor, for tests and the torch path. lora_fast.dispatch chooses the path
(its table names each path's launcher), and the launchers do what they are told.
"""
if __name__ == "kernels":
    # Imported as a top-level "kernels": the repository root is on sys.path (`python -m ...` from a
    # checkout) and something imported the unrelated PyPI package of that name — transformers does,
    # for Hugging Face's hub kernels (a dependency since transformers 5.25). If that package is
    # installed, it is loaded in this module's place (the import returns sys.modules' entry);
    # otherwise look like the empty namespace package a probe treats as absent (no __file__, no
    # version) and load nothing.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
    else:
        __file__ = None
else:
    from .backward import lora_backward
    from .forward import lora_forward
    from .forward_tma import lora_forward_tma
    from .launch import tma_eligible
    from .splitk import lora_forward_split_k

    __all__ = ["lora_forward", "lora_backward", "lora_forward_split_k", "lora_forward_tma", "tma_eligible"]
