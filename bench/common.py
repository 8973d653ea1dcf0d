"""What every benchmark here shares: run metadata, the results-CSV schema, timing, the two device
ceilings, the memory measurements (peak bytes, bytes saved for backward), progress reporting and
the --help layout."""
import csv
import datetime
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lora_fast.check import HelpFormatter  # noqa: F401 - the project's one --help layout, for bench's CLIs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["device", "torch", "triton", "commit", "date", "command", "case", "M", "K", "N", "r",
           "dtype", "dropout", "impl", "mode", "metric", "p50", "p20", "p80", "unit"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def add_cpu_timing_arguments(parser, rounds, each, out_name):
    """The options every interleaved CPU benchmark takes: --rounds (each runs every `each` once),
    --warmup, --threads, and --out (a CSV under bench/results/)."""
    parser.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds (each runs every {each} once)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=RESULTS_DIR / out_name, metavar="CSV",
                        help="CSV to append the rows to (bench/results/ is the project's committed log)")


def run_metadata(device, module, argv):
    """The columns that say where, when and how a row was measured; `module` is the bench module
    that ran (layer, model, cpu_step) and argv its arguments."""
    try:
        git = dict(capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        # measured on uncommitted changes to tracked files: the commit alone would not say what ran
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git).stdout.strip():
            commit += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "-m", f"bench.{module}", *argv])}


