"""Rotary position embedding on Q and K in one launch, in place (Hugging Face's rotate-half form).

With x = [x1, x2] split into halves of head_dim and cos = [c1, c2], sin = [s1, s2] likewise:

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
    out1 = x1 * c1 - x2 * s1                 out2 = x2 * c2 + x1 * s2

cos/sin come already gathered per token (by position ids), so packed sequences work. The backward
applies the transpose of that map to the gradients, in place:

    dx1 = g1 * c1 + g2 * s2                  dx2 = g2 * c2 - g1 * s1

which is the inverse rotation (sin -> -sin) for Hugging Face's cos/sin, whose halves are equal.
One program per token rotates all of its Q heads and then all of its K heads, in tiles of BLOCK_H
heads; math in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import OpSpec, TuneCase


@triton.jit
def _rotate_heads(base, n_heads, stride_h, stride_d, c1, c2, p1, p2, d, d_ok,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE: tl.constexpr):
    """x1 <- x1 * c1 - x2 * p1 and x2 <- x2 * c2 + x1 * p2 for every head of one token."""
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & d_ok[None, :]
        ptr1 = base + heads.to(tl.int64)[:, None] * stride_h + d[None, :] * stride_d
        ptr2 = ptr1 + HALF * stride_d
        x1 = tl.load(ptr1, mask=mask, other=0.0).to(COMPUTE)
        x2 = tl.load(ptr2, mask=mask, other=0.0).to(COMPUTE)
        tl.store(ptr1, (x1 * c1[None, :] - x2 * p1[None, :]).to(base.dtype.element_ty), mask=mask)
        tl.store(ptr2, (x2 * c2[None, :] + x1 * p2[None, :]).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, seq_len, n_q_heads, n_k_heads,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    cos = cos_ptr + b * sc_b + t * sc_t
    sin = sin_ptr + b * ss_b + t * ss_t
    c1 = tl.load(cos + d * sc_d, mask=d_ok, other=0.0).to(COMPUTE)
    c2 = tl.load(cos + (d + HALF) * sc_d, mask=d_ok, other=0.0).to(COMPUTE)
    s1 = tl.load(sin + d * ss_d, mask=d_ok, other=0.0).to(COMPUTE)
    s2 = tl.load(sin + (d + HALF) * ss_d, mask=d_ok, other=0.0).to(COMPUTE)
    if BACKWARD:
        p1 = -s2
        p2 = -s1
    else:
        p1 = s1
        p2 = s2
    _rotate_heads(q_ptr + b * sq_b + t * sq_t, n_q_heads, sq_h, sq_d, c1, c2, p1, p2, d, d_ok,
                  HALF, BLOCK_H, COMPUTE)
    _rotate_heads(k_ptr + b * sk_b + t * sk_t, n_k_heads, sk_h, sk_d, c1, c2, p1, p2, d, d_ok,
                  HALF, BLOCK_H, COMPUTE)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, config):
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] in place by cos/sin [B or 1, T, D] or [T, D]."""
    B, n_q, T, D = q.shape
    n_k = k.shape[1]
    if k.shape != (B, n_k, T, D) or D % 2 or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T, D] "
                         "with the same B, T, even D, dtype and device")
    cos, sin = (c.expand(B, T, D) for c in (cos, sin))
    meta = dict(config)
    _rope_kernel[(B * T,)](q, k, cos, sin, T, n_q, n_k, *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
                           HALF=D // 2, BLOCK_D=triton.next_power_of_2(D // 2), BACKWARD=backward,
                           COMPUTE=tl.float64 if q.dtype == torch.float64 else tl.float32, **meta)


def _problem(q: torch.Tensor, k: torch.Tensor) -> dict:
    B, n_q, T, D = q.shape
    return _key(q.dtype, n_q, k.shape[1], D, B * T)


def _key(dtype, n_q: int, n_k: int, head_dim: int, tokens: int) -> dict:
    return {"dtype": str(dtype).removeprefix("torch."), "q_heads": n_q, "k_heads": n_k,
            "head_dim": head_dim, "tokens": tokens}


