"""Mixed-batch benchmark: one LoRA layer whose batch rows use different adapters
(lora_fast.batch_adapters), against the same layer with one adapter for every row, a per-adapter
loop of lora_fast calls, PEFT's mixed-batch inference (adapter_names=, forward only) and nn.Linear,
interleaved in one process (bench.layer's protocol: rounds rotated, warm-up first, medians; the
GPU's L2 overwritten before each timed run).

    python -m bench.mixed [--cases train decode] [--rounds N] [--out CSV]
    python -m bench.layer --mixed ...          (the same)

Cases (the issue's targets):
  train   fwd+bwd (W0 frozen, x requiring grad), M rows split over --adapters adapters (GPU: M=8192,
          K=N=4096, r=16, bf16; CPU: M=2048, K=N=1024, fp32), rows grouped by adapter and
          interleaved (round-robin): mixed ≤ 1.05x single on a GPU, ≤ 1.15x on the CPU
  decode  fwd, M=8 rows of 8 different adapters (GPU: 4096→4096 bf16): mixed ≤ 1.2x nn.Linear
Rows go to bench/results/mixed.csv with device, versions, commit, command and date. On a CPU these
are timings of the torch path's PyTorch ops, not kernel timings.
"""
import argparse
import sys

import torch
from torch import nn

import lora_fast
from bench import common
from lora_fast import named_adapters
from lora_fast.mixed import batch_adapters

TARGETS = {("cuda", "train"): ("mixed", "single", 1.05), ("cpu", "train"): ("mixed", "single", 1.15),
           ("cuda", "decode"): ("mixed", "linear", 1.2)}


def _case_sizes(device, case, adapters, quick=False):
    if quick:   # the harness alone (gpu_run's dry run)
        return dict(M=64 if case == "train" else 8, K=64, N=48, r=4, n=adapters if case == "train" else 8,
                    dtype="fp32")
    gpu = device.type == "cuda"
    if case == "train":
        return dict(M=8192 if gpu else 2048, K=4096 if gpu else 1024, N=4096 if gpu else 1024, r=16,
                    n=adapters, dtype="bf16" if gpu else "fp32")
    return dict(M=8, K=4096 if gpu else 1024, N=4096 if gpu else 1024, r=16, n=8,
                dtype="bf16" if gpu else "fp32")


def _layer(K, N, r, n, dtype, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, N, device=device, dtype=dtype))
    lora_fast.inject(model, r=r, lora_alpha=2 * r, target_modules=["0"], adapter_name="a0")
    for i in range(1, n):
        named_adapters.add_adapter(model, f"a{i}", r=r, lora_alpha=2 * r, target_modules=["0"])
    with torch.no_grad():
        for name in named_adapters.adapter_names(model):
            nn.init.normal_(model[0].adapter_weights(name)[1], std=0.02)
    return model


def _peft_layer(K, N, r, n, dtype, device):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(K, N, device=device, dtype=dtype)),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    return model.eval()


def bench_case(case, order, impls, rounds, warmup, device, meta, adapters=4, quick=False):
    """Rows for one case: every impl's p50/p20/p80 ms."""
    s = _case_sizes(device, case, adapters, quick)
    dtype = common.DTYPES[s["dtype"]]
    M, K, N, r, n = s["M"], s["K"], s["N"], s["r"], s["n"]
    train = case == "train"
    model = _layer(K, N, r, n, dtype, device).train(train)
    layer = model[0]
    names_list = named_adapters.adapter_names(model)
    if order == "grouped":
        names = [names_list[i * n // M] for i in range(M)]
    else:
        names = [names_list[i % n] for i in range(M)]
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=train)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    rows_of = {name: torch.tensor([i for i, m in enumerate(names) if m == name], device=device)
               for name in names_list}
    flush = common.L2Flush(device)
    peft_model = _peft_layer(K, N, r, n, dtype, device) if "peft" in impls and not train else None
    base = nn.Linear(K, N, device=device, dtype=dtype)
    base.weight, base.bias = layer.weight, layer.bias

    def step(fn):
        if not train:
            with torch.no_grad():
                return fn()
        y = fn()
        y.backward(dy)
        return y

    def single():
        named_adapters.set_adapter(model, "a0")
        return model(x)

    def mixed():
        with batch_adapters(model, names):
            return model(x)

    def loop():   # one lora_fast call per adapter on its rows, the outputs scattered back
        y = x.new_empty((M, N))
        for name, rows in rows_of.items():
            named_adapters.set_adapter(model, name)
            y = y.index_copy(0, rows, model(x.index_select(0, rows)))
        named_adapters.set_adapter(model, "a0")
        return y

    def peft():
        return peft_model(x, adapter_names=names)

    def linear():
        return base(x)

    fns = {"single": single, "mixed": mixed, "loop": loop, "peft": peft, "linear": linear}
    jobs = [name for name in impls if name in fns and (name != "peft" or peft_model is not None)]

    def run(job):
        flush()
        if train:
            for p in model.parameters():
                p.grad = None
            x.grad = None
        with common.Timer(device) as t:
            step(fns[job])
        return t

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = common.interleaved(jobs, run, rounds, warmup, sync)
    label = f"{case}-{order}-{n}adapters"
    rows = []
    for job in jobs:
        p50, p20, p80 = common.quantiles(times[job])
        rows.append({**meta, "case": label, "M": M, "K": K, "N": N, "r": r, "dtype": s["dtype"],
                     "dropout": 0.0, "impl": job, "mode": "fwd_bwd" if train else "fwd",
                     "metric": "time", "p50": p50, "p20": p20, "p80": p80, "unit": "ms"})
    return rows


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.mixed", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["train", "decode"], choices=("train", "decode"),
                        help="train: fwd+bwd of rows over --adapters adapters; decode: fwd of 8 rows, "
                             "8 adapters")
    parser.add_argument("--orders", nargs="+", default=["grouped", "interleaved"],
                        choices=("grouped", "interleaved"), help="how the train case's rows are ordered")
    parser.add_argument("--adapters", type=int, default=4, help="adapters in the train case")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: tests the harness")
    parser.add_argument("--impls", nargs="+", default=["single", "mixed", "loop", "peft", "linear"],
                        choices=("single", "mixed", "loop", "peft", "linear"),
                        help="single: one adapter for every row; mixed: batch_adapters; loop: one call "
                             "per adapter on its rows; peft: PEFT's adapter_names= (forward only); "
                             "linear: nn.Linear")
    common.add_cpu_timing_arguments(parser, rounds=20, each="implementation", out_name="mixed.csv")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    device, meta = common.start("mixed", args, argv)
    for case in args.cases:
        for order in (args.orders if case == "train" else ["every-row"]):
            rows = bench_case(case, order, args.impls, args.rounds, args.warmup, device, meta,
                              args.adapters, args.quick)
            common.append_rows(args.out, rows)
            by = {row["impl"]: row for row in rows}
            print(f"{rows[0]['case']} M={rows[0]['M']} {rows[0]['K']}->{rows[0]['N']} "
                  f"r={rows[0]['r']} {rows[0]['dtype']} {rows[0]['mode']}")
            for impl, row in by.items():
                print(f"  {impl:>7} {row['p50']:9.3f} ({row['p20']:.3f}-{row['p80']:.3f})")
            target = None if args.quick else TARGETS.get((device.type, case))
            if target and target[0] in by and target[1] in by:
                ratio = by[target[0]]["p50"] / by[target[1]]["p50"]
                print(f"  {target[0]}/{target[1]} = {ratio:.3f} (target <= {target[2]}): "
                      f"{'met' if ratio <= target[2] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
