"""QLoRA: a frozen 4-bit NF4 base weight (lora_fast.nf4, bitsandbytes' bytes) under a 16-bit LoRA.

    Linear4bit       lora_fast's frozen NF4 linear (what quantize() puts in place of nn.Linear)
    LoRALinear4bit   a LoRALinear over an NF4 weight: ours, or a bitsandbytes Linear4bit's, its
                     bytes shared (not copied, never re-quantised)
    quantize         a model's linears to Linear4bit, the same bytes bitsandbytes would write

Where the fused kernels run a call ("triton" backend, eagerly: kernels_decode), the layers hand
them a stand-in for W0 (weights.packed) and the kernels decode the codes tile by tile in their
K-loop: no decoded copy of W0 exists (a layer without an adapter runs them at rank 0:
dispatch.base_forward). Elsewhere the weight is decoded per call (fp32 arithmetic, rounded once to the
compute dtype) and the decoded copy is not kept for backward: the autograd Functions decode it
again there (weights.recomputable), as bitsandbytes' own 4-bit matmul does, so a training step
holds one layer's decoded weight at a time, not the model's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch.autograd import forward_ad

from . import dora
from . import nf4 as nf4_format
from . import weights
from .backend import resolve_backend
from .function import lora_linear
from .weights import recomputable
from .module import (DEFAULT_ADAPTER, AdapterSettings, LoRALinear, _check_adapter_dtype, _check_hparams,
                     check_adapter_name, check_dora, default_adapter_dtype)

_STATE = ("absmax", "absmax_code", "absmax_scale", "absmax_offset")


def is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (checked by name: bitsandbytes need not be installed)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
               for c in type(module).__mro__)


def is_4bit(module: nn.Module) -> bool:
    return isinstance(module, Linear4bit) or is_bnb_4bit(module)


def _register_state(module, w: "nf4_format.NF4Weight"):
    """w's tensors as module state: `weight` the packed codes (a frozen uint8 Parameter, as
    bitsandbytes holds them), the statistics as buffers, so .to() moves them and state_dict saves them."""
    module.weight = nn.Parameter(w.packed, requires_grad=False)
    offset = w.absmax_offset
    if offset is not None and not isinstance(offset, torch.Tensor):
        offset = torch.tensor(float(offset), dtype=torch.float32, device=w.packed.device)
    for name, t in zip(_STATE, (w.absmax, w.absmax_code, w.absmax_scale, offset)):
        module.register_buffer("weight_" + name, t)
    module.weight_shape = torch.Size(w.shape)
    module.weight_dtype = w.dtype


def _apply_keeping_statistics(module, fn, apply):
    """Module._apply(fn) that moves the NF4 statistics but never casts them: model.half() or
    .to(torch.bfloat16) would round the float32 absmax (and the codes' meaning with it) for good;
    they stay float32, as bitsandbytes keeps its quant state."""
    kept = {}
    for name in _STATE:
        t = module._buffers.get("weight_" + name)
        if t is not None:
            kept[name] = t
            module._buffers["weight_" + name] = None
    try:
        result = apply(fn)
    finally:
        for name, t in kept.items():
            moved = fn(t)
            module._buffers["weight_" + name] = t.to(moved.device) if moved.dtype != t.dtype else moved
    # the dtype the layer computes in follows the cast (as its bias does); the codes' meaning does not
    module.weight_dtype = fn(torch.empty(0, dtype=module.weight_dtype)).dtype
    return result


def _nf4_of(module) -> "nf4_format.NF4Weight":
    """The NF4Weight over a module's current tensors (built per call: .to() replaces them)."""
    if getattr(module, "bnb_weight", False) or is_bnb_4bit(module):
        return nf4_format.from_bnb(module.weight)
    state = {name: getattr(module, "weight_" + name) for name in _STATE}
    return nf4_format.NF4Weight(module.weight, state["absmax"], state["absmax_code"], state["absmax_scale"],
                                state["absmax_offset"], module.weight_shape, module.weight_dtype)


def compute_dtype_of(module) -> torch.dtype:
    """The dtype a 4-bit linear computes in: its compute_dtype, else its weight's original dtype."""
    return getattr(module, "compute_dtype", None) or _nf4_of(module).dtype


def decoded_shape(module) -> tuple[int, int]:
    """(out, in) of a 4-bit linear's weight."""
    return tuple(_nf4_of(module).shape)


def check_4bit(module, name=None):
    """A 4-bit linear LoRALinear4bit can wrap (NF4 with 64-element blocks); raises naming it."""
    what = f"{name!r}" if name else "base"
    try:
        _nf4_of(module)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what}: {err}") from None


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_compute_dtype(compute_dtype):
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected torch.float16, torch.bfloat16, torch.float32 or None, "
                         f"got {compute_dtype}")


