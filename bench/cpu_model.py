"""CPU training step of the main job's model (examples/finetune_minilm.py): all-MiniLM-L6-v2 with
LoRA r=8, alpha=16 on query, key and value, lora_fast against PEFT, with and without LoRA dropout,
interleaved in one process (bench.layer's protocol).

    python -m bench.cpu_model [--rounds 60 --threads 2 --dropout 0 0.05]

Every model loads the same pretrained weights and gets the same adapter (one seeded A and a
non-zero B: LoRA's B = 0 would leave the branch untested by the check below); every job sees the
same batch in a round (32 lexicon entries + the 2 label prompts, padded to ~6 tokens, as the
example trains). A step is the example's own `train_step`: tokenize, forward, loss, backward,
AdamW step. Before timing, at dropout 0, the two implementations' first losses must agree. Rows
(time per step, tokens/s, the speed-up) go to bench/results/cpu_model.csv. The speed-up is the
median over rounds of PEFT's time / lora_fast's, with its p20–p80: within a round both ran the
same batch seconds apart, so that ratio is steadier than either time (batches differ in length,
and the machine is shared); the ratio of the two median times is printed beside it.
"""
import argparse
import statistics
import sys

import torch

from bench import common
from examples import finetune_minilm as demo

IMPLS = ("peft", "lora_fast")
TARGET_VS_PEFT = 1.0     # lora_fast at least PEFT's speed, with and without dropout


