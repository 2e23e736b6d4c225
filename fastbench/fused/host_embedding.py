"""The offloaded checkpointing mode's input embedding: its frozen table in pinned host memory.

A decoder's input embedding only looks rows up (4,096 tokens read 32 MiB of llama-3-8b's 1 GiB table), and a
LoRA run does not train it; the GPU can read pinned host memory directly, so the ``"offload"`` mode keeps the
table there and gathers each batch's rows over the bus (fastbench.kernels.embedding_gather). The table stays
the module's ``weight`` (a buffer now, so ``state_dict`` and saving see it as before; ``model.parameters()``
no longer yields it, and on an NF4 base ``model.dtype``, the first floating parameter's, becomes the LoRA
weights' float32); ``model.to(device)`` puts it back on the GPU, where the lookup is torch's again.

Only a plain ``nn.Embedding`` whose table is frozen, on a CUDA device, without ``max_norm`` (which rewrites
the table) and shared with no other module (a tied LM head reads it in full every step) is moved;
``OffloadConfig(embedding=False)`` keeps every table on the GPU.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from fastbench.kernels._tensors import interpreting
from fastbench.kernels.embedding_gather import embedding_gather


def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
    if self.weight.device.type == "cpu" and (input_ids.is_cuda or interpreting()):
        return embedding_gather(input_ids, self.weight)
    return F.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                       self.scale_grad_by_freq, self.sparse)


def why_not_offloadable(model) -> str | None:
    """Why ``model``'s input embedding cannot move to the host, or None."""
    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding:
        return f"it is a {type(emb).__name__}, not a plain nn.Embedding"
    weight = emb.weight
    if not isinstance(weight, torch.nn.Parameter):
        return "it is not a parameter"
    if weight.requires_grad:
        return "it is trained"
    if not (weight.is_cuda or interpreting()):
        return "it is not on a CUDA device"
    if emb.max_norm is not None:
        return "it has max_norm"
    names = [name for name, p in model.named_parameters(remove_duplicate=False) if p.data_ptr() == weight.data_ptr()]
    if len(names) > 1:
        return f"its table is shared by {' and '.join(names)} (tied embeddings)"
    return None


def offload_input_embedding(model) -> str | None:
    """Moves ``model``'s input embedding table to pinned host memory (when :func:`why_not_offloadable` allows);
    returns what changed, for ``fastbench_patches``, or None."""
    if why_not_offloadable(model):
        return None
    emb = model.get_input_embeddings()
    table = torch.empty(emb.weight.shape, dtype=emb.weight.dtype, pin_memory=emb.weight.is_cuda)
    table.copy_(emb.weight.detach())
    del emb.weight
    emb.register_buffer("weight", table)
    emb.forward = types.MethodType(_lookup, emb)
    return (f"{type(emb).__name__}.forward (this object only): its table ({table.nbytes / 2**30:.2f} GiB) in pinned "
            "host memory, a batch's rows gathered over the bus")
