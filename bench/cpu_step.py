"""CPU training step of one LoRA layer: lora_fast's torch path against PEFT's lora.Linear and the
bare nn.Linear floor, interleaved in one process.

    python -m bench.cpu_step [--M 2048 --K 1024 --N 1024 --r 16 --threads 2 --reps 30]

One step = forward + backward with W0 frozen and x requiring grad (a layer inside a network):
nn.Linear computes y and dX; the LoRA layers also dA and dB. Each repetition times one step of
every implementation, in rotating order, with time.perf_counter (CPU work is synchronous);
reports median and p20/p80 over the repetitions after warm-up, and appends rows to
bench/results/cpu_step.csv. These are CPU timings of PyTorch ops, not GPU kernel timings.
"""
import argparse
import csv
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lora_fast import LoRALinear

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_step.csv"
COLUMNS = ["device", "torch", "triton", "commit", "date", "command", "case", "M", "K", "N", "r",
           "dtype", "dropout", "impl", "mode", "metric", "p50", "p20", "p80", "unit"]


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


def make_layers(K, N, r, seed):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    torch.manual_seed(seed)
    linear = nn.Linear(K, N).requires_grad_(False)
    peft_base = nn.Linear(K, N)
    peft_base.load_state_dict(linear.state_dict())
    peft_base.requires_grad_(False)  # as PEFT's model wrapper freezes the base
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0)
    peft = PeftLinear(peft_base, "default", config=config, r=r, lora_alpha=r, lora_dropout=0.0)
    ours_base = nn.Linear(K, N)
    ours_base.load_state_dict(linear.state_dict())
    ours = LoRALinear.from_linear(ours_base, r=r, lora_alpha=r)
    with torch.no_grad():  # same non-zero adapter in both: B = 0 would skip nothing, but be fair
        ours.lora_A.copy_(torch.randn(r, K) / K ** 0.5)
        ours.lora_B.copy_(torch.randn(N, r) / r ** 0.5)
        peft.lora_A["default"].weight.copy_(ours.lora_A)
        peft.lora_B["default"].weight.copy_(ours.lora_B)
    return {"linear": linear, "peft": peft, "lora_fast": ours}


def step(layer, x, dy):
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    layer(x).backward(dy)


def check_same_function(layers, x, dy):
    """Timings only mean something if the LoRA layers compute the same thing."""
    outs = {}
    for name in ("peft", "lora_fast"):
        step(layers[name], x, dy)
        lora_a = layers[name].lora_A if name == "lora_fast" else layers[name].lora_A["default"].weight
        outs[name] = (x.grad.clone(), lora_a.grad.clone())
    for a, b in zip(outs["peft"], outs["lora_fast"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--M", type=int, default=2048)
    parser.add_argument("--K", type=int, default=1024)
    parser.add_argument("--N", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    layers = make_layers(args.K, args.N, args.r, seed=0)
    x = torch.randn(args.M, args.K, requires_grad=True)
    dy = torch.randn(args.M, args.N)
    check_same_function(layers, x, dy)
    names = list(layers)
    for _ in range(args.warmup):
        for name in names:
            step(layers[name], x, dy)
    times = {name: [] for name in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            step(layers[name], x, dy)
            times[name].append((time.perf_counter() - t0) * 1e3)

    def q(v, p):
        return statistics.quantiles(v, n=100, method="inclusive")[p - 1]

    meta = {"device": f"{cpu_name()} ({args.threads} threads)", "torch": torch.__version__,
            "triton": triton_version(), "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m bench.cpu_step " + " ".join(sys.argv[1:] if argv is None else argv),
            "case": f"{args.K}->{args.N}", "M": args.M, "K": args.K, "N": args.N, "r": args.r,
            "dtype": "float32", "dropout": 0.0, "mode": "fwd_bwd"}
    rows = []
    for name in names:
        v = times[name]
        rows.append({**meta, "impl": name, "metric": "time", "p50": statistics.median(v),
                     "p20": q(v, 20), "p80": q(v, 80), "unit": "ms"})
    med = {r["impl"]: r["p50"] for r in rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with args.out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)

    print(f"# {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}")
    print(f"# training step (fwd+bwd, W0 frozen) M={args.M} K={args.K} N={args.N} r={args.r} fp32;"
          " CPU timings, not kernel timings")
    print(f"{'impl':>10} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9}")
    for r in rows:
        print(f"{r['impl']:>10} {r['p50']:9.2f} {r['p20']:9.2f} {r['p80']:9.2f}")
    print(f"lora_fast speed-up over PEFT: {med['peft'] / med['lora_fast']:.3f}x (target >= 1.05x)")
    print(f"lora_fast / nn.Linear floor:  {med['lora_fast'] / med['linear']:.3f}x (target <= 1.12x)")
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()
