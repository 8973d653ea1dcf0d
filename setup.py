"""Packaging: the Triton kernels live in kernels/ at the top of the repository but are installed
as lora_fast.kernels (a top-level `kernels` module belongs to another PyPI package). The mapping
holds for normal and editable installs alike."""
from setuptools import setup

setup(
    packages=["lora_fast", "lora_fast.kernels"],
    package_dir={"lora_fast": "lora_fast", "lora_fast.kernels": "kernels"},
)
