"""Gradient-correctness check for users' CI: the installed kernels against the CPU references.

    python -m lora_fast.check [--quick] [--shapes 37x45x53 ...] [--ranks 3 16] [--dtypes fp32 fp16]
                              [--dropout 0 0.1]
    lora-fast-check ...                      (the same, as a console script)

Runs the forward and backward passes of the implementation under test (`--impl`, default the
Triton kernels through `lora_fast.dispatch`, on the paths its static rule picks — nothing timed,
nothing cached, no fallback; compiled on a GPU when
there is one, else under the Triton interpreter, which this command switches on itself) on fresh random inputs, and compares y, dX, dA
and dB with the float64 PyTorch reference and the C++ reference (reported as missing, not skipped,
when the package was built without it). Prints one row per output: relative error ‖out − ref‖/‖ref‖
against each reference and the bound (lora_fast.tolerances: the dtype's bound, or twice plain
PyTorch's error in the same dtype if larger). Exits 1 if any output is out of bounds or non-finite.

--dropout P ... (default 0 and 0.1): each case also runs with LoRA dropout p = P > 0, from a seed;
the two references rebuild the kernels' keep-mask from that seed themselves (the float64 one in
plain PyTorch int64 ops, the C++ one with its own Philox: lora_fast.dropout), so the dropped
elements are checked one by one, not only in distribution.

--nf4: W0 is stored in 4 bits (QLoRA's NF4, lora_fast.nf4; M x K x N with K·N even): the passes
get the 4-bit layer's stand-in for it (lora_fast.weights.packed: the kernels decode its codes in
their K-loop, the torch path decodes it first), the float64 and C++ references decode the codes
themselves, and the codes must come back unchanged. An --impl module outside lora_fast gets the
stand-in too: lora_fast.weights.dense(weight) gives it the decoded tensor.

--dora: the DoRA layer (lora_fast.dora, PEFT's use_dora) on the implementation's passes, with a
magnitude m (out,) a little off W0's row norms: y, dX, dA, dB and dm against the float64 reference
(reference.dora_linear_ref, by float64 autograd of PEFT's formula, dropout in PEFT's form) and the
C++ reference's own DoRA loops (hand-derived gradients: two independent derivations).

--all-paths checks every path the GPU dispatcher can pick (lora_fast.dispatch: in_loop / split /
split_k / tma / cublas forward × fused / split / tma / cublas backward, those that apply to the shape), one row
group per pair and dropout p, instead of the one the dispatcher picks.

--impl MODULE names any module with the passes' interface (lora_fast.kernels is accepted as a name
for lora_fast.dispatch: the kernels' launchers take an explicit path):
    lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p=0.0, seed=None) -> (y, xs)
    lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, dropout_p=0.0, seed=None) -> (dx, dA, dB)
(dropout_p and seed, a 1-element int64 tensor, are passed only when p > 0). The references are
computed first, from private copies of the inputs, and every input (x, weight, lora_A, lora_B,
bias, dy and the seed) must come back from each call unchanged, bit for bit: an implementation
that writes to its inputs fails the check, whatever its outputs.

Exit status: 0 when every output is within its bound, 1 when one is not (or an input was
modified), 2 for a usage error (a bad argument, an --impl that cannot be imported or lacks the
two functions).
"""
import argparse
import functools
import importlib
import os
import sys

DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEFAULT_SHAPES = ["37x45x53", "1x64x33", "67x83x45", "33x17x29", "21x1x1", "130x96x160"]
QUICK_SHAPES = ["37x45x53", "1x64x33"]
DEFAULT_DROPOUT = [0.0, 0.1]
DEFAULT_RANKS = [1, 3, 16, 64, 100]
QUICK_RANKS = [3, 16]
SCALING = 1.5
SEED_LIMIT = 2**32   # --seed's bound: case seeds (seed * cases + i) stay within torch's 64-bit seeds
TRITON_PLATFORMS = "Linux x86_64 and aarch64"   # where Triton publishes wheels


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help for the project's command lines: the description laid out as written (the module
    docstrings are), and each option's default after its help. A default that is None or False is
    not shown (it stands for "computed at run time" or "off": the help itself says what happens),
    nor one the help already names."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        hidden = (default is None or default is False or default is argparse.SUPPRESS
                  or (isinstance(default, (list, tuple)) and not default))
        if action.option_strings and not hidden and "default" not in text:
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            text += f" (default: {shown.replace('%', '%%')})"   # help strings are %-formatted
        return text


