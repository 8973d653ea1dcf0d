"""`python -m lora_fast.check` / `lora-fast-check`: passes on the installed kernels, and fails (exit
1, FAIL rows) on a deliberately wrong implementation and on one that writes to its inputs; usage
errors exit 2 with one line. The end-to-end runs are subprocesses with the interpreter switch
removed from their environment (the command must switch it on itself); the others call main()."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BROKEN = textwrap.dedent('''
    """lora_fast's torch path with dA off by 5% in one row: the check must catch it."""
    from lora_fast import torch_path

    lora_forward = torch_path.lora_forward

    def lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, **dropout):
        dx, da, db = torch_path.lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, **dropout)
        da[0] *= 1.05
        return dx, da, db
''')

OTHER_MASK = textwrap.dedent('''
    """lora_fast's torch path dropping the elements of another seed: right in distribution, wrong
    element by element, which only a check that rebuilds the mask can see."""
    from lora_fast import torch_path

    def lora_forward(*args, seed=None, **kw):
        return torch_path.lora_forward(*args, seed=None if seed is None else seed + 1, **kw)

    def lora_backward(*args, seed=None, **kw):
        return torch_path.lora_backward(*args, seed=None if seed is None else seed + 1, **kw)
''')


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def _check(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lora_fast.check", *args], env=env or _env(),
                          capture_output=True, text=True)


def _ok_rows(stdout):
    """The cells of the rows that passed: M K N r dtype p paths out err err_cpp bound ok."""
    return [l.split() for l in stdout.splitlines() if l.rstrip().endswith(" ok")]


def test_quick_check_passes():
    """Without and with dropout (p = 0 and 0.1 by default)."""
    res = _check("--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed: 0 output(s) out of bounds" in res.stdout
    ok_rows = _ok_rows(res.stdout)
    dtypes = 1 if "Triton interpreter" in res.stdout else 2        # fp32, and bf16 on a GPU
    assert len(ok_rows) == 2 * 2 * dtypes * 2 * 4                 # shapes x ranks x dtypes x p x outputs
    assert {cells[5] for cells in ok_rows} == {"0", "0.1"}


def test_all_paths_checks_every_pair_the_dispatcher_can_pick():
    """67x20x30 at r=3: in_loop, split, cublas forward (M > 64: no split_k) x fused, split, cublas
    backward; 1x64x33: split_k too. With dropout the same pairs (cublas too: the torch path drops
    the kernels' elements). Every output within bounds."""
    from lora_fast import dispatch
    res = _check("--all-paths", "--shapes", "67x20x30", "1x64x33", "--dtypes", "fp32", "--ranks", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    pairs = {}
    for cells in _ok_rows(res.stdout):
        pairs.setdefault((cells[0], cells[5]), set()).add(cells[6])
    backward = {"fused", "split", "cublas"}
    assert pairs["67", "0"] == {f"{f}/{b}" for f in ("in_loop", "split", "cublas") for b in backward}
    assert pairs["1", "0"] == {f"{f}/{b}" for f in ("in_loop", "split", "split_k", "cublas") for b in backward}
    for M in (67, 1):
        offered = {f"{f}/{b}" for f in dispatch.candidates("forward", dispatch.Call(M, 3))
                   for b in dispatch.candidates("backward", dispatch.Call(M, 3))}
        assert pairs[str(M), "0.1"] == pairs[str(M), "0"] == offered
    refused = _check("--all-paths", "--impl", "lora_fast.kernels.forward")
    assert refused.returncode == 2 and "cannot be combined with --impl" in refused.stderr


def test_check_fails_on_a_wrong_implementation(tmp_path):
    (tmp_path / "broken_lora.py").write_text(BROKEN)
    res = _check("--quick", "--impl", "broken_lora",
                 env=_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])))
    assert res.returncode == 1, res.stdout + res.stderr
    fails = [l for l in res.stdout.splitlines() if l.rstrip().endswith("FAIL")]
    assert fails and all(" dA " in l for l in fails), res.stdout
    assert "FAILED:" in res.stdout


def test_check_fails_on_another_dropout_mask(tmp_path):
    """Dropping other elements than the kernels do (another seed's mask) fails every output at
    p > 0, and passes at p = 0."""
    (tmp_path / "other_mask.py").write_text(OTHER_MASK)
    res = _check("--shapes", "37x45x53", "--ranks", "3", "--dtypes", "fp32", "--impl", "other_mask",
                 env=_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])))
    assert res.returncode == 1, res.stdout + res.stderr
    rows = [l.split() for l in res.stdout.splitlines() if l.rstrip().endswith((" ok", "FAIL"))]
    assert {(c[5], c[-1]) for c in rows} == {("0", "ok"), ("0.1", "FAIL")}, res.stdout


def test_bad_arguments_are_refused():
    res = _check("--shapes", "12x7")
    assert res.returncode == 2 and "--shapes: expected MxKxN" in res.stderr
    res = _check("--dropout", "1.0")
    assert res.returncode == 2 and "--dropout: expected probabilities in [0, 1), got 1.0" in res.stderr


def test_console_script():
    """The install put the script beside this interpreter."""
    script = Path(sys.executable).parent / "lora-fast-check"
    assert script.exists(), f"no console script at {script}"
    res = subprocess.run([str(script), "--shapes", "5x9x7", "--ranks", "2", "--dtypes", "fp32"],
                         env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "lora_fast.check: lora_fast.dispatch" in res.stdout


def test_missing_extension_is_reported_not_skipped(monkeypatch, capsys):
    """Built without the C++ reference (LORA_FAST_BUILD_EXT=0): the check still runs, against the
    float64 reference, and says the C++ one is missing."""
    from lora_fast import check, cref
    monkeypatch.setattr(cref, "_cref", None)
    monkeypatch.setattr(cref, "_MISSING", "lora_fast._cref is not built (test)")
    assert check.main(["--shapes", "9x12x10", "--ranks", "3", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "C++ reference: MISSING (lora_fast._cref is not built (test))" in out
    assert all(cells[9] == "-" for cells in _ok_rows(out))


# ---- implementations that write to their inputs: the references come from copies taken first -------

def _hostile(monkeypatch, name, forward=None, backward=None):
    """A module `name` (importable by --impl) with lora_fast's torch path, forward or backward
    replaced."""
    import types

    from lora_fast import torch_path
    module = types.ModuleType(name)
    module.lora_forward = forward or torch_path.lora_forward
    module.lora_backward = backward or torch_path.lora_backward
    monkeypatch.setitem(sys.modules, name, module)
    return name


def _rows(stdout, result):
    return [l.split() for l in stdout.splitlines() if l.rstrip().endswith(f" {result}")]


def test_check_fails_an_impl_that_zeroes_lora_A_and_lora_B(monkeypatch, capsys):
    """With A = B = 0 the output is x·W0ᵀ + b, and references computed afterwards from the same
    (zeroed) tensors agreed with it: such an implementation passed."""
    from lora_fast import check, torch_path

    def forward(x, weight, lora_A, lora_B, bias, scaling, **dropout):
        lora_A.zero_()
        lora_B.zero_()
        return torch_path.lora_forward(x, weight, lora_A, lora_B, bias, scaling, **dropout)

    impl = _hostile(monkeypatch, "zeroes_adapters", forward=forward)
    assert check.main(["--shapes", "9x12x10", "--ranks", "3", "--dtypes", "fp32", "--impl", impl]) == 1
    out = capsys.readouterr().out
    assert {c[7] for c in _rows(out, "FAIL")} >= {"y", "dA", "dB"}, out   # against the true adapters
    assert out.count("FAIL: zeroes_adapters.lora_forward modified its input(s) lora_A, lora_B in place") == 2, out
    assert "FAILED: " in out and "2 call(s) modified their inputs" in out


def test_check_fails_a_right_impl_that_writes_to_x(monkeypatch, capsys):
    """Right outputs, x overwritten after use: every output row passes (the references did not
    see the overwritten x), and the write fails the check."""
    from lora_fast import check, torch_path

    def backward(dy, x, xs, weight, lora_A, lora_B, scaling, **dropout):
        grads = torch_path.lora_backward(dy, x, xs, weight, lora_A, lora_B, scaling, **dropout)
        x.mul_(-1.0)
        return grads

    impl = _hostile(monkeypatch, "writes_x", backward=backward)
    assert check.main(["--shapes", "9x12x10", "--ranks", "3", "--dtypes", "fp32", "--impl", impl]) == 1
    out = capsys.readouterr().out
    assert not _rows(out, "FAIL") and len(_rows(out, "ok")) == 2 * 4, out
    assert out.count("FAIL: writes_x.lora_backward modified its input(s) x in place") == 2, out


def test_nf4_check_passes_and_catches_a_wrong_decoding(monkeypatch, capsys):
    """--nf4: the passes get the 4-bit layer's stand-in for W0 (the kernels decode its codes in their
    K-loop, the torch path with NF4Weight.dequantize), each reference decodes the bytes itself, so
    a decoder that reads the nibbles the other way round fails against both, in either place."""
    import torch

    from lora_fast import check, nf4
    from lora_fast.kernels import launch
    args = ["--shapes", "9x64x10", "1x32x33", "--ranks", "3", "--dtypes", "fp32", "--nf4"]
    torch_path = args + ["--impl", "lora_fast.torch_path"]
    for passing in (args, torch_path):
        assert check.main(passing) == 0
        out = capsys.readouterr().out
        assert "W0 in NF4" in out and len(_ok_rows(out)) == 2 * 2 * 4
    real = nf4.NF4Weight.dequantize

    def swapped(self, dtype=None):
        w = real(self, dtype)
        return w.reshape(-1, 2).flip(1).reshape(w.shape)
    with monkeypatch.context() as patch:
        patch.setattr(nf4.NF4Weight, "dequantize", swapped)
        assert check.main(torch_path) == 1
        assert "FAIL" in capsys.readouterr().out
    # the kernels' decode: its 16-entry level table in the wrong order
    monkeypatch.setattr(launch, "_LEVELS", {torch.device("cpu"): nf4.nf4_levels().flip(0)})
    assert check.main(args) == 1
    assert "FAIL" in capsys.readouterr().out


def test_same_bits_sees_signed_zeros_and_keeps_nans_equal():
    import torch

    from lora_fast.check import _same_bits
    a = torch.tensor([0.0, float("nan"), 1.0])
    assert _same_bits(a, a.clone())
    assert not _same_bits(a, torch.tensor([-0.0, float("nan"), 1.0]))
    assert not _same_bits(a, a.double())
    assert not _same_bits(a, a[:2])


# ---- usage errors: exit 2 and one line, never a traceback --------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--impl", "os"], "--impl os: expected a module defining the functions lora_forward and lora_backward"),
    (["--impl", "no_such_module_here"], "--impl no_such_module_here: expected an importable module, got "
                                        "ModuleNotFoundError"),
    (["--impl", "lora_fast.kernels.lora_forward"], "--impl lora_fast.kernels.lora_forward: expected an "
                                                   "importable module"),
    (["--impl", ""], "--impl '': expected a module name"),
    (["--seed", str(2**70)], f"argument --seed: expected an integer in [0, 2**32), got {2**70}"),
    (["--seed", "-1"], "argument --seed: expected an integer in [0, 2**32), got -1"),
    (["--seed", "one"], "argument --seed: expected an integer in [0, 2**32), got 'one'"),
    (["--ranks", str(2**31)], f"--ranks: expected 1 <= r <= 2**31 - 1, got {2**31}"),
    (["--shapes", "99999999x99999x9999", "--ranks", "4"], "--shapes 99999999x99999x9999 --ranks 4: needs ~"),
    (["--nf4"], "--nf4: W0 (N x K) needs an even number of elements, not 5x9x7"),
])
def test_usage_errors_exit_2_with_one_line(args, message, capsys):
    from lora_fast import check
    with pytest.raises(SystemExit) as exit_:
        check.main(["--shapes", "5x9x7", "--ranks", "2", "--dtypes", "fp32", *args])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and not captured.out
    last = captured.err.rstrip("\n").split("\n")[-1]
    assert last.startswith("lora-fast-check: error: ") and message in last, captured.err
    assert captured.err.startswith("usage: lora-fast-check")   # argparse's usage, then the one error line
