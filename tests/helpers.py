"""Shared test helpers: case lists, input makers and the closeness check (its tolerance table is
lora_fast.tolerances, shared with `python -m lora_fast.check`)."""
import torch

from lora_fast.tolerances import bound, rel_err

HAS_CUDA = torch.cuda.is_available()

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Dtypes the kernels can be checked in here: the interpreter does no bf16 arithmetic (tl.dot on
# bf16 operands returns garbage there), so bf16 kernel checks need a GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# (M, K, N, r): none of M, K, N a multiple of 16 except where a case needs a full tile.
SHAPES = [
    (37, 45, 53, 3),     # odd everything, r < 16 padded inside the kernels
    (1, 64, 33, 1),      # one token (decode), r = 1
    (67, 83, 45, 64),    # r fills one rank tile exactly
    (33, 17, 29, 100),   # r > the 64-wide rank tile: rank loops over chunks
    (21, 1, 1, 2),       # K = 1 and N = 1
]


def assert_close(name, out, ref, dtype, baseline=None):
    """Shape, every element written and finite, and relative error within the bound for dtype
    (the table's, or twice that of `baseline`, plain PyTorch's result in the same dtype, if larger:
    see lora_fast.tolerances)."""
    ref = ref.to(torch.float64)
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite elements (unwritten output?)"
    err = rel_err(out, ref)
    tol = bound(dtype, None if baseline is None else rel_err(baseline, ref))
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} for {dtype}"


def make_inputs(M, K, N, r, dtype, device=DEVICE, seed=0, bias=True):
    """Fresh random inputs at unit scale of the output (never zeros: B is random, not LoRA's 0)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return {
        "x": rand(M, K),
        "weight": rand(N, K, scale=K ** -0.5),
        "lora_A": rand(r, K, scale=K ** -0.5),
        "lora_B": rand(N, r, scale=r ** -0.5),
        "bias": rand(N) if bias else None,
    }


def case_id(shape):
    return "M{}_K{}_N{}_r{}".format(*shape)


def fail_on_call(monkeypatch, owner, name, n, error):
    """Patch owner.name (os.replace, safetensors' save_file, ...) to raise `error` on its n-th call
    (1-based) and to run the real function on every other."""
    real, calls = getattr(owner, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, patched)


def row_by_row(model, x, names):
    """A mixed batch's reference: each row of x alone, with its adapter active (None: adapters
    disabled), the active adapter restored after."""
    import lora_fast
    from lora_fast import named_adapters
    active = named_adapters.active_adapter(model)
    out = []
    for i, name in enumerate(names):
        if name is None:
            with lora_fast.disable_adapters(model):
                out.append(model(x[i:i + 1]))
        else:
            named_adapters.set_adapter(model, name)
            out.append(model(x[i:i + 1]))
    named_adapters.set_adapter(model, active)
    return torch.cat(out)
