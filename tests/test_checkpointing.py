"""Activation checkpointing (torch.utils.checkpoint) around blocks of LoRALinear layers with LoRA
dropout on, in training mode. lora_linear draws each dropout seed from torch's generator of x's
device and keeps no mask; checkpoint restores that generator's state before recomputing a block in
backward, so the recomputation draws the same seeds, hence the same masks, and the gradients are
bit for bit those of the run without checkpointing: both backends, reentrant or not. Without the
restored state (preserve_rng_state=False) they differ, which shows the comparison can fail. And the
checkpointed blocks keep none of their activations for backward: only each block's input."""
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.common import saved_bytes
from helpers import DEVICE
from lora_fast import LoRALinear
from lora_fast.backend import resolve_backend

BACKENDS = ["torch", "triton"]   # triton: compiled on a GPU, the interpreter on CPU (conftest)
MODES = {"non_reentrant": False, "reentrant": True}
P = 0.3
BATCH, SEQ, DIM, HIDDEN, R = 2, 5, 12, 20, 3   # M = 10 rows: small enough for the interpreter


class Block(nn.Module):
    """x + down(gelu(up(norm(x)))), both linears LoRA with dropout."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = LoRALinear(DIM, HIDDEN, r=R, lora_alpha=2 * R, lora_dropout=P)
        self.down = LoRALinear(HIDDEN, DIM, r=R, lora_alpha=2 * R, lora_dropout=P)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


@pytest.fixture
def model():
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block() for _ in range(2)).to(DEVICE).train()
    with torch.no_grad():   # nonzero B (LoRA starts it at 0), so lora_A gets a real gradient too
        for module in blocks.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0.0, 0.5)
    return blocks


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, SEQ, DIM, generator=g).to(DEVICE) for _ in range(2)]   # x, dL/dy


def _forward(blocks, x, reentrant=None, preserve_rng_state=True):
    """The blocks on x, each under checkpoint unless reentrant is None."""
    for block in blocks:
        if reentrant is None:
            x = block(x)
        else:
            x = checkpoint(block, x, use_reentrant=reentrant, preserve_rng_state=preserve_rng_state)
    return x


def _gradients(blocks, x, grad_out, seed, **ckpt):
    """Gradients of x and of every trainable parameter for one training step whose dropout seeds
    come from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)   # reentrant checkpoint needs an input that requires grad
    _forward(blocks, x, **ckpt).backward(grad_out)
    grads = {"x": x.grad}
    for name, p in blocks.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad
            p.grad = None
    return grads


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_recomputation_draws_the_same_dropout_masks(model, backend, mode, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    assert resolve_backend("auto", DEVICE, torch.float32) == backend
    x, grad_out = _inputs(1)
    plain = _gradients(model, x, grad_out, seed=7)
    assert set(plain) == {"x"} | {f"{i}.{part}" for i in range(2) for part in
                                  ("norm.weight", "norm.bias", "up.lora_A", "up.lora_B",
                                   "down.lora_A", "down.lora_B")}
    assert all(g.abs().sum() > 0 for g in plain.values()), "every gradient must be nonzero"

    ckpt = _gradients(model, x, grad_out, seed=7, reentrant=MODES[mode])
    assert all(torch.equal(ckpt[k], plain[k]) for k in plain), \
        f"checkpointed gradients differ from the plain run's by up to {_max_diff(ckpt, plain):.3e}"

    # Controls: dropout is on (another seed, other gradients), and without the restored RNG state
    # the recomputation draws other masks than the forward did, so the gradients are wrong.
    assert _max_diff(_gradients(model, x, grad_out, seed=8), plain) > 1e-3
    unrestored = _gradients(model, x, grad_out, seed=7, reentrant=MODES[mode], preserve_rng_state=False)
    assert _max_diff(unrestored, plain) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_blocks_keep_only_their_inputs(model, mode, monkeypatch):
    """Bytes autograd saves during the forward (parameters excluded): all the activations without
    checkpointing; with it, each block's input and nothing else. And the activations made inside
    the blocks are freed as soon as the forward is done, recomputed ones after the backward."""
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    x, grad_out = _inputs(2)
    x.requires_grad_(True)
    params = list(model.parameters())
    block_inputs = 2 * x.numel() * x.element_size()   # x and the first block's output
    plain = saved_bytes(lambda: _forward(model, x), params)
    ckpt = saved_bytes(lambda: _forward(model, x, reentrant=MODES[mode]), params)
    assert ckpt == block_inputs, f"checkpointed forward saved {ckpt} bytes, expected {block_inputs}"
    assert plain > 4 * block_inputs, f"plain forward saved only {plain} bytes"

    made_inside = []
    hooks = [m.register_forward_hook(lambda m, i, out: made_inside.append(weakref.ref(out)))
             for block in model for m in (block.norm, block.up, block.down)]
    try:
        y = _forward(model, x)
        assert any(ref() is not None for ref in made_inside), "plain run: activations are kept"
        del y, made_inside[:]
        y = _forward(model, x, reentrant=MODES[mode])
        assert len(made_inside) == 6 and all(ref() is None for ref in made_inside), \
            "checkpointed run: an activation made inside a block is still alive after the forward"
        y.backward(grad_out)
        assert len(made_inside) > 6, "backward recomputed the blocks"
        assert all(ref() is None for ref in made_inside), "a recomputed activation outlived backward"
    finally:
        for hook in hooks:
            hook.remove()