def _parse_shape(text):
    try:
        m, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxKxN (e.g. 37x45x53), got {text!r}")
    if m < 0 or k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"expected M >= 0, K >= 1, N >= 1, got {text!r}")
    return m, k, n


def _parse_seed(text):
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text}")
    return seed


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


INPUT_NAMES = ("x", "weight", "lora_A", "lora_B", "bias", "dy", "seed")


def _same_bits(a, b):
    """a and b hold the same bits: shape, dtype and every byte (so -0.0 differs from 0.0, and a
    NaN equals itself, which torch.equal would not say)."""
    import torch
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                            b.contiguous().reshape(-1).view(torch.uint8)))


def _modified(inputs, copies, already):
    """Names of the inputs that no longer equal their private copies, bit for bit (less those in
    `already`, reported for an earlier call)."""
    return [name for name, t in inputs.items() if name not in already and not _same_bits(t, copies[name])]


def check_case(impl, M, K, N, r, dtype, device, seed, p=0.0, nf4=False):
    """(rows, modified) for one case, with LoRA dropout p (the references draw the mask from the
    same seed): rows are (output, err vs float64, err vs C++ or None, bound, ok); modified lists
    (function, input names) for each of the implementation's calls that wrote to its inputs.

    The references (and the plain-PyTorch error the bound allows for) are computed before the
    implementation runs, from private copies of the inputs: an implementation that rewrites its
    inputs in place (zeroes lora_A and lora_B, say) is still compared with the right answer, and
    the check sees that it wrote to them.

    nf4: W0 is stored in 4 bits (lora_fast.nf4, QLoRA's format): the implementation gets the 4-bit
    layer's stand-in for it (weights.packed: the kernels read the codes, the torch path decodes them
    as the layer does, fp32 rounded once to the dtype) and the codes are the input checked for
    writes; the float64 reference decodes the bytes itself (reference.dequantize_nf4_ref) and the
    C++ reference with its own decoder."""
    from lora_fast import cref, torch_path, weights
    from lora_fast.reference import dequantize_nf4_ref, lora_linear_backward_ref, lora_linear_ref

    tensors = dict(zip(INPUT_NAMES, (*_inputs(M, K, N, r, dtype, device, seed), _dropout_seed(seed, device))))
    w_ref = w_cpp = None
    if nf4:
        from lora_fast.nf4 import quantize_nf4
        codes = quantize_nf4(tensors["weight"].float().cpu())
        on_device = codes.to(device)
        tensors["weight"] = on_device.packed                           # checked for writes, bit for bit
        w_ref = dequantize_nf4_ref(codes)
        w_cpp = cref.dequantize_nf4_cref(codes) if cref.available() else None
    copies = {name: t.clone() for name, t in tensors.items()}   # never handed to the implementation
    x, w, a, b, bias, dy, drop_seed = (copies[n] for n in INPUT_NAMES)
    drop = {"dropout_p": p, "seed": drop_seed} if p > 0 else {}
    # plain PyTorch in the same dtype, the bound's measure: with nf4 on the reference's decoding of
    # W0 (rounded to the dtype), so that a wrong decoder does not widen its own bound
    w_pt = w if w_ref is None else w_ref.to(device, dtype)
    y_pt, xs_pt = torch_path.lora_forward(x, w_pt, a, b, bias, SCALING, **drop)
    dx_pt, da_pt, db_pt = torch_path.lora_backward(dy, x, xs_pt, w_pt, a, b, SCALING, **drop)
    w64 = w if w_ref is None else w_ref
    ref = {"y": lora_linear_ref(x, w64, a, b, bias, SCALING, **drop),
           **{k: v for k, v in lora_linear_backward_ref(dy, x, w64, a, b, SCALING, **drop).items()
              if k in ("x", "lora_A", "lora_B")}}
    cpp = None
    if cref.available():
        wc = w if w_cpp is None else w_cpp
        cpp = {"y": cref.lora_linear_cref(x, wc, a, b, bias, SCALING, **drop),
               **cref.lora_linear_backward_cref(dy, x, wc, a, b, SCALING, bias_grad=False, **drop)}

    x, w, a, b, bias, dy, drop_seed = (tensors[n] for n in INPUT_NAMES)
    if nf4:
        w = weights.packed(on_device, dtype)
    drop = {"dropout_p": p, "seed": drop_seed} if p > 0 else {}
    modified = []

    def after(call):
        changed = _modified(tensors, copies, {name for _, names in modified for name in names})
        if changed:
            modified.append((call, changed))

    y, xs = impl.lora_forward(x, w, a, b, bias, SCALING, **drop)
    after("lora_forward")
    dx, da, db = impl.lora_backward(dy, x, xs, w, a, b, SCALING, **drop)
    after("lora_backward")

    rows = [_row(name, out, ref[key], None if cpp is None else cpp[key], base, dtype)
            for name, key, out, base in (("y", "y", y, y_pt), ("dX", "x", dx, dx_pt), ("dA", "lora_A", da, da_pt),
                                         ("dB", "lora_B", db, db_pt))
            if not (M == 0 and key in ("y", "x"))]   # empty outputs: nothing to compare
    return rows, modified


