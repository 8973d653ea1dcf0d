"""LoRALinear: a drop-in nn.Linear with a trainable low-rank update on a frozen base weight."""
from __future__ import annotations

import math
import numbers
import re
import weakref
from typing import NamedTuple

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .checks import DORA_DROPOUT_FORMS, FLOATING_DTYPES
from .function import lora_linear


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a transformers ``Conv1D`` (GPT-2's linear, weight stored (in, out)), without importing
    transformers when it is not loaded already."""
    import sys
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


# r bounds: the kernels index the rank dimension with 32-bit integers.
_MAX_R = 2**31 - 1


def check_dora(use_dora, dora_dropout="peft"):
    """(use_dora, dora_dropout) checked: a bool, and one of DORA_DROPOUT_FORMS."""
    if not isinstance(use_dora, (bool, np.bool_)):
        raise ValueError(f"use_dora: expected True or False, got {use_dora!r}")
    if dora_dropout not in DORA_DROPOUT_FORMS:
        raise ValueError(f"dora_dropout: expected one of {DORA_DROPOUT_FORMS}, got {dora_dropout!r}")
    return bool(use_dora), dora_dropout


def _check_hparams(r, lora_alpha, lora_dropout, use_rslora=False):
    """The hyper-parameters as plain Python numbers (a numpy scalar is taken, and stored as int or
    float so that adapter_config.json can hold it), or a ValueError naming the bad one."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 0 < r <= _MAX_R:
        raise ValueError(f"r: expected a positive integer up to 2**31 - 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise ValueError(f"lora_alpha: expected a positive number (finite), got {lora_alpha!r}")
    try:
        alpha = int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha)
        finite = math.isfinite(alpha)
    except OverflowError:   # an int beyond float's range
        finite = False
    if not finite or not alpha > 0:
        raise ValueError(f"lora_alpha: expected a positive number (finite), got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) \
            or not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, (bool, np.bool_)):
        raise ValueError(f"use_rslora: expected True or False, got {use_rslora!r}")
    return int(r), alpha, float(lora_dropout), bool(use_rslora)


def adapter_dtypes(weight_dtype):
    """The adapter dtypes lora_linear runs with a base weight of `weight_dtype`: its own, and
    float32 master adapters on a float16/bfloat16 base."""
    return {weight_dtype} | ({torch.float32} if weight_dtype in (torch.float16, torch.bfloat16) else set())


def _check_adapter_dtype(adapter_dtype, weight_dtype=None, name=None):
    """adapter_dtype: None, or a floating dtype that lora_linear runs with a weight of
    `weight_dtype` (when given): the weight's own, or float32 master adapters on fp16/bf16."""
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype)
                                          and adapter_dtype.is_floating_point):
        raise ValueError(f"adapter_dtype: expected a floating torch.dtype or None, got {adapter_dtype!r}")
    if adapter_dtype is None or weight_dtype is None:
        return
    usable = adapter_dtypes(weight_dtype)
    if adapter_dtype not in usable:
        where = f" for {name!r}" if name else ""
        raise ValueError(f"adapter_dtype: {adapter_dtype} cannot run with a {weight_dtype} weight"
                         f"{where}; expected {' or '.join(sorted(map(str, usable)))} (or None)")


def default_adapter_dtype(weight_dtype):
    """inject's adapter dtype for a base weight: its own, float32 on a float16/bfloat16 base
    (master adapters, PEFT's default ``autocast_adapter_dtype=True``)."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def _check_base(linear, name=None):
    """A linear LoRALinear can wrap: a plain (not parametrized) floating weight that lora_linear
    runs. Checked for every target before inject changes anything."""
    what = f"{name!r}" if name else "linear"
    if parametrize.is_parametrized(linear, "weight"):
        raise TypeError(f"{what}: its weight is computed by a parametrization (weight_norm, "
                        "torch.nn.utils.parametrize); LoRA needs the stored weight: remove it first "
                        "(parametrize.remove_parametrizations(module, 'weight'))")
    if linear.weight.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{what}: has a {linear.weight.dtype} weight; LoRA here needs a floating base "
                        "weight (float16, bfloat16, float32 or float64): dequantize it first")


def storage_extent(t):
    """(device, storage address, first byte, end byte) of the memory tensor `t` reads, or None for
    a tensor without ordinary storage (meta, empty)."""
    t = getattr(t, "_local_tensor", t)   # a DTensor's shard
    if t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        base = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return t.device, base, start, start + span * t.element_size()


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether tensors a and b read overlapping bytes of one storage (tied or aliased weights)."""
    ea, eb = storage_extent(a), storage_extent(b)
    return (ea is not None and eb is not None and ea[:2] == eb[:2]
            and ea[2] < eb[3] and eb[2] < ea[3])


