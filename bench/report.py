"""Turn a results CSV into a Markdown table and PNG plots, written next to it.

    python -m bench.report bench/results/layer-cuda.csv   (or a bench.model file)

Table: per case and mode, each implementation's median time and its ratios: speed-up over PEFT
(PEFT's time / its time, dropout matched), over the fastest baseline (PEFT, in-place addmm,
torch.compile, LoRAFusion-style; its time / this one's) and cost over the floor (its time /
nn.Linear's).
Plots: speed-up over PEFT against M, one panel per shape (training and inference); peak memory
and saved-for-backward bars for the largest case. Rows of several runs in one file are reported
per run (device, commit, date), the newest last.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

from bench import common

MODES = ("fwd", "fwd_bwd", "bwd", "step")
IMPL_ORDER = ["linear", "peft", "addmm", "compile", "lorafusion_style", "lora_fast", "lora_fast_torch",
              "lora_fast_interp"]
# What lora_fast must never be slower than (issue 8): the fastest of these in the same run.
BASELINES = ("peft", "addmm", "compile", "lorafusion_style")


def _index(rows):
    """{run: {(case, M, K, N, r, dtype, dropout): {(impl, mode): {metric: p50}}}}"""
    runs = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for row in rows:
        run = (row["device"], row["commit"], row["date"], row["command"])
        case = (row["case"], int(row["M"]), int(row["K"]), int(row["N"]), int(row["r"]), row["dtype"],
                float(row["dropout"]))
        runs[run][case][(row["impl"], row["mode"])][row["metric"]] = float(row["p50"])
    return runs


def _floor_time(cases, case, mode):
    """nn.Linear's time for the case: measured at dropout 0 and also valid for any dropout."""
    for c in (case, case[:6] + (0.0,)):
        t = cases.get(c, {}).get(("linear", mode), {}).get("time")
        if t:
            return t
    return None


def _best_baseline_time(by_impl, mode):
    """The fastest baseline's time for one case and mode (None when the run has none)."""
    return min((by_impl[(b, mode)]["time"] for b in BASELINES if (b, mode) in by_impl), default=None)


