"""LoRALinear: a drop-in nn.Linear with a trainable low-rank update on a frozen base weight."""
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .function import lora_linear


def is_conv1d(module):
    """A transformers ``Conv1D`` (GPT-2's linear, weight stored (in, out)), without importing
    transformers when it is not loaded already."""
    import sys
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def _check_hparams(r, lora_alpha, lora_dropout):
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ValueError(f"r: expected a positive integer, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha: expected a positive number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) \
            or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")


class LoRALinear(nn.Linear):
    """``y = x @ weightᵀ + bias + scaling · (dropout(x) @ lora_Aᵀ) @ lora_Bᵀ``, weight and bias frozen.

    A subclass of nn.Linear (``isinstance(m, nn.Linear)`` holds and the ``weight``/``bias``
    state-dict keys are unchanged) adding ``lora_A`` (r, in; kaiming-uniform, a=√5) and
    ``lora_B`` (out, r; zeros, so a new layer computes exactly its base linear), as in PEFT.
    ``scaling = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``.

    The forward runs the fused kernels through ``lora_linear`` (backend "auto"). Dropout
    (``lora_dropout``, training mode only) is applied inside the kernels to the LoRA branch's input
    and regenerated in backward from a seed: no mask and no dropped copy of x is kept, so a training
    step saves the same bytes at p = 0.1 as at p = 0. In eval mode dropout is the identity.

    ``merge()`` folds ``scaling · lora_B @ lora_A`` into ``weight`` (computed in fp32, rounded
    once) so forward is a plain linear; ``unmerge()`` restores the original weight bit for bit.
    That guarantee costs a copy of the original weight, ``out·in·itemsize`` bytes on the weight's
    device, held only while merged (merging in place and subtracting back is not exact in
    bf16/fp16). While merged the adapter gets no gradients: merge is for inference.
    """

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True,
                 use_rslora=False, device=None, dtype=None):
        _check_hparams(r, lora_alpha, lora_dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty((self.r, in_features), **factory))
        self.lora_B = nn.Parameter(torch.empty((out_features, self.r), **factory))
        self._original_weight = None
        self.adapter_enabled = True   # False: forward is the base linear alone (disable_adapters)
        self.from_conv1d = False      # set by from_linear for a transformers Conv1D
        self.reset_lora_parameters()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    adapter_dtype=None):
        """Wrap an existing nn.Linear, sharing (not copying) its weight and bias, which are frozen.
        The adapter lives on the linear's device, in `adapter_dtype` (default: the weight's dtype;
        float32 on a float16/bfloat16 base gives float32 master adapters). Right after this the
        output equals the linear's.

        A transformers ``Conv1D`` (GPT-2's layers: weight stored (in, out)) is taken too: the new
        layer's weight is the transposed *view* of the Conv1D weight (same storage, no copy; the
        kernels take strides), and ``to_base()`` gives a Conv1D back."""
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"linear: expected an nn.Linear or a transformers Conv1D, got "
                            f"{type(linear).__name__}")
        if isinstance(linear, LoRALinear):
            raise TypeError("linear: already a LoRALinear")
        weight = nn.Parameter(linear.weight.detach().t(), requires_grad=False) if conv1d \
            else linear.weight
        out_features, in_features = weight.shape
        adapter_dtype = weight.dtype if adapter_dtype is None else adapter_dtype
        layer = cls(in_features, out_features, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    bias=False, use_rslora=use_rslora, device="meta", dtype=weight.dtype)
        layer.weight = weight
        layer.bias = linear.bias
        layer.from_conv1d = conv1d
        factory = {"device": weight.device, "dtype": adapter_dtype}
        layer.lora_A = nn.Parameter(torch.empty((layer.r, in_features), **factory))
        layer.lora_B = nn.Parameter(torch.empty((out_features, layer.r), **factory))
        layer.reset_lora_parameters()
        layer.train(linear.training)   # an eval-mode model stays in eval mode (no dropout)
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        return layer

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def merged(self):
        return self._original_weight is not None

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into weight: W ← round(W + scaling · B @ A), the sum taken in fp32."""
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged; call unmerge() first")
        self._original_weight = self.weight.detach().clone()
        self._fold_adapter_into_weight()

    def _fold_adapter_into_weight(self):
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self):
        """Restore the weight held before merge(), bit for bit."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        self.weight.copy_(self._original_weight)
        self._original_weight = None

    @torch.no_grad()
    def to_base(self):
        """The plain layer this one wraps, with the adapter merged into its weight (W + s·B@A,
        in fp32, rounded once; in place, no copy kept): an nn.Linear, or a Conv1D for one made
        from a Conv1D. Sharing the weight storage, so do not use this LoRALinear afterwards."""
        if not self.merged:
            self._fold_adapter_into_weight()
        self._original_weight = None
        weight = self.weight.detach()
        if self.from_conv1d:
            from transformers.pytorch_utils import Conv1D
            base = Conv1D(self.out_features, self.in_features)
            base.weight = nn.Parameter(weight.t(), requires_grad=False)   # (in, out) again: a view
            base.bias = self.bias
            return base
        base = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        base.weight = nn.Parameter(weight, requires_grad=False)
        base.bias = self.bias
        return base

    def forward(self, x):
        if self.merged or not self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                           dropout_p=self.lora_dropout, training=self.training)

    def extra_repr(self):
        return (f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, merged={self.merged}"
                + ("" if self.adapter_enabled else ", adapter disabled"))
