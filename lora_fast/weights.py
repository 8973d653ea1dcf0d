"""Base weights that are not a plain tensor of the compute dtype: decoded from another format (a
4-bit NF4 one: lora_fast.qlora), either ahead of the call or inside the kernels.

    recomputable(w, source)   w decoded from `source` (an object whose dequantize(dtype) gives it):
                              the autograd Functions keep `source`, not w, and decode it again in
                              backward (out·in values per layer not alive from forward to backward)
    packed(source, dtype)     a stand-in for the decoded weight that is never decoded: the "triton"
                              backend's kernels read `source` (its codes and statistics) instead,
                              decoding each tile in the K-loop (kernels/blocks.nf4_tile)
    dense(w)                  w as a real tensor: a packed stand-in decoded (the torch path and the
                              plain-op formulas take this), any other w itself

A packed stand-in has the decoded weight's shape, dtype and device, and its values are NaN (one
element, expanded): whatever reads it as a tensor by mistake gets NaN, not a plausible result.
"""
import torch

# On a tensor: the object it was decoded from (recomputable), or stands in for (packed).
RECOMPUTE_ATTR = "_lora_fast_decoded_from"
# On a packed stand-in: True (its values are not the weight's).
PACKED_ATTR = "_lora_fast_packed"

_NAN = {}   # (device, dtype) -> a 1-element NaN tensor the stand-ins expand


def recomputable(weight, source):
    """weight (decoded from `source`) marked so that the autograd Functions do not keep it."""
    setattr(weight, RECOMPUTE_ATTR, source)
    return weight


def packed(source, dtype):
    """The stand-in for source decoded to `dtype`: shape source.shape, on source.device."""
    key = (source.device, dtype)
    if key not in _NAN:
        _NAN[key] = torch.full((1,), float("nan"), dtype=dtype, device=source.device)
    stand_in = _NAN[key].expand(*source.shape)
    setattr(stand_in, PACKED_ATTR, True)
    return recomputable(stand_in, source)


def packed_source(weight):
    """The source a packed stand-in reads, or None for any other tensor."""
    return getattr(weight, RECOMPUTE_ATTR, None) if getattr(weight, PACKED_ATTR, False) else None


def is_packed(weight):
    return getattr(weight, PACKED_ATTR, False)


def dense(weight):
    """weight as a tensor of its values: a packed stand-in decoded (marked recomputable), else weight."""
    source = packed_source(weight)
    return weight if source is None else recomputable(source.dequantize(weight.dtype), source)


def cast(weight, dtype):
    """weight in `dtype` (autocast's cast): a packed stand-in becomes one of that dtype (no copy of
    the stand-in's expanded values), a recomputable weight's cast stays recomputable."""
    if weight is None or weight.dtype == dtype:
        return weight
    source = getattr(weight, RECOMPUTE_ATTR, None)
    if is_packed(weight):
        return packed(source, dtype)
    out = weight.to(dtype)
    return out if source is None else recomputable(out, source)


def kept(ctx, weight):
    """What an autograd Function saves of `weight`: None for a recomputable or packed one (its source
    goes on ctx), else weight itself."""
    ctx.weight_source = getattr(weight, RECOMPUTE_ATTR, None)
    ctx.weight_packed = is_packed(weight)
    return None if ctx.weight_source is not None else weight


def restored(ctx, weight, dtype):
    """The saved weight, or the one `kept` did not save made again in `dtype`: a packed stand-in
    again (the kernels decode it), else decoded."""
    if ctx.weight_source is None:
        return weight
    if ctx.weight_packed:
        return packed(ctx.weight_source, dtype)
    return ctx.weight_source.dequantize(dtype)
