"""The README's usage example runs as written, and CI's command is the README's test command."""
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_usage_example_runs():
    (example,) = re.findall(r"```python\n(.*?)```", README, re.S)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    layer = namespace["layer"]
    assert layer.lora_A.grad is not None and layer.weight.grad is None
    assert namespace["y"].shape == (4, 128, 1024)


def test_exactly_two_fresh_machine_commands():
    blocks = re.findall(r"<!-- (main-job|test-command) -->\n```bash\n(.*?)\n```", README, re.S)
    assert [name for name, _ in blocks] == ["main-job", "test-command"]
    for _, cmd in blocks:
        assert cmd.startswith("pip install torch==2.13.0 && "), "must take the CPU torch on disk first"
