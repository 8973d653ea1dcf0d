"""LoRA training on 2 processes (CPU, gloo) against one process on the whole global batch.

examples/ddp_fsdp2_train.py's `main` runs under torchrun — this file is the worker script (see the
bottom) — with DDP, and with FSDP2 (fully_shard per block: frozen base weights and trainable
adapters sharded side by side in one module) with activation checkpointing per block (RUNS).
Each rank gets half of every global batch and the loss is the mean over the global batch, so the
last step's adapter gradients, the trained adapters and the saved adapter (gathered from the shards
under FSDP2) must equal the single process's to the fp32 tolerance, and the frozen weights stay
bit for bit. With dropout on the ranks draw their own masks, so those runs are checked to run, to
keep the ranks in step and to differ from the runs without dropout; FSDP2 with dropout trains bit
for bit the same with checkpointing as without. The FSDP2 command of the example's docstring runs as
written (on a free port), and the README snippets are the example's code verbatim.
"""
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_fast
from helpers import assert_close

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_fsdp2_train.py"
STEPS = 4
DROPOUT = 0.1
STRATEGIES = ["ddp", "fsdp2"]
# The worker's runs, name: (strategy, activation checkpointing, dropout p's); adapters in OUT/<name>_p<p>
RUNS = {"ddp": ("ddp", False, (0.0, DROPOUT)),
        "fsdp2": ("fsdp2", True, (0.0, DROPOUT)),
        "fsdp2_no_checkpointing": ("fsdp2", False, (DROPOUT,))}
CPU = torch.device("cpu")
F32 = torch.float32


