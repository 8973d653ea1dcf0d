"""Every Python snippet in the README runs as written, and CI's command is the README's test
command."""
import os
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# Blocks under an `<!-- examples/NAME -->` marker are excerpts of that script (test_distributed
# checks they are verbatim there); every other Python block is a whole program that runs here.
SNIPPETS = [code for marker, code in re.findall(r"(<!-- examples/\S+ -->\n)?```python\n(.*?)```", README, re.S)
            if not marker]


def run_snippet(index, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)   # snippets may write files (an adapter directory)
    try:
        namespace = {"__name__": f"readme_snippet_{index}"}
        exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
        return namespace
    finally:
        os.chdir(cwd)


def test_layer_example_runs(tmp_path):
    namespace = run_snippet(0, tmp_path)
    layer = namespace["layer"]
    assert layer.lora_A.grad is not None and layer.weight.grad is None
    assert namespace["y"].shape == (4, 128, 1024)


# the whole-model section's first example, checked beyond running
WHOLE_MODEL = next(i for i, s in enumerate(SNIPPETS) if "lora_fast.inject(" in s and "my-adapter" in s)


def test_whole_model_example_runs(tmp_path):
    pytest.importorskip("transformers")
    index = WHOLE_MODEL
    namespace = run_snippet(index, tmp_path)
    import lora_fast
    assert namespace["names"] and not lora_fast.lora_layers(namespace["merged"])
    assert {p.name for p in (tmp_path / "my-adapter").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_every_snippet_runs(index, tmp_path):
    if index in (0, WHOLE_MODEL):
        pytest.skip("run with its own checks above")
    pytest.importorskip("transformers")
    run_snippet(index, tmp_path)


def test_exactly_two_fresh_machine_commands():
    blocks = re.findall(r"<!-- (main-job|test-command) -->\n```bash\n(.*?)\n```", README, re.S)
    assert [name for name, _ in blocks] == ["main-job", "test-command"]
    for _, cmd in blocks:
        assert cmd.startswith("pip install torch==2.13.0 && "), "must take the CPU torch on disk first"