DEFAULT_ADAPTER = "default"
# Adapter names become module names (state-dict keys) and folder names (PEFT's layout).
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def check_adapter_name(name, arg="adapter_name"):
    """`name` if it can name an adapter: a non-empty str of letters, digits, '_' and '-' (it is a
    state-dict key and, in PEFT's layout, a folder name), else a ValueError naming `arg`."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) \
            or name in _RESERVED_NAMES:
        raise ValueError(f"{arg}: expected an adapter name (letters, digits, '_' and '-', not "
                         f"starting with '-'; not one of {sorted(_RESERVED_NAMES)}), got {name!r}")
    return name


class AdapterSettings(NamedTuple):
    """One adapter's hyper-parameters in a layer (plain Python numbers, checked)."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool = False        # DoRA (lora_fast.dora): a trained magnitude per output row
    dora_dropout: str = "peft"    # DoRA's dropout form: "peft" (PEFT's function) or "lora"

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class _AdapterWeights(nn.Module):
    """lora_A/lora_B (and a DoRA adapter's lora_magnitude_vector) of an adapter not named
    "default" (held in LoRALinear.lora_adapters)."""

    def __init__(self, lora_A, lora_B, magnitude=None):
        super().__init__()
        self.lora_A = lora_A
        self.lora_B = lora_B
        if magnitude is not None:
            self.lora_magnitude_vector = magnitude


# nn.ModuleDict's own attributes cannot name one of its entries.
_RESERVED_NAMES = frozenset(name for name in dir(nn.ModuleDict) if not name.startswith("_"))


# The layers merged now, to refuse a second merge into a weight one of them already holds.
_MERGED = weakref.WeakSet()


