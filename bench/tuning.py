"""What a first step costs in compiling and autotuning on a GPU, counted without one, and whether the
autotune keys keep the paths apart.

    python -m bench.tuning [--capability 8 9] [--sms 132] [--json] [--out FILE]

Replays the launchers' real autotune calls: kernels/launch.py records each launch (kernel, arguments)
instead of running it, on meta tensors, while lora_fast.dispatch behaves as on a GPU's first step —
every applicable path runs once for each new key, as the measurement runs them, then the chosen
one. For each recorded launch of an autotuned kernel it computes what Triton's autotuner would: the
tuning key (the kernel's `key` arguments plus every tensor argument's dtype) and the configs its
`early_config_prune` keeps for the target's compute capability. From those:

  collisions   (kernel, key) pairs launched with different kept-config sets: the autotuner would
               reuse one launch's tuned config for another whose pruner forbids it (the key must
               name every launch-time value the pruner reads)
  benchmarks   configs timed on the first step: the kept set of each distinct key (Triton 3.9 times
               none when one config is kept; 3.6 times that one too)
  builds       distinct compilations: kernel, config, constexprs and argument specialisation
               (Triton's own `native_specialize_impl`), as Triton's JIT cache keys them

Workloads: the bench's Llama-3-8B layer grid (bench.layer --grid targets: training and inference,
lora_fast and the LoRAFusion-style forced split paths), the ~0.9B Llama model's training step
(bench.model's "1b": LoRA r=16 on every projection, seq 2048, dropout 0 and 0.05), and the test
shapes. It must run with TRITON_INTERPRET unset (the GPU config lists; the interpreter has one).
"""
import argparse
import contextlib
import itertools
import json
import os
import sys
from collections import defaultdict
from unittest import mock

import torch

WORKLOADS = ("llama3-8b", "model-1b", "tests")


def _kernel_modules():
    from lora_fast import dispatch, kernels
    from lora_fast.kernels import configs, launch
    return dispatch, kernels, configs, launch


@contextlib.contextmanager
def gpu_first_step(capability, sms):
    """The dispatcher and launchers as on a fresh process on a GPU of this capability and SM count,
    every launch recorded (yields the list) instead of run."""
    dispatch, kernels, configs, launch = _kernel_modules()
    launches = []

    def timer(fn, device):
        fn()            # the measurement's warm-up run: compiles and autotunes
        return 1.0

    patches = [(dispatch, "can_measure", lambda t: True), (dispatch, "timer", timer),
               (dispatch, "tma_possible", lambda x, weight: capability >= 9 and kernels.tma_eligible(x, weight)),
               (configs, "sm_count", lambda device: sms), (launch, "sm_count", lambda device: sms),
               (configs, "device_capability", lambda: capability),
               (launch, "RECORDER", launches)]
    with contextlib.ExitStack() as stack:
        for target, name, value in patches:
            stack.enter_context(mock.patch.object(target, name, value))
        stack.enter_context(mock.patch.dict(os.environ, {"LORA_FAST_DISPATCH_CACHE": ""}))
        stack.callback(dispatch.clear)
        dispatch.clear()
        yield launches


class Call:
    """One lora_linear pass as the Function runs it: forward (training saves xs, inference does
    not) or backward, with what it is asked for."""

    def __init__(self, M, K, N, r, dtype, dropout, train=True, need_dx=True, bias=False, forced=None):
        self.M, self.K, self.N, self.r, self.dtype, self.dropout = M, K, N, r, dtype, dropout
        self.train, self.need_dx, self.bias, self.forced = train, need_dx, bias, forced

    def run(self):
        from lora_fast import dispatch
        meta = dict(device="meta", dtype=self.dtype)
        x = torch.empty(self.M, self.K, **meta)
        w = torch.empty(self.N, self.K, **meta)
        a = torch.empty(self.r, self.K, **meta)
        b = torch.empty(self.N, self.r, **meta)
        bias = torch.empty(self.N, **meta) if self.bias else None
        seed = torch.empty(1, device="meta", dtype=torch.int64) if self.dropout else None
        p = self.dropout if self.train else 0.0
        forced = dispatch.forced(*self.forced) if self.forced else contextlib.nullcontext()
        with forced:
            _, xs = dispatch.lora_forward(x, w, a, b, bias, 2.0, save_xs=self.train, dropout_p=p, seed=seed)
            if self.train:
                dy = torch.empty(self.M, self.N, **meta)
                dispatch.lora_backward(dy, x, xs, w, a, b, 2.0, need_dx=self.need_dx, dropout_p=p, seed=seed)


