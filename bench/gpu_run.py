"""A GPU session's whole run in one command that fits the device lease: the environment, the
GPU-only and bf16 tests, the headline and decode layer benchmarks, the model's training step with
cold and then warm caches, and as much of the targets grid (bench.layer --grid targets) as the
time left allows.

The one device command (from the repository root; the device tool's `run` with timeout_s=540):

    python3 -m bench.gpu_run --install --out /tmp/gpu_run --archive $OUT/gpu_run.tar.gz

The device tool brings back at most 8 files from $OUT, so the results folder (--out) lives outside
it and --archive packs it into one file there, rewritten after every stage: a run cut off at the
device limit still brings back every stage that finished. Unpack with `tar xzf gpu_run.tar.gz`.

Stages, in this order; each command has its own time limit, and no stage's failure or time-out
stops the next. Every stage writes <stage>.log (each command, its output, its exit) and, for the
benchmarks, <stage>.csv (bench/common.py's rows: device, versions, commit, date and command on
each), the report's <stage>.md and plots, and on a GPU <stage>-dispatch.json (bench.layer's record
of the dispatcher's choices):

    install   (--install only) pip install --no-deps --no-build-isolation -e .
    env       python -m bench.gpu_env: GPU, driver, versions, commit, caches (env.log)
    smoke     pytest -m gpu on the GPU-only tests, pytest -k bfloat16 on the kernel, split-K and
              TMA tests (smoke-gpu-junit.xml, smoke-bf16-junit.xml), then
              lora_fast.check --quick --all-paths --dtypes bf16
    headline  bench.layer M=8192 4096->4096 r=16 bf16, dropout 0 and 0.1: linear, peft, addmm,
              lorafusion_style, lora_fast
    decode    bench.layer M=1, 8, 64 on 4096->4096 and 4096->1024, bf16, r=16: linear, peft,
              addmm, lora_fast
    mixed     the mixed-batch kernel tests compiled (tests/test_multi_kernels.py, test_mixed.py),
              then bench.layer --mixed: a training step of 8192 rows over 4 adapters against one
              adapter, a per-adapter loop and nn.Linear; decode M=8 rows of 8 adapters against
              nn.Linear, the loop and PEFT's adapter_names= inference (4096->4096 bf16 r=16)
    qlora     the 4-bit kernels' tests (tests/test_qlora_kernels.py, bf16 included), then bench.qlora:
              a training step of 8192 rows and decode of 1, 8 and 64 rows at 4096->4096 r=16 bf16
              against PEFT+bitsandbytes, bitsandbytes' Linear4bit, the 16-bit layer and nn.Linear
    dora      the DoRA tests (tests/test_dora.py, and tests/test_dora_paths.py: every kernel path with
              the column scale in its epilogue and dY loads, bf16 included), then bench.dora: a
              training step of 8192 rows at 4096->4096 r=16 bf16, dropout 0 and 0.1, both dropout
              forms against lora_fast's LoRA layer, PEFT's DoRA and the scale composed around the passes
    sliced    the per-slice layer's tests (tests/test_sliced.py), then bench.layer --sliced: fwd+bwd
              of GPT-2-XL's c_attn and a Llama-3-8B qkv with LoRA on q and v, M=8192 bf16 r=16,
              against one full-width adapter, one layer per slice and nn.Linear
    model     bench.model --steps 3 --warmup 1 --dropout 0.05 twice, the second in a new process
              with the first's caches (model.log holds both; the rows carry each run's date)
    grid      bench.layer --grid targets without the cases headline and decode measured, in the
              time left

Caches: the benchmarks share LORA_FAST_DISPATCH_CACHE=<out>/dispatch.json, so the dispatcher's
choices and measured times come back with the results; the tests keep theirs in the process (their
odd shapes would only crowd that file). The model stage has its own dispatch cache
(<out>/model-dispatch.json) and Triton cache, so its first run starts cold, as a new user's first
step does, and its second finds both warm. Triton's caches (thousands of files) live in a
temporary folder, deleted at the end. summary.json and summary.md (each stage's commands, exit
codes, wall seconds, time-outs and files) are rewritten after every stage.

Budget (--budget-s, default 480 s of the lease's 15 minutes: a machine's start takes 2-3 of them,
and what is left after this run is one rerun of one stage on the still-warm machine): a stage starts
only if the sum of its commands' time limits fits in what is left; grid's benchmark has no limit of
its own and gets what is left after reserving its report's. A stage that cannot start is recorded
as skipped, with why. A command past its limit gets SIGINT (pytest still writes its junit XML)
and, GRACE_S later, SIGKILL for its whole process group.

Rerun one stage at once, on the still-warm machine (the editable install is still there):

    python3 -m bench.gpu_run --stages model --timeout model=150 --budget-s 180 \\
        --out /tmp/gpu_rerun --archive $OUT/gpu_rerun.tar.gz

--dry-run runs every stage on the CPU (CUDA hidden, the Triton interpreter, tiny shapes, one round,
the tiny model, one fast test) with limits sized to it: a test of this script, not a measurement
(tests/test_gpu_run.py runs it).
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("install", "env", "smoke", "headline", "decode", "mixed", "qlora", "dora", "sliced", "model", "grid")
GRACE_S = 5.0   # between SIGINT and SIGKILL: enough for pytest to write its junit XML
LOG_TAIL = 20   # lines of a failed command's log echoed to the console (the device reply shows its end)


@dataclass
class Step:
    argv: list
    timeout_s: float | None          # None: what is left of the budget, less the later steps' limits
    needs: Path | None = None        # an earlier command's output: skipped when that was not written
    record: dict = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    steps: list
    env: dict = field(default_factory=dict)   # on top of the run's environment
    min_s: float = 0.0                         # for a step without a limit: the least worth starting
    record: dict = field(default_factory=dict)

    def need_s(self):
        """What must be left of the budget for the stage to start."""
        fixed = sum(s.timeout_s for s in self.steps if s.timeout_s is not None)
        return fixed + (self.min_s if any(s.timeout_s is None for s in self.steps) else 0.0)


@dataclass(frozen=True)
class Sizes:
    """What the GPU run and the dry run differ in: the cases, and time limits (s) sized to them."""
    tests: tuple        # (junit file stem, pytest arguments, time limit) per pytest run
    check: tuple        # lora_fast.check arguments
    check_s: float
    headline: tuple     # bench.layer arguments selecting the cases
    headline_s: float
    decode: tuple
    decode_s: float
    mixed_tests: tuple  # pytest arguments
    mixed_tests_s: float
    mixed: tuple        # bench.mixed arguments
    mixed_s: float
    qlora_tests: tuple  # pytest arguments
    qlora_tests_s: float
    qlora: tuple        # bench.qlora arguments
    qlora_s: float
    dora_tests: tuple   # pytest arguments
    dora_tests_s: float
    dora: tuple         # bench.dora arguments
    dora_s: float
    sliced_tests: tuple  # pytest arguments
    sliced_tests_s: float
    sliced: tuple       # bench.layer --sliced arguments
    sliced_s: float
    model: tuple        # bench.model arguments
    model_s: tuple      # (first run, cold caches; second run, warm)
    grid: tuple
    grid_min_s: float
    rounds: tuple       # bench.layer's timing arguments
    install_s: float
    env_s: float
    report_s: float


GPU = Sizes(
    # cheap files first: when the limit cuts a run, it cuts the inductor tests of test_compile.py
    tests=(("smoke-gpu", ("-m", "gpu", "tests/test_paths.py", "tests/test_dropout.py",
                          "tests/test_dispatch.py", "tests/test_compile.py"), 65),
           # on a GPU helpers.KERNEL_DTYPES has bf16; its cases' ids say torch.bfloat16
           ("smoke-bf16", ("-k", "bfloat16", "tests/test_paths.py"), 40)),
    check=("--quick", "--all-paths", "--dtypes", "bf16"), check_s=30,
    headline=("--shapes", "llama3-8b-qo", "--M", "8192", "--r", "16", "--dtype", "bf16",
              "--dropout", "0", "0.1"), headline_s=55,
    decode=("--shapes", "llama3-8b-qo", "llama3-8b-kv", "--M", "1", "8", "64", "--r", "16",
            "--dtype", "bf16", "--dropout", "0"), decode_s=40,
    mixed_tests=("tests/test_multi_kernels.py", "tests/test_mixed.py"), mixed_tests_s=45,
    mixed=(), mixed_s=60,
    # the 4-bit kernels' tests in bf16 too, then training (M=8192) and decode (1, 8, 64 rows) at 4096
    qlora_tests=("tests/test_qlora_kernels.py",), qlora_tests_s=45,
    qlora=("--rounds", "10"), qlora_s=60,
    dora_tests=("tests/test_dora.py", "tests/test_dora_paths.py", "tests/test_qdora.py"), dora_tests_s=90,
    dora=("--rounds", "10"), dora_s=60,
    sliced_tests=("tests/test_sliced.py",), sliced_tests_s=30,
    sliced=("--rounds", "10"), sliced_s=45,
    # the cold run holds the first step's compiling and tuning (predicted 20-40 s, bench/NOTES.md v7)
    model=("--steps", "3", "--warmup", "1", "--dropout", "0.05"), model_s=(100, 40),
    grid=("--grid", "targets"), grid_min_s=30,
    rounds=(), install_s=45, env_s=15, report_s=15,
)
DRY = Sizes(
    tests=(("smoke", ("tests/test_paths.py", "-k", "empty_batch"), 30),),
    check=("--quick", "--all-paths", "--shapes", "1x64x33", "--ranks", "3", "--dtypes", "fp32", "--dropout", "0"),
    check_s=30,
    headline=("--shapes", "tiny", "--M", "33", "--r", "4", "--dtype", "fp32", "--dropout", "0.1"),
    headline_s=30,
    decode=("--shapes", "tiny", "--M", "1", "--r", "4", "--dtype", "fp32", "--dropout", "0"),
    decode_s=30,
    mixed_tests=("tests/test_mixed.py", "-k", "one_row and 2d"), mixed_tests_s=60,
    mixed=("--quick",), mixed_s=60,
    qlora_tests=("tests/test_qlora_kernels.py", "-k", "empty_batch"), qlora_tests_s=60,
    qlora=("--quick", "--cases", "decode", "--impls", "qlora", "base4", "linear"), qlora_s=60,
    dora_tests=("tests/test_dora.py", "-k", "gradcheck"), dora_tests_s=60,
    dora=("--quick", "--dropout", "0", "--impls", "dora", "lora"), dora_s=60,
    sliced_tests=("tests/test_sliced.py", "-k", "one_row"), sliced_tests_s=60,
    sliced=("--quick", "--rounds", "1", "--warmup", "0"), sliced_s=60,
    model=("--size", "tiny", "--steps", "1", "--warmup", "0", "--dropout", "0.05"), model_s=(30, 30),
    grid=("--shapes", "tiny", "--M", "1", "33", "--r", "4", "--dtype", "fp32", "--dropout", "0.1",
          "--impls", "linear", "lora_fast"), grid_min_s=10,
    rounds=("--rounds", "1", "--warmup", "0"), install_s=120, env_s=30, report_s=30,
)


def plan(out, cache, sizes):
    """Every stage, in order. `out`: the results folder; `cache`: the Triton caches' folder."""
    def py(module, *args):
        return [sys.executable, "-u", "-m", module, *map(str, args)]

    def report(csv):
        return Step(py("bench.report", csv), sizes.report_s, needs=csv)

    csv = {name: out / f"{name}.csv"
           for name in ("headline", "decode", "mixed", "qlora", "dora", "sliced", "model", "grid")}
    pytest = ("pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--durations=15")
    model = (*sizes.model, "--out", csv["model"])
    return [
        Stage("install", [Step([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                "-e", "."], sizes.install_s)]),
        Stage("env", [Step(py("bench.gpu_env"), sizes.env_s)]),
        Stage("smoke", [*(Step(py(*pytest, "--junitxml", out / f"{stem}-junit.xml", *args), limit)
                          for stem, args, limit in sizes.tests),
                        Step(py("lora_fast.check", *sizes.check), sizes.check_s)],
              env={"LORA_FAST_DISPATCH_CACHE": ""}),
        Stage("headline", [Step(py("bench.layer", *sizes.headline, *sizes.rounds, "--impls", "linear", "peft",
                                   "addmm", "lorafusion_style", "lora_fast", "--out", csv["headline"]),
                                sizes.headline_s),
                           report(csv["headline"])]),
        Stage("decode", [Step(py("bench.layer", *sizes.decode, *sizes.rounds, "--impls", "linear", "peft",
                                 "addmm", "lora_fast", "--out", csv["decode"]), sizes.decode_s),
                         report(csv["decode"])]),
        Stage("mixed", [Step(py(*pytest, "--junitxml", out / "mixed-junit.xml", *sizes.mixed_tests),
                             sizes.mixed_tests_s),
                        Step(py("bench.layer", "--mixed", *sizes.mixed, *sizes.rounds, "--out", csv["mixed"]),
                             sizes.mixed_s),
                        report(csv["mixed"])]),
        Stage("qlora", [Step(py(*pytest, "--junitxml", out / "qlora-junit.xml", *sizes.qlora_tests),
                             sizes.qlora_tests_s),
                        Step(py("bench.qlora", *sizes.qlora, "--out", csv["qlora"]), sizes.qlora_s),
                        report(csv["qlora"])]),
        Stage("dora", [Step(py(*pytest, "--junitxml", out / "dora-junit.xml", *sizes.dora_tests),
                            sizes.dora_tests_s),
                       Step(py("bench.dora", *sizes.dora, "--out", csv["dora"]), sizes.dora_s),
                       report(csv["dora"])]),
        Stage("sliced", [Step(py(*pytest, "--junitxml", out / "sliced-junit.xml", *sizes.sliced_tests),
                              sizes.sliced_tests_s),
                         Step(py("bench.layer", "--sliced", *sizes.sliced, "--out", csv["sliced"]), sizes.sliced_s),
                         report(csv["sliced"])]),
        Stage("model", [Step(py("bench.model", *model), sizes.model_s[0]),
                        Step(py("bench.model", *model), sizes.model_s[1]),
                        report(csv["model"])],
              env={"LORA_FAST_DISPATCH_CACHE": str(out / "model-dispatch.json"),
                   "TRITON_CACHE_DIR": str(cache / "triton-model")}),
        Stage("grid", [Step(py("bench.layer", *sizes.grid, *sizes.rounds, "--skip-cases-in", csv["headline"],
                               csv["decode"], "--out", csv["grid"]), None),
                       report(csv["grid"])],
              min_s=sizes.grid_min_s),
    ]


