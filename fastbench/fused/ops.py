"""The elementwise ops and the loss that the fused decoder calls, one place to pick each one's
implementation (the Triton op in ``fastbench.kernels`` or its PyTorch form until that op lands).

    rms_norm(x, w)   = x / sqrt(mean(x^2) + eps) * (offset + w)    (offset 1 for Gemma's (1 + w))
    apply_rope(q, k) = (q cos + rotate_half(q) sin, k cos + rotate_half(k) sin)
    swiglu(g, u)     = silu(g) u;  geglu(g, u) = gelu(g) u
    linear_cross_entropy(h, W, labels) = CE(h W^T, labels), summed over labels != ignore_index and
                       divided by their count (or by ``num_items_in_batch`` when given)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-6, offset=0.0):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    """q [B, Hq, T, D], k [B, Hk, T, D]; cos, sin [B, T, D] as HF's rotary embedding returns them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate, up):
    return F.silu(gate) * up


def geglu(gate, up, approximate="tanh"):
    return F.gelu(gate, approximate=approximate) * up


def linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, num_items_in_batch=None):
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.to(hidden.dtype).t()).float()
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
