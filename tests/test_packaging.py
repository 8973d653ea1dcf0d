"""kernels/ installs as lora_fast.kernels, never as a top-level `kernels` module, in an editable
install (the one the tests run on) and in a built wheel (what a normal install copies)."""
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
    assert "kernels" not in sys.modules


def test_wheel_maps_kernels_into_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("lora_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lora_fast/kernels/forward.py" in names
    assert "lora_fast/kernels/backward.py" in names
    assert not any(n.startswith("kernels/") for n in names)
