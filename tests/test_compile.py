"""torch.compile and CUDA graphs: the operators of lora_fast.ops pass opcheck, a model of LoRALinears
compiles with fullgraph=True (no graph break) and trains like eager, a new sequence length does
not recompile once the length is dynamic, and (GPU) the forward and the training step replay from
CUDA graphs. Without a GPU the Triton kernels run under the interpreter, where their ops are
opaque; the traced (triton_op) form of the kernels is checked in a subprocess that only traces."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import DEVICE, HAS_CUDA, assert_close, make_inputs
from lora_fast import LoRALinear, LoRALinearFunction, lora_linear
from lora_fast.ops import OPS

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test counts its own compiles, and compiled models of earlier tests do not fill the
    recompile limit of the shared Module.forward code."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """A pre-norm MLP block of two LoRALinears, adding the residual in place on a LoRALinear's
    output (legal: the output is an ordinary view of the op's result)."""

    def __init__(self, d, hidden, r, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = LoRALinear(d, hidden, r=r, lora_alpha=2 * r, lora_dropout=dropout)
        self.down = LoRALinear(hidden, d, r=r + 1, lora_alpha=r, lora_dropout=dropout)

    def forward(self, x):
        h = self.down(F.gelu(self.up(self.norm(x))))
        h += x
        return h


def _model(dropout=0.0, seed=0, device=DEVICE, d=24, hidden=40, r=4):
    torch.manual_seed(seed)
    model = nn.Sequential(Block(d, hidden, r, dropout), Block(d, hidden, r, dropout)).to(device)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=m.r ** -0.5)   # LoRA's zero init would hide the adapter
    return model


def _twins(dropout=0.0, device=DEVICE):
    """Two models with equal weights and their SGD optimizers (trainable parameters only)."""
    a, b = _model(dropout, device=device), _model(dropout, device=device)
    b.load_state_dict(a.state_dict())
    opt = lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    return (a, opt(a)), (b, opt(b))


def _step(model, opt, x, seed):
    """One training step; returns the loss and x's gradient. The seed fixes the dropout draws."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), x.grad


def _assert_same_training(eager, compiled, steps, shape=(2, 7, 24), dtype=torch.float32):
    (m_e, opt_e), (m_c, opt_c) = eager, compiled
    for i in range(steps):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + i)).to(DEVICE)
        loss_e, gx_e = _step(m_e, opt_e, x, seed=i)
        loss_c, gx_c = _step(m_c, opt_c, x, seed=i)
        assert_close(f"step {i} loss", loss_c, loss_e, dtype)
        assert_close(f"step {i} grad x", gx_c, gx_e, dtype)
    for (name, p_e), (_, p_c) in zip(m_e.named_parameters(), m_c.named_parameters()):
        assert_close(f"{name} after {steps} steps", p_c, p_e, dtype)


# --- the operators -----------------------------------------------------------------------------

def _op_inputs(bias, dropout_p, requires_grad):
    t = make_inputs(2 * 5, 13, 11, 3, torch.float32, seed=61, bias=bias)
    x = t["x"].reshape(2, 5, 13)
    seed = torch.tensor([7], device=DEVICE) if dropout_p else None
    leaf = lambda v: v.clone().requires_grad_(requires_grad)
    return (leaf(x), t["weight"], leaf(t["lora_A"]), leaf(t["lora_B"]), t["bias"], 0.7, dropout_p, seed)


@pytest.mark.parametrize("bias,dropout_p", [(True, 0.0), (False, 0.3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, bias, dropout_p):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch with dynamic
    shapes, for each op on odd sizes (M = 2·5, in 13, out 11, r 3)."""
    ops = OPS[backend]
    args = _op_inputs(bias, dropout_p, requires_grad=True)
    torch.library.opcheck(ops.forward, args)
    plain = _op_inputs(bias, dropout_p, requires_grad=False)
    torch.library.opcheck(ops.inference, plain)
    x, weight, lora_A, lora_B, _, scaling, p, seed = plain
    _, xs = ops.forward(*plain)
    dy = make_inputs(10, 11, 1, 1, torch.float32, seed=62)["x"]
    for need in [(True, True, True), (False, True, False), (True, False, True)]:
        torch.library.opcheck(ops.backward, (dy, x, xs, weight, lora_A, lora_B, scaling, p, seed, *need))


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_on_the_output_keeps_gradients(backend):
    """y += residual after lora_linear: y is a view of the op's output, not the output itself, so
    autograd allows the in-place add, and the gradients are those of y + residual."""
    t = {k: v.clone().requires_grad_(True) for k, v in make_inputs(12, 10, 8, 2, torch.float32, seed=63).items()}
    x3 = t["x"].view(3, 4, 10)
    res = torch.randn(3, 4, 8, device=DEVICE)
    y = lora_linear(x3, t["weight"], t["lora_A"], t["lora_B"], t["bias"], scaling=0.5, backend=backend)
    assert not y._is_view(), "a view as a module's output: FSDP2 warns that in-place ops drop its hook"
    y += res
    y.square().sum().backward()
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    y_ref = lora_linear(ref["x"].view(3, 4, 10), ref["weight"], ref["lora_A"], ref["lora_B"], ref["bias"],
                        scaling=0.5, backend=backend) + res
    y_ref.square().sum().backward()
    for k in t:
        assert_close(f"grad {k}", t[k].grad, ref[k].grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_and_lora_linear_agree(backend):
    """LoRALinearFunction (public) runs the same ops: same output and gradients, dropout included."""
    t = make_inputs(14, 9, 7, 3, torch.float32, seed=64)
    a = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    b = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    seed = torch.tensor([11], device=DEVICE)
    # (y, xs), as the forward op returns (the forward / setup_context split that torch.func needs)
    y_f, xs_f = LoRALinearFunction.apply(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5,
                                         backend, 0.25, seed)
    y_op, xs_op = OPS[backend].forward(b["x"], b["weight"], b["lora_A"], b["lora_B"], b["bias"], 0.5, 0.25, seed)
    assert torch.equal(y_f, y_op) and torch.equal(xs_f, xs_op)
    dy = torch.randn(y_f.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    y_f.backward(dy)
    y_op.backward(dy)
    for k in t:
        assert torch.equal(a[k].grad, b[k].grad), k


def test_eager_calls_skip_the_operators(monkeypatch):
    """Eagerly lora_linear runs the passes through LoRALinearFunction, not the torch.library
    operators, whose Python dispatch would add ~30 us to every call (a decode step's budget)."""
    import lora_fast.ops as ops

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through a torch.library operator")
    monkeypatch.setattr(ops, "OPS", {b: OPS[b]._replace(forward=refuse, inference=refuse,
                                                             backward=refuse) for b in BACKENDS})
    t = {k: v.clone().requires_grad_(True) for k, v in make_inputs(6, 8, 5, 2, torch.float32).items()}
    for backend in BACKENDS:
        y = lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], backend=backend,
                        dropout_p=0.2, training=True)
        y.sum().backward()
        with torch.no_grad():
            lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], backend=backend)


