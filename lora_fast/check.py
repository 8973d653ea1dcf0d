"""Gradient-correctness check for users' CI: the installed kernels against the CPU references.

    python -m lora_fast.check [--quick] [--shapes 37x45x53 ...] [--ranks 3 16] [--dtypes fp32 fp16]
                              [--dropout 0 0.1]
    lora-fast-check ...                      (the same, as a console script)

Runs the forward and backward launchers of the implementation under test (`--impl`, default the
Triton kernels, `lora_fast.kernels`; compiled on a GPU when there is one, else under the Triton
interpreter, which this command switches on itself) on fresh random inputs, and compares y, dX, dA
and dB with the float64 PyTorch reference and the C++ reference (reported as missing, not skipped,
when the package was built without it). Prints one row per output: relative error ‖out − ref‖/‖ref‖
against each reference and the bound (lora_fast.tolerances: the dtype's bound, or twice plain
PyTorch's error in the same dtype if larger). Exits 1 if any output is out of bounds or non-finite.

--dropout P ... (default 0 and 0.1): each case also runs with LoRA dropout p = P > 0, from a seed;
the two references rebuild the kernels' keep-mask from that seed themselves (the float64 one in
plain PyTorch int64 ops, the C++ one with its own Philox: lora_fast.dropout), so the dropped
elements are checked one by one, not only in distribution.

--all-paths checks every path the GPU dispatcher can pick (lora_fast.dispatch: in_loop / split /
split_k / tma / cublas forward × fused / split / tma / cublas backward, those that apply to the shape), one row
group per pair and dropout p, instead of the launchers' default path.

--impl MODULE names any module with the launchers' interface:
    lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p=0.0, seed=None) -> (y, xs)
    lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, dropout_p=0.0, seed=None) -> (dx, dA, dB)
(dropout_p and seed, a 1-element int64 tensor, are passed only when p > 0).
"""
import argparse
import importlib
import os
import sys

DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEFAULT_SHAPES = ["37x45x53", "1x64x33", "67x83x45", "33x17x29", "21x1x1", "130x96x160"]
QUICK_SHAPES = ["37x45x53", "1x64x33"]
DEFAULT_DROPOUT = [0.0, 0.1]
SCALING = 1.5


def _parse_shape(text):
    try:
        m, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected MxKxN (e.g. 37x45x53), got {text!r}")
    if m < 0 or k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"--shapes: expected M >= 0, K >= 1, N >= 1, got {text!r}")
    return m, k, n


def _inputs(M, K, N, r, dtype, device, seed):
    import torch
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return (rand(M, K), rand(N, K, scale=K ** -0.5), rand(r, K, scale=K ** -0.5),
            rand(N, r, scale=r ** -0.5), rand(N), rand(M, N))


def _dropout_seed(seed, device):
    """The case's dropout seed, spread over the 62 bits the layer draws from (both key words used)."""
    import torch
    return torch.tensor([(seed + 1) * 0x9E3779B97F4A7C15 % 2**62], dtype=torch.int64, device=device)


def check_case(impl, M, K, N, r, dtype, device, seed, p=0.0):
    """Rows (output, err vs float64, err vs C++ or None, bound, ok) for one case, with LoRA
    dropout p (the references draw the mask from the same seed)."""
    import torch

    from lora_fast import cref, torch_path
    from lora_fast.reference import lora_linear_backward_ref, lora_linear_ref
    from lora_fast.tolerances import bound, rel_err

    x, w, a, b, bias, dy = _inputs(M, K, N, r, dtype, device, seed)
    drop = {"dropout_p": p, "seed": _dropout_seed(seed, device)} if p > 0 else {}
    y, xs = impl.lora_forward(x, w, a, b, bias, SCALING, **drop)
    dx, da, db = impl.lora_backward(dy, x, xs, w, a, b, SCALING, **drop)
    y_pt, xs_pt = torch_path.lora_forward(x, w, a, b, bias, SCALING, **drop)          # plain PyTorch, same dtype
    dx_pt, da_pt, db_pt = torch_path.lora_backward(dy, x, xs_pt, w, a, b, SCALING, **drop)

    ref = {"y": lora_linear_ref(x, w, a, b, bias, SCALING, **drop),
           **{k: v for k, v in lora_linear_backward_ref(dy, x, w, a, b, SCALING, **drop).items()
              if k in ("x", "lora_A", "lora_B")}}
    cpp = None
    if cref.available():
        cpp = {"y": cref.lora_linear_cref(x, w, a, b, bias, SCALING, **drop),
               **cref.lora_linear_backward_cref(dy, x, w, a, b, SCALING, bias_grad=False, **drop)}
    rows = []
    for name, key, out, base in (("y", "y", y, y_pt), ("dX", "x", dx, dx_pt), ("dA", "lora_A", da, da_pt),
                                 ("dB", "lora_B", db, db_pt)):
        if M == 0 and key in ("y", "x"):
            continue   # empty outputs: nothing to compare
        shape_ok = out is not None and tuple(out.shape) == tuple(ref[key].shape)
        finite = shape_ok and bool(torch.isfinite(out).all())
        err = rel_err(out, ref[key]) if shape_ok else float("inf")
        err_cpp = rel_err(out, cpp[key]) if (cpp is not None and shape_ok) else None
        limit = bound(dtype, rel_err(base, ref[key]))
        ok = finite and err <= limit and (err_cpp is None or err_cpp <= limit)
        rows.append((name, err, err_cpp, limit, ok))
    return rows