def kernels_decode(x, dtype):
    """Whether a call on x (in `dtype`) runs the "triton" backend eagerly, where the kernels read the
    4-bit codes themselves: not while torch.compile traces (its ops take real tensors: the traced
    graph decodes, README), nor under torch.func transforms or forward-mode AD (plain-op formulas).
    A backend setting that cannot run here (LORA_FAST_BACKEND=triton on a float64 input, say) is
    not this function's to refuse: False, and lora_linear says why where it applies."""
    try:
        backend = resolve_backend("auto", x.device, dtype)
    except (ValueError, ImportError):
        return False
    return (backend == "triton" and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and forward_ad._current_level < 0)


def _compute_dtype(module, x):
    """The dtype the layer computes in: its compute_dtype if set (bitsandbytes' convention: x is
    cast to it, the output cast back), else x's."""
    return getattr(module, "compute_dtype", None) or x.dtype


class _DecodedLinear(torch.autograd.Function):
    """x @ decode(W)ᵀ + bias for a 4-bit W that keeps the codes, not the decoded copy, for backward
    (dX = dY @ decode(W) decodes again): the base linear of a 4-bit layer without an adapter."""

    @staticmethod
    def forward(x, bias, source, dtype):
        if _base_on_kernels(x, dtype):
            from lora_fast import dispatch
            y = dispatch.base_forward(x.reshape(-1, x.shape[-1]), weights.packed(source, dtype), bias)
            return y.view(*x.shape[:-1], source.shape[0])
        return F.linear(x, source.dequantize(dtype), bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, source, dtype = inputs
        ctx.source, ctx.dtype, ctx.x_dtype = source, dtype, x.dtype

    @staticmethod
    def backward(ctx, dy):
        need_x, need_b = ctx.needs_input_grad[:2]
        # dY is the output's dtype (the autocast dtype under autocast): the product in it, dX in x's
        dx = None
        if need_x and _base_on_kernels(dy, dy.dtype):
            from lora_fast import dispatch
            dx = dispatch.base_backward(dy.reshape(-1, dy.shape[-1]), weights.packed(ctx.source, dy.dtype))
            dx = dx.view(*dy.shape[:-1], ctx.source.shape[1]).to(ctx.x_dtype)
        elif need_x:
            dx = (dy @ ctx.source.dequantize(dy.dtype)).to(ctx.x_dtype)
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if need_b else None
        return dx, dbias, None, None


def _base_on_kernels(x, dtype):
    """Whether the base linear alone runs on the "triton" backend's table at rank 0
    (dispatch.base_forward: the codes decoded in the kernels' K-loop, or decode-then-cuBLAS where the
    dispatcher measures that faster or the kernels cannot read the weight): where a LoRA layer's call
    would (kernels_decode), not under autocast (F.linear's casts there, as before)."""
    return not torch.is_autocast_enabled(x.device.type) and kernels_decode(x, dtype)


def _base_linear(module, x, dtype):
    """The 4-bit base linear of x (already in dtype), its bias cast to dtype."""
    bias = None if module.bias is None else module.bias.to(dtype)
    return _DecodedLinear.apply(x, bias, module.nf4, dtype)


class Linear4bit(nn.Module):
    """y = x @ dequant(W)ᵀ + bias with W stored as NF4 (lora_fast.nf4: bitsandbytes' layout), frozen.

    The state dict holds ``weight`` (the packed codes, uint8 (out·in/2, 1)) and ``weight_absmax``,
    ``weight_absmax_code``, ``weight_absmax_scale``, ``weight_absmax_offset`` (the last three None
    without double quantisation). compute_dtype: the dtype x is cast to (None: x's own)."""

    def __init__(self, w: "nf4_format.NF4Weight", bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        """A frozen 4-bit linear over w (an nf4.NF4Weight: its tensors become this module's, not
        copied), with bias (out,) or None, computing in compute_dtype (None: x's dtype)."""
        super().__init__()
        if not isinstance(w, nf4_format.NF4Weight):
            raise TypeError(f"w: expected an lora_fast.nf4.NF4Weight, got {type(w).__name__}")
        check_compute_dtype(compute_dtype)
        self.out_features, self.in_features = w.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        _register_state(self, w)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """linear's weight quantised (nf4.quantize_nf4: bitsandbytes' bytes; double_quant: its
        absmax quantised too), its bias kept as it is; compute_dtype as for Linear4bit(...)."""
        return cls(nf4_format.quantize_nf4(linear.weight.detach(), double_quant=double_quant),
                   linear.bias, compute_dtype)

    @property
    def nf4(self) -> "nf4_format.NF4Weight":
        return _nf4_of(self)

    def _apply(self, fn, recurse=True):
        return _apply_keeping_statistics(self, fn, lambda f: super(Linear4bit, self)._apply(f, recurse))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded (out, in) weight in `dtype` (default: the original weight's)."""
        return self.nf4.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) @ the decoded weightᵀ + bias, in the compute dtype; the result in x's dtype."""
        dtype = _compute_dtype(self, x)
        return _base_linear(self, x.to(dtype), dtype).to(x.dtype)

    def extra_repr(self) -> str:
        """Sizes, format and bias, for print(module)."""
        w = self.nf4
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
                f"double_quant={w.double_quant}, bias={self.bias is not None}")


class LoRALinear4bit(LoRALinear):
    """A LoRALinear whose frozen base weight is NF4 (QLoRA): every adapter feature of LoRALinear
    (named adapters, dropout, rslora, master adapters, disable_adapters), the base weight decoded
    per call and not kept for backward.

    ``weight`` is the packed uint8 codes — a bitsandbytes layer's own Params4bit when made from one
    (shared, not copied: its bytes stay as they are) — so ``in_features``/``out_features`` come from
    the decoded shape. merge() keeps the merged 16-bit weight beside the codes, which are never
    touched, so unmerge() is exact; merge_and_unload gives an nn.Linear (decoded W0 + s·B@A in
    float32, rounded once) or, with requantize=True, a Linear4bit again (quantising the merged
    weight: NF4's error, up to half a level step times the block's absmax per element).
    DoRA (use_dora: QDoRA, PEFT's use_dora on a bitsandbytes 4-bit layer): the row norms from the
    codes in row chunks (nf4.NF4Weight.dequantize_rows: W0's part once, A·W0ᵀ per step, no (out, in)
    temporary), the 4-bit LoRA passes with the column scale composed around them (lora_fast.dora),
    merge as m / ‖W0 + s·B·A‖ ⊙ (W0 + s·B·A) of the decoded W0.
    """

    @classmethod
    def from_4bit(cls, base: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                  use_rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                  adapter_name: str = DEFAULT_ADAPTER, use_dora: bool = False,
                  dora_dropout: str = "peft") -> "LoRALinear4bit":
        """Wrap a 4-bit linear `base` (lora_fast's Linear4bit or bitsandbytes' Linear4bit with NF4),
        sharing its codes, statistics and bias. r, lora_alpha, lora_dropout, use_rslora,
        adapter_dtype (default: float32 master adapters on a 16-bit compute dtype, else the compute
        dtype), adapter_name, use_dora and dora_dropout as for LoRALinear.from_linear (DoRA's
        magnitude starts at the decoded W0's row norms)."""
        if not is_4bit(base):
            raise TypeError(f"base: expected a lora_fast.qlora.Linear4bit or a bitsandbytes Linear4bit, "
                            f"got {type(base).__name__}")
        settings = AdapterSettings(*_check_hparams(r, lora_alpha, lora_dropout, use_rslora),
                                   *check_dora(use_dora, dora_dropout))
        check_adapter_name(adapter_name)
        w = _nf4_of(base)
        compute = compute_dtype_of(base)
        _check_adapter_dtype(adapter_dtype, compute)
        layer = cls(w.shape[1], w.shape[0], r=1, bias=False, device="meta", dtype=compute)
        layer.from_conv1d = False
        layer._init_adapter_state()
        layer.active_adapter = adapter_name
        # the codes before the adapter: a DoRA magnitude starts at their decoded row norms
        layer.bnb_weight = is_bnb_4bit(base)
        layer.weight = base.weight
        if not layer.bnb_weight:   # bitsandbytes' statistics live in its Params4bit's quant state
            for name in _STATE:
                layer.register_buffer("weight_" + name, getattr(base, "weight_" + name))
        layer.weight_shape, layer.weight_dtype = torch.Size(w.shape), w.dtype
        layer.compute_dtype = getattr(base, "compute_dtype", None)
        layer._add_weights(adapter_name, settings, {"device": w.device,
                                                    "dtype": adapter_dtype or default_adapter_dtype(compute)})
        layer.bias = base.bias
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.train(base.training)
        return layer

    @property
    def nf4(self) -> "nf4_format.NF4Weight":
        return _nf4_of(self)

    def _apply(self, fn, recurse=True):
        return _apply_keeping_statistics(self, fn, lambda f: super(LoRALinear4bit, self)._apply(f, recurse))

    def base_dtype(self) -> torch.dtype:
        """The compute dtype (the base layer's compute_dtype, else the original weight's dtype)."""
        return self.compute_dtype or self.weight_dtype

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The 4-bit base linear alone for x (..., in), in the compute dtype, the result in x's dtype;
        the decoded weight is not kept for backward."""
        dtype = _compute_dtype(self, x)
        return _base_linear(self, x.to(dtype), dtype).to(x.dtype)

    def kernel_weight(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W0 as lora_linear takes it for x (already in `dtype`): a packed stand-in (lora_fast.weights)
        where the fused kernels run the call, so that they decode the codes tile by tile in their
        K-loop (no decoded copy in memory), else decoded (dense_weight)."""
        if kernels_decode(x, dtype):
            return weights.packed(self.nf4, dtype)
        return self.dense_weight(dtype)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 decoded (no adapter) in `dtype` (default the compute dtype), marked so that the
        autograd Functions decode it again in backward instead of keeping it (weights.recomputable)."""
        source = self.nf4
        with torch.no_grad():
            return recomputable(source.dequantize(dtype or self.base_dtype()), source)

    # --- merging: the merged weight beside the codes ------------------------------------------

    def _merged_dense(self) -> torch.Tensor:
        merged = self.nf4.dequantize(torch.float32)
        merged += self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        if self.use_dora:   # m / ‖W0 + s·B·A‖ ⊙ (W0 + s·B·A), the norm of that same sum
            merged *= (self.magnitude().detach().float() / torch.linalg.vector_norm(merged, dim=1))[:, None]
        return merged.to(self.base_dtype())

    # --- DoRA: the norms from the codes ---------------------------------------------------------

    def dora_base_sq(self) -> torch.Tensor:
        """The decoded W0's squared row norms (out,) in float32 (float64 for a float64 compute dtype),
        from the codes row chunk by row chunk, cached until the codes or their statistics change."""
        source = self._dora_source()
        key = dora.weight_key(source)
        if self._dora_base is None or self._dora_base[0] != key:
            self._dora_base = (key, dora.base_row_norms_sq(source))
        return self._dora_base[1]

    def dora_norm(self, name: str | None = None) -> torch.Tensor:
        """‖W0 + s·B·A‖ per row (out,) of DoRA adapter `name` (default the active one), detached, W0
        the codes' decoded weight (merged or not: merge() never changes the codes)."""
        name = self.active_adapter if name is None else name
        lora_A, lora_B = self.adapter_weights(name)
        scaling = self.adapter_settings[name].scaling
        source = self._dora_source()
        if torch.compiler.is_compiling():
            return dora.weight_norm_direct(source, lora_A, lora_B, scaling)
        return dora.weight_norm(source, lora_A, lora_B, scaling, self.dora_base_sq())

    def _dora_source(self) -> "dora.FourBit":
        """The codes as DoRA's norms read them: row chunks decoded in the compute dtype, the W0 the
        forward computes with."""
        return dora.FourBit(self.nf4, self.base_dtype())

    @torch.no_grad()
    def merge(self) -> None:
        """Keep W0 + s·B@A (float32, rounded once to the compute dtype) beside the codes; forward
        is then a plain linear with it. Costs out·in values of the compute dtype while merged."""
        self.check_mergeable()
        # _original_weight is the merged-state marker of LoRALinear: here the merged weight
        self._original_weight = self._merged_dense()
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Drop the merged weight: the codes were never touched, so this is exact."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        self._original_weight = None
        self.merged_adapter = None

    @torch.no_grad()
    def to_base(self, requantize: bool = False) -> nn.Module:
        """An nn.Linear with the active adapter merged (decoded W0 + s·B@A in float32, rounded once
        to the compute dtype), or with requantize=True a Linear4bit of that weight (lossy: NF4).
        The codes are not changed: this layer still works afterwards."""
        dense = self._merged_dense() if self.settings is not None else self.dense_weight()
        bias = None if self.bias is None else self.bias.detach()
        if requantize:
            return Linear4bit(nf4_format.quantize_nf4(dense, double_quant=self.nf4.double_quant), bias,
                              self.compute_dtype)
        base = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        base.weight = nn.Parameter(dense, requires_grad=False)
        base.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (..., out) for x (..., in), as LoRALinear's table says, in the compute dtype (x cast to
        it, the result cast back to x's dtype, as bitsandbytes' Linear4bit does)."""
        dtype = _compute_dtype(self, x)
        bias = None if self.bias is None else self.bias.to(dtype)
        xc = x.to(dtype)
        if self.merged and self.adapter_enabled:
            return F.linear(xc, self._original_weight.to(dtype), bias).to(x.dtype)
        if self.adapter_enabled and self.mixed_rows is not None:   # its adapters, active one or not
            return self.mixed_rows.forward(self, xc).to(x.dtype)
        if not self.adapter_enabled or self.settings is None:
            return self.base_linear(x)
        if self.use_dora:
            from .dora import dora_linear
            y = dora_linear(xc, self.kernel_weight(xc, dtype), self.lora_A, self.lora_B, self.magnitude(), bias,
                            scaling=self.scaling, dropout_p=self.lora_dropout, training=self.training,
                            dropout=self.settings.dora_dropout, norm=self.dora_norm())
            return y.to(x.dtype)
        y = lora_linear(xc, self.kernel_weight(xc, dtype), self.lora_A, self.lora_B, bias, scaling=self.scaling,
                        dropout_p=self.lora_dropout, training=self.training)
        return y.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        if self.bnb_weight:   # bitsandbytes' own keys for its statistics, as its Linear4bit saves them
            for key, value in self.weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # as LoRALinear: a merged layer unmerges, loads and merges again, so forward uses what was loaded
        merged = self.merged
        if merged:
            self.unmerge()
        try:
            nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                            unexpected_keys, error_msgs)
            if self.bnb_weight:
                self._load_bnb_statistics(state_dict, prefix, missing_keys, unexpected_keys, error_msgs)
        finally:
            if merged:
                self.merge()

    def _load_bnb_statistics(self, state_dict, prefix, missing_keys, unexpected_keys, error_msgs):
        """bitsandbytes' statistics keys (weight.absmax, weight.quant_map, ...) into the codes' own
        quant state, in place: codes loaded without their statistics would decode to another weight."""
        head = prefix + "weight."
        entries = {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(head)]
        current = self.weight.quant_state
        if not entries:
            if (prefix + "weight") in state_dict:
                missing_keys.append(head + "absmax")   # codes without their statistics
            return
        from bitsandbytes.functional import QuantState
        try:
            loaded = QuantState.from_dict(entries, device=self.weight.device)
        except (ValueError, KeyError, TypeError) as err:
            error_msgs.append(f"{head}*: bitsandbytes' quant state could not be read: {err}")
            return
        same = (loaded.quant_type == current.quant_type and tuple(loaded.shape) == tuple(current.shape)
                and loaded.blocksize == current.blocksize and bool(loaded.nested) == bool(current.nested)
                and loaded.absmax.shape == current.absmax.shape)
        if not same:
            error_msgs.append(f"{head}*: the checkpoint's 4-bit weight ({loaded.quant_type}, {tuple(loaded.shape)}, "
                              f"double quant {bool(loaded.nested)}) does not match this layer's "
                              f"({current.quant_type}, {tuple(current.shape)}, double quant {bool(current.nested)})")
            return
        with torch.no_grad():
            current.absmax.copy_(loaded.absmax)
            if current.nested:
                current.state2.absmax.copy_(loaded.state2.absmax)
                current.state2.code.copy_(loaded.state2.code)
                if isinstance(current.offset, torch.Tensor):
                    current.offset.copy_(loaded.offset)
                else:
                    current.offset = loaded.offset

    def extra_repr(self) -> str:
        """LoRALinear's, and the weight format."""
        return f"{super().extra_repr()}, nf4{' (bitsandbytes)' if self.bnb_weight else ''}"