def _row(name, out, ref, ref_cpp, baseline, dtype):
    """(name, err vs float64, err vs C++ or None, bound, ok) of one output: the right shape, finite,
    and within the bound (twice plain PyTorch's error, `baseline`, if larger) of both references."""
    import torch

    from lora_fast.tolerances import bound, rel_err
    shape_ok = out is not None and tuple(out.shape) == tuple(ref.shape)
    finite = shape_ok and bool(torch.isfinite(out).all())
    err = rel_err(out, ref) if shape_ok else float("inf")
    err_cpp = rel_err(out, ref_cpp) if (ref_cpp is not None and shape_ok) else None
    limit = bound(dtype, rel_err(baseline, ref))
    return name, err, err_cpp, limit, finite and err <= limit and (err_cpp is None or err_cpp <= limit)


def check_dora_case(impl, M, K, N, r, dtype, device, seed, p=0.0):
    """(rows, modified) as check_case's, for DoRA on impl's passes (lora_fast.dora.DoRALinearFunction,
    dropout in PEFT's form): y, dX, dA, dB and dm against the float64 reference; the bound allows for
    the torch path's error in the same dtype."""
    import torch

    from lora_fast import cref, dora, torch_path
    from lora_fast.reference import dora_linear_ref

    tensors = dict(zip(INPUT_NAMES, (*_inputs(M, K, N, r, dtype, device, seed), _dropout_seed(seed, device))))
    g = torch.Generator().manual_seed(seed + 1)
    norms = torch.linalg.vector_norm(tensors["weight"].double().cpu(), dim=1)
    tensors["magnitude"] = (norms * (1 + 0.2 * torch.rand(N, generator=g, dtype=torch.float64))).to(device, dtype)
    copies = {name: t.clone() for name, t in tensors.items()}
    x, w, a, b, bias, dy, drop_seed, m = (copies[n] for n in (*INPUT_NAMES, "magnitude"))
    y_ref, grads = dora_linear_ref(x, w, a, b, m, bias, SCALING, dropout_p=p, seed=drop_seed if p > 0 else None,
                                   grad_out=dy)
    cpp = None
    if cref.available():
        drop = {"dropout_p": p, "seed": drop_seed} if p > 0 else {}
        g_cpp = cref.dora_linear_backward_cref(dy, x, w, a, b, m, SCALING, **drop)
        cpp = [cref.dora_linear_cref(x, w, a, b, m, bias, SCALING, **drop), g_cpp["x"], g_cpp["lora_A"],
               g_cpp["lora_B"], g_cpp["magnitude"]]

    def run(passes, t):
        leaves = [t[n].clone().requires_grad_() for n in ("x", "lora_A", "lora_B", "magnitude")]
        norm = dora.weight_norm(t["weight"], t["lora_A"], t["lora_B"], SCALING)
        y = dora.DoRALinearFunction.apply(leaves[0], t["weight"], t["bias"], leaves[1], leaves[2], leaves[3], norm,
                                          SCALING, passes, p, t["seed"] if p > 0 else None, True)
        y.backward(t["dy"])
        return [y.detach()] + [leaf.grad for leaf in leaves]

    baseline = run(torch_path, copies)
    modified = []
    outs = run(impl, tensors)
    changed = _modified(tensors, copies, set())
    if changed:
        modified.append(("DoRA forward/backward", changed))
    refs = [y_ref, grads["x"], grads["lora_A"], grads["lora_B"], grads["magnitude"]]
    rows = [_row(name, out, ref, None if cpp is None else cpp[i], base, dtype)
            for i, (name, out, base, ref) in enumerate(zip(("y", "dX", "dA", "dB", "dm"), outs, baseline, refs))
            if not (M == 0 and name in ("y", "dX"))]
    return rows, modified


