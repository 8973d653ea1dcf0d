"""Installs: kernels/ goes in as lora_fast.kernels, never as a top-level `kernels` module, in the
editable install the tests run on and in a built wheel; LORA_FAST_BUILD_EXT=0 (a machine without a
compiler) builds the package without its C++ extension (test_check.py shows it reported missing).
The wheel carries LICENSE and py.typed and the one version; Triton is required only where it has
wheels, and lora_fast works without it."""
import ast
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

import lora_fast
import lora_fast.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_inside_namespace():
    assert Path(lora_fast.kernels.__file__).parent == ROOT / "kernels"
    assert lora_fast.kernels.lora_forward.__module__ == "lora_fast.kernels.forward"


def test_top_level_kernels_import_gets_the_hub_package_or_nothing():
    """From a checkout's root (on sys.path under `python -m`), `import kernels` (transformers
    imports Hugging Face's hub kernels, a dependency since 5.25) reaches our directory first: it must
    give the installed hub package if there is one, else an inert stub that a probe takes for absent
    — never our kernels."""
    import importlib.metadata
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    code = ("import sys; sys.path.insert(0, '.');"
            "from transformers.utils.import_utils import _is_package_available;"
            "print(_is_package_available('kernels', return_version=True)[0]);"
            "import kernels; print(not hasattr(kernels, 'lora_forward'));"
            "print(getattr(kernels, '__file__', None) is not None and 'site-packages' in kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(installed), "True", str(installed)], out.stdout + out.stderr


def test_wheel_without_extension(tmp_path):
    """Also: LICENSE, py.typed, the version, the license expression and the triton marker in the wheel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LORA_FAST_BUILD_EXT"] = "0"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, env=env)
    (wheel,) = tmp_path.glob("lora_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lora_fast/kernels/forward.py" in names and "lora_fast/kernels/backward.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert not any("_cref" in n for n in names)
    assert "lora_fast/py.typed" in names
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    wheel_file = zipfile.ZipFile(wheel)
    (license_file,) = [n for n in names if n.startswith(dist_info) and n.endswith("/LICENSE")]
    assert wheel_file.read(license_file) == (ROOT / "LICENSE").read_bytes()
    metadata = wheel_file.read(f"{dist_info}/METADATA").decode()
    headers = [line.partition(": ") for line in metadata.split("\n\n")[0].splitlines()]
    assert ("Version", ": ", lora_fast.__version__) in headers
    assert {("License-Expression", ": ", "Apache-2.0"), ("License", ": ", "Apache-2.0")} & set(headers)
    (triton,) = [Requirement(v) for k, _, v in headers if k == "Requires-Dist" and v.startswith("triton")]
    assert triton.marker is not None


# ---- the version, in one place ---------------------------------------------------------------------

def test_version_in_one_place():
    """pyproject reads lora_fast/_version.py (a literal, importing nothing: a build must not import
    lora_fast or torch); the package re-exports it; the installed metadata and the changelog agree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lora_fast._version.__version__"}
    tree = ast.parse((ROOT / "lora_fast" / "_version.py").read_text())
    (assign,) = [node for node in tree.body if not isinstance(node, ast.Expr)]   # the docstring aside
    assert isinstance(assign, ast.Assign) and isinstance(assign.value, ast.Constant)
    assert assign.value.value == lora_fast.__version__
    assert importlib.metadata.version("lora-fast") == lora_fast.__version__
    assert f"## [{lora_fast.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_license_file_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    # the table form: the SPDX string needs setuptools >= 77, which the GPU image may not have
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}


# ---- Triton only where it has wheels ----------------------------------------------------------------

def _platform(system, machine, platform):
    return {"platform_system": system, "platform_machine": machine, "sys_platform": platform,
            "os_name": "nt" if platform == "win32" else "posix"}


def test_triton_required_only_where_it_has_wheels():
    """Triton publishes wheels for Linux x86_64 and aarch64 only: elsewhere a plain requirement makes
    `pip install` fail (nothing to install), so it carries a marker."""
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    (triton,) = [d for d in deps if d.name == "triton"]
    assert triton.marker is not None
    for env in (_platform("Linux", "x86_64", "linux"), _platform("Linux", "aarch64", "linux")):
        assert triton.marker.evaluate(env), env
    for env in (_platform("Darwin", "arm64", "darwin"), _platform("Darwin", "x86_64", "darwin"),
                _platform("Windows", "AMD64", "win32"), _platform("Linux", "armv7l", "linux")):
        assert not triton.marker.evaluate(env), env
    assert all(d.marker is None for d in deps if d.name != "triton")


NO_TRITON = textwrap.dedent('''
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        """As on macOS or Windows: there is no triton to import."""
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "triton":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoTriton())
    import torch
    import lora_fast
    from lora_fast import check, reference

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w, bias = torch.randn(8, 16), torch.randn(8)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    for backend in ("auto", "torch"):
        y = lora_fast.lora_linear(x, w, a, b, bias, scaling=2.0, backend=backend)
        ref = reference.lora_linear_ref(x, w, a, b, bias, 2.0)   # float64
        torch.testing.assert_close(y, ref.float(), rtol=1e-4, atol=1e-4)
        y.square().sum().backward()
    layer = lora_fast.LoRALinear(16, 8, r=4, lora_alpha=8, lora_dropout=0.1)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None
    try:
        lora_fast.lora_linear(x, w, a, b, backend="triton")
    except ImportError as e:
        assert str(e).startswith("backend='triton' needs the triton package"), e
    else:
        raise AssertionError("backend='triton' ran without triton")
    try:
        check.main(["--quick"])   # the default --impl: the Triton kernels
    except SystemExit as e:
        assert e.code == 2, e.code
    else:
        raise AssertionError("lora-fast-check ran the Triton kernels without Triton")
    assert check.main(["--impl", "lora_fast.torch_path", "--shapes", "5x9x7", "--ranks", "2",
                       "--dtypes", "fp32"]) == 0
    assert not [m for m in sys.modules if m.partition(".")[0] == "triton"], "something imported triton"
    print("without triton: OK")
''')


def test_works_without_triton():
    """import lora_fast, lora_linear on both backends, LoRALinear with dropout, and lora-fast-check
    on the torch path, with `import triton` failing; the check of the Triton kernels is refused
    with one line saying why and what to run instead."""
    res = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "without triton: OK" in res.stdout, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("lora-fast-check: error:")]
    assert errors == ["lora-fast-check: error: --impl lora_fast.dispatch: needs Triton, which is not installed "
                      "here (No module named 'triton'); Triton has wheels for Linux x86_64 and aarch64 only: "
                      "check the torch backend with --impl lora_fast.torch_path"], res.stderr
    assert "Traceback" not in res.stderr
