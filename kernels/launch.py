"""How the launchers start a kernel: directly on real tensors, through torch.library.wrap_triton
while torch.compile traces them (lora_fast.ops registers the launchers as triton_ops)."""
import torch

from . import configs


def launch(kernel, grid, like):
    """``kernel[grid]``, traceable. While a graph is being traced — `like` (any tensor argument) is
    a fake or functional tensor, as in a triton_op's fake implementation or its decomposition under
    torch.compile — the launch goes through wrap_triton, which records it as a graph node (autotune
    and config pruning included). On real tensors the kernel is called itself: wrap_triton's own
    eager path builds a new pruned autotuner, and so tunes again, on every call. The interpreter's
    kernels are not JIT functions and cannot be traced (lora_fast.ops makes them opaque ops)."""
    if not configs.INTERPRET and _traced(like):
        return torch.library.wrap_triton(kernel)[grid]
    return kernel[grid]


def _traced(t):
    if type(t) is torch.Tensor:   # fake and functional tensors are subclasses: a plain one is real
        return False
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor
    return is_fake(t) or isinstance(t, FunctionalTensor)