def _load_example():
    spec = importlib.util.spec_from_file_location("ddp_fsdp2_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _full(t):
    """A plain tensor copy; an FSDP2 shard (DTensor) is gathered whole (a collective)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, cwd=ROOT):
    """`torchrun --nproc_per_node=2 ARGS` rendezvousing on a free port of 127.0.0.1 (one retry if
    another process takes the port first). The repository root goes on PYTHONPATH, as conftest
    puts it on sys.path here; gloo is kept on the loopback interface."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for _ in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0 or "address already in use" not in output.lower():
            break
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"
    return output


# ---- the single-process reference and the 2-process runs ----------------------------------------

@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def single(example):
    """One process, the whole global batch, no dropout, no checkpointing."""
    model = example.build_model(CPU)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = example.train(model, example.make_optimizer(model), example.global_batches(STEPS), 0, 1, CPU)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"initial": initial, "losses": losses, "grads": grads, "params": params}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch, every run of RUNS. Per rank, run and dropout p: losses, full parameters,
    full gradients of the trainable ones, and how each parameter is held (type, requires_grad,
    local shape, has grad)."""
    out = tmp_path_factory.mktemp("launch")
    _torchrun([__file__, str(out)])
    return out, [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(params=STRATEGIES)
def strategy(request):
    return request.param


def _lora(names):
    return sorted(name for name in names if ".lora_" in name)


def test_matches_one_process_on_the_global_batch(single, launched, strategy):
    ranks = [record[strategy] for record in launched[1]]
    lora = _lora(single["grads"])
    assert lora and set(lora) == set(single["grads"]), "only the adapters train"
    assert all(single["grads"][name].abs().sum() > 0 for name in lora)
    for rank, record in enumerate(ranks):
        run = record[0.0]
        for name in lora:
            assert_close(f"rank {rank} grad {name}", run["grads"][name], single["grads"][name], F32)
            assert_close(f"rank {rank} {name}", run["params"][name], single["params"][name], F32)
            assert not torch.equal(run["params"][name], single["initial"][name]), f"{name} did not train"
        for name, value in single["initial"].items():
            if name not in lora:
                assert torch.equal(run["params"][name], value), f"rank {rank}: frozen {name} changed"
                assert not run["layout"][name]["has_grad"], f"rank {rank}: frozen {name} has a grad"
    # Each rank's loss is the mean over its half of the tokens: their average is the global mean.
    average = [(a + b) / 2 for a, b in zip(ranks[0][0.0]["losses"], ranks[1][0.0]["losses"])]
    assert_close("loss", torch.tensor(average), torch.tensor(single["losses"]), F32)
    for name in lora:
        assert torch.equal(ranks[0][0.0]["params"][name], ranks[1][0.0]["params"][name])


def test_fsdp2_shards_frozen_and_trainable_weights_together(launched):
    for record in (record["fsdp2"] for record in launched[1]):
        layout = record[0.0]["layout"]
        block_linear = [n for n in layout if n.startswith("blocks.0.qkv.")]
        assert sorted(block_linear) == ["blocks.0.qkv.bias", "blocks.0.qkv.lora_A",
                                        "blocks.0.qkv.lora_B", "blocks.0.qkv.weight"]
        for name, held in layout.items():
            full = record[0.0]["params"][name].shape
            assert held["type"] == "DTensor", f"{name} is not sharded"
            assert held["local_shape"] == (math.ceil(full[0] / 2),) + tuple(full[1:]), name
            assert held["requires_grad"] == held["has_grad"] == (".lora_" in name), name


def test_saved_adapter_is_the_trained_one(example, single, launched, strategy):
    """The adapter rank 0 wrote (PEFT format; under FSDP2 gathered from the shards by every rank),
    loaded into a fresh single-process model, is the one the ranks trained and computes what the
    single-process model computes."""
    out, ranks = launched[0] / f"{strategy}_p0.0", [record[strategy] for record in launched[1]]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    fresh = example.build_model(CPU)
    loaded = lora_fast.load_adapter(fresh, out)
    assert len(loaded) == 4 * 2
    state = dict(fresh.named_parameters())
    for name in _lora(single["grads"]):
        assert torch.equal(state[name], ranks[0][0.0]["params"][name]), f"{name}: saved != trained"
        assert_close(name, state[name], single["params"][name], F32)
    tokens = example.global_batches(1)[0, :, :-1]
    reference = example.build_model(CPU).eval()
    reference.load_state_dict(single["params"])
    with torch.no_grad():
        assert_close("logits", fresh.eval()(tokens), reference(tokens), F32)


def test_load_adapter_into_an_fsdp2_sharded_model(launched):
    """Every rank loads the saved adapter into its shards; gathered, they are the trained adapter."""
    for record in launched[1]:
        trained = record["fsdp2"][0.0]["params"]
        loaded = record["fsdp2_loaded"]
        for name in _lora(loaded):
            assert torch.equal(loaded[name], trained[name]), f"{name}: loaded != saved"


def test_dropout_runs_keep_the_ranks_in_step(single, launched, strategy):
    ranks = [record[strategy] for record in launched[1]]
    lora = _lora(single["grads"])
    for record in ranks:
        run, no_dropout = record[DROPOUT], record[0.0]
        assert all(math.isfinite(loss) for loss in run["losses"])
        diff = max((run["params"][n] - no_dropout["params"][n]).abs().max().item() for n in lora)
        assert diff > 1e-4, f"p={DROPOUT} trained the same adapter as p=0 (max diff {diff:.2e})"
    for name in lora:
        assert torch.equal(ranks[0][DROPOUT]["params"][name], ranks[1][DROPOUT]["params"][name])
    config = json.loads((launched[0] / f"{strategy}_p{DROPOUT}" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == DROPOUT


def test_fsdp2_checkpointing_redraws_the_dropout_masks(launched):
    """FSDP2 with dropout: checkpointed blocks, recomputed in backward, train exactly as plain ones
    (each rank's masks drawn again from its restored RNG state)."""
    for rank, record in enumerate(launched[1]):
        ckpt, plain = record["fsdp2"][DROPOUT], record["fsdp2_no_checkpointing"][DROPOUT]
        assert ckpt["losses"] == plain["losses"], f"rank {rank}"
        for name in plain["grads"]:
            assert torch.equal(ckpt["grads"][name], plain["grads"][name]), f"rank {rank} grad {name}"
            assert torch.equal(ckpt["params"][name], plain["params"][name]), f"rank {rank} {name}"


# ---- the example as documented --------------------------------------------------------------------

def _documented_commands():
    return re.findall(r"^\s*(torchrun .*)$", EXAMPLE.read_text(), re.M)


def test_documented_fsdp2_command_runs(tmp_path):
    """The FSDP2 + checkpointing command of the example's docstring, as written (torchrun run as
    `python -m torch.distributed.run`, given a free port): default dropout, the script's own
    device choice and process group."""
    (command,) = [c for c in _documented_commands() if "--strategy fsdp2" in c]
    args = command.split()
    assert args[:2] == ["torchrun", "--nproc_per_node=2"]
    (tmp_path / "examples").symlink_to(ROOT / "examples")   # the command's relative path; output here
    output = _torchrun(args[2:], cwd=tmp_path)
    assert re.search(r"loss per step: ([\d.]+ ){4}\| adapter in runs/adapter$", output, re.M), output[-3000:]
    config = json.loads((tmp_path / "runs" / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.05


def _snippets():
    """(document, example path, code) for every fenced block of README.md under a
    `<!-- examples/NAME -->` marker."""
    doc = ROOT / "README.md"
    return [(doc.name, path, code) for path, code in
            re.findall(r"<!-- (examples/\S+) -->\n```\w*\n(.*?)```", doc.read_text(), re.S)]


def test_readme_snippets_are_the_examples_code():
    snippets = _snippets()
    assert snippets, "no marked snippets in README.md"
    for doc, path, code in snippets:
        source = [line.rstrip() for line in (ROOT / path).read_text().splitlines()]
        lines = code.rstrip("\n").split("\n")
        assert _occurs_indented(lines, source), f"{doc}: a snippet is not verbatim in {path}:\n{code}"


def _occurs_indented(lines, source):
    """lines occur consecutively in source, all shifted by one common indentation."""
    for start, first in enumerate(source):
        indent = first[:len(first) - len(first.lstrip())]
        if first.strip() == lines[0].strip() and \
                source[start:start + len(lines)] == [(indent + line if line else "") for line in lines]:
            return True
    return False


# ---- the worker: `torchrun --nproc_per_node=2 tests/test_distributed.py OUT` ----------------------

def _worker(out):
    import torch.distributed as dist
    example = _load_example()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record = {name: {} for name in RUNS}
    for name, (strategy, checkpointing, dropouts) in RUNS.items():
        for p in dropouts:
            model, losses = example.main(strategy, out / f"{name}_p{p}", CPU, steps=STEPS,
                                         lora_dropout=p, checkpointing=checkpointing)
            params = dict((model.module if strategy == "ddp" else model).named_parameters())
            record[name][p] = {
                "losses": losses,
                "params": {key: _full(t) for key, t in params.items()},
                "grads": {key: _full(t.grad) for key, t in params.items() if t.requires_grad},
                "layout": {key: {"type": type(t).__name__, "requires_grad": t.requires_grad,
                                 "local_shape": tuple(t.to_local().shape if hasattr(t, "to_local")
                                                      else t.shape),
                                 "has_grad": t.grad is not None}
                           for key, t in params.items()},
            }
    # load_adapter into a model already sharded by FSDP2: each rank copies in its own shard
    sharded = example.shard(example.build_model(CPU), "fsdp2", CPU)
    lora_fast.load_adapter(sharded, out / "fsdp2_p0.0")
    record["fsdp2_loaded"] = {key: _full(t) for key, t in sharded.named_parameters()}
    torch.save(record, out / f"rank{rank}.pt")
    dist.barrier()   # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
