"""bench.gpu_run, the GPU session's one command, run as --dry-run on the CPU (every stage, tiny
shapes, the Triton interpreter) in a subprocess: the stages run in order and leave their logs, CSVs
and reports in the output folder and the archive; a failed stage, a stage past its time limit and a
budget too small for a stage are each recorded, and none stops what follows."""
import importlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import common, gpu_run

ROOT = Path(__file__).resolve().parents[1]

STAGES = ["env", "smoke", "headline", "decode", "mixed", "qlora", "dora", "sliced", "model", "grid"]


def _run(out, *args):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_run", "--dry-run", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    return done, {s["name"]: s for s in summary["stages"]}, summary


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every stage, decode's command made to fail."""
    tmp = tmp_path_factory.mktemp("gpu_run")
    out = tmp / "out"
    done, stages, summary = _run(out, "--archive", str(tmp / "run.tar.gz"), "--fail", "decode")
    return out, tmp / "run.tar.gz", done, stages, summary


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """smoke past a half-second limit, headline failing, then a budget model cannot fit in."""
    out = tmp_path_factory.mktemp("gpu_run") / "out"
    return (out, *_run(out, "--stages", "smoke", "headline", "model", "--timeout", "smoke=0.5",
                       "--fail", "headline", "--budget-s", "75"))


def test_stages_run_in_order_and_leave_their_files(full):
    out, _, done, stages, summary = full
    assert list(stages) == STAGES, done.stdout + done.stderr
    starts = [done.stdout.index(f"== {name}") for name in STAGES]
    assert starts == sorted(starts), done.stdout
    assert summary["finished"] and summary["dry_run"] and summary["budget_s"] == 480
    for name, stage in stages.items():
        assert stage["status"] == ("failed" if name == "decode" else "ok"), (name, stage, done.stdout)
        for key in ("rc", "timed_out", "wall_s", "log", "files", "steps"):
            assert key in stage, (name, key)
        assert stage["log"] == f"{name}.log" and stage["log"] in stage["files"]
        assert all((out / f).is_file() for f in stage["files"]), stage["files"]
        log = (out / stage["log"]).read_text()
        for step in stage["steps"]:
            if step["status"] != "skipped":
                assert f"$ {step['command']}" in log
                assert step["wall_s"] > 0 and step["timeout_s"] > 0
    assert stages["smoke"]["steps"][0]["rc"] == 0 and "smoke-junit.xml" in stages["smoke"]["files"]
    env_log = (out / "env.log").read_text()
    # the benchmarks' dispatch choices go to the output folder; the dry run is on the interpreter
    assert f"dispatch cache: {out / 'dispatch.json'}" in env_log and "TRITON_INTERPRET='1'" in env_log


@pytest.mark.parametrize("name,module", [("headline", "layer"), ("qlora", "qlora"), ("dora", "dora"),
                                         ("sliced", "layer"), ("model", "model"),
                                         ("grid", "layer")])
def test_bench_stages_write_rows_and_a_report(full, name, module):
    out, _, _, stages, _ = full
    assert {f"{name}.csv", f"{name}.md"} <= set(stages[name]["files"])
    rows = common.read_rows(out / f"{name}.csv")
    assert rows and all(list(r) == common.COLUMNS for r in rows)
    for row in rows:
        for col in ("device", "torch", "triton", "commit", "date", "command"):
            assert row[col], (name, col, row)
        assert row["command"].startswith(f"python -m bench.{module} ")


def test_model_runs_twice_in_two_processes(full):
    """The second run is the warm-cache one: its rows follow the first's in the same CSV."""
    out, _, _, stages, _ = full
    assert [s["status"] for s in stages["model"]["steps"]] == ["ok", "ok", "ok"]
    times = [r for r in common.read_rows(out / "model.csv") if r["impl"] == "lora_fast" and r["metric"] == "time"]
    assert len(times) == 2


def test_grid_leaves_out_what_headline_measured_and_gets_the_time_left(full):
    out, _, _, stages, summary = full
    def cases(csv):
        return {(r["case"], r["M"], r["r"], r["dtype"], r["dropout"])
                for r in common.read_rows(out / csv) if r["case"] != "ceiling"}

    headline, grid = cases("headline.csv"), cases("grid.csv")
    assert headline == {("tiny", "33", "4", "fp32", "0.1")}
    assert grid == {("tiny", "1", "4", "fp32", "0.1")}
    # grid's benchmark has no limit of its own: what was left, less its report's 30 s
    elapsed = sum(s["wall_s"] for n, s in stages.items() if n != "grid")
    assert abs(stages["grid"]["steps"][0]["timeout_s"] - (summary["budget_s"] - elapsed - 30)) < 10


def test_failed_stage_is_recorded_and_the_next_runs(full):
    out, _, done, stages, _ = full
    assert done.returncode == 1
    decode = stages["decode"]
    assert decode["rc"] == 1 and not decode["timed_out"]
    assert "injected failure" in (out / "decode.log").read_text()
    assert decode["steps"][1]["status"] == "skipped" and "decode.csv" in decode["steps"][1]["reason"]
    assert stages["model"]["status"] == "ok"
    assert "| decode | failed | 1 |" in (out / "summary.md").read_text()


def test_archive_holds_the_output_folder(full):
    out, archive, _, _, summary = full
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert json.load(tar.extractfile("out/summary.json")) == summary
    assert names == {"out"} | {f"out/{p.name}" for p in out.iterdir()}


def test_timed_out_stage_is_killed_and_the_next_runs(cut):
    out, done, stages, _ = cut
    smoke = stages["smoke"]
    assert smoke["status"] == "timed_out" and smoke["timed_out"], done.stdout
    for step in smoke["steps"]:
        assert step["timed_out"] and step["timeout_s"] == 0.5
        assert step["wall_s"] < 0.5 + gpu_run.GRACE_S + 3, step   # SIGINT, then SIGKILL after the grace
    assert (out / "smoke.log").read_text().count("timed out after 0.5 s: killed") == 2
    assert stages["headline"]["status"] == "failed" and stages["headline"]["rc"] == 1


def test_budget_too_small_skips_the_stage(cut):
    out, done, stages, summary = cut
    assert done.returncode == 1
    model = stages["model"]
    assert model["status"] == "skipped" and "needs 90 s" in model["reason"], model
    assert all("status" not in step for step in model["steps"])
    assert not (out / "model.log").exists() and summary["finished"]


def test_refuses_an_output_folder_in_use(tmp_path, capsys):
    (tmp_path / "old.csv").write_text("")
    with pytest.raises(SystemExit):
        gpu_run.parse_args(["--dry-run", "--out", str(tmp_path)])
    assert "not an empty folder" in capsys.readouterr().err


def test_the_gpu_commands_parse(tmp_path, capsys):
    """The GPU plan runs only on a lent GPU, so its commands' options are checked here: each
    module's own parser reads them, with --help last (it exits 0 once everything before it parsed),
    and pytest's test files exist."""
    for stage in gpu_run.plan(tmp_path, tmp_path, gpu_run.GPU):
        for step in stage.steps:
            at = step.argv.index("-m") + 1
            module, args = step.argv[at], step.argv[at + 1:]
            if module == "pytest":
                files = [a for a in args if a.startswith("tests/")]
                assert files and all((ROOT / f).is_file() for f in files), files
            elif module not in ("pip", "bench.gpu_env"):
                with pytest.raises(SystemExit) as exit:
                    importlib.import_module(module).main([*args, "--help"])
                assert exit.value.code == 0, (module, args, capsys.readouterr().err)
