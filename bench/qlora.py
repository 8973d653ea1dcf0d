"""QLoRA benchmark: lora_fast's 4-bit NF4 LoRA layer against PEFT + bitsandbytes' QLoRA layer (the
same bytes: qlora.quantize writes what bitsandbytes does), lora_fast's 16-bit LoRA layer and
nn.Linear, interleaved in one process (bench.layer's protocol: rounds rotated, warm-up first,
medians; the GPU's L2 overwritten before each timed run). Also the bytes each saves for backward
and the base weight's bytes per parameter.

    python -m bench.qlora [--cases train decode] [--rounds N] [--out CSV]

Cases:
  train   fwd+bwd (W0 frozen, x requiring grad), r=16. GPU: M=8192, K=N=4096, bf16 compute
          (targets: ≥ 1.2x PEFT+bitsandbytes, ≤ 1.10x lora_fast's bf16 layer); CPU: M=2048,
          K=N=1024, fp32 (reported, no target: the torch path decodes W0 per call, as PEFT does)
  decode  fwd of M rows, --decode-M (GPU: 1, 8 and 64 rows, 4096→4096 bf16; targets: ≥ 2x faster
          than bf16 nn.Linear — a quarter of its bytes — and at least bitsandbytes' own 4-bit
          inference, `bnb`; CPU: 8 rows)
Implementations: qlora (lora_fast's 4-bit LoRA layer: on a GPU the kernels decode W0 in their
K-loop), base4 (lora_fast's Linear4bit, no adapter: the same kernels at rank 0), peft (PEFT's
LoRA on bitsandbytes' Linear4bit), bnb (bitsandbytes' Linear4bit alone), lora16 (lora_fast's
16-bit layer), linear (nn.Linear in the compute dtype).
Rows go to bench/results/qlora.csv with device, versions, commit, command and date. On a CPU these
are timings of the torch path's PyTorch ops and of bitsandbytes' CPU kernels.
"""
import argparse
import sys

import torch
from torch import nn

import lora_fast
from bench import common
from lora_fast import qlora

TARGETS = {("cuda", "train"): (("qlora", "peft", 1 / 1.2), ("qlora", "lora16", 1.10)),
           ("cuda", "decode"): (("qlora", "linear", 0.5), ("base4", "linear", 0.5), ("base4", "bnb", 1.0))}
IMPLS = ("qlora", "base4", "peft", "bnb", "lora16", "linear")


def _sizes(device, case, quick=False, rows=None):
    if quick:
        return dict(M=64 if case == "train" else rows or 8, K=128, N=64, r=4)
    gpu = device.type == "cuda"
    big = 4096 if gpu else 1024
    return dict(M=(8192 if gpu else 2048) if case == "train" else rows or 8, K=big, N=big, r=16)


def _bnb_layer(linear, dtype):
    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu().clone(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4").to(linear.weight.device)
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False   # else an eval-mode forward repacks the weight in place
    return layer


def bench_case(case, impls, rounds, warmup, device, meta, quick=False, rows=None):
    """Rows for one case (decode: of `rows` rows): every impl's p50/p20/p80 ms, and its
    saved-for-backward bytes."""
    s = _sizes(device, case, quick, rows)
    M, K, N, r = s["M"], s["K"], s["N"], s["r"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    train = case == "train"
    torch.manual_seed(0)
    linear = nn.Linear(K, N, device=device, dtype=dtype)
    models = {}
    if "qlora" in impls:
        four = qlora.Linear4bit.from_linear(linear, compute_dtype=dtype)
        models["qlora"] = qlora.LoRALinear4bit.from_4bit(four, r=r, lora_alpha=2 * r)
    if "base4" in impls:
        models["base4"] = qlora.Linear4bit.from_linear(linear, compute_dtype=dtype)
    if "bnb" in impls:
        try:
            models["bnb"] = _bnb_layer(linear, dtype)
        except ImportError as err:
            print(f"  bnb: skipped ({err})")
    if "lora16" in impls:
        models["lora16"] = lora_fast.LoRALinear.from_linear(nn.Linear(K, N, device=device, dtype=dtype), r=r,
                                                           lora_alpha=2 * r)
    if "peft" in impls:
        try:
            from peft import LoraConfig, get_peft_model
            net = nn.Sequential(_bnb_layer(linear, dtype))
            models["peft"] = get_peft_model(net, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
        except ImportError as err:
            print(f"  peft: skipped ({err})")
    if "linear" in impls:
        models["linear"] = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    for m in models.values():
        m.train(train)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=train)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    row = {**meta, "case": case, "M": M, "K": K, "N": N, "r": r, "dtype": {v: k for k, v in common.DTYPES.items()}[dtype],
           "dropout": 0.0, "mode": "fwd_bwd" if train else "fwd"}
    return common.layer_rows(models, x, dy, train, rounds, warmup, device, row)


def weight_bytes_per_parameter(shapes, double_quant=True):
    """Base-weight bytes per parameter of NF4 weights of these (out, in) shapes: codes, absmax and
    (double quantisation) the absmax codes' map, scales and offset, from nf4's own sizes."""
    from lora_fast.nf4 import ABSMAX_BLOCKSIZE, BLOCKSIZE
    total = params = 0
    for out, inp in shapes:
        n = out * inp
        blocks = -(-n // BLOCKSIZE)
        stats = blocks + 256 * 4 + 4 * -(-blocks // ABSMAX_BLOCKSIZE) + 4 if double_quant else 4 * blocks
        total += n // 2 + stats
        params += n
    return total / params


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.qlora", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["train", "decode"], choices=("train", "decode"),
                        help="train: fwd+bwd; decode: fwd of 8 rows")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: tests the harness")
    parser.add_argument("--decode-M", type=int, nargs="+", default=None, metavar="M",
                        help="rows of the decode case (default: 1 8 64 on a GPU, 8 on a CPU)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                        help="qlora: lora_fast's 4-bit layer; base4: lora_fast's Linear4bit (no adapter); "
                             "peft: PEFT's LoRA on bitsandbytes' Linear4bit; bnb: bitsandbytes' Linear4bit; "
                             "lora16: lora_fast's 16-bit layer; linear: nn.Linear")
    common.add_cpu_timing_arguments(parser, rounds=20, each="implementation", out_name="qlora.csv")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    device, meta = common.start("qlora", args, argv)
    decode_rows = args.decode_M or ([1, 8, 64] if device.type == "cuda" else [8])
    for case, n in [(c, n) for c in args.cases for n in (decode_rows if c == "decode" else [None])]:
        rows = bench_case(case, args.impls, args.rounds, args.warmup, device, meta, args.quick, n)
        common.append_rows(args.out, rows)
        common.print_layer_rows(f"{case} M={rows[0]['M']} {rows[0]['K']}->{rows[0]['N']} r={rows[0]['r']} "
                                f"{rows[0]['dtype']} {rows[0]['mode']}", rows,
                                [] if args.quick else TARGETS.get((device.type, case), []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