def quantize(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, skip_modules: list[str] | None = None) -> list[str]:
    """Replace `model`'s nn.Linear layers in place by Linear4bit (NF4, bitsandbytes' bytes: a
    model quantised here holds what loading it with BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4") would), every one but the output head (as QLoRA and transformers
    leave it) and those named in skip_modules (exact names or dotted suffixes); returns the
    quantised names. Nothing is changed if an argument is refused.

    Args:
        model: an nn.Module without LoRA layers (quantize first, then inject).
        quant_type: "nf4" (the only 4-bit format here).
        double_quant: quantise the absmax statistics too (bitsandbytes' compress_statistics /
            bnb_4bit_use_double_quant): ~0.127 bits a parameter instead of 0.5.
        compute_dtype: the dtype the layers compute in (bnb_4bit_compute_dtype); None: the input's.
        skip_modules: names (exact or dotted suffix) left as they are (llm_int8_skip_modules).
    """
    from .inject import _output_head, lora_layers
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if quant_type != "nf4":
        raise ValueError(f"quant_type: only 'nf4' is supported, got {quant_type!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant: expected a bool, got {type(double_quant).__name__}")
    check_compute_dtype(compute_dtype)
    if isinstance(skip_modules, str) or not isinstance(skip_modules, (list, tuple, set, frozenset, type(None))):
        raise TypeError(f"skip_modules: expected a list of module names, got {skip_modules!r}")
    skip = list(skip_modules or [])
    if not all(isinstance(s, str) and s for s in skip):
        raise TypeError(f"skip_modules: expected a list of module names, got {skip_modules!r}")
    if lora_layers(model):
        raise RuntimeError("quantize: the model has LoRA layers already; quantize first, then inject")
    head = _output_head(model)
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and m is not head
             and not any(name == s or name.endswith("." + s) for s in skip)]
    for name in names:   # every weight checked before the first layer is replaced
        w = model.get_submodule(name).weight
        if w.is_meta:
            raise ValueError(f"quantize: layer {name!r}: its weight is on the meta device (no values to "
                             "quantise); load or materialise the weights first")
        if w.numel() % 2:
            raise ValueError(f"quantize: layer {name!r}: its weight has {w.numel()} elements, expected an "
                             "even number (two 4-bit codes per byte)")
        if not torch.isfinite(w).all():
            raise ValueError(f"quantize: layer {name!r}: its weight has inf or NaN values")
    quantized = {}
    for name in names:
        try:
            quantized[name] = Linear4bit.from_linear(model.get_submodule(name), double_quant, compute_dtype)
        except (ValueError, TypeError) as err:   # nothing replaced yet
            raise type(err)(f"quantize: layer {name!r}: {err}") from None
    for name, layer in quantized.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return names
