"""Layer microbenchmark: lora_fast against nn.Linear, PEFT, the in-place-addmm layer and
torch.compile, interleaved in one process, on real models' projection shapes.

    python -m bench.layer [--quick] [--shapes ...] [--M ...] [--r ...] [--dtype ...] [--out FILE]
    python -m bench.layer --sliced [--quick] [--shapes ...] [--M M] [--rounds N] [--out FILE]

For each case every implementation runs each mode once per round, rounds interleaved, the GPU's L2
overwritten before each timed run. Modes: fwd (no grad, eval: an unmerged adapter at inference),
fwd_bwd (training step, W0 frozen, x requiring grad as a hidden state does), bwd (backward alone,
its forward untimed). Metrics per (impl, mode): time (ms), tflops, gbps, roofline_pct (the
roofline time for the minimal FLOPs and bytes of the job over the measured time, with the two
ceilings measured at start), peak_mem (bytes allocated above the step's start, CUDA only) and
saved_bytes (what autograd saves for backward, parameters excluded). Rows are appended to a CSV
(see bench/common.py); `python -m bench.report FILE` makes the table and plots.
On a machine without a GPU it runs tiny shapes: CPU timings of PyTorch ops (and of the Triton
interpreter when TRITON_INTERPRET=1), which test the harness and are not kernel timings.

--sliced: a fused q, k, v projection with LoRA on q and v (lora_fast.sliced.LoRASlicedLinear, one
fused pass each way) against the same fused layer with one full-width adapter of rank r (LoRALinear),
one layer per slice over row views of the same weight (LoRALinear on q and v, nn.Linear on k; outputs
concatenated, one (M, out) copy a model with separate projections would not make) and nn.Linear:
fwd+bwd (W0 frozen, x requiring grad), r=16, GPT-2-XL's c_attn (1600 → 3·1600) and a Llama-3-8B
qkv (4096 → 4096+1024+1024). GPU: M=8192 bf16; CPU: M=2048 fp32, the torch path. Rows (time,
saved_bytes) go to bench/results/sliced.csv.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

from bench import common
from bench.impls import IMPLS, make_impls
from lora_fast import LoRALinear, dispatch
from lora_fast.sliced import LoRASlicedLinear, enabled_sizes

SHAPES = {  # name: (in_features K, out_features N)
    "llama3-8b-qo": (4096, 4096), "llama3-8b-kv": (4096, 1024),
    "llama3-8b-up": (4096, 14336), "llama3-8b-down": (14336, 4096),
    "llama2-7b-up": (4096, 11008), "llama2-7b-down": (11008, 4096),
    "70b-up": (8192, 28672),
    "tiny": (48, 40),   # CPU mode: tests the harness
    "cpu-1k": (1024, 1024),   # the CPU training-step target of bench.cpu_step
}
TOKENS = (1, 8, 64, 512, 4096, 16384)
MODES = ("fwd", "fwd_bwd", "bwd")


LLAMA3_8B = ("llama3-8b-qo", "llama3-8b-kv", "llama3-8b-up", "llama3-8b-down")


def default_grid(device, quick, grid="default"):
    """(shape, M, r, dtype, dropout) cases. GPU default: every shape × every M at r=16 bf16, an r
    sweep and fp16/fp32 on one shape; --quick: two shapes at decode and training sizes; --grid
    targets: the target cases (the M=8192 4096→4096 r=16 headline at dropout 0.1 and 0, the
    Llama-3-8B shapes at r = 8, 16, 64, decode M = 1, 8, 64)."""
    if device.type != "cuda":
        return [("tiny", m, 4, "fp32", p) for m in (1, 33) for p in (0.0, 0.05)][: 2 if quick else 4]
    if grid == "targets":
        cases = [("llama3-8b-qo", 8192, 16, "bf16", 0.1)]
        cases += [(s, 8192, r, "bf16", 0.0) for s in LLAMA3_8B for r in (8, 16, 64)]
        cases += [(s, m, 16, "bf16", 0.0) for s in LLAMA3_8B for m in (1, 8, 64)]
        return cases
    if quick:
        return [(s, m, 16, "bf16", p) for s in ("llama3-8b-qo", "llama3-8b-up") for m in (1, 4096)
                for p in (0.0, 0.05)]
    cases = [(s, m, 16, "bf16", 0.0) for s in SHAPES if s not in ("tiny", "cpu-1k") for m in TOKENS]
    cases += [("llama3-8b-qo", m, 16, "bf16", 0.05) for m in (512, 4096, 16384)]
    cases += [("llama3-8b-qo", m, r, "bf16", 0.0) for r in (8, 64, 128) for m in (1, 4096)]
    cases += [("llama3-8b-qo", 4096, 16, dt, 0.0) for dt in ("fp16", "fp32")]
    return cases


def job_size(K, N, r, M, mode, itemsize, lora):
    """Minimal FLOPs and bytes of the job (each operand read once, each result written once)."""
    base_f = 2 * M * N * K
    fwd_f = base_f + (2 * M * r * (K + N) if lora else 0)
    bwd_f = base_f + (4 * M * r * (K + N) if lora else 0)
    fwd_b = (M * K + N * K + M * N + N + ((r * K + N * r) if lora else 0)) * itemsize
    bwd_b = (M * N + N * K + 2 * M * K + ((2 * (r * K + N * r)) if lora else 0)) * itemsize
    flops = {"fwd": fwd_f, "bwd": bwd_f, "fwd_bwd": fwd_f + bwd_f}[mode]
    nbytes = {"fwd": fwd_b, "bwd": bwd_b, "fwd_bwd": fwd_b + bwd_b}[mode]
    return flops, nbytes


def bench_case(case, impl_names, rounds, warmup, device, ceilings, meta, modes=MODES):
    shape, M, r, dtype_name, dropout = case
    K, N = SHAPES[shape]
    dtype = common.DTYPES[dtype_name]
    impls, base = make_impls(impl_names, K, N, r, dtype, dropout, device)
    gen = torch.Generator(device="cpu").manual_seed(M)
    x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(M, N, generator=gen).to(device, dtype)
    flush = common.L2Flush(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)

    def clear(impl):
        x.grad = None
        for p in impl.params:
            p.grad = None

    def run(impl, mode):
        """One timed repetition; returns a Timer (read after synchronize)."""
        clear(impl)
        impl.train(mode != "fwd")
        flush()
        with impl.context():
            return _timed_run(impl, mode)

    def _timed_run(impl, mode):
        if mode == "fwd":
            with torch.no_grad(), common.Timer(device) as t:
                impl.forward(x)
        elif mode == "fwd_bwd":
            with common.Timer(device) as t:
                impl.forward(x).backward(dy)
        else:
            y = impl.forward(x)
            flush()
            with common.Timer(device) as t:
                y.backward(dy)
        return t

    check_same_function(impls, x, dtype)
    jobs = [(name, mode) for name in impls for mode in modes]
    times = common.interleaved(jobs, lambda job: run(impls[job[0]], job[1]), rounds, warmup, sync)

    rows = []
    base_row = {**meta, "case": shape, "M": M, "K": K, "N": N, "r": r, "dtype": dtype_name,
                "dropout": dropout}
    peak_flops, bandwidth = ceilings[dtype_name]
    for (name, mode), values in times.items():
        impl = impls[name]
        p50, p20, p80 = common.quantiles(values)
        flops, nbytes = job_size(K, N, r, M, mode, x.element_size(), impl.lora)
        floor_ms = max(flops / peak_flops, nbytes / bandwidth) * 1e3
        row = {**base_row, "impl": name, "mode": mode}
        rows.append({**row, "metric": "time", "p50": p50, "p20": p20, "p80": p80, "unit": "ms"})
        # rates are (work / time): their p20 comes from the time's p80 and the other way round
        for metric, unit, work in (("tflops", "TFLOP/s", flops / 1e9),      # GFLOP per ms
                                   ("gbps", "GB/s", nbytes / 1e6),          # MB per ms
                                   ("roofline_pct", "%", floor_ms * 100)):
            rows.append({**row, "metric": metric, "unit": unit, "p50": work / p50,
                         "p20": work / p80, "p80": work / p20})
        peak = common.peak_bytes(device, lambda: run(impl, mode))
        if peak is not None:
            rows.append({**row, "metric": "peak_mem", "p50": peak, "p20": peak, "p80": peak, "unit": "B"})
        if mode == "fwd_bwd":
            clear(impl)
            impl.train(True)
            with impl.context():
                saved = common.saved_bytes(lambda: impl.forward(x), exclude=[*base, *impl.params])
            rows.append({**row, "metric": "saved_bytes", "p50": saved, "p20": saved, "p80": saved,
                         "unit": "B"})
    return rows


def measured_cases(paths):
    """(shape, M, r, dtype, dropout) of every case these CSVs hold rows for; a path that does not
    exist holds none (an earlier run that wrote nothing)."""
    return {(row["case"], int(row["M"]), int(row["r"]), row["dtype"], float(row["dropout"]))
            for path in paths if Path(path).exists() for row in common.read_rows(path)}


def check_same_function(impls, x, dtype):
    """Numbers for an implementation that computes something else mean nothing: with dropout off,
    every adapter implementation's output matches PEFT's (or lora_fast's) to the dtype's rounding."""
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    with torch.no_grad():
        outs = {}
        for name, impl in impls.items():
            impl.train(False)
            if impl.lora:
                with impl.context():
                    outs[name] = impl.forward(x).float()
    ref = outs.get("peft", outs.get("lora_fast"))
    for name, out in outs.items():
        err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() if ref.numel() else 0.0
        if not err <= tol:
            raise RuntimeError(f"{name} disagrees with the reference implementation: relative error {err:.2e}")


def write_dispatch_choices(csv_path, meta):
    """What lora_fast.dispatch chose for each key this run met, with the times it measured, in a JSON
    file beside the CSV (one entry per run: its metadata and the choices)."""
    path = csv_path.with_name(csv_path.stem + "-dispatch.json")
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({**meta, "choices": dispatch.choices()})
    path.write_text(json.dumps(runs, indent=1))
    print(f"dispatch choices written to {path}")


# --- --sliced ----------------------------------------------------------------------------------

SLICED_SHAPES = {  # name: (in_features, output slices q, k, v)
    "gpt2-xl-c_attn": (1600, (1600, 1600, 1600)),
    "llama3-8b-qkv": (4096, (4096, 1024, 1024)),
    "tiny-qkv": (48, (24, 8, 8)),   # --quick: tests the harness
}
SLICED_ENABLE = (True, False, True)   # q and v
SLICED_IMPLS = ("sliced", "full", "separate", "linear")
# (impl, baseline, most allowed ratio of times): NOTES v14's predictions
SLICED_TARGETS = (("sliced", "full", 1.05), ("sliced", "separate", 1.0))


class SeparateSlices(nn.Module):
    """A LoRASlicedLinear as one layer per slice (a model with separate q, k, v projections): row
    views of its weight and bias, a LoRALinear with its blocks of lora_A and lora_B on an enabled
    slice, the frozen nn.Linear on the others; the outputs concatenated."""

    def __init__(self, fused):
        super().__init__()
        r, blocks_A = fused.r, iter(fused.lora_A.detach().split(fused.r))
        blocks_B = iter(fused.lora_B.detach().split(enabled_sizes(fused.slices, fused.enable)))
        parts, row = [], 0
        for n, on in zip(fused.slices, fused.enable):
            part = nn.Linear(fused.in_features, n, device="meta")
            part.weight = nn.Parameter(fused.weight.detach()[row:row + n], requires_grad=False)
            part.bias = nn.Parameter(fused.bias.detach()[row:row + n], requires_grad=False)
            if on:
                part = LoRALinear.from_linear(part, r=r, lora_alpha=fused.lora_alpha)
                with torch.no_grad():
                    part.lora_A.copy_(next(blocks_A))
                    part.lora_B.copy_(next(blocks_B))
            parts.append(part)
            row += n
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], dim=-1)


def sliced_models(impls, K, slices, r, dtype, device):
    """{impl: module} over one frozen base linear (K → Σ slices), adapters non-zero (lora_B ~ N(0,
    0.02²)); "separate" holds the same adapter as "sliced" (checked to compute the same)."""
    torch.manual_seed(0)
    linear = nn.Linear(K, sum(slices), device=device, dtype=dtype).requires_grad_(False)
    sliced = LoRASlicedLinear.from_linear(linear, slices, SLICED_ENABLE, r=r, lora_alpha=2 * r)
    full = LoRALinear.from_linear(linear, r=r, lora_alpha=2 * r)
    for layer in (sliced, full):
        nn.init.normal_(layer.lora_B, std=0.02)
    models = {"sliced": sliced, "full": full, "separate": SeparateSlices(sliced), "linear": linear}
    x = torch.randn(64, K, device=device, dtype=dtype)
    with torch.no_grad():
        want, got = sliced(x).float(), models["separate"](x).float()
    err = ((got - want).norm() / want.norm()).item()
    if not err <= {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]:
        raise RuntimeError(f"separate disagrees with sliced: relative error {err:.2e}")
    return {name: models[name].train(True) for name in impls}


def bench_sliced(shape, M, r, dtype_name, impls, rounds, warmup, device, meta):
    """Rows for one shape: every impl's fwd+bwd time and saved bytes (common.layer_rows)."""
    K, slices = SLICED_SHAPES[shape]
    dtype = common.DTYPES[dtype_name]
    models = sliced_models(impls, K, slices, r, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(M)
    x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(M, sum(slices), generator=gen).to(device, dtype)
    row = {**meta, "case": shape, "M": M, "K": K, "N": sum(slices), "r": r, "dtype": dtype_name,
           "dropout": 0.0, "mode": "fwd_bwd"}
    return common.layer_rows(models, x, dy, True, rounds, warmup, device, row)


def build_sliced_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.layer --sliced", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny shape at M=64 fp32: tests the harness")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SLICED_SHAPES),
                        default=["gpt2-xl-c_attn", "llama3-8b-qkv"], help="fused projections to time")
    parser.add_argument("--M", type=int, default=None, help="tokens (default: 8192 on a GPU, 2048 on the CPU)")
    parser.add_argument("--r", type=int, default=16, help="rank of each enabled slice (and of full)")
    parser.add_argument("--impls", nargs="+", default=list(SLICED_IMPLS), choices=SLICED_IMPLS,
                        help="sliced: LoRASlicedLinear; full: LoRALinear, one rank-r adapter on the whole "
                             "output; separate: one layer per slice; linear: nn.Linear")
    common.add_cpu_timing_arguments(parser, rounds=20, each="implementation", out_name="sliced.csv")
    return parser


