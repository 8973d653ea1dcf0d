"""Mixed batches: each row of a batch computed with its own adapter, in training and inference.

    with lora_fast.batch_adapters(model, ["math", "code", None, "math"]):
        logits = model(input_ids).logits      # row 0 and 3 with "math", row 1 "code", row 2 the base

Inside the block every LoRA layer runs ONE fused pass for the whole batch (the base GEMM over all
rows, each row's low-rank product with its adapter's A and B), forward and backward, instead of one
call per adapter. Rows of a (B, T, ...) activation belong to their batch index; a 2-D (M, in)
activation with M a multiple of the batch size holds each batch item's rows together (batch-major,
as a flattened (B, T, in)). A layer without an adapter that a row names computes the base linear for
that row (as PEFT does for a layer an adapter does not target).

Per batch, the row→adapter map and its stable sort (rows grouped by adapter, so that a row tile of the
kernels touches a contiguous range of adapters) are computed once and shared by every layer with the
same set of adapters. Per layer, the adapters' weights are stacked once into (n, r_max, in) and
(n, out, r_max) tensors (zero-padded ranks; the compute dtype) and kept until a weight changes
(an optimizer step bumps its version): not rebuilt per call.

Autograd: with grad mode on when the block starts (and `trainable` left True), the adapters named in
the batch are made trainable (requires_grad) and stay so after the block, since a backward run after
it must still reach them (autograd drops the gradient of a tensor that no longer requires grad);
set_adapter or mark_only_lora_as_trainable freezes the inactive ones again. Each adapter's
gradients come only from its own rows, so one optimizer step over all of them equals the steps of
separate per-adapter runs on their rows. Saved for backward: x (the caller's tensor), xs (M, r_max),
and the stacks the layer keeps anyway.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .backend import resolve_backend
from .checks import check_lora_inputs, check_tensor_kinds
from .function import (_autocast_dtype, autocast_inputs, cast_master_adapters, decoded_weight, kept_weight, passes,
                       rows as as_rows)


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[str | None], trainable: bool = True,
                   backend: str = "auto") -> Iterator[nn.Module]:
    """Within the block, row i of every batch given to `model` uses adapter names[i] (None: the
    base model alone). See the module docstring.

    Args:
        model: a model with LoRA adapters (inside DDP / torch.compile wrappers or not).
        names: one adapter name (or None) per batch row; every name must be an adapter of the model.
        trainable: with grad mode on, make the named adapters' parameters require grad (they stay
            so after the block), so that a backward gives each its rows' gradients.
        backend: "auto", "triton" or "torch", as lora_linear's.

    Refused, changing nothing: an unknown name, names that are not a list of str/None, a merged
    layer (its weight holds one adapter), a block inside another one. merge() inside the block is
    refused too.
    """
    from .inject import require_lora_layers
    from .named_adapters import adapter_names

    layers = list(require_lora_layers(model, "batch_adapters").values())
    known = adapter_names(model)
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"names: expected a list with one adapter name (or None) per batch row, "
                        f"got {type(names).__name__}")
    unknown = sorted({repr(n) for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"names: {', '.join(unknown)} not adapters of the model; its adapters are "
                         f"{known} (None: the base model alone)")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    merged = [layer for layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"batch_adapters: {len(merged)} LoRA layers have adapter "
                           f"{merged[0].merged_adapter!r} merged into their weight; unmerge(model) "
                           "first (a merged weight holds one adapter for every row)")
    if any(layer.mixed_rows is not None for layer in layers):
        raise RuntimeError("batch_adapters: the model is inside a batch_adapters block already")
    other = [layer for layer in layers if not layer.supports_mixed
             and set(layer.adapter_settings) & (set(names) - {None})]
    if other:   # the passes stack each adapter's lora_B as a linear's (out, r)
        raise ValueError(f"names: {len(other)} {type(other[0]).__name__} layers hold adapters of the "
                         "batch, and mixed batches run plain linear LoRA layers only; set_adapter "
                         "one adapter for the batch instead")
    dora = sorted({name for layer in layers for name in set(names) - {None}
                   if name in layer.adapter_settings and layer.adapter_settings[name].use_dora})
    if dora:
        raise ValueError(f"names: {dora} are DoRA adapters, which mixed batches do not run yet; "
                         "batch LoRA adapters only, or set_adapter one DoRA adapter for the batch")
    batch = RowAdapters(known, list(names), backend)
    if trainable and torch.is_grad_enabled():
        used = set(batch.order)
        for layer in layers:
            for name in used & set(layer.adapter_settings):
                for p in layer.adapter_weights(name):
                    p.requires_grad_(True)
    for layer in layers:
        layer.mixed_rows = batch
    try:
        yield model
    finally:
        for layer in layers:
            layer.mixed_rows = None


class RowAdapters:
    """One batch's row → adapter map (set on every LoRA layer by batch_adapters), with the
    per-adapter-set row ids and sort each layer's pass needs, computed once per batch."""

    def __init__(self, known, names, backend):
        self.names = names
        self.backend = backend
        self.order = [name for name in known if name in set(names)]   # the model's order
        self._rows = {}   # (layer's adapters in the batch, rows per item, device) -> (ids, perm)

    def forward(self, layer, x):
        """The layer's output for x, each row with its adapter."""
        used = tuple(name for name in self.order if name in layer.adapter_settings)
        if not used:   # no row uses an adapter this layer holds
            return layer.base_linear(x)
        ids, perm = self.row_ids(used, x)
        return mixed_lora_linear(x, layer, used, ids, perm, self.backend)

    def row_ids(self, used, x):
        """(ids (M,) int32: index into `used` per row of x, -1 for the base; perm: the rows stably
        sorted by ids, or None if they are sorted already)."""
        batch = len(self.names)
        if x.dim() < 2:
            raise ValueError(f"x: expected (batch, ..., in) rows, got shape {tuple(x.shape)}")
        per_item, rem = divmod(math.prod(x.shape[:-1]), batch) if batch else (0, 1)
        if x.shape[0] != batch and (x.dim() > 2 or rem or per_item == 0):
            raise ValueError(f"names: has {batch} entries, one per batch row, but the layer's input "
                             f"has shape {tuple(x.shape)} (batch {x.shape[0]})")
        key = (used, per_item, x.device)
        if key not in self._rows:
            index = {name: i for i, name in enumerate(used)}
            item_ids = [index.get(name, -1) for name in self.names]
            ids = torch.tensor(item_ids, dtype=torch.int32).repeat_interleave(per_item)
            perm = None
            if any(a > b for a, b in zip(item_ids, item_ids[1:])):
                perm = torch.argsort(ids, stable=True).to(torch.int32)
            self._rows[key] = (ids.to(x.device), None if perm is None else perm.to(x.device))
        return self._rows[key]