# --- torch.compile on this machine -------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_matches_eager_aot_eager(backend, dropout, monkeypatch):
    """fullgraph=True (a graph break raises), two SGD steps, dropout drawn from the same seeds: the
    aot_eager backend runs the traced graph as it is, so it matches eager to the fp32 bound."""
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    eager, (model, opt) = _twins(dropout)
    compiled = (torch.compile(model, fullgraph=True, backend="aot_eager"), opt)
    _assert_same_training(eager, compiled, steps=2)


def test_compiled_training_matches_eager_inductor():
    """The default backend (inductor, C++ on the CPU) around the opaque torch-path ops, dropout on;
    fallback_random keeps torch.randint of the dropout seed on eager's generator."""
    eager, (model, opt) = _twins(dropout=0.1)
    compiled = (torch.compile(model, fullgraph=True), opt)
    with torch._inductor.config.patch(fallback_random=True):
        _assert_same_training(eager, compiled, steps=2)


@pytest.mark.parametrize("mark_dynamic", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_new_sequence_lengths_do_not_recompile(backend, mark_dynamic, monkeypatch):
    """Four sequence lengths, forward and backward: one compile when the length is marked dynamic,
    two otherwise (the first length static, then one dynamic graph for every other length)."""
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    counter = CompileCounterWithBackend("aot_eager")
    eager, (model, _) = _twins()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for length in (5, 7, 12, 17):
        x = torch.randn(2, length, 24, device=DEVICE, requires_grad=True)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 1)
        y = compiled(x)
        y.square().mean().backward()
        assert_close(f"y, length {length}", y, eager[0](x), torch.float32)
    assert counter.frame_count == (1 if mark_dynamic else 2), f"{counter.frame_count} compiles"


