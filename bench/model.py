"""Whole-model training benchmark: a Llama-architecture model from a transformers config (random
weights, nothing downloaded), LoRA r=16 on every linear layer but the head, AdamW, PEFT against
lora_fast, dropout 0 and 0.05.

    python -m bench.model [--steps 10] [--dropout 0 0.05] [--out FILE]

Both models start from the same weights and the same adapters (PEFT's initialisation copied into
lora_fast's layers) and see the same batches; their steps are interleaved. Before timing is
trusted, the loss curves of the first steps must agree (dropout 0; with dropout the two draw
their masks differently). Reports per step: median time, tokens/s and peak memory (CUDA), and how
much longer each model's first step took than a steady one (compiling, autotuning and
lora_fast.dispatch's measuring; the target: under 60 s cold, under 10 s with warm caches in a
second process).
On CPU it runs a tiny config: a test of the harness, not a measurement.
"""
import argparse
import statistics
import sys
import time

import torch
from torch import nn

from bench import common
from lora_fast import LoRALinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZES = {  # ~0.9B parameters (the GPU default); a tiny one (the CPU default, tests)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000, seq=2048, dtype="bf16"),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, seq=32, dtype="fp32"),
}


def build_base(device, size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = {k: v for k, v in size.items() if k not in ("seq", "dtype")}
    config = LlamaConfig(**cfg, max_position_embeddings=size["seq"], attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device, common.DTYPES[size["dtype"]])


def with_peft(base, r, dropout):
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(TARGETS))
    # adapters in the model dtype, like ours (PEFT's default would keep them in fp32)
    return get_peft_model(base, config, autocast_adapter_dtype=False)


def with_lora_fast(base, peft_model, r, dropout):
    """Swap every target nn.Linear for a LoRALinear sharing its weight, with PEFT's adapter values.
    (A short local swap: model-level injection is `lora_fast.inject` once that lands.)"""
    base.requires_grad_(False)
    peft_layers = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict)}
    for name, module in list(base.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                layer = LoRALinear.from_linear(child, r=r, lora_alpha=2 * r, lora_dropout=dropout)
                src = peft_layers[f"{name}.{child_name}"]
                with torch.no_grad():
                    layer.lora_A.copy_(src.lora_A["default"].weight)
                    layer.lora_B.copy_(src.lora_B["default"].weight)
                setattr(module, child_name, layer)
    return base


def run(args, device):
    size = SIZES[args.size or ("1b" if device.type == "cuda" else "tiny")]
    meta = common.run_metadata(device, "model", args.argv)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, size["vocab_size"], (args.batch, size["seq"]), generator=gen).to(device)
               for _ in range(args.steps + args.warmup)]
    rows = []
    for dropout in args.dropout:
        peft_model = with_peft(build_base(device, size, seed=0), args.r, dropout)
        ours = with_lora_fast(build_base(device, size, seed=0), peft_model, args.r, dropout)
        models = {"peft": peft_model, "lora_fast": ours}
        optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for k, m in models.items()}
        times = {k: [] for k in models}
        first = {}     # wall seconds of each model's first step: compiling and tuning included
        losses = {k: [] for k in models}
        peaks = {}
        for step in common.progress(range(args.warmup + args.steps), desc=f"bench.model dropout={dropout:g}",
                                    unit="step"):
            for name in (list(models) if step % 2 == 0 else list(models)[::-1]):
                model, opt = models[name], optims[name]
                model.train()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                wall = time.perf_counter()
                with common.Timer(device) as t:
                    loss = model(input_ids=batches[step], labels=batches[step]).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
                first.setdefault(name, time.perf_counter() - wall)
                losses[name].append(loss.item())
                if step >= args.warmup:
                    times[name].append(t.elapsed_ms())
        if dropout == 0:
            check_loss_curves(losses, size["dtype"])
        tokens = args.batch * size["seq"]
        base_row = {**meta, "case": f"llama-{size['num_hidden_layers']}L-{size['hidden_size']}",
                    "M": tokens, "K": size["hidden_size"], "N": size["intermediate_size"], "r": args.r,
                    "dtype": size["dtype"], "dropout": dropout, "mode": "step"}
        for name in models:
            p50, p20, p80 = common.quantiles(times[name])
            rows.append({**base_row, "impl": name, "metric": "time", "p50": p50, "p20": p20, "p80": p80,
                         "unit": "ms"})
            rows.append({**base_row, "impl": name, "metric": "tokens_per_s", "p50": tokens / p50 * 1e3,
                         "p20": tokens / p80 * 1e3, "p80": tokens / p20 * 1e3, "unit": "tok/s"})
            if name in peaks:
                rows.append({**base_row, "impl": name, "metric": "peak_mem", "p50": peaks[name],
                             "p20": peaks[name], "p80": peaks[name], "unit": "B"})
            # the first step less a steady one: compiling, autotuning and the dispatcher's measuring
            setup = first[name] - p50 / 1e3
            rows.append({**base_row, "impl": name, "metric": "first_step_setup", "p50": setup, "p20": setup,
                         "p80": setup, "unit": "s"})
        print(f"dropout={dropout:g}: first step " + ", ".join(
            f"{n} {first[n]:.1f} s ({first[n] - statistics.median(times[n]) / 1e3:.1f} s over a steady step)"
            for n in models) + " — compile + tune + dispatch measuring; a warm second process should be < 10 s")
        print(f"dropout={dropout:g}: " + ", ".join(
            f"{n} {statistics.median(times[n]):.1f} ms/step" for n in models)
            + f"; lora_fast speed-up over PEFT {statistics.median(times['peft']) / statistics.median(times['lora_fast']):.3f}x"
            + (f"; peak MiB peft {peaks['peft'] / 2**20:.0f}, lora_fast {peaks['lora_fast'] / 2**20:.0f}" if peaks else ""))
        del models, optims, peft_model, ours
    return rows


def check_loss_curves(losses, dtype):
    """Same weights, adapters and data: the two loss curves agree to the dtype's rounding."""
    tol = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2}[dtype]
    for step, (a, b) in enumerate(zip(losses["peft"], losses["lora_fast"])):
        if not abs(a - b) <= tol * abs(a):
            raise RuntimeError(f"loss curves diverge at step {step}: PEFT {a:.6f}, lora_fast {b:.6f}")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first is the cold one)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05], metavar="P",
                        help="LoRA dropout probabilities, each a pair of models")
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (default: 1b on a GPU, tiny on the CPU)")
    parser.add_argument("--out", default=None, metavar="CSV",
                        help="CSV to append to (default: bench/results/model-<device>.csv)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" or args.size == "tiny":
        print("A tiny model: a test of the harness, not a measurement.", file=sys.stderr)
    rows = run(args, device)
    out = args.out or common.RESULTS_DIR / f"model-{device.type}.csv"
    common.append_rows(out, rows)
    print(f"{len(rows)} rows appended to {out}")
    return out


if __name__ == "__main__":
    main()
