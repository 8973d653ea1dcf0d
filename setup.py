"""Packaging.

- The Triton kernels live in kernels/ at the top of the repository but are installed as
  lora_fast.kernels (a top-level `kernels` module belongs to another PyPI package), in normal and
  editable installs alike.
- csrc/lora_ref.cpp builds the C++ reference `lora_fast._cref` with pybind11 (no libtorch, so one
  build serves any torch). Set LORA_FAST_BUILD_EXT=0 to install without it (no compiler, no
  pybind11); it is also left out, with a warning, when pybind11 is missing or the compile fails.
  Either way `python -m lora_fast.check` reports the C++ reference as missing and why.
"""
import os
import sys

from setuptools import setup

ext_modules = []
if os.environ.get("LORA_FAST_BUILD_EXT", "1") == "0":
    print("lora_fast: LORA_FAST_BUILD_EXT=0, building without the C++ reference", file=sys.stderr)
else:
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("lora_fast: WARNING pybind11 is not importable, building without the C++ reference "
              "(lora_fast._cref)", file=sys.stderr)
    else:
        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
        ext_modules.append(Pybind11Extension(
            "lora_fast._cref", ["csrc/lora_ref.cpp"], cxx_std=17,
            extra_compile_args=["-O2", *openmp], extra_link_args=openmp,
            optional=True,   # a failed compile leaves the package usable, the reference reported missing
        ))

setup(
    packages=["lora_fast", "lora_fast.kernels"],
    package_dir={"lora_fast": "lora_fast", "lora_fast.kernels": "kernels"},
    package_data={"lora_fast": ["py.typed"]},   # PEP 561: the package's type hints are for users' checkers
    ext_modules=ext_modules,
)