def _distinct_memory(t: torch.Tensor) -> torch.Tensor:
    """t when no two of its elements share memory (safe to write in place), else a dense copy."""
    extent = 0
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= extent:
            return t.contiguous()
        extent += (size - 1) * stride
    return t


class _RoPEFunction(torch.autograd.Function):
    """Rotates its inputs' memory in place and returns them as outputs of this node.

    q and k are usually views of one projection output, and autograd cannot mark two views dirty in
    one Function; so instead their version counters are bumped, which makes autograd refuse any
    backward that saved the unrotated values.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        _launch(q, k, cos, sin, False, config_for(SPEC, "fwd", _problem(q, k)))
        increment_version(q)
        increment_version(k)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _distinct_memory(dq), _distinct_memory(dk)
        _launch(dq, dk, cos, sin, True, config_for(SPEC, "bwd", _problem(dq, dk)))
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] (any strides) in place; returns (q, k).

    Use the returned tensors from here on: they carry the rotation's autograd history, the arguments
    do not. cos/sin: [B, T, D], [1, T, D] or [T, D] as Hugging Face's rotary embedding returns them;
    they are constants here (no gradient flows to them). The backward rotates the incoming gradients
    in place (copying them first only where their memory overlaps).
    """
    if torch.is_grad_enabled():
        if cos.requires_grad or sin.requires_grad:
            raise ValueError("apply_rope does not differentiate with respect to cos/sin; pass them detached")
        if any(x.is_leaf and x.requires_grad for x in (q, k)):
            raise RuntimeError("apply_rope rotates in place: q and k cannot be leaf tensors that require grad")
    return _RoPEFunction.apply(q, k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The oracle, out of place: x * cos + rotate_half(x) * sin in fp32, cast back to x.dtype."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = (c.to(compute).unsqueeze(-3) for c in (cos, sin))  # broadcast over heads
    return tuple((x.to(compute) * cos + _rotate_half(x.to(compute)) * sin).to(x.dtype) for x in (q, k))


# --- launch configs -------------------------------------------------------------------------------

_CONFIGS = [{"BLOCK_H": h, "num_warps": w, "num_stages": 1} for h in (1, 2, 4, 8, 16, 32) for w in (1, 2, 4, 8, 16)]
CANDIDATES = {"fwd": _CONFIGS, "bwd": _CONFIGS}


def heuristic(pass_name: str, problem) -> dict:
    """Tiles of up to 2048 elements per half (all Q heads of a token at head_dim 128), 8 per thread."""
    block_d = triton.next_power_of_2(problem["head_dim"] // 2)
    block_h = min(32, triton.next_power_of_2(problem["q_heads"]), max(1, 2048 // block_d))
    warps = max(1, min(16, block_h * block_d // 256))
    return {"BLOCK_H": block_h, "num_warps": warps, "num_stages": 1}


def problems(model_config, tokens: int, dtype) -> list[tuple[str, dict]]:
    n_q = model_config.num_attention_heads
    n_k = getattr(model_config, "num_key_value_heads", None) or n_q
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // n_q
    return [(p, _key(dtype, n_q, n_k, head_dim, tokens)) for p in ("fwd", "bwd")]


def tune_case(pass_name: str, problem, device) -> TuneCase:
    """Random q/k (batch 1) and HF-style cos/sin; run returns the rotated (q, k), fresh each call."""
    dtype = getattr(torch, problem["dtype"])
    T, D = problem["tokens"], problem["head_dim"]
    q = torch.randn(1, problem["q_heads"], T, D, device=device, dtype=dtype)
    k = torch.randn(1, problem["k_heads"], T, D, device=device, dtype=dtype)
    angle = torch.rand(T, D // 2, device=device) * 100
    cos, sin = (f(torch.cat((angle, angle), -1)).to(dtype) for f in (torch.cos, torch.sin))
    backward = pass_name == "bwd"

    def run(config):
        qc, kc = q.clone(), k.clone()
        _launch(qc, kc, cos, sin, backward, config)
        return qc, kc

    expected = reference(q, k, cos, -sin if backward else sin)
    return TuneCase(run, expected, 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)


SPEC = OpSpec("rope", CANDIDATES, heuristic, tune_case=tune_case, problems=problems,
              kernels=(_rope_kernel, _rotate_heads))
