"""Data parallelism for a LoRA model (``FastLanguageModel.get_peft_model``, fused or plain PEFT) with
torch's DistributedDataParallel.

Only the trainable parameters take part: the frozen base weights and every buffer are named to DDP as
ignored, so it neither broadcasts them at construction nor reduces them (nor meets the offload mode's
input embedding table, a buffer in pinned host memory). DDP reduces the LoRA gradients bucket by bucket
as the backward produces them (overlapped with the rest of the backward); the fused path's autograd
Functions and its activation checkpointing take the parameters as inputs, so each gradient reaches its
parameter, and DDP's hook, once per backward as DDP expects (``find_unused_parameters=False``).

The loss of one optimizer step is the mean token loss over the label tokens of every rank and every
micro-batch of the step (fastbench.train.loop.accumulate): with N_r labels on rank r and N = sum_r N_r (one
all-reduce before the first backward), each micro-batch's loss is its summed token loss / N, and the
gradients are *summed* over ranks (a comm hook, not DDP's default mean), so

    grad = sum_r sum_micro d(sum of token losses)/dθ / N

exactly what one process computes over the whole batch. Micro-batches but the last run under ``no_sync``
(their gradients accumulate locally; the last backward reduces the sum).
"""
import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastbench.distributed.world import World

IGNORE_INDEX = -100


def frozen_names(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s frozen parameters and of all its buffers (what DDP should leave alone)."""
    return [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]


def ignore_frozen(model: torch.nn.Module) -> None:
    """Marks the frozen parameters and buffers of ``model`` as ignored by any DDP wrapping it later (ours,
    accelerate's, HF Trainer's): no broadcast of the base weights at construction, no reduction of them."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen_names(model))


def _sum_hook(group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients summed over ranks (DDP's default divides the sum by the world
    size; the loss here is already normalised over the whole world's label tokens)."""
    return dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(lambda f: f.value()[0])


def wrap(model: torch.nn.Module, world: World, bucket_cap_mb: float = 25.0) -> torch.nn.Module:
    """``model`` under DDP for ``world`` (returned as it is in a world of one without a process group).
    The trainable parameters are broadcast from rank 0 once here, so every rank starts from rank 0's LoRA
    initialisation."""
    if not world.grouped:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: nothing for data parallelism to reduce")
    ignore_frozen(model)
    ddp = DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                                  find_unused_parameters=False,
                                  gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (what saves the adapter), or ``model``."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_gradients(model: torch.nn.Module, last: bool):
    """The context of one micro-batch's forward and backward: gradients reduced over ranks only in the
    step's ``last`` micro-batch (DDP's ``no_sync`` before it; an FSDP2 model reduces then only too)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