def start(module, args, argv):
    """(device, metadata) of a bench module's run, its CPU threads set and the header printed: device,
    versions, commit, date, and the timing protocol (args.rounds, args.warmup)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    meta = run_metadata(device, module, argv)
    print(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit "
          f"{meta['commit']}, {meta['date']}")
    print(f"# {args.rounds} interleaved rounds after {args.warmup} warm-up; p50 ms (p20-p80)"
          + ("; CPU timings of the torch path, not kernel timings" if device.type == "cpu" else ""))
    return device, meta


def append_rows(path, rows):
    """Append rows (dicts with COLUMNS) to a CSV, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path):
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def quantiles(values):
    """(p50, p20, p80) of a list of timings."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def interleaved(jobs, run, rounds, warmup, sync=lambda: None):
    """{job: [ms per round]}: every job once per round, the round's order rotated by one each
    time (no job always runs first, or after the same neighbour: drifts in clock speed, caches
    and other tenants' load fall on all alike), after `warmup` untimed rounds. run(job) returns a
    Timer, read after sync() at the end of each round (a GPU's events are asynchronous)."""
    for _ in range(warmup):
        for job in jobs:
            run(job)
    times = {job: [] for job in jobs}
    for i in range(rounds):
        order = jobs[i % len(jobs):] + jobs[:i % len(jobs)]
        timers = [(job, run(job)) for job in order]
        sync()
        for job, t in timers:
            times[job].append(t.elapsed_ms())
    return times


def layer_rows(models, x, dy, train, rounds, warmup, device, row):
    """Time each of `models` (name -> module) on x, interleaved (`interleaved`), the L2 flushed before
    each run: fwd+bwd with dy when `train`, else a no-grad forward; one time row per model (p50/p20/p80
    ms) and, when training, one saved_bytes row (what autograd keeps for backward), each `row` plus
    impl, metric and values."""
    flush = L2Flush(device)

    def run(job):
        flush()
        model = models[job]
        x.grad = None
        for p in model.parameters():
            p.grad = None
        with Timer(device) as t:
            if train:
                model(x).backward(dy)
            else:
                with torch.no_grad():
                    model(x)
        return t

    jobs = list(models)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = interleaved(jobs, run, rounds, warmup, sync)
    rows = []
    for job in jobs:
        p50, p20, p80 = quantiles(times[job])
        rows.append({**row, "impl": job, "metric": "time", "p50": p50, "p20": p20, "p80": p80, "unit": "ms"})
        if train:
            params = list(models[job].parameters()) + list(models[job].buffers())
            saved = saved_bytes(lambda: models[job](x), params)
            rows.append({**row, "impl": job, "metric": "saved_bytes", "p50": saved, "p20": saved, "p80": saved,
                         "unit": "B"})
    return rows


def print_layer_rows(header, rows, targets):
    """Print one case of layer_rows' rows: `header`, each impl's p50 (p20-p80) ms and saved bytes
    when measured, then each (impl, baseline, most allowed ratio) of `targets` both were timed for."""
    by = {row["impl"]: row for row in rows if row["metric"] == "time"}
    saved = {row["impl"]: row["p50"] for row in rows if row["metric"] == "saved_bytes"}
    print(header)
    for impl, row in by.items():
        text = f"  saved {saved[impl] / 2**20:.2f} MiB" if impl in saved else ""
        print(f"  {impl:>14} {row['p50']:9.3f} ({row['p20']:.3f}-{row['p80']:.3f}){text}")
    for a, b, limit in targets:
        if a in by and b in by:
            ratio = by[a]["p50"] / by[b]["p50"]
            print(f"  {a}/{b} = {ratio:.3f} (target <= {limit:.3f}): {'met' if ratio <= limit else 'NOT met'}")


class Timer:
    """Times one region: CUDA events on a GPU (device work is asynchronous), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3

    def elapsed_ms(self):
        """Milliseconds; on a GPU call after a synchronize."""
        return self.start.elapsed_time(self.end) if self.cuda else self.ms


class L2Flush:
    """Overwrites a buffer twice the size of the GPU's L2 before each timed repetition, so weights
    and activations come from device memory, as they do in a model, not from the cache."""

    def __init__(self, device):
        self.buffer = None
        if device.type == "cuda":
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.buffer = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)

    def __call__(self):
        if self.buffer is not None:
            self.buffer.zero_()


def measure_ceilings(device, dtype):
    """Measured peak matmul rate (FLOP/s, a large square product in `dtype`) and copy bandwidth
    (bytes/s, read + write of a large device-to-device copy): the roofline's two numbers."""
    if device.type == "cuda":
        n, copy_bytes, reps = 8192, 1 << 30, 20
    else:
        n, copy_bytes, reps = 1024, 1 << 26, 3
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    mm_ms, copy_ms = [], []
    for i in range(reps + 2):
        with Timer(device) as t_mm:
            torch.mm(a, b)
        with Timer(device) as t_copy:
            dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            mm_ms.append(t_mm.elapsed_ms())
            copy_ms.append(t_copy.elapsed_ms())
    flops = 2 * n ** 3 / (statistics.median(mm_ms) / 1e3)
    bandwidth = 2 * src.numel() * 4 / (statistics.median(copy_ms) / 1e3)
    return flops, bandwidth


def saved_bytes(step, exclude):
    """Bytes of the tensors autograd saves for backward during `step()` (unique storages), not
    counting the parameters in `exclude` (held by the module whether or not they are saved)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def peak_bytes(device, fn):
    """Peak bytes allocated while fn() runs, above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


class LineProgress:
    """Progress as plain lines: about `lines` of them over the run (and the last), each flushed,
    no carriage return. What a CI log or a redirected stream gets instead of a bar redrawn with
    '\r', which such a log keeps as one long unreadable line (or hundreds of them)."""

    def __init__(self, items, desc, unit, total, stream, lines=10):
        self.items, self.desc, self.unit, self.stream = items, desc, unit, stream
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        self.every = max(1, -(-self.total // lines)) if self.total else 1
        self.postfix = ""

    def set_postfix(self, **values):
        """As tqdm's: shown on the following lines."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self):
        start = time.perf_counter()
        done = 0
        for item in self.items:
            yield item
            done += 1
            if done % self.every == 0 or done == self.total:
                of = f"/{self.total}" if self.total is not None else ""
                extra = f", {self.postfix}" if self.postfix else ""
                print(f"{self.desc}: {done}{of} {self.unit}s, {time.perf_counter() - start:.1f} s{extra}",
                      file=self.stream, flush=True)


def progress(items, desc, unit="it", total=None, stream=None):
    """Iterate over `items` with progress on `stream` (default: sys.stderr, looked up at the call):
    tqdm's bar on a terminal, LineProgress's plain lines anywhere else."""
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        from tqdm import tqdm
        return tqdm(items, desc=desc, unit=unit, total=total, file=stream)
    return LineProgress(items, desc, unit, total, stream)
