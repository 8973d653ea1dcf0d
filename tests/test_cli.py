"""The command lines as a user meets them: every one has a complete --help (its whole description,
help and default for each option, no dangling references, no issue numbers), progress that stays
readable where the output is not a terminal, and default outputs that leave the source tree clean.
The parsers are read directly (each CLI has a build_parser()), so no CLI starts a process here."""
import importlib
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module: what runs it; every module of bench/ with a main() must be here (checked below)
CLIS = {
    "lora_fast.check": "lora-fast-check",
    "lora_fast.aot": "python -m lora_fast.aot",
    "bench.cpu_model": "python -m bench.cpu_model",
    "bench.cpu_step": "python -m bench.cpu_step",
    "bench.gpu_env": "python -m bench.gpu_env",
    "bench.gpu_run": "python3 -m bench.gpu_run",
    "bench.layer": "python -m bench.layer",
    "bench.mixed": "python -m bench.mixed",
    "bench.qlora": "python -m bench.qlora",
    "bench.dora": "python -m bench.dora",
    "bench.model": "python -m bench.model",
    "bench.report": "python -m bench.report",
    "bench.tuning": "python -m bench.tuning",
    "examples.finetune_minilm": "python examples/finetune_minilm.py",
    "examples.ddp_fsdp2_train": "torchrun ... examples/ddp_fsdp2_train.py",
}


def _parser(module):
    if module == "examples.finetune_minilm":
        pytest.importorskip("tqdm")
    return importlib.import_module(module).build_parser()


def test_every_cli_is_listed():
    """A new bench module with a main() gets its --help checked too."""
    with_main = {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py") if "\ndef main(" in p.read_text()}
    with_main |= {f"examples.{p.stem}" for p in (ROOT / "examples").glob("*.py") if "__main__" in p.read_text()}
    assert with_main <= set(CLIS), sorted(with_main - set(CLIS))


@pytest.mark.parametrize("module", sorted(CLIS))
def test_help_is_complete(module):
    parser = _parser(module)
    text = parser.format_help()
    description = parser.description or ""
    # the whole docstring, not its first line (which stops mid-sentence in most of them)
    assert description.strip() == importlib.import_module(module).__doc__.strip()
    assert description.rstrip().endswith("."), description[-200:]
    assert not re.search(r"\bissue\s*#?\d+", text, re.I), re.search(r".*\bissue\s*#?\d+.*", text, re.I).group()
    assert "see above" not in text.lower()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        name = "/".join(action.option_strings) or action.dest
        shown = formatter._expand_help(action) if action.help else ""
        assert shown.strip(), f"{module}: {name} has no help"
        default = action.default
        if action.option_strings and not (default is None or default is False or default == []):
            assert "default" in shown, f"{module}: {name}'s help does not give its default {default!r}: {shown!r}"


def test_help_runs_without_running_the_command(capsys):
    """--help prints the help and exits 0, before any work: bench.gpu_env (no options of its own)
    used to ignore its arguments and probe the machine."""
    from bench import gpu_env
    from lora_fast import check
    for main in (gpu_env.main, check.main):
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: ") and "date:" not in out and "lora_fast.check:" not in out


def test_console_script_help():
    script = Path(sys.executable).parent / "lora-fast-check"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Exit status: 0 when every output is within its bound" in res.stdout


# ---- progress where the output is not a terminal ----------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bench_progress_is_plain_lines_off_a_terminal():
    from bench import common
    stream = io.StringIO()
    bar = common.progress(range(37), desc="bench.test", unit="case", stream=stream)
    bar.set_postfix(loss="0.5")
    assert list(bar) == list(range(37))
    out = stream.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert 3 <= len(lines) <= 11 and lines[-1].startswith("bench.test: 37/37 cases, ") and "loss=0.5" in lines[-1]


def test_bench_progress_is_a_bar_on_a_terminal():
    from tqdm import tqdm

    from bench import common
    stream = _Terminal()
    bar = common.progress(range(3), desc="bench.test", stream=stream)
    assert isinstance(bar, tqdm)
    list(bar)
    assert "\r" in stream.getvalue()


def test_example_progress_is_plain_lines_off_a_terminal(capsys):
    """The fine-tuning example's bar: sys.stderr as the call finds it (here pytest's capture, not
    a terminal) gets lines with the loss, no carriage return."""
    pytest.importorskip("tqdm")
    from examples import finetune_minilm as demo
    bar = demo.progress(list(range(146)), desc="epoch 1/2", unit="step")
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 3 <= len(lines) <= 11 and lines[-1].startswith("epoch 1/2: 146/146 steps, ") and "loss=0.007" in lines[-1]


def test_tqdm_only_behind_the_progress_helpers():
    """Every progress bar in bench/ and examples/ goes through the helpers above."""
    calls = {str(p.relative_to(ROOT)): p.read_text().count("tqdm(")
             for folder in ("bench", "examples") for p in (ROOT / folder).glob("*.py")}
    assert {k: v for k, v in calls.items() if v} == {"bench/common.py": 1, "examples/finetune_minilm.py": 1}


# ---- where outputs go by default ----------------------------------------------------------------------

def _ignored_or_outside(path):
    """path (relative: from the repository root, where the README runs the examples) is outside the
    repository or git-ignored in it."""
    path = (ROOT / path).resolve()
    if not path.is_relative_to(ROOT):
        return True
    res = subprocess.run(["git", "check-ignore", "-q", str(path.relative_to(ROOT))], cwd=ROOT)
    assert res.returncode in (0, 1), "git check-ignore failed"
    return res.returncode == 0


@pytest.mark.parametrize("module", ["examples.finetune_minilm", "examples.ddp_fsdp2_train"])
def test_examples_write_outside_the_source_tree(module):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    (out,) = [a for a in _parser(module)._actions if a.dest == "out"]
    assert _ignored_or_outside(out.default), f"{module}: --out default {out.default} is tracked by git"


def test_bench_results_default_to_the_committed_log():
    """The bench CSVs are the project's log (bench/results/, committed); nothing else by default."""
    from bench import common
    for module in ("bench.cpu_model", "bench.cpu_step"):
        (out,) = [a for a in _parser(module)._actions if a.dest == "out"]
        assert Path(out.default).parent == common.RESULTS_DIR
    for module in ("bench.layer", "bench.model", "bench.tuning"):
        (out,) = [a for a in _parser(module)._actions if a.dest == "out"]
        assert out.default is None   # layer/model: bench/results/<name>-<device>.csv; tuning: none
