"""CPU training step of one LoRA layer, the torch path's target: lora_fast against PEFT's
lora.Linear and the bare nn.Linear floor, interleaved in one process (bench.layer's protocol).

    python -m bench.cpu_step [--M 2048 --r 16 --threads 2 --rounds 40]

One step = forward + backward with W0 frozen and x requiring grad (a layer inside a network), at
1024→1024 in fp32: nn.Linear computes y and dX, the LoRA layers also dA and dB. Rows go to
bench/results/cpu_step.csv. These are CPU timings of PyTorch ops, not GPU kernel timings.
"""
import argparse
import sys

import torch

from bench import common
from bench.layer import bench_case

TARGET_VS_PEFT = 1.05    # lora_fast at least this much faster than PEFT
TARGET_VS_FLOOR = 1.12   # and at most this much slower than nn.Linear


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_step", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--M", type=int, default=2048, help="tokens: rows of x")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    common.add_cpu_timing_arguments(parser, rounds=40, each="layer", out_name="cpu_step.csv")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    meta = common.run_metadata(device, "cpu_step", argv)
    ceilings = {"fp32": common.measure_ceilings(device, torch.float32)}
    rows = bench_case(("cpu-1k", args.M, args.r, "fp32", 0.0), ["linear", "peft", "lora_fast"],
                      args.rounds, args.warmup, device, ceilings, meta, modes=("fwd_bwd",))
    common.append_rows(args.out, rows)

    times = {r["impl"]: r for r in rows if r["metric"] == "time"}
    print(f"# {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}")
    print(f"# training step (fwd+bwd, W0 frozen) M={args.M} 1024->1024 r={args.r} fp32, "
          f"{args.rounds} interleaved rounds; CPU timings, not kernel timings")
    print(f"{'impl':>10} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9}")
    for name, r in times.items():
        print(f"{name:>10} {r['p50']:9.2f} {r['p20']:9.2f} {r['p80']:9.2f}")
    vs_peft = times["peft"]["p50"] / times["lora_fast"]["p50"]
    vs_floor = times["lora_fast"]["p50"] / times["linear"]["p50"]
    print(f"lora_fast speed-up over PEFT: {vs_peft:.3f}x (target >= {TARGET_VS_PEFT}x)")
    print(f"lora_fast / nn.Linear floor:  {vs_floor:.3f}x (target <= {TARGET_VS_FLOOR}x)")
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    main()
