"""Activation checkpointing per decoder layer, for the fused path.

A layer comes as consecutive parts (the fused decoder: attention with its residual, then the MLP with its
residual), each called as ``fn(x, context)``. A recomputed unit keeps its input and, in the backward,
recomputes its parts from it; the output of its last part is then only the root of that backward, so where
``context.recomputing`` is true the last part may skip the products that compute nothing but its output. The
offload and budget modes recompute each part as a unit of its own (two inputs kept per layer; the fused decoder
then skips the O and down projections' forwards and the GLU); ``True`` recomputes the whole layer as one unit
(one input per layer, the least memory; it skips the down projection and the GLU).

``use_gradient_checkpointing`` (a :class:`CheckpointConfig`) picks one policy for all layers of a model:

- ``False``: keep every layer's activations (fastest, most memory).
- ``True``: keep only each layer's input, recompute the layer in the backward.
- ``"offload"`` (or ``"unsloth"``, the name Unsloth's users know it by): keep each part's input in pinned CPU
  memory (copied on a side stream, overlapped with the next layers' compute; back ahead of use during the
  backward) and recompute the part; except that every ``OffloadConfig.save_every``-th layer (default 4; 0:
  none) keeps its MLP's graph, the activations it saves offloaded to pinned memory as well, so its MLP is not
  recomputed. :class:`OffloadConfig` holds this mode's other settings. The fused path also keeps an untied,
  frozen input embedding table in pinned host memory in this mode (fastbench.fused.host_embedding).
- a number (GiB) or ``"auto"``: a budget for the step's peak reserved GPU memory, all of it counted: weights,
  LoRA parameters and optimizer state, activations, the loss, the dequantize workspace, the offload copies.
  At the first step the bytes one kept layer saves are measured (the first layer run once more, its graph
  dropped); each forward then keeps the first layers that fit and recomputes the rest, and where even
  recomputing every layer does not fit, recomputes the first layers from inputs offloaded to pinned memory
  (fastbench.fused.checkpointing.budget). ``"auto"`` budgets what this process can reserve on its GPU (its
  free memory, within ``torch.cuda.set_per_process_memory_fraction``) less a margin (on a CPU: keeps
  everything).

A recomputed part must be deterministic (no dropout): the fused path refuses lora_dropout > 0.

Modules: ``config`` (the settings), ``policy`` (which layers keep, recompute or offload), ``budget`` (the
budget mode's plan), ``recompute`` (the autograd Function), ``offload`` (the pinned-memory copies), ``context``
(what a part is told as it runs).
"""
from fastbench.fused.checkpointing.config import CheckpointConfig, OffloadConfig, parse_setting, setting_from_text
from fastbench.fused.checkpointing.context import PartContext
from fastbench.fused.checkpointing.offload import HostOffloader
from fastbench.fused.checkpointing.policy import LayerCheckpointing, Part

__all__ = ["CheckpointConfig", "OffloadConfig", "parse_setting", "setting_from_text", "PartContext", "HostOffloader",
           "LayerCheckpointing", "Part"]