def _run_paths(impl, all_paths, M, K, N, r, dtype, device, seed, p, nf4=False, dora=False):
    """(paths label, (rows, modified)) for one case at dropout p: the impl's own choice, or every
    dispatcher path pair (every path drops the kernels' elements, so every pair applies with dropout too)."""
    x, w, *_, dy = _inputs(M, K, N, r, dtype, device, seed)
    check = check_dora_case if dora else functools.partial(check_case, nf4=nf4)

    # DoRA (check_dora_case: PEFT's dropout form) rules out the TMA backward, and with dropout
    # split_k, tma and, for fp32, the kernels' form (dispatch.Call)
    form = {"dora": True, "peft_form": p > 0} if dora else {}

    def call(first):   # the dispatcher's view of the call: a 4-bit W0 is read by fewer paths
        if not nf4:
            return impl.Call(M, r, operands=(first, w), **form)
        return impl.Call(M, r, operands=(first, w), packed=True,
                         kernels_read_weight=impl.kernels_read_4bit(first.device, dtype, K), **form)
    if not all_paths:
        if getattr(impl, "__name__", "") == "lora_fast.dispatch":
            # the kernels on the static rule's paths: nothing timed, no cache file written, no
            # fallback hiding a path that fails, and fp32 on a GPU checks the kernels, not cuBLAS
            paths = {name: impl.heuristic(name, call(x if name == "forward" else dy)) for name in ("forward", "backward")}
            with impl.forced(**paths):
                yield "default", check(impl, M, K, N, r, dtype, device, seed, p)
            return
        yield "default", check(impl, M, K, N, r, dtype, device, seed, p)
        return
    for forward in impl.candidates("forward", call(x)):
        for backward in impl.candidates("backward", call(dy)):
            with impl.forced(forward=forward, backward=backward):
                yield f"{forward}/{backward}", check(impl, M, K, N, r, dtype, device, seed, p)