def run_step(step, env, log, timeout_s):
    """Runs one command in its own process group, its output appended to `log`; fills step.record."""
    with log.open("a") as f:
        f.write(f"$ {shlex.join(step.argv)}\n")
        f.flush()
        start = time.monotonic()
        # its own process group (not session: the device tool ends a command's leftovers only
        # within its session); setpgrp, as process_group=0 does from Python 3.11 on
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        finally:
            # nothing a command started (inductor's compile workers, say) outlives it to hold the
            # GPU during the next one; on an interrupt of this script, not the command either
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        wall = time.monotonic() - start
        end = f"timed out after {timeout_s:.3g} s: killed" if timed_out else f"exit {proc.returncode}"
        f.write(f"[{end}, {wall:.1f} s]\n\n")
    step.record.update(status="timed_out" if timed_out else "ok" if proc.returncode == 0 else "failed",
                       rc=proc.returncode, timed_out=timed_out, wall_s=round(wall, 3))


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_stage(stage, env, out, deadline):
    """Runs a stage's commands in order (each whatever the previous did), within the budget."""
    left = deadline - time.monotonic()
    if left < stage.need_s():
        stage.record.update(status="skipped", reason=f"{left:.0f} s of the budget left, the stage needs "
                                                      f"{stage.need_s():.0f} s")
        say(f"== {stage.name}: skipped ({stage.record['reason']})")
        return
    say(f"== {stage.name} ({left:.0f} s of the budget left)")
    log = out / f"{stage.name}.log"
    before = _listing(out)
    start = time.monotonic()
    stage_env = {**env, **stage.env}
    for i, step in enumerate(stage.steps):
        step.record.update(command=shlex.join(step.argv))
        reserved = sum(s.timeout_s for s in stage.steps[i + 1:] if s.timeout_s is not None)
        limit = deadline - time.monotonic() - reserved
        timeout_s = limit if step.timeout_s is None else min(step.timeout_s, limit)
        if step.needs is not None and not step.needs.exists():
            step.record.update(status="skipped", reason=f"{step.needs.name} was not written")
        elif timeout_s <= 0:
            step.record.update(status="skipped", reason="no time left in the budget")
        else:
            step.record.update(timeout_s=round(timeout_s, 1))
            say(f"   $ {step.record['command']}")
            run_step(step, stage_env, log, timeout_s)
        say(f"   {_step_outcome(step.record)}")
        if step.record["status"] in ("failed", "timed_out"):
            say("".join(f"   | {line}\n" for line in log.read_text().splitlines()[-LOG_TAIL:]).rstrip())
    statuses = [s.record["status"] for s in stage.steps]
    rcs = [s.record["rc"] for s in stage.steps if s.record.get("rc")]
    stage.record.update(
        status="timed_out" if "timed_out" in statuses else "failed" if "failed" in statuses else "ok",
        rc=rcs[0] if rcs else 0, timed_out="timed_out" in statuses,
        wall_s=round(time.monotonic() - start, 3), log=log.name,
        files=sorted(name for name, stat in _listing(out).items()
                     if before.get(name) != stat and not name.startswith("summary.")))


