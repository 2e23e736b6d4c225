"""Sharded weights with FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder layer's parameters
split over the ranks, gathered for that layer's forward and backward only, for a bf16 LoRA model whose
weights do not fit one GPU. This serves plain PEFT models (transformers' own layer forwards).

Refused, saying why:

- the fused path (a model from ``FastLanguageModel.get_peft_model`` that kept its fused forward). FSDP2
  gathers a module's parameters in hooks around that module's ``forward`` and registers the reduction of
  their gradients there; the fused backbone never calls a decoder layer's ``forward`` (it reads each
  projection's weight and LoRA factors and hands them to its own autograd Functions), so the layers'
  weights would reach the kernels as shards (DTensors) and no gradient would be reduced. Its activation
  checkpointing also keeps the weight tensors read in the forward for the recomputation in the backward,
  which FSDP2 frees after the forward (``reshard_after_forward``).
- NF4 bases: bitsandbytes' ``Params4bit`` carries its quantization state (absmax, code, block size) beside
  the packed data, which FSDP2's DTensor sharding neither splits nor gathers; bitsandbytes supports FSDP1
  flat parameters with ``bnb_4bit_quant_storage`` only, not FSDP2.

The loss is normalised over the world's label tokens (fastbench.train.loop.accumulate), so the
gradient reduction sums (divide factor 1, plain SUM collectives) instead of averaging.
"""
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from fastbench.distributed.world import World


class ShardingRefused(ValueError):
    """FSDP2 cannot shard this model (the message says why and what to do instead)."""


def _fused(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return getattr(decoder, "_fastbench", None) is not None


def _nf4(model) -> bool:
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def refusal(model) -> str | None:
    """Why FSDP2 cannot shard ``model``, or None."""
    if _fused(model):
        return ("the fused path does not call its decoder layers' forward, where FSDP2 gathers their weights and "
                "reduces their gradients: shard a plain PEFT model (FastLanguageModel.get_peft_model(..., "
                "fallback=True) of an unsupported setting, or peft.get_peft_model), or train with data parallelism "
                "(--nproc) where the weights fit one GPU (an NF4 base with --load-in-4bit)")
    if _nf4(model):
        return ("an NF4 base (bitsandbytes Params4bit) cannot be sharded by FSDP2: its quantization state is not "
                "part of the sharded tensor; load the base in bf16 to shard it, or keep NF4 with data parallelism")
    return None


def shard(model: torch.nn.Module, world: World, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Applies ``fully_shard`` to each decoder layer of ``model`` (a PEFT model) and to the model itself, on a
    1-D mesh of the world; returns the model (now an FSDPModule). Gradients are summed over ranks."""
    reason = refusal(model)
    if reason:
        raise ShardingRefused(f"cannot shard this model with FSDP2: {reason}")
    if not world.grouped:
        return model
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model
