"""LoRASlicedLinear: LoRA on chosen output slices of a fused projection (loralib's MergedLinear,
for slices of any sizes).

GPT-2's ``c_attn`` (768 → 3·768) and a fused ``qkv_proj`` (4096 → 4096 + 1024 + 1024 with GQA) hold
q, k and v in one weight. With ``slices=(4096, 1024, 1024), enable=(True, False, True)`` slice i
(its own out_i rows of the output) gets the update s·B_i·A_i if enabled, none otherwise:

    y = x @ W0ᵀ + b + s · (d(x) @ Aᵀ) @ B_fullᵀ

A (k·r, in) stacks the k enabled slices' A_i; lora_B (Σ enabled out_i, r) stacks their B_i by rows
(loralib's layout, which for equal slices is MergedLinear's own: its parameters copy over as they
are); B_full (out, k·r) is the block-diagonal placement of the B_i (``block_b``), zeros elsewhere.
One dropout mask on x serves every slice, as in loralib. The forward is one ``lora_linear`` call for
the whole layer, so one fused pass each way: the kernels see a rank-k·r adapter. B_full is built
from lora_B on every call (a copy of out·k·r values, against the M·(in + out) the passes move), so
autograd keeps lora_B's gradient to the enabled blocks of dB_full (the off-block entries the
kernels compute are dropped), and lora_A's needs nothing: B_full's zeros give no cross-slice terms.

Saved for backward: LoRALinear's (x, and xs (M, k·r): the k slices' M·r values each, as k separate
layers would keep) plus B_full itself, out·k·r·itemsize bytes (384 KiB for a bf16 Llama-3-8B qkv at
r = 16, q and v), which unlike lora_B is not a parameter the module holds anyway.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .function import lora_linear
from .module import DEFAULT_ADAPTER, LoRALinear, _AdapterWeights


def check_slices(slices: Sequence[int], enable: Sequence[bool],
                 out_features: int | None = None) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """(slices, enable) as tuples of int and bool, or a ValueError naming the bad argument: slices
    positive integers summing to out_features (any sum for None), enable one bool per slice, at
    least one True."""
    if isinstance(slices, (str, bytes)) or not isinstance(slices, Sequence) or not slices \
            or any(isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n <= 0
                   for n in slices):
        raise ValueError(f"slices: expected a non-empty sequence of positive integers (the output "
                         f"rows of each slice), got {slices!r}")
    if out_features is not None and sum(slices) != out_features:
        raise ValueError(f"slices: {tuple(slices)} sum to {sum(slices)}, expected out_features = "
                         f"{out_features}")
    if isinstance(enable, (str, bytes)) or not isinstance(enable, Sequence) \
            or any(not isinstance(on, (bool, np.bool_)) for on in enable):
        raise ValueError(f"enable: expected a sequence of True/False, one per slice, got {enable!r}")
    if len(enable) != len(slices):
        raise ValueError(f"enable: has {len(enable)} entries, expected {len(slices)} (one per slice "
                         f"of {tuple(slices)})")
    if not any(enable):
        raise ValueError("enable: no slice enabled; expected at least one True (with none, use the "
                         "linear itself)")
    return tuple(int(n) for n in slices), tuple(bool(on) for on in enable)


def enabled_sizes(slices: Sequence[int], enable: Sequence[bool]) -> list[int]:
    """The out_i of the enabled slices among `slices` (`enable` one bool per slice), in order: the
    row counts of the B_i that lora_B stacks."""
    return [n for n, on in zip(slices, enable) if on]


def block_b(lora_B: torch.Tensor, slices: Sequence[int], enable: Sequence[bool]) -> torch.Tensor:
    """B_full (out, k·r) of lora_B (Σ enabled out_i, r) for a layer's `slices` and `enable`: the j-th
    enabled slice's rows hold its B_j in columns j·r .. (j+1)·r - 1, every other entry is 0.
    Differentiable in lora_B (its gradient is the enabled blocks of B_full's). r is lora_B's column
    count."""
    blocks = iter(lora_B.split(enabled_sizes(slices, enable)))
    # a disabled slice is an (n, 0) block: block_diag gives it n zero rows and no columns
    return torch.block_diag(*(next(blocks) if on else lora_B.new_zeros(n, 0)
                              for n, on in zip(slices, enable)))


def blocks_from_full(B_full: torch.Tensor, slices: Sequence[int], enable: Sequence[bool],
                     r: int) -> torch.Tensor:
    """lora_B (Σ enabled out_i, r) whose ``block_b`` is B_full (out, k·r) for a layer's `slices`,
    `enable` and per-slice rank r: e.g. a rank-k·r adapter saved in PEFT's format, whose A is the
    layer's lora_A as it is. A ValueError if B_full has another shape or any non-zero entry outside
    the blocks (such an adapter does not factor per slice)."""
    slices, enable = check_slices(slices, enable)
    k = sum(enable)
    if tuple(B_full.shape) != (sum(slices), k * r):
        raise ValueError(f"B_full: expected shape {(sum(slices), k * r)} (out, k·r for {k} enabled "
                         f"slices of rank {r}), got {tuple(B_full.shape)}")
    inside = block_b(B_full.new_ones(sum(enabled_sizes(slices, enable)), r), slices, enable) != 0
    outside = B_full[~inside].count_nonzero().item()
    if outside:
        raise ValueError(f"B_full: {outside} non-zero entries outside the per-slice blocks of slices "
                         f"{slices}, enable {enable}: it is not a per-slice adapter of rank {r}")
    return B_full[inside].view(-1, r)   # boolean indexing reads row-major: slice by slice, row by row


def equivalent_alpha(lora_alpha: float, k: int, use_rslora: bool = False) -> float:
    """The lora_alpha of a rank-k·r adapter whose scaling is that of rank r with `lora_alpha`
    (lora_alpha / r, or / √r with use_rslora): how a sliced layer's adapter reads as one adapter of
    rank k·r (PEFT's alpha_pattern for it)."""
    return lora_alpha * (math.sqrt(k) if use_rslora else k)


class LoRASlicedLinear(LoRALinear):
    """A LoRALinear whose adapter updates chosen output slices only (see the module docstring):
    ``slices`` (output rows per slice, summing to out_features), ``enable`` (which slices get LoRA).

    Per adapter ``lora_A`` (k·r, in) and ``lora_B`` (Σ enabled out_i, r), k the number of enabled
    slices; initialised as LoRALinear's (and loralib's MergedLinear's): lora_A kaiming-uniform
    (a=√5) over the whole tensor, whose fan-in is `in` as for each A_i alone, lora_B zeros. Every
    adapter of the layer (add_adapter) has its slices, each its own r. ``full_lora_B(name)`` is an
    adapter's B_full (out, k·r): with lora_A, a rank-k·r LoRALinear adapter computing the same.

    Everything else is LoRALinear's: state (merge, unmerge bit for bit, to_base, disable_adapters,
    named adapters, dropout, rslora, master adapters), and a Conv1D base through from_linear.
    Refused: DoRA (use_dora), and mixed batches (lora_fast.batch_adapters) whose rows use its
    adapters (their passes stack each adapter's lora_B as (out, r)).
    """

    supports_dora = False
    supports_mixed = False   # mixed batches stack each adapter's lora_B as (out, r)

    def __init__(self, in_features: int, out_features: int, slices: Sequence[int],
                 enable: Sequence[bool], r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, adapter_name: str = DEFAULT_ADAPTER):
        """A new layer with a freshly initialised base weight (nn.Linear's init) and adapter.

        Args:
            in_features, out_features: the linear's sizes.
            slices: output rows of each slice, positive integers summing to out_features, in
                output order (e.g. (4096, 1024, 1024) for q, k, v).
            enable: one bool per slice, at least one True: which slices get the update.
            r: each enabled slice's rank (lora_A is (k·r, in), lora_B (Σ enabled out_i, r)).
            lora_alpha, lora_dropout, bias, use_rslora, device, dtype, adapter_name: as for
                ``LoRALinear(...)``; scaling = lora_alpha / r (or / √r) with each slice's r.
        """
        # before LoRALinear's __init__, which adds the first adapter in this layout
        self.slices, self.enable = check_slices(slices, enable, out_features)
        super().__init__(in_features, out_features, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         bias=bias, use_rslora=use_rslora, device=device, dtype=dtype,
                         adapter_name=adapter_name)

    @classmethod
    def from_linear(cls, linear: nn.Module, slices: Sequence[int], enable: Sequence[bool], r: int = 8,
                    lora_alpha: float = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                    adapter_dtype: torch.dtype | None = None,
                    adapter_name: str = DEFAULT_ADAPTER) -> "LoRASlicedLinear":
        """Wrap an existing nn.Linear or transformers Conv1D (GPT-2's ``c_attn``), sharing (not
        copying) its weight and bias, which are frozen; right after this the output equals the
        linear's. slices, enable: as for ``LoRASlicedLinear(...)``; r, lora_alpha, lora_dropout,
        use_rslora, adapter_dtype, adapter_name: as for ``LoRALinear.from_linear``."""
        # LoRALinear.from_linear calls cls once, to make the empty layer it fills: given this
        # layout, it wraps the linear (checks, Conv1D's transposed view) as for any LoRALinear.
        make = functools.partial(cls, slices=slices, enable=enable)
        return LoRALinear.from_linear.__func__(make, linear, r=r, lora_alpha=lora_alpha,
                                               lora_dropout=lora_dropout, use_rslora=use_rslora,
                                               adapter_dtype=adapter_dtype, adapter_name=adapter_name)

    def _add_weights(self, name, settings, factory):
        # LoRALinear's, in this layout
        if settings.use_dora:
            raise ValueError("use_dora: DoRA is not available on LoRASlicedLinear layers; "
                             "use_dora=False")
        lora_A = nn.Parameter(torch.empty((sum(self.enable) * settings.r, self.in_features), **factory))
        lora_B = nn.Parameter(torch.empty((sum(enabled_sizes(self.slices, self.enable)), settings.r),
                                          **factory))
        if name == DEFAULT_ADAPTER:
            self._parameters["lora_A"], self._parameters["lora_B"] = lora_A, lora_B
        else:
            self.lora_adapters[name] = _AdapterWeights(lora_A, lora_B)
        self.adapter_settings[name] = settings
        self.reset_lora_parameters(name)
        for param in self.adapter_parameters(name):
            param.requires_grad_(name == getattr(self, "active_adapter", name))

    def full_lora_B(self, name: str | None = None) -> torch.Tensor:
        """B_full (out, k·r) of adapter `name` (default: the active one), made from its lora_B by
        ``block_b``: differentiable in lora_B (``.detach()`` it to keep no graph)."""
        weights = self.adapter_weights(name)
        if weights is None:
            raise ValueError(f"adapter_name: this layer has no adapter "
                             f"{self.active_adapter if name is None else name!r}")
        return block_b(weights[1], self.slices, self.enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (..., out) for x (..., in): the adapter's update on the enabled slices' rows, in one
        lora_linear call; LoRALinear's forward when merged, disabled or without the active adapter."""
        if self.mixed_rows is not None and self.adapter_enabled:
            # batch_adapters admits a sliced layer only if no row of the batch uses its adapters
            return self.base_linear(x)
        if not self.adapter_enabled or self.merged or self.settings is None:
            return super().forward(x)
        return lora_linear(x, self.weight, self.lora_A, self.full_lora_B(), self.bias,
                           scaling=self.scaling, dropout_p=self.lora_dropout, training=self.training)

    def _fold_adapter_into_weight(self):
        # LoRALinear's fold with B_full for lora_B: its zeros add exact zeros, so the rows of a
        # disabled slice come back bit for bit (W0 + 0, rounded to W0's dtype, is W0)
        compute = torch.promote_types(torch.promote_types(self.weight.dtype, self.lora_A.dtype),
                                      torch.float32)
        delta = self.scaling * (self.full_lora_B().to(compute) @ self.lora_A.to(compute))
        self.weight.copy_((self.weight.to(compute) + delta).to(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slices={self.slices}, enable={self.enable}"