def build_parser():
    parser = argparse.ArgumentParser(prog="lora-fast-check", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a few seconds: shapes {' '.join(QUICK_SHAPES)}, ranks "
                             f"{' '.join(map(str, QUICK_RANKS))}, fp32 (and bf16 on a GPU)")
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, metavar="MxKxN",
                        help="problem sizes: M rows of x, K = in_features, N = out_features, e.g. 37x45x53 "
                             f"(default: {' '.join(DEFAULT_SHAPES)}; with --quick {' '.join(QUICK_SHAPES)})")
    parser.add_argument("--ranks", nargs="+", type=int, metavar="R",
                        help=f"LoRA ranks r >= 1 (default: {' '.join(map(str, DEFAULT_RANKS))}; with --quick "
                             f"{' '.join(map(str, QUICK_RANKS))})")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES,
                        help="dtypes of every tensor (default: fp32 fp16, plus bf16 on a GPU; with --quick "
                             "fp32, plus bf16 on a GPU; the Triton interpreter does no bf16)")
    parser.add_argument("--dropout", nargs="+", type=float, metavar="P",
                        help="LoRA dropout probabilities in [0, 1) (default: "
                             f"{' '.join(f'{p:g}' for p in DEFAULT_DROPOUT)}: without and with dropout)")
    parser.add_argument("--impl", default="lora_fast.dispatch", metavar="MODULE",
                        help="the module under test, imported by name: it must define lora_forward and "
                             "lora_backward with the passes' interface (given in the description); the "
                             "default runs the kernels on the dispatcher's static-rule paths (lora_fast.kernels "
                             "means the same); lora_fast.torch_path checks the torch backend, which needs no Triton")
    parser.add_argument("--nf4", action="store_true",
                        help="W0 in 4 bits (QLoRA's NF4): the passes get it decoded as the 4-bit layer "
                             "decodes it, each reference decodes the codes itself")
    parser.add_argument("--dora", action="store_true",
                        help="DoRA (lora_fast.dora) on the passes: y, dX, dA, dB and the magnitude's dm against "
                             "the float64 and C++ references; not with --nf4")
    parser.add_argument("--all-paths", action="store_true",
                        help="check every forward x backward path the GPU dispatcher can pick "
                             "(lora_fast.dispatch) instead of the one it picks; not with another --impl")
    parser.add_argument("--seed", type=_parse_seed, default=0,
                        help="an integer in [0, 2**32) from which every case's inputs and dropout seed are "
                             "drawn (case i of n uses seed * n + i)")
    return parser