def _step_outcome(record):
    """'ok, exit 0 in 3.1 s (limit 30 s)', 'skipped (why)', 'not run'."""
    if "reason" in record:
        return f"{record['status']} ({record['reason']})"
    if "rc" not in record:
        return record.get("status", "not run")
    return f"{record['status']}, exit {record['rc']} in {record['wall_s']} s (limit {record['timeout_s']:g} s)"


def _listing(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()}


def write_summary(out, summary, stages):
    summary["stages"] = [{"name": s.name, **s.record, "env": s.env,
                          "steps": [{**st.record, "command": shlex.join(st.argv)} for st in s.steps]}
                         for s in stages]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# bench.gpu_run, {summary['started']}", "", f"`{summary['command']}`", "",
             f"budget {summary['budget_s']:.0f} s, ran {summary['wall_s']:.0f} s"
             + ("" if summary["finished"] else " (still running, or cut off)"), "",
             "| stage | status | exit | wall s | files |", "|---|---|---|---|---|"]
    for s in summary["stages"]:
        status = s.get("status", "not run") + (f" ({s['reason']})" if "reason" in s else "")
        lines.append(f"| {s['name']} | {status} | {s.get('rc', '')} | "
                     f"{s.get('wall_s', '')} | {' '.join(s.get('files', []))} |")
    lines += ["", "Commands:", ""]
    for s in summary["stages"]:
        lines += [f"- {s['name']}: `{st['command']}` — {_step_outcome(st)}" for st in s["steps"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def write_archive(out, archive):
    """The results folder as one .tar.gz, replaced whole (a run killed while writing it leaves the
    previous one)."""
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    os.replace(partial, archive)


def say(text):
    print(text, flush=True)


def _timeout_arg(text):
    name, _, seconds = text.partition("=")
    if name not in STAGES or not seconds:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
    try:
        value = float(seconds)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a positive number")
    return name, value


def build_parser():
    # The stdlib's formatter, defaults written into the help: this runs before the install, so it
    # imports nothing of lora_fast (bench.common's HelpFormatter comes from there).
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder (new or empty)")
    parser.add_argument("--archive", type=Path, help="also pack --out into this .tar.gz after every stage, outside --out (default: none)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for the whole run (default 480: the lease's 15 minutes less a "
                             "machine's start and one rerun)")
    parser.add_argument("--install", action="store_true",
                        help="first pip install --no-deps --no-build-isolation -e . (the GPU image has "
                             "every dependency but lora_fast itself)")
    parser.add_argument("--stages", nargs="+", choices=STAGES[1:],
                        help="run only these stages, in the usual order (default: all of them; install only "
                             "with --install)")
    parser.add_argument("--timeout", type=_timeout_arg, action="append", default=[], metavar="STAGE=SECONDS",
                        help="the time limit of each of STAGE's commands (e.g. a rerun with more time); may be "
                             "given once per stage (default: each stage's own limits)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on the CPU (Triton interpreter, tiny shapes): tests this script")
    parser.add_argument("--fail", choices=STAGES, metavar="STAGE",
                        help="for testing this script: STAGE's first command is replaced by one that exits 1")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out}: exists and is not an empty folder (a run's summary describes "
                     "its whole folder: give a new one)")
    if args.archive is not None:
        args.archive = args.archive.resolve()
        if args.archive.is_relative_to(args.out):
            parser.error(f"--archive {args.archive}: must be outside --out {args.out}, which it packs")
    if not args.dry_run and shutil.which("nvidia-smi") is None:
        parser.error("no GPU here (nvidia-smi is not on PATH); --dry-run runs every stage on the CPU")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    # SIGTERM (a supervisor's stop) ends the run like Ctrl-C: the running command's group is killed
    # and the summary says where it stopped
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_run-") as cache:
        cache = Path(cache)
        stages = [s for s in plan(args.out, cache, DRY if args.dry_run else GPU)
                  if (s.name == "install" and args.install)
                  or (s.name != "install" and (args.stages is None or s.name in args.stages))]
        limits = dict(args.timeout)
        for stage in stages:
            for step in stage.steps if stage.name in limits else []:
                step.timeout_s = limits[stage.name]
            if stage.name == args.fail:
                stage.steps[0].argv = [sys.executable, "-c", "raise SystemExit('gpu_run --fail: injected failure')"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "LORA_FAST_DISPATCH_CACHE": str(args.out / "dispatch.json"),
               "TRITON_CACHE_DIR": str(cache / "triton")}
        if args.dry_run:
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        summary = {"command": shlex.join([Path(sys.executable).name, "-m", "bench.gpu_run", *argv]),
                   "out": str(args.out), "archive": str(args.archive) if args.archive else None,
                   "dry_run": args.dry_run, "budget_s": args.budget_s,
                   "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "finished": None, "wall_s": 0.0}
        start = time.monotonic()

        def save():
            summary["wall_s"] = round(time.monotonic() - start, 1)
            write_summary(args.out, summary, stages)
            if args.archive is not None:
                write_archive(args.out, args.archive)

        save()
        try:
            for stage in stages:
                run_stage(stage, env, args.out, deadline)
                save()
        except KeyboardInterrupt:
            running = next((s for s in stages if "status" not in s.record), None)   # None: during the last save
            if running is not None:
                running.record.update(status="interrupted")
            save()
            say(f"interrupted during {running.name if running else 'the last save'}: summary in "
                f"{args.out / 'summary.md'}")
            return 130
    summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    say((args.out / "summary.md").read_text())
    return 1 if any(s.record["status"] in ("failed", "timed_out") for s in stages) else 0


if __name__ == "__main__":
    sys.exit(main())