class LoRALayer(nn.Module):
    """What every LoRA layer of lora_fast holds and does, whatever its base: named adapters
    (lora_A (r, in), lora_B (out, r) and a DoRA magnitude, the one named "default" registered as the
    layer's own lora_A/lora_B), the active one, the merged / disabled state and merge_weights, the
    state dict holding W0. A base class of LoRALinear (over nn.Linear; see its docstring for the
    state table) and of embedding.LoRAEmbedding; a subclass gives in_features / out_features, the
    base weight as the (out, in) matrix the delta B·A is added to (_linear_view), forward and to_base."""

    # 2: the state dict holds a Conv1D-made layer's weight as (in, out) and a merged layer's W0
    _version = 2

    def _linear_view(self) -> torch.Tensor:
        """The base weight as the (out, in) matrix that merge adds s·B·A to (a view: writes reach it)."""
        return self.weight

    def _init_adapter_state(self):
        # The adapter named "default" is registered as lora_A/lora_B themselves (the state-dict
        # keys one-adapter models and their checkpoints have always had); every other one in
        # lora_adapters[name]. Keys depend on the name only, never on which adapter is active.
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.register_parameter("lora_magnitude_vector", None)   # the "default" adapter's, with DoRA
        self._dora_base = None        # (key, ‖w_j‖²): W0's squared row norms for DoRA, per weight version
        self.lora_adapters = nn.ModuleDict()
        self.adapter_settings: dict[str, AdapterSettings] = {}
        # W0 while merged: a buffer, so .to() / .half() / .cuda() move it with the weight; not
        # persistent (the state dict's weight is W0 already, see _save_to_state_dict)
        self.register_buffer("_original_weight", None, persistent=False)
        self.merged_adapter = None    # the adapter folded into weight while merged
        self.adapter_enabled = True   # False: forward is the base linear alone (disable_adapters)
        self.mixed_rows = None        # a mixed.RowAdapters inside lora_fast.batch_adapters
        self._merge_weights = False   # loralib's merge_weights: merged in eval mode, unmerged in train

    # whether use_dora / lora_fast.batch_adapters are available on this kind of layer
    supports_dora = True
    supports_mixed = True

    def _add_weights(self, name, settings, factory):
        if settings.use_dora and not self.supports_dora:
            raise ValueError(f"use_dora: DoRA is not available on {type(self).__name__} layers; "
                             "use_dora=False")
        lora_A = nn.Parameter(torch.empty((settings.r, self.in_features), **factory))
        lora_B = nn.Parameter(torch.empty((self.out_features, settings.r), **factory))
        magnitude = nn.Parameter(torch.empty((self.out_features,), **factory)) if settings.use_dora else None
        if name == DEFAULT_ADAPTER:
            self._parameters["lora_A"], self._parameters["lora_B"] = lora_A, lora_B
            self._parameters["lora_magnitude_vector"] = magnitude
        else:
            self.lora_adapters[name] = _AdapterWeights(lora_A, lora_B, magnitude)
        self.adapter_settings[name] = settings
        self.reset_lora_parameters(name)
        for param in self.adapter_parameters(name):
            param.requires_grad_(name == getattr(self, "active_adapter", name))

    # --- the adapters ---------------------------------------------------------------------------

    def adapter_weights(self, name: str | None = None) -> tuple[nn.Parameter, nn.Parameter] | None:
        """(lora_A, lora_B) of adapter `name` (default: the active one), or None if this layer
        has no adapter of that name."""
        name = self.active_adapter if name is None else name
        if name not in self.adapter_settings:
            return None
        if name == DEFAULT_ADAPTER:
            return self._parameters["lora_A"], self._parameters["lora_B"]
        holder = self.lora_adapters[name]
        return holder._parameters["lora_A"], holder._parameters["lora_B"]

    def magnitude(self, name: str | None = None) -> nn.Parameter | None:
        """DoRA's lora_magnitude_vector (out,) of adapter `name` (default: the active one), or None
        (not a DoRA adapter, or no adapter of that name)."""
        name = self.active_adapter if name is None else name
        if name not in self.adapter_settings:
            return None
        holder = self if name == DEFAULT_ADAPTER else self.lora_adapters[name]
        return holder._parameters.get("lora_magnitude_vector")

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Every trainable tensor of adapter `name`: lora_A, lora_B and, with DoRA, the magnitude."""
        weights = self.adapter_weights(name)
        if weights is None:
            return []
        magnitude = self.magnitude(name)
        return [*weights] + ([magnitude] if magnitude is not None else [])

    @property
    def lora_A(self):
        """The active adapter's lora_A (r, in), or None if this layer has no adapter of that name
        (the layer then computes its base linear)."""
        weights = self.adapter_weights()
        return weights[0] if weights else None

    @property
    def lora_B(self):
        """The active adapter's lora_B (out, r), or None (see lora_A)."""
        weights = self.adapter_weights()
        return weights[1] if weights else None

    @property
    def settings(self) -> AdapterSettings | None:
        """The active adapter's hyper-parameters, or None if this layer has no adapter of that name."""
        return self.adapter_settings.get(self.active_adapter)

    r = property(lambda self: self._setting("r"), doc="The active adapter's rank.")
    lora_alpha = property(lambda self: self._setting("lora_alpha"), doc="The active adapter's alpha.")
    use_rslora = property(lambda self: self._setting("use_rslora"), doc="The active adapter's rslora flag.")
    use_dora = property(lambda self: self._setting("use_dora"), doc="Whether the active adapter is DoRA.")
    scaling = property(lambda self: self._setting("scaling"), doc="The active adapter's scaling.")

    @property
    def lora_dropout(self):
        """The active adapter's dropout probability (settable: a probability in [0, 1))."""
        return self._setting("lora_dropout")

    @lora_dropout.setter
    def lora_dropout(self, p):
        settings = self.settings
        if settings is None:
            raise RuntimeError(f"lora_dropout: this layer has no adapter {self.active_adapter!r}")
        _, _, p, _ = _check_hparams(settings.r, settings.lora_alpha, p)
        self.adapter_settings[self.active_adapter] = settings._replace(lora_dropout=p)

    def base_dtype(self) -> torch.dtype:
        """The dtype the base linear computes in (a 4-bit layer's is not its stored codes')."""
        return self.weight.dtype

    def _setting(self, attr):
        settings = self.settings
        return None if settings is None else getattr(settings, attr)

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                    use_dora: bool = False, dora_dropout: str = "peft") -> None:
        """Add adapter `name` (frozen, not active; lora_B zero) on this layer's base weight.
        r, lora_alpha, lora_dropout, use_rslora: as for ``LoRALinear(...)``.
        adapter_dtype: as for from_linear (default: the dtype of the layer's other adapters, or
        the base weight's with float32 on a float16/bfloat16 base). use_dora, dora_dropout: as for
        ``LoRALinear(...)``."""
        check_adapter_name(name)
        if name in self.adapter_settings:
            raise ValueError(f"adapter_name: this layer has an adapter {name!r} already")
        settings = AdapterSettings(*_check_hparams(r, lora_alpha, lora_dropout, use_rslora),
                                   *check_dora(use_dora, dora_dropout))
        _check_adapter_dtype(adapter_dtype, self.base_dtype())
        if adapter_dtype is None:
            others = [w[0].dtype for w in map(self.adapter_weights, self.adapter_settings)]
            adapter_dtype = others[0] if others else default_adapter_dtype(self.base_dtype())
        self._add_weights(name, settings, {"device": self.weight.device, "dtype": adapter_dtype})

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`; refused for the active adapter (set another one first)."""
        if name not in self.adapter_settings:
            raise ValueError(f"adapter_name: this layer has no adapter {name!r}; it has "
                             f"{list(self.adapter_settings)}")
        if name == self.active_adapter:
            raise RuntimeError(f"delete_adapter: {name!r} is the active adapter; set_adapter to "
                               "another one first")
        if name == DEFAULT_ADAPTER:
            self._parameters["lora_A"] = self._parameters["lora_B"] = None
            self._parameters["lora_magnitude_vector"] = None
        else:
            del self.lora_adapters[name]
        del self.adapter_settings[name]

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter: the one forward uses and training updates (its
        parameters require grad, every other adapter's do not). A layer without an adapter of
        that name computes its base linear. Refused while merged (unmerge first)."""
        check_adapter_name(name)
        if self.merged and name != self.active_adapter:
            if not self.merge_weights:
                raise RuntimeError(f"set_adapter: adapter {self.merged_adapter!r} is merged into the "
                                   "weight; unmerge() first")
            self.unmerge()   # merged by eval() (merge_weights): the new adapter is merged below
        self.active_adapter = name
        for other in self.adapter_settings:
            for param in self.adapter_parameters(other):
                param.requires_grad_(other == name)
        if self.merge_weights:
            self._follow_mode()

    def reset_lora_parameters(self, name: str | None = None) -> None:
        """Adapter `name` (default: the active one) as a new one starts, so that with it active the
        layer computes its base: for a linear lora_A kaiming-uniform (a=√5), lora_B zeros and a
        DoRA magnitude W0's row norms (an embedding's: _init_adapter)."""
        name = self.active_adapter if name is None else name
        if self.merged and name == self.merged_adapter:
            raise RuntimeError("reset_lora_parameters: the adapter is merged; call unmerge() first")
        weights = self.adapter_weights(name)
        if weights is None:
            raise ValueError(f"adapter_name: this layer has no adapter {name!r}")
        self._init_adapter(name, weights)

    def _init_adapter(self, name, weights):
        nn.init.kaiming_uniform_(weights[0], a=math.sqrt(5))
        nn.init.zeros_(weights[1])
        magnitude = self.magnitude(name)
        if magnitude is not None and magnitude.device.type != "meta":
            with torch.no_grad():
                magnitude.copy_(self.dora_base_sq().sqrt())

    @property
    def merge_weights(self) -> bool:
        """loralib's ``merge_weights``: when True, eval() merges the active adapter into the weight
        (forward is one plain linear) and train() unmerges it (bit for bit, as unmerge() does).
        Off by default; setting it applies it to the current mode at once."""
        return self.__dict__.get("_merge_weights", False)

    @merge_weights.setter
    def merge_weights(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"merge_weights: expected a bool, got {type(value).__name__}")
        self._merge_weights = value
        if value:
            try:
                self._follow_mode()
            except BaseException:   # refused (e.g. a parametrized weight): the flag stays off
                self._merge_weights = False
                raise

    def train(self, mode: bool = True) -> "LoRALayer":
        super().train(mode)
        if self.merge_weights:
            self._follow_mode()
        return self

    def _follow_mode(self):
        if self.training and self.merged:
            self.unmerge()
        elif not self.training and not self.merged and self.settings is not None:
            self.merge()

    @property
    def merged(self) -> bool:
        """Whether the adapter is folded into ``weight`` now (merge() without unmerge())."""
        return self._original_weight is not None

    def check_mergeable(self) -> None:
        """Raise, saying why, if merge() could not fold the adapter into this weight and restore
        it; nothing is changed."""
        if self.merged:
            raise RuntimeError("merge: the adapter is already merged; call unmerge() first")
        if self.settings is None:
            raise RuntimeError(f"merge: this layer has no adapter {self.active_adapter!r} (the "
                               "active one)")
        if self.mixed_rows is not None:
            raise RuntimeError("merge: inside lora_fast.batch_adapters, rows use other adapters "
                               "than the active one; merge outside the block")
        if parametrize.is_parametrized(self, "weight"):
            raise RuntimeError("merge: weight is computed by a parametrization "
                               "(torch.nn.utils.parametrize); folding the adapter into it would "
                               "write into a temporary. Remove the parametrization first "
                               "(parametrize.remove_parametrizations(layer, 'weight'))")
        for other in list(_MERGED):
            if other is not self and shares_memory(other.weight, self.weight):
                raise RuntimeError("merge: weight shares its memory with the weight of another "
                                   f"merged LoRALinear ({other.out_features}x{other.in_features}); "
                                   "tied weights cannot hold two adapters' deltas")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into weight: W ← round(W + scaling · B @ A), the sum taken in float32
        (or in the weight's dtype if wider). Raises (changing nothing) if already merged, if the
        weight is parametrized, or if it is tied to another merged layer's weight. The state dict
        keeps W0 while merged: to export the merged weights, use to_base() (or merge_and_unload)."""
        self.check_mergeable()
        original = self.weight.detach().clone()
        self._fold_adapter_into_weight()
        self._original_weight = original
        self.merged_adapter = self.active_adapter
        _MERGED.add(self)

    def _fold_adapter_into_weight(self):
        # float32 at least; float64 for a float64 weight (float32 would cost it 1e-7 relative error)
        compute = torch.promote_types(torch.promote_types(self.weight.dtype, self.lora_A.dtype),
                                      torch.float32)
        delta = self.scaling * (self.lora_B.to(compute) @ self.lora_A.to(compute))
        weight = self._linear_view()
        merged = weight.to(compute) + delta
        if self.use_dora:   # DoRA: m / ‖W0 + s·B·A‖ ⊙ (W0 + s·B·A), the norm of that same sum
            magnitude = self.magnitude().detach().to(compute)
            merged = merged * (magnitude / torch.linalg.vector_norm(merged, dim=1))[:, None]
        weight.copy_(merged.to(weight.dtype))

    def _fold_for_unload(self):
        """to_base's first step: the active adapter folded into the weight (unless merged already,
        or absent), and the merged state dropped with no copy of W0 kept."""
        if not self.merged and self.settings is not None:
            self.check_mergeable()
            self._fold_adapter_into_weight()
        self._original_weight = None
        self.merged_adapter = None
        _MERGED.discard(self)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight held before merge(), bit for bit."""
        if not self.merged:
            raise RuntimeError("unmerge: the adapter is not merged")
        self.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapter = None
        _MERGED.discard(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The base model's weight as the base model stores it (see the class docstring).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key not in destination:   # parametrized: saved under parametrizations.weight.original
            return
        if self.merged:
            destination[key] = self._original_weight
        if self.from_conv1d:
            destination[key] = destination[key].t()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        incoming = state_dict.get(key)
        if isinstance(incoming, torch.Tensor) and (self.from_conv1d or self.merged):
            state_dict = dict(state_dict)   # the caller's dict is left as it was
            if self.from_conv1d and self._conv1d_layout(prefix, state_dict, local_metadata):
                if tuple(incoming.shape) == (self.in_features, self.out_features):
                    incoming = incoming.t()   # Conv1D's (in, out) -> this layer's (out, in)
                else:
                    error_msgs.append(f"{key}: a LoRALinear made from a Conv1D takes Conv1D's "
                                      f"(in, out) = {(self.in_features, self.out_features)} layout")
            if self.merged:   # merge() below folds into the weight: never into the caller's tensor
                incoming = incoming.clone()
            state_dict[key] = incoming
        merged = self.merged
        if merged:   # load into the base weight and the adapter, then fold the new adapter in
            self.unmerge()
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            if merged:
                self.merge()

    def _conv1d_layout(self, prefix, state_dict, local_metadata):
        """Whether the weight in `state_dict` is in Conv1D's (in, out) layout: a plain GPT-2
        checkpoint, or one saved by this version (_version 2); not one of a LoRALinear saved by a
        version before that (_version 1, lora_A beside it), which held (out, in)."""
        version = local_metadata.get("version")
        return not (version is not None and version < 2 and prefix + "lora_A" in state_dict)

    def extra_repr(self) -> str:
        if list(self.adapter_settings) == [self.active_adapter]:   # one adapter: as before
            lora = (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                    f"lora_dropout={self.lora_dropout}")
            if self.use_dora:
                lora += f", use_dora=True, dora_dropout={self.settings.dora_dropout!r}"
        else:
            lora = "adapters={" + ", ".join(
                f"{name!r}: r={s.r} alpha={s.lora_alpha} dropout={s.lora_dropout}"
                for name, s in self.adapter_settings.items()) + f"}}, active={self.active_adapter!r}"
        return (f"{super().extra_repr()}, {lora}, merged={self.merged}"
                + ("" if self.adapter_enabled else ", adapter disabled"))


class LoRALinear(LoRALayer, nn.Linear):
    """``y = x @ weightᵀ + bias + scaling · (dropout(x) @ lora_Aᵀ) @ lora_Bᵀ``, weight and bias frozen.

    A subclass of nn.Linear (``isinstance(m, nn.Linear)`` holds and the ``weight``/``bias``
    state-dict keys are unchanged) adding ``lora_A`` (r, in; kaiming-uniform, a=√5) and
    ``lora_B`` (out, r; zeros, so a new layer computes exactly its base linear), as in PEFT.
    ``scaling = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``.

    The forward runs the fused kernels through ``lora_linear`` (backend "auto"). Dropout
    (``lora_dropout``, training mode only) is applied inside the kernels to the LoRA branch's input
    and regenerated in backward from a seed: no mask and no dropped copy of x is kept, so a training
    step saves the same bytes at p = 0.1 as at p = 0. In eval mode dropout is the identity.

    State. Two flags decide what forward computes, and every entrance respects both:

    ============  ==========  ==========================================================
    merged        enabled     forward
    ============  ==========  ==========================================================
    no            yes         the base linear plus the adapter (the kernels)
    yes           yes         F.linear with the merged weight W0 + s·B@A
    no            no          F.linear with W0 (inside ``disable_adapters``)
    yes           no          F.linear with the copy of W0 that merge() keeps
    ============  ==========  ==========================================================

    ``merge()`` folds ``scaling · lora_B @ lora_A`` into ``weight`` (computed in float32, or in the
    weight's dtype if wider, rounded once) so forward is a plain linear; ``unmerge()`` restores the
    original weight bit for bit. That guarantee costs a copy of the original weight,
    ``out·in·itemsize`` bytes on the weight's device, held only while merged (merging in place
    and subtracting back is not exact in bf16/fp16). While merged the adapter gets no gradients:
    merge is for inference. merge() refuses a weight it cannot fold into and restore: one that
    another merged layer's weight overlaps (tied weights: both deltas would land in one tensor)
    or one computed by a parametrization (the fold would write into a temporary).

    ``state_dict()`` always holds the base model's weight as the base model stores it: W0, not
    the merged weight, while merged (so loading it anywhere counts the adapter once), and (in, out)
    for a layer made from a transformers Conv1D (so GPT-2 checkpoints load both ways).
    ``load_state_dict`` into a merged layer unmerges, loads and merges again, so forward uses
    what was loaded.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 adapter_name: str = DEFAULT_ADAPTER, use_dora: bool = False, dora_dropout: str = "peft"):
        """A new layer with a freshly initialised base weight (nn.Linear's init) and adapter.

        Args:
            in_features, out_features: the linear's sizes.
            r: the adapter's rank, a positive integer (lora_A is (r, in), lora_B (out, r)).
            lora_alpha: positive finite number; scaling = lora_alpha / r (or / √r, use_rslora).
            lora_dropout: probability in [0, 1) of dropping an element of the LoRA branch's
                input in training mode.
            bias: whether the base linear has a bias.
            use_rslora: rank-stabilised scaling lora_alpha / √r (PEFT's ``use_rslora``).
            device, dtype: of every parameter, as for nn.Linear.
            adapter_name: the first adapter's name (it is the active one).
            use_dora: DoRA (PEFT's ``use_dora``): a trainable ``lora_magnitude_vector`` (out,),
                initialised to W0's row norms, scales the adapted output (lora_fast.dora).
            dora_dropout: DoRA's dropout form, "peft" (PEFT's function, the default) or "lora"
                (dropout inside the LoRA branch only: cheaper, differs from PEFT with dropout).
        """
        settings = AdapterSettings(*_check_hparams(r, lora_alpha, lora_dropout, use_rslora),
                                   *check_dora(use_dora, dora_dropout))
        check_adapter_name(adapter_name)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter_state()
        self._add_weights(adapter_name, settings, {"device": device, "dtype": dtype})
        self.active_adapter = adapter_name
        self.from_conv1d = False      # set by from_linear for a transformers Conv1D
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, use_rslora: bool = False,
                    adapter_dtype: torch.dtype | None = None,
                    adapter_name: str = DEFAULT_ADAPTER, use_dora: bool = False,
                    dora_dropout: str = "peft") -> "LoRALinear":
        """Wrap an existing nn.Linear, sharing (not copying) its weight and bias, which are frozen.
        Right after this the output equals the linear's.

        Args:
            linear: an nn.Linear (not already a LoRALinear), or a transformers ``Conv1D``
                (GPT-2's layers: weight stored (in, out)); the new layer's weight is then the
                transposed *view* of the Conv1D weight (same storage, no copy; the kernels take
                strides), its state dict keeps the Conv1D layout, and ``to_base()`` gives a
                Conv1D back.
            r, lora_alpha, lora_dropout, use_rslora: as for ``LoRALinear(...)``.
            adapter_dtype: floating dtype of lora_A/lora_B (default: the weight's dtype; float32
                on a float16/bfloat16 base gives float32 master adapters). They live on the
                linear's device.
            adapter_name: the adapter's name (the active one).
            use_dora, dora_dropout: as for ``LoRALinear(...)``.
        """
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"linear: expected an nn.Linear or a transformers Conv1D, got "
                            f"{type(linear).__name__}")
        if isinstance(linear, LoRALinear):
            raise TypeError("linear: already a LoRALinear")
        _check_base(linear)
        _check_adapter_dtype(adapter_dtype, linear.weight.dtype)
        settings = AdapterSettings(*_check_hparams(r, lora_alpha, lora_dropout, use_rslora),
                                   *check_dora(use_dora, dora_dropout))
        check_adapter_name(adapter_name)
        weight = nn.Parameter(linear.weight.detach().t(), requires_grad=False) if conv1d \
            else linear.weight
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, r=1, bias=False, device="meta", dtype=weight.dtype)
        layer.weight = weight
        layer.bias = linear.bias
        layer.from_conv1d = conv1d
        layer._init_adapter_state()
        layer.active_adapter = adapter_name
        layer._add_weights(adapter_name, settings, {"device": weight.device,
                                                    "dtype": adapter_dtype or weight.dtype})
        layer.train(linear.training)   # an eval-mode model stays in eval mode (no dropout)
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        return layer

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The base linear alone for x (..., in): x @ W0ᵀ + bias, the adapters left out."""
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 as a dense (out, in) tensor in `dtype` (None: as stored; the weight itself then, decoded
        for a 4-bit layer)."""
        return self.weight if dtype is None or dtype == self.weight.dtype else self.weight.to(dtype)

    def dora_base_sq(self) -> torch.Tensor:
        """W0's squared row norms ‖w_j‖² (out,) in float32 (float64 for a float64 weight), cached
        until the weight changes (its storage, version, dtype or device)."""
        from . import dora
        weight = self.dense_weight()
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
        if self._dora_base is None or self._dora_base[0] != key:
            self._dora_base = (key, dora.base_row_norms_sq(weight))
        return self._dora_base[1]

    def dora_norm(self, name: str | None = None) -> torch.Tensor:
        """‖W0 + s·B·A‖ per row (out,) of DoRA adapter `name` (default the active one), detached."""
        from . import dora
        name = self.active_adapter if name is None else name
        lora_A, lora_B = self.adapter_weights(name)
        scaling = self.adapter_settings[name].scaling
        if torch.compiler.is_compiling():   # no cache keyed on storage and version inside a graph
            return dora.weight_norm_direct(self.dense_weight(), lora_A, lora_B, scaling)
        if self.merged:   # the cache holds the weight's norms, and W0 is the copy merge() kept
            return dora.weight_norm(self._original_weight, lora_A, lora_B, scaling)
        return dora.weight_norm(self.dense_weight(), lora_A, lora_B, scaling, self.dora_base_sq())

    @torch.no_grad()
    def to_base(self) -> nn.Module:
        """The plain layer this one wraps, with the active adapter merged into its weight (W + s·B@A,
        computed as merge() does; in place, no copy kept; the base weight as it is if this layer
        has no adapter of the active name): an nn.Linear, or a Conv1D for one made from a Conv1D.
        Sharing the weight storage, so do not use this LoRALinear afterwards."""
        self._fold_for_unload()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (..., out) for x (..., in), as the table in the class docstring says."""
        if not self.adapter_enabled:
            return F.linear(x, self._original_weight if self.merged else self.weight, self.bias)
        if self.mixed_rows is not None:   # rows with their own adapters (lora_fast.batch_adapters)
            return self.mixed_rows.forward(self, x)
        if self.merged or self.settings is None:
            return F.linear(x, self.weight, self.bias)
        if self.use_dora:
            from .dora import dora_linear
            return dora_linear(x, self.weight, self.lora_A, self.lora_B, self.magnitude(), self.bias,
                               scaling=self.scaling, dropout_p=self.lora_dropout, training=self.training,
                               dropout=self.settings.dora_dropout, norm=self.dora_norm())
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                           dropout_p=self.lora_dropout, training=self.training)
