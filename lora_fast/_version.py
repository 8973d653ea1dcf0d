"""The package's version, in one place: pyproject.toml reads it (setuptools' `attr`, parsed without
importing anything) and lora_fast.__version__ re-exports it. It must stay a plain string literal
that imports nothing, so that a build never imports lora_fast (or torch)."""
__version__ = "0.1.0"