def markdown(rows):
    out = []
    for (device, commit, date, command), cases in _index(rows).items():
        ceilings = [f"{case[5]}: matmul {m[('device', 'ceiling')]['tflops']:.1f} TFLOP/s, "
                    f"copy {m[('device', 'ceiling')]['gbps']:.0f} GB/s"
                    for case, m in cases.items() if case[0] == "ceiling"]
        cases = {c: m for c, m in cases.items() if c[0] != "ceiling"}
        out += [f"## {device} — commit {commit}, {date}", "", f"`{command}`", ""]
        if ceilings:
            out += ["Measured ceilings (the roofline's two numbers): " + "; ".join(ceilings), ""]
        checked = targets(cases)
        if checked:
            out += ["Issue 8's targets (lora_fast):", "", *checked, ""]
        out += [
                "time = median ms; ×PEFT = PEFT's time / this one's (> 1: faster than PEFT); "
                "×best = the fastest baseline's time / this one's (≥ 1: no baseline is faster); "
                "×floor = this time / nn.Linear's (the floor; 1.00 is the target)", "",
                "| case | M | r | dtype | dropout | mode | impl | time ms | ×PEFT | ×best | ×floor | roofline % | saved B |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for case in sorted(cases, key=lambda c: (c[0], c[5], c[4], c[6], c[1])):
            name, M, K, N, r, dtype, dropout = case
            by_impl = cases[case]
            for mode in MODES:
                peft = by_impl.get(("peft", mode), {}).get("time")
                floor = _floor_time(cases, case, mode)
                best = _best_baseline_time(by_impl, mode)
                for impl in IMPL_ORDER:
                    m = by_impl.get((impl, mode))
                    if not m:
                        continue
                    t = m["time"]
                    vs_peft = f"{peft / t:.2f}" if peft and impl != "linear" else ""
                    vs_best = f"{best / t:.2f}" if best and impl not in BASELINES and impl != "linear" else ""
                    vs_floor = f"{t / floor:.2f}" if floor else ""
                    saved = f"{m['saved_bytes']:.0f}" if "saved_bytes" in m else ""
                    out.append(f"| {name} ({K}→{N}) | {M} | {r} | {dtype} | {dropout:g} | {mode} | {impl} | "
                               f"{t:.4g} | {vs_peft} | {vs_best} | {vs_floor} | {m.get('roofline_pct', float('nan')):.1f} | {saved} |")
        out.append("")
    return "\n".join(out)


def _ratio(cases, case, mode, impl, against):
    """(against's time / impl's time) for one case and mode, or None when either is missing."""
    by_impl = cases.get(case, {})
    t = by_impl.get((impl, mode), {}).get("time")
    if against == "floor":
        other = _floor_time(cases, case, mode)
        return t / other if t and other else None     # cost over the floor: impl / floor
    if against == "best":
        other = _best_baseline_time(by_impl, mode)
    else:
        other = by_impl.get((against, mode), {}).get("time")
    return other / t if t and other else None


def targets(cases):
    """Issue 8's targets, checked on the cases this run has (bench.layer --grid targets has them
    all): one Markdown bullet each, with the measured value and met/missed."""
    out = []

    def check(label, value, ok, where=""):
        out.append(f"- {label}: {value:.2f}{where} — {'met' if ok else 'MISSED'}")

    for p in (0.1, 0.0):
        head = ("llama3-8b-qo", 8192, 4096, 4096, 16, "bf16", p)
        peft, floor = _ratio(cases, head, "fwd_bwd", "lora_fast", "peft"), _ratio(cases, head, "fwd_bwd", "lora_fast", "floor")
        if peft is not None:
            check(f"training M=8192 4096→4096 r=16 bf16 dropout {p:g}: ×PEFT (≥ 1.45)", peft, peft >= 1.45)
        if floor is not None:
            check(f"training M=8192 4096→4096 r=16 bf16 dropout {p:g}: ×floor (≤ 1.10)", floor, floor <= 1.10)
    worst = {}
    for case in cases:
        if case[0].startswith("llama3-8b") and case[5] == "bf16" and case[1] >= 512:
            for mode in ("fwd_bwd", "fwd"):
                value = _ratio(cases, case, mode, "lora_fast", "best")
                if value is not None and (mode not in worst or value < worst[mode][0]):
                    worst[mode] = (value, case)
        if case[0].startswith("llama3-8b") and case[5] == "bf16" and case[1] <= 64:
            value = _ratio(cases, case, "fwd", "lora_fast", "floor")
            if value is not None and ("decode" not in worst or value > worst["decode"][0]):
                worst["decode"] = (value, case)
    for mode in ("fwd_bwd", "fwd"):
        if mode in worst:
            value, c = worst[mode]
            check(f"{mode}, Llama-3-8B shapes, M ≥ 512: worst ×best baseline (≥ 1.00)", value, value >= 1.0,
                  f" at {c[0]} M={c[1]} r={c[4]} dropout {c[6]:g}")
    if "decode" in worst:
        value, c = worst["decode"]
        check("inference, unmerged adapter, M ≤ 64: worst ×floor (≤ 1.10)", value, value <= 1.10,
              f" at {c[0]} M={c[1]} r={c[4]}")
    return out


def plots(rows, stem):
    """Speed-up over PEFT against M per shape; memory bars for the largest case. Returns paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = _index(rows)
    cases = {c: m for c, m in list(runs.values())[-1].items() if c[0] != "ceiling"}   # newest run
    shapes = sorted({c[0] for c in cases})
    present = {mode for by_impl in cases.values() for _, mode in by_impl}
    for mode in [m for m in ("fwd_bwd", "fwd") if m in present]:
        fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            series = defaultdict(list)
            for case, by_impl in cases.items():
                if case[0] != shape or case[6] != 0.0:
                    continue
                peft = by_impl.get(("peft", mode), {}).get("time")
                for impl in IMPL_ORDER:
                    t = by_impl.get((impl, mode), {}).get("time")
                    if peft and t and impl not in ("peft", "linear"):
                        series[(impl, case[4], case[5])].append((case[1], peft / t))
            for (impl, r, dtype), points in sorted(series.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{impl} r={r} {dtype}")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(shape, fontsize=9)
            ax.set_xlabel("tokens M")
            ax.set_ylabel(f"speed-up over PEFT ({mode})")
            ax.legend(fontsize=6)
        written.append(_save(fig, Path(f"{stem}-speedup-{mode}.png")))

    train_mode = "fwd_bwd" if "fwd_bwd" in present else "step"
    largest = max(cases, key=lambda c: c[1] * (c[2] + c[3]))
    by_impl = cases[largest]
    impls = [i for i in IMPL_ORDER if (i, train_mode) in by_impl]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k, metric in enumerate(("peak_mem", "saved_bytes")):
        values = [by_impl[(i, train_mode)].get(metric, 0) / 2 ** 20 for i in impls]
        ax.bar([j + 0.4 * k for j in range(len(impls))], values, width=0.4, label=metric)
    ax.set_xticks([j + 0.2 for j in range(len(impls))], impls, rotation=20, fontsize=8)
    ax.set_ylabel(f"MiB ({train_mode}; peak_mem is CUDA only)")
    ax.set_title(f"{largest[0]} M={largest[1]} r={largest[4]} {largest[5]} dropout={largest[6]:g}", fontsize=9)
    ax.legend(fontsize=8)
    written.append(_save(fig, Path(f"{stem}-memory.png")))
    return written


def _save(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("file", type=Path,
                        help="a results CSV written by bench.layer or bench.model; the table (NAME.md for "
                             "NAME.csv) and the plots (NAME-*.png) are written beside it")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = common.read_rows(args.file)
    if not rows:
        parser.error(f"{args.file}: no rows")
    stem = args.file.with_suffix("")
    md = Path(f"{stem}.md")
    md.write_text(f"# Results: {args.file.name}\n\n" + markdown(rows) + "\n")
    written = [md, *plots(rows, stem)]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
