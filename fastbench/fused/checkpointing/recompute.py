"""A recomputed unit: consecutive layer parts run without a graph in the forward and recomputed from their kept
(or offloaded) input in the backward, as one autograd Function."""
from __future__ import annotations

import torch

from fastbench.fused.checkpointing.context import PLAIN, RECOMPUTING, chain


class RecomputedUnit(torch.autograd.Function):
    """``apply(fns, offloader, slot, x, *params)``: runs the parts ``fns`` one after the other on x without a
    graph; the backward recomputes them from the kept x (with an offloader: the copy it saved under ``slot``),
    the last one with a :class:`PartContext` that says it is recomputing, and returns the gradients of x and
    of ``params`` (the parts' trainable parameters)."""

    @staticmethod
    def forward(ctx, fns, offloader, slot, x, *params):
        y = chain(fns, x)  # a Function's forward runs without building a graph
        ctx.fns, ctx.offloader = fns, offloader
        device = x.device.type  # the recomputation must run under the same autocast as this forward
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        if offloader is not None:
            ctx.key = offloader.save(slot, x)
            ctx.save_for_backward(*params)
        else:
            ctx.save_for_backward(x, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        if ctx.offloader is not None:
            x, params = ctx.offloader.load(ctx.key), saved
        else:
            x, params = saved[0], saved[1:]
        needs = ctx.needs_input_grad[3:]
        x = x.detach().requires_grad_(needs[0])
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            y = chain(ctx.fns[:-1], x, PLAIN)
            y = ctx.fns[-1](y, RECOMPUTING)
        inputs = [t for t, need in zip((x, *params), needs) if need]
        grads = iter(torch.autograd.grad(y, inputs, dy, allow_unused=True))
        return (None, None, None, *[next(grads) if need else None for need in needs])