def _trace_triton_ops(groups):
    """Run by test_triton_ops_trace_into_kernels in a process without TRITON_INTERPRET: register
    the triton ops as on a GPU (triton_op, JIT kernels launched through wrap_triton), compile a call
    of them on CPU tensors for each group of lengths, record the forward and backward graphs without
    running them (no GPU to run them on) and print what they hold, as JSON."""
    import triton
    from torch._dynamo.backends.common import aot_autograd
    from triton.backends.compiler import GPUTarget

    from lora_fast import ops

    class TraceOnlyDriver:   # lets torch lower the kernels to TTIR to see which arguments they write
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def is_active(self):
            return True

    class NotRun(Exception):
        pass

    triton.runtime.driver.set_active(TraceOnlyDriver())
    traced_ops = ops._define("triton", traceable=True, prefix="triton_traced")   # what a GPU registers

    def step(x, weight, lora_A, lora_B, bias):
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        y, _ = traced_ops.forward(x, weight, lora_A, lora_B, bias, 0.5, 0.1, seed)
        return y

    t = make_inputs(1, 64, 48, 8, torch.float32, device="cpu")
    results = []
    for lengths in groups:
        torch._dynamo.reset()
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)

            def run(*args):
                raise NotRun
            return run

        counter = CompileCounterWithBackend(aot_autograd(fw_compiler=record, bw_compiler=record))
        compiled = torch.compile(step, fullgraph=True, backend=counter)
        for length in lengths:
            x = torch.randn(length, 64, requires_grad=True)
            torch._dynamo.mark_dynamic(x, 0)
            with pytest.raises(NotRun):
                compiled(x, t["weight"], t["lora_A"].requires_grad_(), t["lora_B"].requires_grad_(), t["bias"])
        targets = [[str(n.target) for n in g.graph.nodes if n.op == "call_function"] for g in graphs]
        results.append({"frames": counter.frame_count, "targets": targets})
    print(json.dumps(results))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the compiled tests below run the traced kernels")