def sliced_main(argv):
    args = build_sliced_parser().parse_args(argv)
    device, meta = common.start("layer", args, ["--sliced", *argv])
    gpu = device.type == "cuda"
    M = 64 if args.quick else args.M or (8192 if gpu else 2048)
    dtype_name = "bf16" if gpu and not args.quick else "fp32"
    for shape in ["tiny-qkv"] if args.quick else args.shapes:
        rows = bench_sliced(shape, M, args.r, dtype_name, args.impls, args.rounds, args.warmup, device, meta)
        common.append_rows(args.out, rows)
        common.print_layer_rows(f"{shape} M={M} {rows[0]['K']}->{SLICED_SHAPES[shape][1]} r={args.r} "
                                f"{dtype_name} fwd_bwd", rows, [] if args.quick else SLICED_TARGETS)
    return args.out


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.layer", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--mixed", action="store_true",
                        help="the mixed-batch cases instead (rows with different adapters: "
                             "bench.mixed, whose options follow --mixed)")
    parser.add_argument("--sliced", action="store_true",
                        help="the per-slice LoRA cases instead (a fused q, k, v projection, LoRA on q and "
                             "v; options: --sliced --help)")
    parser.add_argument("--quick", action="store_true", help="a small grid (a minute on a GPU)")
    parser.add_argument("--grid", choices=("default", "targets"), default="default",
                        help="default: every shape x M at r=16 bf16, an r sweep, fp16/fp32 on one shape; "
                             "targets: the target cases only (the M=8192 4096->4096 headline, Llama-3-8B "
                             "shapes x r, decode sizes); without a GPU both are the tiny CPU grid")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                        help="instead of the grid: these shapes, crossed with --M, --r, --dtype and --dropout")
    parser.add_argument("--M", type=int, nargs="+", default=None,
                        help=f"tokens, with --shapes (default: {' '.join(map(str, TOKENS))})")
    parser.add_argument("--r", type=int, nargs="+", default=[16], help="LoRA ranks, with --shapes")
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(common.DTYPES),
                        help="with --shapes: these dtypes (default: bf16 on a GPU, fp32 on the CPU); "
                             "without: only the grid's cases in these dtypes")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0], metavar="P",
                        help="LoRA dropout probabilities, with --shapes")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to time")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (default: 30 on a GPU, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--out", default=None, metavar="CSV",
                        help="CSV to append to (default: bench/results/layer-<device>.csv)")
    parser.add_argument("--skip-cases-in", nargs="+", default=[], metavar="CSV",
                        help="leave out the cases these CSVs already hold rows for (a GPU session's "
                             "later stage, or resuming a run that was cut off)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--mixed" in argv:   # its own cases and options (bench/mixed.py)
        from bench import mixed
        return mixed.main([a for a in argv if a != "--mixed"])
    if "--sliced" in argv:
        return sliced_main([a for a in argv if a != "--sliced"])
    parser = build_parser()
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shapes:
        dtypes = args.dtype or ["bf16" if device.type == "cuda" else "fp32"]
        cases = list(itertools.product(args.shapes, args.M or TOKENS, args.r, dtypes, args.dropout))
    else:
        cases = default_grid(device, args.quick, args.grid)
        if args.dtype:
            cases = [c for c in cases if c[3] in args.dtype]
    if args.skip_cases_in:
        done = measured_cases(args.skip_cases_in)
        print(f"{sum(c in done for c in cases)} of {len(cases)} cases already measured in "
              f"{' '.join(args.skip_cases_in)}: left out", file=sys.stderr)
        cases = [c for c in cases if c not in done]
    rounds = args.rounds or (30 if device.type == "cuda" else 5)
    out = args.out or common.RESULTS_DIR / f"layer-{device.type}.csv"
    if device.type != "cuda":
        print("No CUDA device: tiny shapes on the CPU. These are CPU timings of PyTorch ops (and of "
              "the Triton interpreter), a test of the harness, not kernel timings.", file=sys.stderr)
    meta = common.run_metadata(device, "layer", argv)
    ceilings = {dt: common.measure_ceilings(device, common.DTYPES[dt]) for dt in sorted({c[3] for c in cases})}
    ceiling_rows = []
    for dt, (flops, bw) in ceilings.items():
        print(f"measured ceilings on {meta['device']} ({dt}): matmul {flops / 1e12:.1f} TFLOP/s, "
              f"copy {bw / 1e9:.0f} GB/s", file=sys.stderr)
        row = {**meta, "case": "ceiling", "M": 0, "K": 0, "N": 0, "r": 0, "dtype": dt, "dropout": 0.0,
               "impl": "device", "mode": "ceiling"}
        ceiling_rows += [{**row, "metric": "tflops", "p50": flops / 1e12, "p20": flops / 1e12,
                          "p80": flops / 1e12, "unit": "TFLOP/s"},
                         {**row, "metric": "gbps", "p50": bw / 1e9, "p20": bw / 1e9, "p80": bw / 1e9,
                          "unit": "GB/s"}]
    common.append_rows(out, ceiling_rows)
    n_rows = len(ceiling_rows)
    for case in common.progress(cases, desc="bench.layer", unit="case"):
        rows = bench_case(case, args.impls, rounds, args.warmup, device, ceilings, meta)
        common.append_rows(out, rows)
        n_rows += len(rows)
    print(f"{n_rows} rows appended to {out}")
    if device.type == "cuda":
        write_dispatch_choices(Path(out), meta)
    return out


if __name__ == "__main__":
    main()
