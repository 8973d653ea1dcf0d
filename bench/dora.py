"""DoRA benchmark: lora_fast's DoRA layer (both dropout forms) against lora_fast's LoRA layer and
PEFT's DoRA (``use_dora=True``) on the same base linear, interleaved in one process (bench.layer's
protocol: rounds rotated, warm-up first, medians; the GPU's L2 overwritten before each run), and
the bytes each saves for backward.

    python -m bench.dora [--dropout P ...] [--rounds N] [--out CSV]

One case: a training step (fwd+bwd, W0 frozen, x requiring grad), r=16. GPU: M=8192, K=N=4096,
bf16 (targets at dropout 0: dora ≤ 1.10× lora; with PEFT's dropout form ≤ 2.0× lora and ≥ 1.3×
faster than peft_dora); CPU: M=2048, K=N=1024, fp32, the torch path (targets: dora ≤ 1.15× lora,
≥ 1.2× faster than peft_dora).
Implementations: dora (lora_fast, dropout="peft": PEFT's function), dora_lora_form (dropout inside
the LoRA branch only; the same function at dropout 0), dora_composed (dora with the column scale as
elementwise passes around the LoRA passes, lora_fast.dora.composed_scale: the A/B of the kernels'
DoRA epilogue and dY loads; on the CPU's torch path the two are the same ops), lora (lora_fast's LoRA layer), peft_dora
(PEFT's DoRA layer), linear (nn.Linear, frozen). Rows go to bench/results/dora.csv with device,
versions, commit, command and date.
"""
import argparse
import sys

import torch
from torch import nn

import lora_fast
from bench import common

IMPLS = ("dora", "dora_lora_form", "dora_composed", "lora", "peft_dora", "linear")
# (impl, baseline, most allowed ratio of times) per device and whether dropout applies
# (dora against dora_composed: the kernels' DoRA epilogue and dY loads must not lose to the passes
# they replace)
TARGETS = {("cuda", False): (("dora", "lora", 1.10), ("dora", "peft_dora", 1 / 1.3), ("dora", "dora_composed", 1.0)),
           ("cuda", True): (("dora_lora_form", "lora", 1.10), ("dora", "lora", 2.0), ("dora", "peft_dora", 1 / 1.3)),
           ("cpu", False): (("dora", "lora", 1.15), ("dora", "peft_dora", 1 / 1.2)),
           ("cpu", True): (("dora", "lora", 1.15), ("dora", "peft_dora", 1 / 1.2))}


def _sizes(device, quick=False):
    if quick:
        return dict(M=64, K=128, N=64, r=4)
    gpu = device.type == "cuda"
    return dict(M=8192 if gpu else 2048, K=4096 if gpu else 1024, N=4096 if gpu else 1024, r=16)


class _Composed(nn.Module):
    """lora_fast's DoRA layer with the column scale composed around the LoRA passes
    (lora_fast.dora.composed_scale): the design before the kernels' epilogue took it."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from lora_fast.dora import composed_scale
        with composed_scale():
            return self.layer(x)


def _models(impls, linear, r, p):
    def fresh():
        return nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                         dtype=linear.weight.dtype).requires_grad_(False)

    models = {}
    for impl in impls:
        base = fresh()
        base.load_state_dict(linear.state_dict())
        if impl in ("dora", "dora_lora_form", "dora_composed"):
            models[impl] = lora_fast.LoRALinear.from_linear(
                base, r=r, lora_alpha=2 * r, lora_dropout=p, use_dora=True,
                dora_dropout="lora" if impl == "dora_lora_form" else "peft")
            if impl == "dora_composed":
                models[impl] = _Composed(models[impl])
        elif impl == "lora":
            models[impl] = lora_fast.LoRALinear.from_linear(base, r=r, lora_alpha=2 * r, lora_dropout=p)
        elif impl == "peft_dora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as err:
                print(f"  peft_dora: skipped ({err})")
                continue
            models[impl] = get_peft_model(nn.Sequential(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                                          lora_dropout=p, use_dora=True))
        elif impl == "linear":
            models[impl] = base
    for m in models.values():
        m.train(True)
        for name, param in m.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02)
    return models


def bench_case(impls, rounds, warmup, device, meta, p, quick=False):
    s = _sizes(device, quick)
    M, K, N, r = s["M"], s["K"], s["N"], s["r"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    linear = nn.Linear(K, N, device=device, dtype=dtype)
    models = _models(impls, linear, r, p)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    row = {**meta, "case": "train", "M": M, "K": K, "N": N, "r": r,
           "dtype": {v: k for k, v in common.DTYPES.items()}[dtype], "dropout": p, "mode": "fwd_bwd"}
    return common.layer_rows(models, x, dy, True, rounds, warmup, device, row)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.dora", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1], metavar="P",
                        help="LoRA dropout probabilities, one case each")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: tests the harness")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                        help="dora / dora_lora_form: lora_fast's DoRA (PEFT's dropout form / dropout in the LoRA "
                             "branch only); lora: lora_fast's LoRA; peft_dora: PEFT's DoRA; linear: nn.Linear")
    common.add_cpu_timing_arguments(parser, rounds=20, each="implementation", out_name="dora.csv")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    device, meta = common.start("dora", args, argv)
    for p in args.dropout:
        rows = bench_case(args.impls, args.rounds, args.warmup, device, meta, p, args.quick)
        common.append_rows(args.out, rows)
        common.print_layer_rows(f"train M={rows[0]['M']} {rows[0]['K']}->{rows[0]['N']} r={rows[0]['r']} "
                                f"{rows[0]['dtype']} dropout={p} fwd_bwd", rows,
                                [] if args.quick else TARGETS.get((device.type, p > 0), []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