def llama3_8b_calls():
    """bench.layer --grid targets on a GPU: each case in training (x needs grad) and inference,
    lora_fast (dispatched) and lorafusion_style (split forced)."""
    from bench.layer import SHAPES, default_grid
    calls = []
    for shape, M, r, dtype_name, dropout in default_grid(torch.device("cuda"), quick=False, grid="targets"):
        K, N = SHAPES[shape]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        for train, forced in itertools.product((True, False), (None, ("split", "split"))):
            calls.append(Call(M, K, N, r, dtype, dropout, train=train, bias=True, forced=forced))
    return calls


def model_1b_calls():
    """One training step of bench.model's ~0.9B Llama (batch 1, seq 2048, bf16, r=16 on q, k, v, o,
    gate, up, down): the first layer's q/k/v see hidden states that need no gradient (the embedding
    is frozen), every other projection's input does."""
    from bench.model import SIZES
    size = SIZES["1b"]
    hidden, inter = size["hidden_size"], size["intermediate_size"]
    kv = hidden // size["num_attention_heads"] * size["num_key_value_heads"]
    M = size["seq"]
    projections = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
                   "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
    calls = []
    for dropout in (0.0, 0.05):
        for first_layer in (True, False):
            for name, (K, N) in projections.items():
                need_dx = not (first_layer and name in "qkv")
                calls.append(Call(M, K, N, 16, torch.bfloat16, dropout, need_dx=need_dx))
    return calls


def test_calls():
    """The test suite's and lora-fast-check's odd shapes, every rank class, each dtype, dropout on
    and off, training and inference."""
    from lora_fast.check import DEFAULT_SHAPES, _parse_shape
    shapes = [_parse_shape(s) for s in DEFAULT_SHAPES] + [(70, 48, 24)]
    calls = []
    for (M, K, N), r, dtype, dropout, train in itertools.product(
            shapes, (1, 3, 16, 64, 100), (torch.float32, torch.float16, torch.bfloat16), (0.0, 0.1), (True, False)):
        if M:
            calls.append(Call(M, K, N, r, dtype, dropout, train=train, bias=True))
    return calls


CALLS = {"llama3-8b": llama3_8b_calls, "model-1b": model_1b_calls, "tests": test_calls}