def test_triton_ops_trace_into_kernels():
    """The GPU form of the triton ops (triton_op + wrap_triton, autotune with pruning) traced on
    this machine, dropout on: no opaque op is left, the kernels are graph nodes in forward and
    backward, and four lengths compile once on each side of IN_LOOP_MAX_M = 256 rows (first pass:
    skinny kernel + GEMM each way; in loop: one fused kernel each way)."""
    groups = {"first pass": ([300, 400, 517, 1030], 2), "in loop": ([70, 100, 151, 256], 1)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import test_compile; test_compile._trace_triton_ops({[g for g, _ in groups.values()]})"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for (path, (_, launches)), out in zip(groups.items(), results):
        assert out["frames"] == 1, f"{path}: {out['frames']} compiles for four lengths"
        forward, backward = out["targets"]
        for name, targets in (("forward", forward), ("backward", backward)):
            assert not any("lora_fast" in t for t in targets), f"{path} {name}: an opaque op is left: {targets}"
            kernels = [t for t in targets if "triton_kernel_wrapper" in t]
            assert len(kernels) == launches, f"{path} {name}: {launches} kernels expected, got {targets}"


# --- GPU: the traced kernels, CUDA graphs ------------------------------------------------------

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bias,dropout_p", [(True, 0.0), (False, 0.3)])
def test_opcheck_triton_op_gpu(bias, dropout_p):
    test_opcheck("triton", bias, dropout_p)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_training_matches_eager_inductor_gpu(dropout):
    """Inductor runs the traced kernels (tuned again at compile time): the same training to the
    fp32 bound; dropout seeds from eager's generator (fallback_random)."""
    eager, (model, opt) = _twins(dropout)
    compiled = (torch.compile(model, fullgraph=True), opt)
    with torch._inductor.config.patch(fallback_random=True):
        _assert_same_training(eager, compiled, steps=2, shape=(2, 150, 24))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mark_dynamic", [False, True])
def test_new_sequence_lengths_do_not_recompile_gpu(mark_dynamic):
    """As on the CPU, through the traced kernels and inductor; the lengths keep M above
    IN_LOOP_MAX_M, where the path (first pass or in-loop) and the tile sizes no longer change."""
    counter = CompileCounterWithBackend("inductor")
    eager, (model, _) = _twins()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for length in (150, 200, 257, 333):
        x = torch.randn(2, length, 24, device="cuda", requires_grad=True)
        if mark_dynamic:
            torch._dynamo.mark_dynamic(x, 1)
        y = compiled(x)
        y.square().mean().backward()
        assert_close(f"y, length {length}", y, eager[0](x), torch.float32)
    assert counter.frame_count == (1 if mark_dynamic else 2), f"{counter.frame_count} compiles"


def _warm_up(fn, times=3):
    """Run fn on a side stream before a capture: Triton compiles and autotunes there (both
    synchronise), and the allocator has the blocks the capture will ask for."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


@pytest.mark.gpu
@needs_cuda
def test_no_host_sync_in_forward_and_backward_gpu():
    """After warm-up a training step through the kernels (dropout on) never waits on the GPU:
    torch's sync debug mode raises on any synchronising call."""
    layer = LoRALinear(256, 192, r=16, lora_dropout=0.1, device="cuda")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(300, 256, device="cuda", requires_grad=True)
    step = lambda: layer(x).square().mean().backward()
    _warm_up(step)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _captured_layer_forward(**layer_kwargs):
    """(layer, static_x, graph, static_y): a 256→192 r=16 LoRALinear with a non-zero B, warmed up on
    a static (300, 256) input, its no-grad forward captured in a CUDA graph."""
    layer = LoRALinear(256, 192, r=16, device="cuda", **layer_kwargs)
    nn.init.normal_(layer.lora_B)
    static_x = torch.randn(300, 256, device="cuda")
    with torch.no_grad():
        _warm_up(lambda: layer(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
    return layer, static_x, graph, static_y


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_forward_gpu():
    torch.manual_seed(0)
    layer, static_x, graph, static_y = _captured_layer_forward()
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(300, 256, device="cuda")
            static_x.copy_(x)
            graph.replay()
            assert_close(f"replay {i}", static_y, layer(x), torch.float32)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_training_step_gpu():
    """Forward, backward and the SGD step captured whole (as in torch.cuda.graphs' docs); each
    replay equals an eager step of a twin model on the same batch."""
    (m_e, opt_e), (m_g, opt_g) = _twins(device="cuda")
    static_x = torch.randn(2, 150, 24, device="cuda")

    def step():
        m_g(static_x).square().mean().backward()
        opt_g.step()

    def zero():
        opt_g.zero_grad(set_to_none=True)

    _warm_up(lambda: (zero(), step()))
    m_e.load_state_dict(m_g.state_dict())     # the warm-up steps moved m_g
    zero()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(3):
        x = torch.randn(2, 150, 24, device="cuda")
        static_x.copy_(x)
        graph.replay()
        _step(m_e, opt_e, x, seed=i)
    for (name, p_e), (_, p_g) in zip(m_e.named_parameters(), m_g.named_parameters()):
        assert_close(f"{name} after 3 replays", p_g, p_e, torch.float32)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_draw_new_dropout_masks_gpu():
    """The dropout seed is drawn by torch.randint on the CUDA generator, which a captured graph
    advances on every replay: two replays drop different elements, and both are dropout outputs
    (not the eval output)."""
    layer, static_x, graph, static_y = _captured_layer_forward(lora_dropout=0.5)
    with torch.no_grad():
        graph.replay()
        first = static_y.clone()
        graph.replay()
        second = static_y.clone()
        evaluated = layer.eval()(static_x)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first, second), "two replays drew the same dropout mask"
    assert not torch.equal(first, evaluated) and not torch.equal(second, evaluated)


@pytest.mark.gpu
@needs_cuda
def test_reduce_overhead_training_matches_eager_gpu():
    """mode="reduce-overhead" (inductor + CUDA graph trees), forward and backward, three steps."""
    eager, (model, opt) = _twins()
    compiled = (torch.compile(model, mode="reduce-overhead", fullgraph=True), opt)
    _assert_same_training(eager, compiled, steps=3, shape=(2, 150, 24))
