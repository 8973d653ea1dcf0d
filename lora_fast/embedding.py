"""LoRA on an nn.Embedding, as PEFT's (and loralib's ``lora.Embedding``) computes it:

    y = E[ids] + s · (Aᵀ[ids]) @ Bᵀ        E (num, dim), A (r, num), B (dim, r), s = lora_alpha / r

a gather of A's columns and a (tokens, r) @ (r, dim) product: no kernel, plain PyTorch (the
gather reads r values a token; the product is 2·r·dim FLOPs a token, nothing beside the rest of a
model). Read as a linear over one-hot rows, the embedding is W = Eᵀ (dim, num) with in = num and
out = dim, so A and B have LoRALinear's layout and everything LoRALayer does (named adapters,
merge, unmerge bit for bit, merge_weights, the state dict) works on Eᵀ, a view of E.

As in PEFT: A starts at zeros and B normal (so a new layer computes its base embedding), the
gather takes the base layer's padding_idx, norm_type and scale_grad_by_freq, and there is no
dropout on the ids (lora_dropout is recorded, not applied). Refused: sparse and max_norm
embeddings, and subclasses with a forward of their own. PEFT's files hold
``<path>.lora_embedding_A`` (r, num) and ``.lora_embedding_B`` (dim, r), no ".weight".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .module import (DEFAULT_ADAPTER, AdapterSettings, LoRALayer, _check_adapter_dtype, _check_hparams,
                     check_adapter_name)


def check_embedding(module: nn.Module, name: str | None = None) -> None:
    """Raise, naming the layer, unless `module` is an embedding LoRAEmbedding can take over."""
    where = f"{name!r}" if name else "embedding"
    if not isinstance(module, nn.Embedding) or isinstance(module, LoRAEmbedding):
        raise TypeError(f"{where}: expected an nn.Embedding, got {type(module).__name__}")
    if type(module).forward is not nn.Embedding.forward:
        # e.g. Gemma3's scaled embedding: its own forward would be lost when the layer is replaced
        raise TypeError(f"{where}: {type(module).__name__} computes its own forward (not "
                        "nn.Embedding's), which a LoRA embedding would replace; exclude it")
    if module.sparse:
        raise ValueError(f"{where}: sparse=True (sparse gradients): LoRA on a sparse embedding is not "
                         "available (the adapter's gather would need a sparse transposed gradient)")
    if module.max_norm is not None:
        raise ValueError(f"{where}: max_norm={module.max_norm} renormalises rows of the weight in "
                         "place on every lookup; LoRA on such an embedding is not available")
    if not module.weight.is_floating_point():
        raise TypeError(f"{where}: weight dtype {module.weight.dtype}, expected a floating dtype")


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """An nn.Embedding (``isinstance(m, nn.Embedding)`` holds, ``weight`` is E (num, dim) as before)
    with LoRA adapters: ``y = E[ids] + scaling · Aᵀ[ids] @ Bᵀ``, lora_A (r, num_embeddings), lora_B
    (embedding_dim, r) (see the module docstring). Made by ``from_embedding``; the state table,
    merge and named adapters are LoRALinear's (LoRALayer)."""

    supports_dora = False
    supports_mixed = False   # lora_fast.batch_adapters runs linear layers only

    in_features = property(lambda self: self.num_embeddings, doc="num_embeddings (A is (r, num)).")
    out_features = property(lambda self: self.embedding_dim, doc="embedding_dim (B is (dim, r)).")

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r: int = 8, lora_alpha: float = 8,
                       lora_dropout: float = 0.0, use_rslora: bool = False,
                       adapter_dtype: torch.dtype | None = None,
                       adapter_name: str = DEFAULT_ADAPTER) -> "LoRAEmbedding":
        """Wrap `embedding`, sharing (not copying) its weight, which is frozen; right after this the
        output equals the embedding's.

        Args:
            embedding: an nn.Embedding (its own forward; no max_norm).
            r, lora_alpha, use_rslora, adapter_name: as for ``LoRALinear(...)``.
            lora_dropout: recorded as PEFT records it; PEFT's embedding applies no dropout, nor this.
            adapter_dtype: floating dtype of lora_A/lora_B (default the weight's).
        """
        check_embedding(embedding)
        _check_adapter_dtype(adapter_dtype, embedding.weight.dtype)
        settings = AdapterSettings(*_check_hparams(r, lora_alpha, lora_dropout, use_rslora))
        check_adapter_name(adapter_name)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                    norm_type=embedding.norm_type, scale_grad_by_freq=embedding.scale_grad_by_freq,
                    sparse=embedding.sparse, device="meta", dtype=embedding.weight.dtype)
        layer.weight = embedding.weight
        layer.from_conv1d = False
        layer._init_adapter_state()
        layer.active_adapter = adapter_name
        layer._add_weights(adapter_name, settings, {"device": embedding.weight.device,
                                                    "dtype": adapter_dtype or embedding.weight.dtype})
        layer.train(embedding.training)
        embedding.weight.requires_grad_(False)
        return layer

    def _linear_view(self) -> torch.Tensor:
        return self.weight.t()   # Eᵀ (dim, num): the (out, in) matrix s·B·A is added to

    def _init_adapter(self, name, weights):
        # PEFT's embedding init: A zeros, B normal (the update starts at zero either way)
        nn.init.zeros_(weights[0])
        nn.init.normal_(weights[1])

    def base_embedding(self, ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The lookup of `ids` (integer, any shape) in `weight` ((num, d); default the base
        weight) with the layer's padding_idx, norm_type, scale_grad_by_freq and sparse."""
        return F.embedding(ids, self.weight if weight is None else weight, self.padding_idx, None,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    def check_sizes(self) -> None:
        """Raise unless the weight still has the rows the adapters were made for: transformers'
        resize_token_embeddings swaps a resized weight into this very module."""
        columns = sorted({weights[0].shape[1] for weights in map(self.adapter_weights, self.adapter_settings)})
        if columns and columns != [self.weight.shape[0]]:
            raise RuntimeError(f"LoRAEmbedding: the weight has {self.weight.shape[0]} rows, its "
                               f"adapters' lora_A {columns} columns (resize_token_embeddings after "
                               "inject?): resize the embeddings before inject, or merge_and_unload, "
                               "resize and inject again")

    def check_mergeable(self) -> None:
        """LoRALayer's checks, and the weight's size (check_sizes)."""
        self.check_sizes()
        super().check_mergeable()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """y (..., dim) for integer ids (...), as LoRALinear's state table says (merged, disabled)."""
        self.check_sizes()
        if not self.adapter_enabled:
            return self.base_embedding(ids, self._original_weight if self.merged else None)
        base = self.base_embedding(ids)
        if self.merged or self.settings is None or self.mixed_rows is not None:
            return base   # batch_adapters admits this layer only if no row uses its adapters
        after_A = self.base_embedding(ids, self.lora_A.t())
        return (base + (after_A @ self.lora_B.t()) * self.scaling).to(base.dtype)

    @torch.no_grad()
    def to_base(self) -> nn.Embedding:
        """The plain nn.Embedding, with the active adapter merged into its weight (in place, no copy
        kept), sharing the weight: do not use this layer afterwards."""
        self._fold_for_unload()
        base = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                            norm_type=self.norm_type, scale_grad_by_freq=self.scale_grad_by_freq,
                            sparse=self.sparse, device="meta")
        base.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
        return base