class _Plan(NamedTuple):
    """A layer's stacked adapters for a pass: A (n, R, K), B (n, N, R) in the compute dtype,
    scale = s/(1-p) (n,), dropout_p (n,) float32 or None, and each adapter's rank."""
    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor
    dropout_p: torch.Tensor | None
    ranks: list


def _plan(layer, used, training, dtype, device):
    """The layer's _Plan for its adapters `used`, cached on the layer until a weight changes (its
    version, as an optimizer step bumps it), a setting changes, or another set, mode or dtype is
    asked: on a GPU the per-call work is then no copy at all, not even the scales'."""
    weights = [layer.adapter_weights(name) for name in used]
    settings = tuple(layer.adapter_settings[name] for name in used)
    key = (used, settings, training, dtype, device,
           tuple((p._version, p.data_ptr()) for w in weights for p in w))
    cached = getattr(layer, "_mixed_plan", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    ranks = [a.shape[0] for a, _ in weights]
    R = max(ranks)
    with torch.no_grad():
        A = torch.zeros((len(used), R, layer.in_features), dtype=dtype, device=device)
        B = torch.zeros((len(used), layer.out_features, R), dtype=dtype, device=device)
        for i, (a, b) in enumerate(weights):
            A[i, :ranks[i]] = a
            B[i, :, :ranks[i]] = b
    ps = [s.lora_dropout if training else 0.0 for s in settings]
    # float64 for float64 rows (the torch path's exact scale), else the kernels' fp32
    scale = torch.tensor([s.scaling / (1.0 - p) for s, p in zip(settings, ps)], device=device,
                         dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    dropout_p = torch.tensor(ps, dtype=torch.float32, device=device) if any(ps) else None
    plan = _Plan(A, B, scale, dropout_p, ranks)
    layer._mixed_plan = (key, plan)
    return plan


def mixed_lora_linear(x, layer, used, ids, perm, backend="auto"):
    """y (..., out) of `layer` for x, row m with adapter used[ids[m]] (the base for -1)."""
    weight, bias = layer.dense_weight(x.dtype), layer.bias
    params = [p for name in used for p in layer.adapter_weights(name)]
    check_tensor_kinds(x, weight, params[0], params[1], bias)
    autocast = _autocast_dtype(x)
    if autocast is not None:
        x, weight, bias = autocast_inputs(autocast, x, weight, bias)
    training = layer.training
    settings = [layer.adapter_settings[name] for name in used]
    for (a, b), s in zip(zip(params[::2], params[1::2]), settings):
        a, b = cast_master_adapters(x, a, b)
        check_lora_inputs(x, weight, a, b, bias, s.scaling, s.lora_dropout, training, autocast)
    chosen = resolve_backend(backend, x.device, x.dtype)
    plan = _plan(layer, used, training, x.dtype, x.device)
    seed = None if plan.dropout_p is None else \
        torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
    with torch.autocast(x.device.type, enabled=False) if autocast is not None else contextlib.nullcontext():
        needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                      for t in (x, weight, bias, *params))
        if needs_graph:
            y = MixedLoRAFunction.apply(x, weight, bias, plan, ids, perm, chosen, seed, *params)
        else:
            y, _ = passes(chosen).multi_forward(as_rows(x), weight, bias, plan.A, plan.B, plan.scale,
                                                plan.dropout_p, seed, ids, perm, save_xs=False)
    return y.view(*x.shape[:-1], weight.shape[0])


class MixedLoRAFunction(torch.autograd.Function):
    """y (M, out) of a mixed batch; inputs (x, weight, bias, plan, ids, perm, backend, seed,
    lora_A_0, lora_B_0, lora_A_1, ...): the pass reads the plan's stacks, and each adapter's
    gradients go back to its own parameters (views of the stacked gradients: no copy)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, ids, perm, backend, seed, *params):
        y, xs = passes(backend).multi_forward(as_rows(x), weight, bias, plan.A, plan.B, plan.scale,
                                              plan.dropout_p, seed, ids, perm, save_xs=True)
        ctx.save_for_backward(x, xs, kept_weight(ctx, weight))   # a 4-bit weight: decoded again in backward
        ctx.plan, ctx.ids, ctx.perm, ctx.backend, ctx.seed = plan, ids, perm, backend, seed
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, xs, weight = ctx.saved_tensors
        weight = decoded_weight(ctx, weight, x.dtype)
        plan, needs = ctx.plan, ctx.needs_input_grad
        need_x, need_w, need_b = needs[:3]
        need_a, need_lb = needs[8::2], needs[9::2]
        dx = da = db = None
        if need_x or any(need_a) or any(need_lb):
            dx, da, db = passes(ctx.backend).multi_backward(
                dy, as_rows(x), xs, weight, plan.A, plan.B, plan.scale, plan.dropout_p, ctx.seed,
                ctx.ids, ctx.perm, need_dx=need_x, need_da=any(need_a), need_db=any(need_lb))
        grads = []
        for i, r in enumerate(plan.ranks):
            grads.append(da[i, :r] if need_a[i] else None)
            grads.append(db[i, :, :r] if need_lb[i] else None)
        dw = torch.mm(dy.t(), as_rows(x)) if need_w else None
        dbias = dy.sum(0) if need_b else None
        return ((dx.view(x.shape) if need_x else None), dw, dbias, None, None, None, None, None,
                *grads)
