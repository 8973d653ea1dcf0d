"""The LoRA linear's passes as torch.library operators: torch.compile traces a model of LoRALinears
in one graph (fullgraph=True, no break), with dynamic sequence lengths, and CUDA graphs capture it.

Three ops per backend (``torch``, ``triton``). x has any leading shape (..., in) and is the caller's
tensor; y, xs and the gradients are 2-D (M = rows of x):

    lora_fast::{backend}_forward(x, weight, lora_A, lora_B, bias?, scaling, dropout_p, seed?) -> (y, xs)
    lora_fast::{backend}_inference(<the same>) -> y                   (xs is not kept: no backward)
    lora_fast::{backend}_backward(dy, x, xs, weight, lora_A, lora_B, scaling, dropout_p, seed?,
                                  need_dx, need_da, need_db) -> [dx, dA, dB], only the asked ones

y is returned 2-D and lora_linear reshapes it to (..., out) outside the op: autograd forbids
in-place ops (``y += residual``) on an op output that is itself a view.

`{backend}_forward` carries the autograd formula (register_autograd). It saves x and xs (M·r values
in x's dtype) as tensors, plus weight, lora_A and lora_B (held by the module anyway), and keeps the
dropout seed (8 bytes, drawn by lora_linear) on ctx: saved_tensors_hooks see exactly x and xs, as
with LoRALinearFunction. The backward regenerates the dropout mask from that seed.

Registration. ``torch``: custom_op + register_fake, opaque to the compiler (its passes are library
GEMMs, and on the CPU its dropout mask comes from the C++ extension, which the tracer cannot see
into; on CUDA the mask is the kernels' mask kernel, nothing read back, so CUDA graphs capture it).
``triton``: triton_op, whose launchers start their kernels through wrap_triton
while they are traced (kernels/launch.py), so inductor sees the kernels themselves.
@triton.autotune with prune_configs_by is supported there (torch 2.11 and 2.13 alike): the tracer
runs early_config_prune on the fake arguments and records an autotuner of the kept configs, tuned
once per compiled graph; the autotune key (M_BUCKET, N, K, R) plays no part there. Without a GPU
the triton ops are custom_ops with fakes, like the torch ones: under the Triton interpreter the
kernels are no JIT functions, which wrap_triton cannot trace (torch 2.11 refuses them, 2.13
launches them untraced); torch < 2.6 has no triton_op either.

Eagerly, lora_linear does not call these operators (their Python dispatch costs ~30 us a call):
LoRALinearFunction runs the passes itself. This file only registers the operators; the passes
they run are lora_fast.function's.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import function   # the passes themselves (run_forward / run_backward / input_grads)
from .backend import interpreter_enabled


class Ops(NamedTuple):
    forward: object
    inference: object
    backward: object


def _kernels_traceable():
    """Whether the triton ops are triton_ops: the kernels run compiled (a GPU, no interpreter) and
    torch has triton_op and wrap_triton (2.6+). Elsewhere they are custom_ops, and importing
    lora_fast does not import triton (and torch._inductor, which triton_op pulls in: 1.5 s)."""
    return (torch.cuda.is_available() and not interpreter_enabled()
            and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"))


def _define(backend, traceable, prefix=None):
    """Register the three ops of `backend` (named lora_fast::{prefix}_*, prefix = backend by
    default): lora_fast.function's run_forward / run_backward as operators."""
    def define(name):
        qualname = f"lora_fast::{prefix or backend}_{name}"
        if traceable:
            return torch.library.triton_op(qualname, mutates_args=())
        return torch.library.custom_op(qualname, mutates_args=())

    @define("forward")
    def forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return function.run_forward(backend, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)

    @define("inference")
    def inference(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                  scaling: float, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
        return function.run_forward(backend, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed,
                           save_xs=False)[0]

    @define("backward")
    def backward(dy: Tensor, x: Tensor, xs: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                 scaling: float, dropout_p: float, seed: Optional[Tensor],
                 need_dx: bool, need_da: bool, need_db: bool) -> list[Tensor]:
        return function.run_backward(backend, dy, x, xs, weight, lora_A, lora_B, scaling, dropout_p, seed,
                            need_dx, need_da, need_db)

    def setup_context(ctx, inputs, output):
        x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1], weight, lora_A, lora_B)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.seed = seed   # 8 bytes, not an activation: on ctx, not among the saved tensors

    def grads(ctx, dy, _):
        need_x, need_w, need_a, need_lb, need_b = ctx.needs_input_grad[:5]
        dx, dw, da, db, dbias = function.input_grads(backward, dy, *ctx.saved_tensors, ctx.scaling, ctx.dropout_p,
                                            ctx.seed, need_x, need_w, need_a, need_lb, need_b)
        return dx, dw, da, db, dbias, None, None, None

    if not traceable:   # a triton_op's fake is the op itself, run on fake tensors
        forward.register_fake(_forward_fake)
        inference.register_fake(lambda *args: _forward_fake(*args)[0])
        backward.register_fake(_backward_fake)
    forward.register_autograd(grads, setup_context=setup_context)
    return Ops(forward, inference, backward)


def _forward_fake(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    m = math.prod(x.shape[:-1])
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, lora_A.shape[0]))


def _backward_fake(dy, x, xs, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_da, need_db):
    grads = [(need_dx, dy.new_empty((dy.shape[0], x.shape[-1]))), (need_da, lora_A.new_empty(lora_A.shape)),
             (need_db, lora_B.new_empty(lora_B.shape))]
    return [g for need, g in grads if need]


OPS = {"torch": _define("torch", traceable=False),
       "triton": _define("triton", traceable=_kernels_traceable())}
