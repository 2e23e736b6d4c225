"""One tensor as the bytes of a GGUF type: the numpy array (and raw type) the gguf writer takes.

F32/F16/BF16 are casts (round to nearest even); Q8_0, Q4_0, Q5_0 and Q5_1 use the gguf package's
quantizers (the same arithmetic as llama.cpp's reference ones, so the bytes are identical); the
k-quants come from :mod:`fastbench.export.kquants` and IQ4_NL (the fallback of Q3_K for rows that are
not a multiple of 256) from :func:`quantize_iq4_nl`, both in torch on the tensor's device.
"""
from __future__ import annotations

import torch

from fastbench.export.kquants import BLOCK_BYTES as K_TYPES, quantize_k

# IQ4_NL's 16 levels (the format's fixed table)
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def quantize(tensor: torch.Tensor, kind: str):
    """(numpy array, raw type or None) of ``tensor`` stored as ``kind`` (a gguf type name)."""
    import gguf

    t = tensor.detach()
    if kind == "F32":
        return t.float().cpu().numpy(), None
    if kind == "F16":
        return t.half().cpu().numpy(), None
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "BF16":
        return t.bfloat16().view(torch.uint8).cpu().numpy(), qtype
    if kind in K_TYPES:
        return quantize_k(t, kind).cpu().numpy(), qtype
    if kind == "IQ4_NL":
        return quantize_iq4_nl(t).cpu().numpy(), qtype
    return gguf.quants.quantize(t.float().cpu().numpy(), qtype), qtype


def quantize_iq4_nl(weight: torch.Tensor) -> torch.Tensor:
    """[rows, cols] (cols a multiple of 32) -> uint8 [rows, cols/32 * 18]: per block of 32, an fp16 d and
    32 indices into the level table (value i in the low nibble of byte i, value i + 16 in its high
    nibble); x = d * level[index]. d: a search over the block's extreme mapped to each end of the table
    (with small offsets), each followed by nearest-level rounding and the least-squares d."""
    rows, cols = weight.shape
    x = weight.float().reshape(-1, 32)
    levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32, device=x.device)
    edges = (levels[1:] + levels[:-1]) / 2
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    safe = torch.where(extreme != 0, extreme, 1)
    best_d, best_score = torch.zeros_like(extreme), torch.full_like(extreme, -1.0)
    for end in (-127.0, 113.0):
        for step in range(-4, 9):
            target = end * (1 + step / 64)
            idx = torch.bucketize((x * (target / safe)).contiguous(), edges)
            best_d, best_score = _better(x, levels[idx], best_d, best_score)
    d = best_d.half().float()
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1), 0.0)
    idx = torch.bucketize((x * inv).contiguous(), edges).to(torch.int32)
    packed = (idx[:, :16] | (idx[:, 16:] << 4)).to(torch.uint8)
    d_bytes = best_d.half().view(torch.uint8).reshape(-1, 2)
    return torch.cat([d_bytes, packed], 1).reshape(rows, -1)


def _better(x, v, best_d, best_score):
    sxv, svv = (x * v).sum(-1, keepdim=True), (v * v).sum(-1, keepdim=True)
    score = sxv * sxv / svv
    better = score > best_score
    return torch.where(better, sxv / svv, best_d), torch.where(better, score, best_score)
