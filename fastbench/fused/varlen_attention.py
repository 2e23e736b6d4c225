"""Causal attention over sequences laid end to end, without a mask: FlashAttention's variable-length
kernels (torch's ``aten._flash_attention_forward`` / ``_flash_attention_backward``).

A packed batch [B, T] holds sequences that each start where ``position_ids`` is 0 (and at each row's
start). Flattened to B*T tokens they are consecutive runs; ``cu`` holds the runs' start offsets and B*T.
Causal attention within each run is the block-diagonal causal mask exactly, at the cost of the runs' own
lengths (sum of L_i^2 / 2 score entries) instead of T^2 / 2 per row, and with no [B, 1, T, T] mask to
build or read. A sliding window W keeps keys j with i - j < W: FlashAttention's left window W - 1.

The dense-mask SDPA path (fastbench.fused.decoder.SdpaMasks) stays for what these kernels do not take:
the CPU, fp32, head sizes over 256, key padding.
"""
from __future__ import annotations

import dataclasses

import torch

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """The runs of a flattened [B, T] batch: ``cu`` int32 [n + 1] (starts, then B*T) on the batch's device,
    ``longest`` the longest run's length, ``window`` the sliding window of the layers asking (None: none)."""

    cu: torch.Tensor
    longest: int
    window: int | None = None

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor | None, B: int, T: int, device) -> "PackedSequences":
        """Runs start at each row's first token and wherever ``position_ids`` [B, T] is 0 (None: one run per
        row). Reading the longest run waits for the device once."""
        starts = torch.zeros(B, T, dtype=torch.bool, device=device)
        if position_ids is not None:
            starts |= position_ids.expand(B, T) == 0
        starts[:, 0] = True
        offsets = torch.nonzero(starts.flatten()).flatten()
        cu = torch.cat([offsets, offsets.new_full((1,), B * T)]).to(torch.int32)
        return cls(cu, int((cu[1:] - cu[:-1]).max()))

    def with_window(self, window: int | None) -> "PackedSequences":
        return dataclasses.replace(self, window=window)


def usable(q: torch.Tensor) -> bool:
    """Whether the variable-length kernels take q (..., D): a CUDA tensor in fp16/bf16 with D a multiple of 8
    up to 256, on a GPU of compute capability 8.0 or newer with flash SDPA enabled."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= MAX_HEAD_DIM and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def _window_args(window: int | None) -> dict:
    return {} if window is None else {"window_size_left": window - 1, "window_size_right": 0}


def flash_forward(q, k, v, seqs: PackedSequences, scale: float):
    """(out [N, Hq, D], what the backward needs) for q [N, Hq, D], k, v [N, Hk, D] (Hq a multiple of Hk)."""
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, seqs.cu, seqs.cu, seqs.longest, seqs.longest, 0.0, True, False, scale=scale,
        **_window_args(seqs.window))
    return out, (lse, rng, unused)


def flash_backward(dout, q, k, v, out, saved, seqs: PackedSequences, scale: float):
    """(dq, dk, dv) of :func:`flash_forward`."""
    lse, rng, unused = saved
    return torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, seqs.cu, seqs.cu, seqs.longest, seqs.longest, 0.0, True, rng, unused,
        scale=scale, **_window_args(seqs.window))


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seqs: PackedSequences, scale: float):
        out, saved = flash_forward(q, k, v, seqs, scale)
        ctx.save_for_backward(q, k, v, out, seqs.cu, *saved)
        ctx.longest, ctx.window, ctx.scale = seqs.longest, seqs.window, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, cu, *saved = ctx.saved_tensors
        seqs = PackedSequences(cu, ctx.longest, ctx.window)
        dq, dk, dv = flash_backward(dout.contiguous(), q, k, v, out, saved, seqs, ctx.scale)
        return dq, dk, dv, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSequences,
                     scale: float) -> torch.Tensor:
    """Causal attention within each run of ``seqs``: q [B, T, Hq, D], k, v [B, T, Hk, D] (any strides with
    D contiguous; B and T merge without a copy when T's stride times T is B's) -> [B, T, Hq, D]."""
    B, T, Hq, D = q.shape
    flat = [x.reshape(B * T, x.shape[2], D) for x in (q, k, v)]
    return _VarlenAttention.apply(*flat, seqs, scale).view(B, T, Hq, D)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSequences,
              scale: float) -> torch.Tensor:
    """The oracle of :func:`varlen_attention`, in the inputs' dtype: SDPA over each run on its own."""
    B, T, Hq, D = q.shape
    flat = [x.reshape(B * T, x.shape[2], D).transpose(0, 1) for x in (q, k, v)]
    cu = seqs.cu.tolist()
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[:, a:b] for x in flat)
        i = torch.arange(b - a, device=q.device)
        keep = i[:, None] >= i[None, :]
        if seqs.window is not None:
            keep &= (i[:, None] - i[None, :]) < seqs.window
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=keep, scale=scale, enable_gqa=Hq != ks.shape[0]))
    return torch.cat(outs, dim=1).transpose(0, 1).reshape(B, T, Hq, D)
