"""The implementations the layer benchmark compares, all sharing one frozen base weight and one
adapter (the same non-zero A and B) per case:

  linear           nn.Linear alone (cuBLAS / MKL): the floor, no adapter
  peft             PEFT's real peft.tuners.lora.Linear around an nn.Linear
  addmm            the fastest hand-written style: out = x@W0ᵀ; out.addmm_(x@Aᵀ, Bᵀ, alpha=s), and a
                   custom backward reusing dY@B with in-place addmm_ (dropout 0 only)
  compile          torch.compile of the plain PEFT-style formula
  lora_fast        LoRALinear (backend "auto": the Triton kernels on CUDA, the torch path on CPU),
                   each pass's path picked by lora_fast.dispatch (measured on the GPU)
  lorafusion_style LoRAFusion's design in our kernels: a shrink pass (dropout, x·Aᵀ) then the GEMM
                   with xs·Bᵀ in its epilogue; backward one pass over dY (dY·B, dB) then the dX GEMM
                   with (dY·B)·A and dA in its epilogue — the dispatcher's "split" path, forced
  lora_fast_torch  lora_linear(backend="torch") on CUDA (dropout 0 only)
  lora_fast_interp lora_linear(backend="triton") on CPU under TRITON_INTERPRET=1 (not a timing)
"""
import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lora_fast import LoRALinear, dispatch, lora_linear
from lora_fast.backend import interpreter_enabled

IMPLS = ("linear", "peft", "addmm", "compile", "lora_fast", "lorafusion_style", "lora_fast_torch",
         "lora_fast_interp")


@dataclass
class Impl:
    name: str
    forward: callable                      # x -> y
    params: list                           # the trainable tensors (grads cleared between steps)
    modules: list = field(default_factory=list)   # toggled by train()/eval()
    lora: bool = True                      # carries an adapter (else: the floor)
    context: callable = contextlib.nullcontext    # entered around every forward and backward

    def train(self, mode):
        for m in self.modules:
            m.train(mode)


class _AddmmLoRA(torch.autograd.Function):
    """The in-place addmm LoRA layer as hand-written fast implementations do it."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        xa = x2 @ lora_A.t()
        out.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        x2 = x.reshape(-1, x.shape[-1])
        dy = dy.reshape(-1, weight.shape[0])
        g = dy @ lora_B
        dx = dy @ weight
        dx.addmm_(g, lora_A, alpha=s)
        da = torch.zeros_like(lora_A).addmm_(g.t(), x2, alpha=s)
        db = torch.zeros_like(lora_B).addmm_(dy.t(), xa, alpha=s)
        return dx.view(x.shape), None, None, da, db, None


def _plain_formula(x, weight, bias, lora_A, lora_B, scaling, dropout, training):
    dropped = F.dropout(x, p=dropout, training=training) if dropout > 0 else x
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped, lora_A), lora_B)


_COMPILED = {}


def _compiled_formula():
    """One compiled function for the whole run, with symbolic sizes (dynamic=True) so the grid's
    many shapes cost one compilation per dtype and mode rather than one each (its matmuls are
    library calls either way; only the fused pointwise kernels are shape-generic)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_plain_formula, dynamic=True)
    return _COMPILED["fn"]


def make_impls(names, K, N, r, dtype, dropout, device, seed=0):
    """The requested implementations for one case, those that apply to it (device, dropout)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    weight = nn.Parameter(rand(N, K, scale=K ** -0.5), requires_grad=False)
    bias = nn.Parameter(rand(N, scale=1.0), requires_grad=False)
    lora_A = rand(r, K, scale=K ** -0.5)
    lora_B = rand(N, r, scale=r ** -0.5)      # non-zero: a trained adapter, not LoRA's init
    scaling = 2.0

    def linear_sharing_base():
        lin = nn.Linear(K, N, device="meta")
        lin.weight, lin.bias = weight, bias
        return lin

    def adapter():
        return nn.Parameter(lora_A.clone()), nn.Parameter(lora_B.clone())

    out = {}
    for name in names:
        if name == "linear":
            lin = linear_sharing_base()
            out[name] = Impl(name, lin, [], [lin], lora=False)
        elif name == "peft":
            from peft import LoraConfig
            from peft.tuners.lora import Linear as PeftLinear
            config = LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=dropout)
            layer = PeftLinear(linear_sharing_base(), "default", config=config, r=r,
                               lora_alpha=scaling * r, lora_dropout=dropout)
            layer.to(device)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(lora_A)
                layer.lora_B["default"].weight.copy_(lora_B)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            out[name] = Impl(name, layer, [a, b], [layer])
        elif name == "addmm" and dropout == 0:
            a, b = adapter()
            out[name] = Impl(name, lambda x, a=a, b=b: _AddmmLoRA.apply(x, weight, bias, a, b, scaling), [a, b])
        elif name == "compile":
            a, b = adapter()
            state = {"training": True}
            fn = _compiled_formula()
            impl = Impl(name, lambda x, a=a, b=b: fn(x, weight, bias, a, b, scaling, dropout, state["training"]),
                        [a, b])
            impl.train = lambda mode, state=state: state.update(training=mode)
            out[name] = impl
        elif name == "lora_fast":
            layer = LoRALinear.from_linear(linear_sharing_base(), r=r, lora_alpha=scaling * r,
                                           lora_dropout=dropout)
            with torch.no_grad():
                layer.lora_A.copy_(lora_A)
                layer.lora_B.copy_(lora_B)
            out[name] = Impl(name, layer, [layer.lora_A, layer.lora_B], [layer])
        elif name == "lorafusion_style" and (device.type == "cuda" or interpreter_enabled()):
            a, b = adapter()
            state = {"training": True}
            impl = Impl(name, lambda x, a=a, b=b: lora_linear(
                x, weight, a, b, bias, scaling=scaling, dropout_p=dropout, training=state["training"],
                backend="triton"), [a, b], context=lambda: dispatch.forced(forward="split", backward="split"))
            impl.train = lambda mode, state=state: state.update(training=mode)
            out[name] = impl
        elif name in ("lora_fast_torch", "lora_fast_interp") and dropout == 0:
            backend = "torch" if name == "lora_fast_torch" else "triton"
            if (name == "lora_fast_torch") != (device.type == "cuda"):
                continue        # on CPU "lora_fast" already is the torch path
            if name == "lora_fast_interp" and not interpreter_enabled():
                continue
            a, b = adapter()
            out[name] = Impl(name, lambda x, a=a, b=b, be=backend: lora_linear(
                x, weight, a, b, bias, scaling=scaling, backend=be), [a, b])
    return out, (weight, bias)
