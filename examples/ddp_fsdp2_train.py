"""LoRA fine-tuning on several processes, data-parallel (DDP) or sharded (FSDP2), with optional
activation checkpointing:

    torchrun --nproc_per_node=2 examples/ddp_fsdp2_train.py --strategy ddp --out runs/adapter_ddp
    torchrun --nproc_per_node=2 examples/ddp_fsdp2_train.py --strategy fsdp2 --checkpointing

DDP: every rank holds the whole frozen model and the adapter, trains on its share of each global
batch, and DDP averages the adapter gradients. FSDP2 (torch.distributed.fsdp.fully_shard): every
parameter, frozen base and trainable adapter alike, is split across the ranks and gathered per
block for its forward and backward; only the adapter gradients are reduce-scattered. CUDA with
NCCL when there is a GPU per rank, else CPU with gloo. The model is a miniature decoder (random
weights, random tokens) so the script runs anywhere in seconds; with a real model only
`build_model` and the data change. tests/test_distributed.py runs `main` on 2 CPU processes and
checks gradients, weights and the saved adapter against one process on the whole batch. The adapter
goes to runs/adapter/ under the current directory (runs/ is git-ignored) unless --out says otherwise.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import lora_fast

VOCAB, DIM, HEADS, DEPTH = 64, 32, 4, 2
GLOBAL_BATCH, SEQ = 8, 12


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, a decoder layer in miniature."""

    def __init__(self):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, HEADS, DIM // HEADS).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, DIM))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nn.Module):
    def __init__(self, checkpointing=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.norm, self.lm_head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)
        self.checkpointing = checkpointing

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            if self.checkpointing and self.training:
                # Keep only each block's input; backward recomputes the block, LoRA dropout
                # included: checkpoint restores the RNG state, so the same masks are drawn again.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(self.norm(x))


def build_model(device, lora_dropout=0.0, checkpointing=False):
    """The base model with LoRA on every linear of the blocks. Every rank builds the same one (same
    seed: same base weights, same adapter initialisation); FSDP2 relies on that, DDP would also
    broadcast rank 0's."""
    torch.manual_seed(0)
    model = TinyLM(checkpointing).to(device)
    lora_fast.inject(model, r=4, lora_alpha=8, target_modules=["qkv", "proj", "up", "down"],
                     lora_dropout=lora_dropout)
    return model


def shard(model, strategy, device):
    if strategy == "ddp":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)   # gathered for this block's forward/backward, then freed
    return fully_shard(model, mesh=mesh)   # the rest: embedding, final norm, head


def make_optimizer(model):
    """AdamW on the adapter alone. Under FSDP2, call it after sharding: its parameters are then
    the DTensor shards."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def global_batches(steps):
    """(steps, GLOBAL_BATCH, SEQ + 1) random tokens, the same on every rank."""
    return torch.randint(VOCAB, (steps, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def train(model, optimizer, batches, rank, world_size, device):
    """One optimizer step per global batch, this rank taking its contiguous share of the rows. The
    loss is the mean over the rank's tokens, and DDP and FSDP2 average gradients over ranks: the
    gradient of the mean over the global batch. Returns the losses; the last step's gradients are
    left in .grad."""
    losses = []
    for batch in batches:
        tokens = batch.chunk(world_size)[rank].to(device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(strategy, out, device, steps=4, lora_dropout=0.05, checkpointing=False):
    """Train and save the adapter, on an initialised process group; returns this rank's model and
    losses."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = shard(build_model(device, lora_dropout, checkpointing), strategy, device)
    torch.manual_seed(1000 + rank)   # after building: each rank draws its own dropout masks
    optimizer = make_optimizer(model)
    losses = train(model, optimizer, global_batches(steps), rank, world_size, device)
    lora_fast.save_adapter(model, out)   # every rank calls it (FSDP2 gathers the shards); rank 0 writes
    return model, losses


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, each option's default after its help."""


def build_parser():
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N examples/ddp_fsdp2_train.py",
                                     description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp",
                        help="ddp: every rank holds the whole model; fsdp2: parameters sharded across ranks")
    parser.add_argument("--out", default="runs/adapter",
                        help="directory for the adapter (PEFT format), relative to the current directory; "
                             "rank 0 writes it")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps, one global batch each")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout probability")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing per block (recomputed in backward, same dropout masks)")
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    local_rank, world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.device_count() >= world_size
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    model, losses = main(args.strategy, args.out, device, args.steps, args.lora_dropout, args.checkpointing)
    if dist.get_rank() == 0:
        print("loss per step:", " ".join(f"{loss:.4f}" for loss in losses), "| adapter in", args.out)
    # The sharded model holds the process group (FSDP2's mesh, DDP's reducer): freed here, while the
    # interpreter is whole, not at its teardown, where gloo's worker threads have aborted rank 1 of
    # a CI run ("terminate called without an active exception") after all work had finished.
    del model
    gc.collect()
    dist.barrier()   # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()
