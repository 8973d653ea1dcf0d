"""How the launchers start a kernel: directly on real tensors, through torch.library.wrap_triton
while torch.compile traces them (lora_fast.ops registers the launchers as triton_ops)."""
import torch
from triton.runtime.autotuner import Autotuner

from . import configs, tuning

# While a list, launches are appended to it as (kernel, args, kwargs) instead of running:
# bench.tuning replays the launchers' real autotune calls this way without a GPU.
RECORDER = None


def launch(kernel, grid, like):
    """``kernel[grid]``, traceable. While a graph is being traced — `like` (any tensor argument) is
    a fake or functional tensor, as in a triton_op's fake implementation or its decomposition under
    torch.compile — the launch goes through wrap_triton, which records it as a graph node (autotune
    and config pruning included). On real tensors the kernel is called itself: wrap_triton's own
    eager path builds a new pruned autotuner, and so tunes again, on every call. The interpreter's
    kernels are not JIT functions and cannot be traced (lora_fast.ops makes them opaque ops).
    An autotuned kernel goes through kernels/tuning.py first (disk, capture, parallel compiles)."""
    if RECORDER is not None:
        return lambda *args, **kwargs: RECORDER.append((kernel, args, kwargs))
    if not configs.INTERPRET and _traced(like):
        return torch.library.wrap_triton(kernel)[grid]
    if isinstance(kernel, Autotuner) and len(kernel.configs) > 1:
        return lambda *args, **kwargs: tuning.run(kernel, grid, args, kwargs)
    return kernel[grid]


def _traced(t):
    if type(t) is torch.Tensor:   # fake and functional tensors are subclasses: a plain one is real
        return False
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor
    return is_fake(t) or isinstance(t, FunctionalTensor)