def _run_paths(impl, all_paths, M, K, N, r, dtype, device, seed, p):
    """(paths label, rows) for one case at dropout p: the impl's own choice, or every dispatcher
    path pair (every path drops the kernels' elements, so every pair applies with dropout too)."""
    if not all_paths:
        yield "default", check_case(impl, M, K, N, r, dtype, device, seed, p)
        return
    x, w, *_, dy = _inputs(M, K, N, r, dtype, device, seed)
    for forward in impl.forward_paths(M, r, tma=impl.tma_possible(x, w)):
        for backward in impl.backward_paths(r, need_dx=True, M=M, tma=impl.tma_possible(dy, w)):
            with impl.forced(forward=forward, backward=backward):
                yield f"{forward}/{backward}", check_case(impl, M, K, N, r, dtype, device, seed, p)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="lora-fast-check", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, two ranks, fp32 (and bf16 on a GPU)")
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, help="MxKxN, e.g. 37x45x53")
    parser.add_argument("--ranks", nargs="+", type=int, help="LoRA ranks r (default 1 3 16 64 100)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES,
                        help="default fp32 fp16, plus bf16 on a GPU (the interpreter does no bf16)")
    parser.add_argument("--dropout", nargs="+", type=float, metavar="P",
                        help="LoRA dropout probabilities (default 0 0.1: without and with dropout)")
    parser.add_argument("--impl", default="lora_fast.kernels", help="module under test (see above)")
    parser.add_argument("--all-paths", action="store_true",
                        help="every forward x backward path the dispatcher can pick (lora_fast.dispatch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton
    from lora_fast import cref

    device = torch.device("cuda" if cuda else "cpu")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if args.dtypes:
        names = args.dtypes
    elif args.quick:
        names = ["fp32"] + (["bf16"] if cuda else [])
    else:
        names = ["fp32", "fp16"] + (["bf16"] if cuda else [])
    if "bf16" in names and not cuda:
        parser.error("--dtypes bf16 needs a GPU: the Triton interpreter does no bf16 arithmetic")
    for r in args.ranks or []:
        if r < 1:
            parser.error(f"--ranks: expected r >= 1, got {r}")
    dropouts = args.dropout if args.dropout is not None else DEFAULT_DROPOUT
    for p in dropouts:
        if not 0.0 <= p < 1.0:
            parser.error(f"--dropout: expected probabilities in [0, 1), got {p}")
    shapes = args.shapes or [_parse_shape(s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    ranks = args.ranks or ([3, 16] if args.quick else [1, 3, 16, 64, 100])
    if args.all_paths and args.impl != "lora_fast.kernels":
        parser.error("--all-paths checks lora_fast.dispatch's paths: it cannot be combined with --impl")
    impl = importlib.import_module("lora_fast.dispatch" if args.all_paths else args.impl)

    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    print(f"lora_fast.check: {args.impl} on {where}; torch {torch.__version__}")
    if cref.available():
        print(f"C++ reference: built ({'OpenMP' if cref.has_openmp() else 'no OpenMP'})")
    else:
        print(f"C++ reference: MISSING ({cref.missing_reason()}); checking against float64 PyTorch only")
    print(f"LoRA dropout p: {', '.join(f'{p:g}' for p in dropouts)} (at p > 0 both references draw the "
          "kernels' mask from the case's seed themselves)")
    print(f"{'M':>5} {'K':>5} {'N':>5} {'r':>4} {'dtype':>5} {'p':>4} {'paths':>14} {'out':>3}  "
          f"{'err vs f64':>10} {'err vs C++':>10}  {'bound':>8}  result")
    failures, worst = 0, 0.0
    cases = [(s, r, n, p) for s in shapes for r in ranks for n in names for p in dropouts]
    for i, ((M, K, N), r, name, p) in enumerate(cases):
        seed = args.seed * len(cases) + i
        for paths, rows in _run_paths(impl, args.all_paths, M, K, N, r, dtypes[name], device, seed, p):
            for out, err, err_cpp, limit, ok in rows:
                failures += not ok
                worst = max(worst, err / limit)
                cpp_text = "-" if err_cpp is None else f"{err_cpp:.2e}"
                print(f"{M:>5} {K:>5} {N:>5} {r:>4} {name:>5} {p:>4g} {paths:>14} {out:>3}  {err:>10.2e} "
                      f"{cpp_text:>10}  {limit:>8.1e}  {'ok' if ok else 'FAIL'}")
    print(f"{'FAILED' if failures else 'passed'}: {failures} output(s) out of bounds; "
          f"worst error at {worst:.2f} of its bound")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