def build(impl, r, alpha, dropout, adapter):
    """The example's model with LoRA on its targets, `adapter` (name -> (A, B)) copied in."""
    model, _ = demo.load_model_and_tokenizer(torch.device("cpu"))
    if impl == "peft":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import Linear as PeftLinear
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                 target_modules=demo.TARGET_MODULES))
        layers = {name.removeprefix("base_model.model."): (m.lora_A["default"].weight, m.lora_B["default"].weight)
                  for name, m in model.named_modules() if isinstance(m, PeftLinear)}
    else:
        import lora_fast
        lora_fast.inject(model, r=r, lora_alpha=alpha, target_modules=demo.TARGET_MODULES, lora_dropout=dropout)
        layers = {name: (m.lora_A, m.lora_B) for name, m in lora_fast.lora_layers(model).items()}
    if sorted(layers) != sorted(adapter):
        raise RuntimeError(f"{impl}: adapted layers {sorted(layers)} != {sorted(adapter)}")
    with torch.no_grad():
        for name, (a, b) in layers.items():
            a.copy_(adapter[name][0])
            b.copy_(adapter[name][1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    return model.train(), optimizer


def make_adapter(r, seed=0):
    """name -> (A (r, in), B (out, r)) for every target layer of the example's model: A at
    kaiming-like scale, B small and non-zero."""
    model, _ = demo.load_model_and_tokenizer(torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in demo.TARGET_MODULES:
            k, n = m.in_features, m.out_features
            out[name] = (torch.randn(r, k, generator=gen) * k ** -0.5, torch.randn(n, r, generator=gen) * 0.01)
    return out


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_model", description=__doc__,
                                     formatter_class=common.HelpFormatter)
    common.add_cpu_timing_arguments(parser, rounds=60, each="job", out_name="cpu_model.csv")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05], metavar="P",
                        help="LoRA dropout probabilities, each timed for both implementations")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scaling alpha / r)")
    parser.add_argument("--batch-size", type=int, default=32, help="lexicon entries per step (plus the 2 prompts)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    meta = common.run_metadata(device, "cpu_model", argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    _, tokenizer = demo.load_model_and_tokenizer(device)
    train_data, _ = demo.load_vader_dataset()
    n = args.batch_size
    batches = [train_data[i * n:(i + 1) * n] for i in range(args.warmup + args.rounds)]
    adapter = make_adapter(args.r)
    jobs = [(impl, p) for p in args.dropout for impl in IMPLS]
    models = {(impl, p): build(impl, args.r, args.alpha, p, adapter) for impl, p in jobs}
    check_same_loss(models, tokenizer, batches[0], device)
    calls = {job: 0 for job in jobs}

    def run(job):
        model, optimizer = models[job]
        batch = batches[calls[job]]   # the k-th call of every job gets the k-th batch
        calls[job] += 1
        with common.Timer(device) as t:
            demo.train_step(model, tokenizer, optimizer, batch, device)
        return t

    times = common.interleaved(jobs, run, args.rounds, args.warmup)
    tokens = statistics.median(   # rows through each adapted layer: texts and prompts, padded
        tokenizer([*(t for t, _ in b), *demo.LABEL_PROMPTS], padding=True, return_tensors="pt")["input_ids"].numel()
        for b in batches)
    a, b = next(iter(adapter.values()))
    base_row = {**meta, "case": "minilm-l6-qkv", "M": tokens, "K": a.shape[1], "N": b.shape[0], "r": args.r,
                "dtype": "fp32", "mode": "step"}
    rows = []
    print(f"# {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}")
    print(f"# training step of {demo.MODEL_ID} (LoRA r={args.r} alpha={args.alpha:g} on "
          f"{', '.join(demo.TARGET_MODULES)}), {n} entries + {len(demo.LABEL_PROMPTS)} prompts, "
          f"~{tokens} tokens a step, {args.rounds} interleaved rounds")
    print(f"{'dropout':>7} {'impl':>10} {'p50 ms':>8} {'p20 ms':>8} {'p80 ms':>8}")
    for (impl, p), values in times.items():
        p50, p20, p80 = common.quantiles(values)
        print(f"{p:>7g} {impl:>10} {p50:8.1f} {p20:8.1f} {p80:8.1f}")
        row = {**base_row, "dropout": p, "impl": impl}
        rows.append({**row, "metric": "time", "p50": p50, "p20": p20, "p80": p80, "unit": "ms"})
        rows.append({**row, "metric": "tokens_per_s", "p50": tokens / p50 * 1e3, "p20": tokens / p80 * 1e3,
                     "p80": tokens / p20 * 1e3, "unit": "tok/s"})
    for p in args.dropout:
        peft, ours = times[("peft", p)], times[("lora_fast", p)]
        r50, r20, r80 = common.quantiles([t_peft / t_ours for t_peft, t_ours in zip(peft, ours)])
        rows.append({**base_row, "dropout": p, "impl": "lora_fast", "metric": "speedup_vs_peft",
                     "p50": r50, "p20": r20, "p80": r80, "unit": "x"})
        print(f"dropout {p:g}: lora_fast speed-up over PEFT {r50:.3f}x, median of per-round ratios (p20-p80 "
              f"{r20:.3f}-{r80:.3f}); ratio of medians {statistics.median(peft) / statistics.median(ours):.3f}x; "
              f"target >= {TARGET_VS_PEFT}x")
    common.append_rows(args.out, rows)
    print(f"rows appended to {args.out}")


def check_same_loss(models, tokenizer, batch, device):
    """Same weights, adapters and batch: at dropout 0 the implementations' losses agree to fp32
    rounding, so the times below are for the same computation (evaluated without a step)."""
    losses = {}
    labels = torch.tensor([y for _, y in batch])
    with torch.no_grad():
        for (impl, p), (model, _) in models.items():
            if p == 0:
                out = demo.logits(model.eval(), tokenizer, [t for t, _ in batch], device)
                losses[impl] = torch.nn.functional.cross_entropy(out, labels).item()
                model.train()
    if len(losses) == 2 and not abs(losses["peft"] - losses["lora_fast"]) <= 1e-4 * abs(losses["peft"]):
        raise RuntimeError(f"PEFT's loss {losses['peft']:.6f} != lora_fast's {losses['lora_fast']:.6f}")


if __name__ == "__main__":
    main()
