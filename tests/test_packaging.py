"""Installs: kernels/ goes in as lora_fast.kernels, never as a top-level `kernels` module, in the
editable install the tests run on and in a built wheel; LORA_FAST_BUILD_EXT=0 (a machine without a
compiler) builds the package without its C++ extension (test_check.py shows it reported missing)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import lora_fast
import lora_fast.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_inside_namespace():
    assert Path(lora_fast.kernels.__file__).parent == ROOT / "kernels"
    assert lora_fast.kernels.lora_forward.__module__ == "lora_fast.kernels.forward"


def test_top_level_kernels_probe_sees_nothing():
    """From a checkout's root (on sys.path under `python -m`), transformers' probe for the PyPI
    package `kernels` imports our directory; it must find an inert stub, not our kernels, and
    conclude that package is absent."""
    code = ("import sys; sys.path.insert(0, '.');"
            "from transformers.utils.import_utils import _is_package_available;"
            "print(_is_package_available('kernels', return_version=True)[0]);"
            "m = sys.modules.get('kernels'); print(m is None or not hasattr(m, 'lora_forward'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr


def test_wheel_without_extension(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORA_FAST_BUILD_EXT"] = "0"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, env=env)
    (wheel,) = tmp_path.glob("lora_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lora_fast/kernels/forward.py" in names and "lora_fast/kernels/backward.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert not any("_cref" in n for n in names)
