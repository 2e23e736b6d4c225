"""Fused LoRA projections with hand-derived backwards, for a frozen base weight (bf16/fp16/fp32 or NF4).

One projection computes, for x [N, i], base weight W [o, i], bias b, LoRA A [r, i], B [o, r], scale s:

    y = x W^T + b + s (x A^T) B^T

and, given dY [N, o] (the small [N, r] products first, so no [o, i] matrix is ever formed):

    dX = dY W + s (dY B) A
    dA = s (dY B)^T x
    dB = s dY^T (x A^T)

W and b are frozen (no gradient). Only x is saved; x A^T is recomputed in the backward. An NF4 weight
is dequantized right before each use, in the forward and again in the backward, into one workspace
per (device, dtype) that all projections share, so at most one dequantized matrix exists at a time.

- :func:`lora_projections`: several projections of one input (Q, K, V; or O alone), one Function.
- :func:`lora_mlp`: gate/up -> GLU -> down in one Function; saves x and the two pre-activations
  (gate, up), recomputes the GLU in the backward and writes its gradients over gate and up in place.

A projection is a :class:`Projection`; ``lora`` is None for a layer without an active adapter.
These are cuBLAS matmuls around Triton elementwise ops, so this module has no launch configs.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fastbench.kernels.nf4 import dequantize_nf4_weight


class LoRA(NamedTuple):
    A: torch.Tensor  # [r, i]
    B: torch.Tensor  # [o, r]
    scale: float


class GLU(NamedTuple):
    """h = forward(gate, up); backward(dh, gate, up, dgate=, dup=) -> (dgate, dup), as fastbench.kernels.swiglu."""
    forward: Callable
    backward: Callable


class Projection(NamedTuple):
    weight: torch.Tensor  # [o, i] dense, or a bitsandbytes Params4bit (NF4, with .quant_state)
    bias: torch.Tensor | None
    lora: LoRA | None


_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements, shared by every dequantization on this device."""
    key = (device, dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)
        buf = _workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def base_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [o, i] weight in ``dtype``: NF4 weights are dequantized into the shared workspace."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    if state.dtype != dtype:
        return dequantize_nf4_weight(weight).to(dtype)
    return dequantize_nf4_weight(weight, out=_workspace(state.shape.numel(), dtype, weight.device).view(state.shape))


def _forward(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """x [..., i] -> y [..., o], a fresh tensor (not a view: callers may rotate it in place)."""
    y = x @ base_weight(p.weight, x.dtype).t()
    if p.bias is not None:
        y += p.bias.to(y.dtype)
    if p.lora is not None:
        A, B, s = p.lora.A.to(x.dtype), p.lora.B.to(x.dtype), p.lora.scale
        x2 = x.reshape(-1, x.shape[-1])
        y.view(-1, y.shape[-1]).addmm_(x2 @ A.t(), B.t(), alpha=s)
    return y


def _backward(x2, p: Projection, dy, dx, need_dx: bool):
    """Adds dY W + s (dY B) A into dx (allocating it if None) and returns (dx, dA, dB)."""
    dA = dB = None
    if p.lora is not None:
        A, B, s = p.lora.A.to(dy.dtype), p.lora.B.to(dy.dtype), p.lora.scale
        dyB = dy @ B
        if p.lora.A.requires_grad:
            dA = (dyB.t() @ x2).mul_(s).to(p.lora.A.dtype)
        if p.lora.B.requires_grad:
            dB = (dy.t() @ (x2 @ A.t())).mul_(s).to(p.lora.B.dtype)
    if need_dx:
        W = base_weight(p.weight, dy.dtype)
        dx = dy @ W if dx is None else dx.addmm_(dy, W)
        if p.lora is not None:
            dx.addmm_(dyB, A, alpha=s)
    return dx, dA, dB


def _flatten(projections):
    return [t for p in projections if p.lora is not None for t in (p.lora.A, p.lora.B)]


def _grads_by_input(projections, grads):
    """[(dA, dB) per projection] -> the gradients of ``_flatten(projections)``, in order."""
    return [g for p, (dA, dB) in zip(projections, grads) if p.lora is not None for g in (dA, dB)]


class _LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projections, *lora_params):
        ctx.save_for_backward(x)
        ctx.projections = projections
        return tuple(_forward(x, p) for p in projections)

    @staticmethod
    def backward(ctx, *dys):
        (x,) = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx, grads = None, []
        for p, dy in zip(ctx.projections, dys):
            dx, dA, dB = _backward(x2, p, dy.reshape(-1, dy.shape[-1]), dx, ctx.needs_input_grad[0])
            grads.append((dA, dB))
        dx = None if dx is None else dx.view(x.shape)
        return (dx, None, *_grads_by_input(ctx.projections, grads))


def _outside_autocast(function, x, *args):
    """Under autocast, run in the autocast dtype with autocast off (these Functions cast for themselves)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return function.apply(x, *args)
    with torch.autocast(device, enabled=False):
        return function.apply(x.to(torch.get_autocast_dtype(device)), *args)


def lora_projections(x: torch.Tensor, *projections: Projection) -> tuple[torch.Tensor, ...]:
    """``(x W_p^T + b_p + s_p (x A_p^T) B_p^T for p in projections)``; x [..., i] -> [..., o_p] each."""
    return _outside_autocast(_LoRAProjections, x, projections, *_flatten(projections))


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, glu, gate, up, down, *lora_params):
        g, u = _forward(x, gate), _forward(x, up)
        ctx.save_for_backward(x, g, u)
        ctx.glu, ctx.projections, ctx.spent = glu, (gate, up, down), False
        return _forward(glu.forward(g, u), down)

    @staticmethod
    def backward(ctx, dy):
        if ctx.spent:  # the first backward wrote its GLU gradients over the saved g and u
            raise RuntimeError("lora_mlp's backward reuses its saved pre-activations as gradient buffers; "
                               "a second backward (retain_graph=True) needs a second forward")
        ctx.spent = True
        x, g, u = ctx.saved_tensors
        gate, up, down = ctx.projections
        x2, g, u = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
        h = ctx.glu.forward(g, u)
        dh, dA_down, dB_down = _backward(h, down, dy.reshape(-1, dy.shape[-1]), None, True)
        del h
        dg, du = ctx.glu.backward(dh, g, u, dgate=g, dup=u)  # g, u are not needed any more
        del dh
        dx, dA_gate, dB_gate = _backward(x2, gate, dg, None, ctx.needs_input_grad[0])
        dx, dA_up, dB_up = _backward(x2, up, du, dx, ctx.needs_input_grad[0])
        grads = [(dA_gate, dB_gate), (dA_up, dB_up), (dA_down, dB_down)]
        dx = None if dx is None else dx.view(x.shape)
        return (dx, None, None, None, None, *_grads_by_input(ctx.projections, grads))


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, glu: GLU) -> torch.Tensor:
    """``down(glu(gate(x), up(x)))`` with LoRA on each projection."""
    return _outside_autocast(_LoRAMLP, x, glu, gate, up, down, *_flatten((gate, up, down)))


def reference(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """The math of one projection in plain PyTorch autograd (the test oracle)."""
    W = base_weight(p.weight, x.dtype).clone()
    y = x @ W.t()
    if p.bias is not None:
        y = y + p.bias.to(y.dtype)
    if p.lora is not None:
        y = y + p.lora.scale * (x @ p.lora.A.to(x.dtype).t()) @ p.lora.B.to(x.dtype).t()
    return y
