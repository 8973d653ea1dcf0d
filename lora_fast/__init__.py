"""lora_fast: a fused LoRA linear layer (Triton kernels forward and backward) with a float64
reference and a plain-PyTorch path. Public API:

    lora_linear(x, weight, lora_A, lora_B, bias=None, *, scaling=1.0, backend="auto")
    LoRALinear(in_features, out_features, r=8, lora_alpha=8, ...), LoRALinear.from_linear(...)
    reference.lora_linear_ref / reference.lora_linear_backward_ref (float64)
    inject(model, r, lora_alpha, target_modules, ...) and merge / unmerge / merge_and_unload /
    disable_adapters / trainable_parameters / mark_only_lora_as_trainable on a whole model
    save_adapter / load_adapter / load_adapters / lora_state_dict: adapters in PEFT's format
        (several adapters in PEFT's layout; load_adapter(..., hotswap=True) for compiled models)
    add_adapter / set_adapter / delete_adapter / adapter_names / active_adapter: named adapters
    batch_adapters(model, names): each batch row with its own adapter, trained or served
    quantize(model, "nf4") / Linear4bit / LoRALinear4bit: QLoRA, a 4-bit NF4 base (bitsandbytes' bytes)
    dora_linear / LoRALinear(..., use_dora=True) / inject(..., use_dora=True): DoRA (PEFT's use_dora)
    LoRASlicedLinear / inject(..., slices={name: (sizes, enable)}): LoRA on chosen slices of a fused
        projection (loralib's MergedLinear); convert: loralib and from-scratch checkpoints
    LoRAEmbedding / inject(..., target_modules=[<an nn.Embedding>]): LoRA on embeddings (PEFT's keys)
    dispatch: which kernel path each pass runs on a GPU, measured per shape and cached
    dropout.keep_mask(seed, M, K, p): the kernels' LoRA dropout mask, reproduced outside them
"""
from . import dispatch, dropout, reference
from .function import LoRALinearFunction, lora_linear
from .module import LoRALinear
from .inject import (disable_adapters, inject, lora_layers, mark_only_lora_as_trainable, merge,
                     merge_and_unload, trainable_parameters, unmerge)
from .named_adapters import active_adapter, adapter_names, add_adapter, delete_adapter, set_adapter
from .adapters import load_adapter, load_adapters, lora_state_dict, save_adapter
from . import convert
from .mixed import batch_adapters
from .qlora import Linear4bit, LoRALinear4bit, quantize
from .dora import dora_linear
from .sliced import LoRASlicedLinear
from .embedding import LoRAEmbedding

from ._version import __version__
__all__ = ["lora_linear", "LoRALinear", "LoRALinearFunction", "reference", "dropout", "inject", "merge",
           "unmerge", "merge_and_unload", "lora_layers", "lora_state_dict",
           "mark_only_lora_as_trainable", "trainable_parameters", "disable_adapters",
           "save_adapter", "load_adapter", "load_adapters", "add_adapter", "set_adapter",
           "delete_adapter", "adapter_names", "active_adapter", "batch_adapters", "quantize", "Linear4bit",
           "LoRALinear4bit", "dora_linear", "convert", "LoRASlicedLinear", "LoRAEmbedding", "__version__"]