def _check_case_sizes(parser, shapes, ranks):
    """A usage error for a case whose tensors cannot fit in this machine's memory (the float64
    references and private copies hold ~4 float64 copies of x, W, A, B and y)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not a POSIX system: no bound
        return
    for M, K, N in shapes:
        for r in ranks:
            need = 4 * 8 * (M * K + N * K + r * (K + N) + M * N)
            if need > memory:
                parser.error(f"--shapes {M}x{K}x{N} --ranks {r}: needs ~{need / 2**30:.0f} GiB for its "
                             f"tensors and references, this machine has {memory / 2**30:.0f} GiB")


def _load_impl(parser, name):
    """The --impl module; a usage error (exit 2, one line) when it cannot be imported or lacks one of
    the two functions. Only a failure to find a module is caught here: an exception raised by the
    module's own code is that module's bug, and keeps its traceback."""
    try:
        if name == "lora_fast.dispatch":   # it imports the kernels (and Triton) on its first call only
            importlib.import_module("lora_fast.kernels")
        impl = importlib.import_module(name)
    except ImportError as e:
        missing = (e.name or "").partition(".")[0]
        if missing == "triton":
            parser.error(f"--impl {name}: needs Triton, which is not installed here ({e}); Triton has wheels "
                         f"for {TRITON_PLATFORMS} only: check the torch backend with --impl lora_fast.torch_path")
        parser.error(f"--impl {name}: expected an importable module, got {type(e).__name__}: {e}")
    except (ValueError, TypeError) as e:   # an empty or relative name
        parser.error(f"--impl {name!r}: expected a module name such as lora_fast.dispatch ({e})")
    lacking = [f"no {f}" if not hasattr(impl, f) else f"a {f} that is not callable"
               for f in ("lora_forward", "lora_backward") if not callable(getattr(impl, f, None))]
    if lacking:
        parser.error(f"--impl {name}: expected a module defining the functions lora_forward and lora_backward "
                     f"(the interface in --help); it has {' and '.join(lacking)}")
    return impl


def main(argv=None):
    parser = build_parser()
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
        if not 1 <= r <= 2**31 - 1:
            parser.error(f"--ranks: expected 1 <= r <= 2**31 - 1, got {r}")
    dropouts = args.dropout if args.dropout is not None else DEFAULT_DROPOUT
    for p in dropouts:
        if not 0.0 <= p < 1.0:
            parser.error(f"--dropout: expected probabilities in [0, 1), got {p}")
    shapes = args.shapes or [_parse_shape(s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    ranks = args.ranks or (QUICK_RANKS if args.quick else DEFAULT_RANKS)
    if args.nf4:   # two 4-bit codes a byte: W0 needs an even element count
        odd = [f"{M}x{K}x{N}" for M, K, N in shapes if (K * N) % 2]
        if args.shapes and odd:
            parser.error(f"--nf4: W0 (N x K) needs an even number of elements, not {', '.join(odd)}")
        shapes = [(M, K, N) for M, K, N in shapes if (K * N) % 2 == 0]
    _check_case_sizes(parser, shapes, ranks)
    if args.dora and args.nf4:
        parser.error("--dora with --nf4: DoRA on a 4-bit base weight is not available yet")
    if args.impl == "lora_fast.kernels":
        args.impl = "lora_fast.dispatch"
    if args.all_paths and args.impl != "lora_fast.dispatch":
        parser.error("--all-paths checks lora_fast.dispatch's paths: it cannot be combined with --impl")
    impl = _load_impl(parser, args.impl)

    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    print(f"lora_fast.check: {args.impl} on {where}; torch {torch.__version__}"
          + ("; W0 in NF4 (4-bit)" if args.nf4 else "") + ("; DoRA" if args.dora else ""))
    if cref.available():
        print(f"C++ reference: built ({'OpenMP' if cref.has_openmp() else 'no OpenMP'})")
    else:
        print(f"C++ reference: MISSING ({cref.missing_reason()}); checking against float64 PyTorch only")
    print(f"LoRA dropout p: {', '.join(f'{p:g}' for p in dropouts)} (at p > 0 both references draw the "
          "kernels' mask from the case's seed themselves)")
    print(f"{'M':>5} {'K':>5} {'N':>5} {'r':>4} {'dtype':>5} {'p':>4} {'paths':>14} {'out':>3}  "
          f"{'err vs f64':>10} {'err vs C++':>10}  {'bound':>8}  result")
    failures, writes, worst = 0, 0, 0.0
    cases = [(s, r, n, p) for s in shapes for r in ranks for n in names for p in dropouts]
    for i, ((M, K, N), r, name, p) in enumerate(cases):
        seed = args.seed * len(cases) + i
        for paths, (rows, modified) in _run_paths(impl, args.all_paths, M, K, N, r, dtypes[name], device, seed, p,
                                                  args.nf4, args.dora):
            for out, err, err_cpp, limit, ok in rows:
                failures += not ok
                worst = max(worst, err / limit)
                cpp_text = "-" if err_cpp is None else f"{err_cpp:.2e}"
                print(f"{M:>5} {K:>5} {N:>5} {r:>4} {name:>5} {p:>4g} {paths:>14} {out:>3}  {err:>10.2e} "
                      f"{cpp_text:>10}  {limit:>8.1e}  {'ok' if ok else 'FAIL'}")
            for call, changed in modified:
                writes += 1
                print(f"FAIL: {impl.__name__}.{call} modified its input(s) {', '.join(changed)} in place "
                      f"(M={M} K={K} N={N} r={r} {name} p={p:g} paths {paths}): an implementation must "
                      "leave its inputs unchanged (the references were computed from copies)")
    text = f"{failures} output(s) out of bounds"
    if writes:
        text += f", {writes} call(s) modified their inputs"
    print(f"{'FAILED' if failures or writes else 'passed'}: {text}; worst error at {worst:.2f} of its bound")
    return 1 if failures or writes else 0


if __name__ == "__main__":
    sys.exit(main())