def _config_id(config):
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def _specialisation(kernel, args):
    """Triton's JIT specialisation of the non-constexpr arguments (type and 16-divisibility)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    out = []
    for name, arg in zip(kernel.arg_names, args):
        if hasattr(arg, "base") and hasattr(arg, "block_shape"):   # a TMA descriptor: its tile is the config's
            out.append((name, "desc", str(arg.base.dtype), tuple(arg.shape[1:]), tuple(arg.strides)))
        else:
            out.append((name,) + tuple(native_specialize_impl(BaseBackend, arg, False, True, True)))
    return tuple(out)


def analyse(launches, capability):
    """{'collisions': [...], 'kernels': {name: {keys, benchmarks, benchmarks_triton36, builds}}}."""
    from triton.runtime.autotuner import Autotuner

    from lora_fast.kernels import tuning
    kept = {}                       # (kernel name, key) -> set of config ids
    collisions = []
    builds = defaultdict(set)
    keys = defaultdict(set)
    for kernel, args, kwargs in launches:
        name = (kernel.fn if isinstance(kernel, Autotuner) else kernel).__name__
        spec = _specialisation(kernel if not isinstance(kernel, Autotuner) else kernel.fn, args)
        if not isinstance(kernel, Autotuner):
            builds[name].add((tuple(sorted(kwargs.items())), spec))
            continue
        named = dict(zip(kernel.arg_names, args))
        configs = kernel.early_config_prune(kernel.configs, named, capability=capability, **kwargs)
        if not configs:
            raise RuntimeError(f"{name}: the pruner leaves no config for {kwargs}")
        key = tuning.autotune_key(kernel, args, kwargs)
        ids = frozenset(_config_id(c) for c in configs)
        previous = kept.setdefault((name, key), ids)
        if previous != ids:
            collisions.append({"kernel": name, "key": repr(key), "first": sorted(map(repr, previous)),
                               "then": sorted(map(repr, ids)), "launch": repr(sorted(kwargs.items()))})
        keys[name].add(key)
        launch_constexprs = tuple(sorted(kwargs.items()))
        for c in configs:
            builds[name].add((launch_constexprs, _config_id(c), spec))
    per_kernel = {}
    for name in sorted(builds):
        sets = [ids for (kname, _), ids in kept.items() if kname == name]
        per_kernel[name] = {"keys": len(keys[name]),
                            "benchmarks": sum(len(s) for s in sets if len(s) > 1),
                            "benchmarks_triton36": sum(len(s) for s in sets),
                            "builds": len(builds[name])}
    return {"collisions": collisions, "kernels": per_kernel,
            "total": {k: sum(v[k] for v in per_kernel.values())
                      for k in ("keys", "benchmarks", "benchmarks_triton36", "builds")}}


def replay(workload, capability=9, sms=132):
    with gpu_first_step(capability, sms) as launches:
        for call in CALLS[workload]():
            call.run()
    return analyse(launches, capability)


def build_parser():
    from bench.common import HelpFormatter
    parser = argparse.ArgumentParser(prog="python -m bench.tuning", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--capability", type=int, nargs="+", default=[9], metavar="MAJOR",
                        help="compute capability majors to replay (8: A100, 9: H100/H200)")
    parser.add_argument("--sms", type=int, default=132, help="SM count of the GPU replayed (H100/H200: 132)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS,
                        help="what to replay: the Llama-3-8B layer grid, the ~0.9B model's step, the test shapes")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", metavar="JSON",
                        help="also write the counts, with the run's metadata, to this JSON file (default: none)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it (the replay needs the GPU config lists)")
    result = {f"sm_{cap}0/{w}": replay(w, cap, args.sms) for cap in args.capability for w in args.workloads}
    if args.out:
        from bench import common
        meta = common.run_metadata(torch.device("cpu"), "tuning", sys.argv[1:] if argv is None else argv)
        meta["device"] = f"replay without a GPU on {meta['device']} (sm {args.capability}, {args.sms} SMs)"
        with open(args.out, "w") as f:
            json.dump({**meta, "counts": {k: {"total": v["total"], "kernels": v["kernels"],
                                              "collisions": len(v["collisions"])} for k, v in result.items()}},
                      f, indent=1)
    if args.json:
        print(json.dumps(result))
        return result
    for name, r in result.items():
        t = r["total"]
        print(f"## {name}: {t['keys']} keys, {t['benchmarks']} configs benchmarked "
              f"({t['benchmarks_triton36']} on Triton 3.6), {t['builds']} builds, "
              f"{len(r['collisions'])} key collisions")
        for kernel, k in r["kernels"].items():
            print(f"  {kernel:36} keys {k['keys']:4}  benchmarks {k['benchmarks']:5}  "
                  f"(3.6: {k['benchmarks_triton36']:5})  builds {k['builds']:5}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
