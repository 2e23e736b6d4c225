"""Rotary position embedding on Q and K in one launch, in place (Hugging Face's rotate-half form).

With x = [x1, x2] split into halves of head_dim and cos = [c1, c2], sin = [s1, s2] likewise:

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
    out1 = x1 * c1 - x2 * s1                 out2 = x2 * c2 + x1 * s2

cos/sin come already gathered per token (by position ids), so packed sequences work. The backward
applies the transpose of that map to the gradients:

    dx1 = g1 * c1 + g2 * s2                  dx2 = g2 * c2 - g1 * s1

which is the inverse rotation (sin -> -sin) for Hugging Face's cos/sin, whose halves are equal. It
writes fresh gradient tensors rather than rotating the incoming ones in place: autograd hands one
gradient tensor to several consumers (an add's backward passes it on to both operands), so
overwriting it would corrupt a sibling's gradient; the bytes moved are the same either way.
One program rotates all Q heads and then all K heads of BLOCK_T tokens (one token for the usual head counts
and sizes, more for narrow heads: :func:`tokens_per_program`), in tiles of BLOCK_H heads; math in fp32 (fp64
for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import OpSpec, TuneCase
from fastbench.kernels._tensors import dtype_name, next_power_of_2


@triton.jit
def _rotate_heads(src, dst, n_heads, stride_h, stride_d, out_stride_h, out_stride_d, c1, c2, p1, p2, d, ok,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, COMPUTE: tl.constexpr):
    """dst1 = x1 * c1 - x2 * p1 and dst2 = x2 * c2 + x1 * p2 for every head of a tile of tokens (dst may be
    src): src/dst [BLOCK_T, 1, 1] pointers to each token's first head, c1..p2 [BLOCK_T, 1, BLOCK_D], d the
    [1, 1, BLOCK_D] half-dim offsets, ok [BLOCK_T, 1, BLOCK_D] the valid tokens and half-dims."""
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H))[None, :, None]
        mask = ok & (heads < n_heads)
        heads = heads.to(tl.int64)
        src1 = src + heads * stride_h + d * stride_d
        dst1 = dst + heads * out_stride_h + d * out_stride_d
        x1 = tl.load(src1, mask=mask, other=0.0).to(COMPUTE)
        x2 = tl.load(src1 + HALF * stride_d, mask=mask, other=0.0).to(COMPUTE)
        tl.store(dst1, (x1 * c1 - x2 * p1).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst1 + HALF * out_stride_d, (x2 * c2 + x1 * p2).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out, k_out, cos_ptr, sin_ptr, n_tokens, seq_len, n_q_heads, n_k_heads,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, oq_b, oq_h, oq_t, oq_d, ok_b, ok_h, ok_t, ok_d,
                 sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                 HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = (tokens // seq_len)[:, None]
    t = (tokens % seq_len)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (tokens < n_tokens)[:, None] & (d < HALF)  # [BLOCK_T, BLOCK_D]
    cos = cos_ptr + b * sc_b + t * sc_t
    sin = sin_ptr + b * ss_b + t * ss_t
    c1 = tl.load(cos + d * sc_d, mask=ok, other=0.0).to(COMPUTE)[:, None, :]
    c2 = tl.load(cos + (d + HALF) * sc_d, mask=ok, other=0.0).to(COMPUTE)[:, None, :]
    s1 = tl.load(sin + d * ss_d, mask=ok, other=0.0).to(COMPUTE)[:, None, :]
    s2 = tl.load(sin + (d + HALF) * ss_d, mask=ok, other=0.0).to(COMPUTE)[:, None, :]
    if BACKWARD:
        p1 = -s2
        p2 = -s1
    else:
        p1 = s1
        p2 = s2
    b = b[:, :, None]
    t = t[:, :, None]
    d = d[:, None, :]
    ok = ok[:, None, :]
    _rotate_heads(q_ptr + b * sq_b + t * sq_t, q_out + b * oq_b + t * oq_t, n_q_heads, sq_h, sq_d, oq_h, oq_d,
                  c1, c2, p1, p2, d, ok, HALF, BLOCK_H, COMPUTE)
    _rotate_heads(k_ptr + b * sk_b + t * sk_t, k_out + b * ok_b + t * ok_t, n_k_heads, sk_h, sk_d, ok_h, ok_d,
                  c1, c2, p1, p2, d, ok, HALF, BLOCK_H, COMPUTE)


TILE = 1024  # at least this many elements of a half-rotation (tokens x Q heads x half-dims) per program


def tokens_per_program(n_tokens: int, n_q_heads: int, head_dim: int) -> int:
    """How many tokens one program rotates: 1 where a token's Q heads fill a :data:`TILE` (every model with
    32 heads of 128, or 16 of 256), more for narrow heads, so that a program is not mostly masked lanes."""
    per_token = next_power_of_2(n_q_heads) * next_power_of_2(head_dim // 2)
    return max(1, min(TILE // per_token, next_power_of_2(n_tokens)))


def _btd_strides(c: torch.Tensor, B: int, T: int, D: int) -> tuple[int, int, int]:
    """The strides of cos/sin ([B, T, D], [1, T, D] or [T, D]) seen as [B, T, D] (0 along a broadcast
    batch), without an expand op (these launches run a few times per layer and step)."""
    if c.dim() == 2 and tuple(c.shape) == (T, D):
        return 0, c.stride(0), c.stride(1)
    if c.dim() == 3 and c.shape[0] in (1, B) and tuple(c.shape[1:]) == (T, D):
        return 0 if c.shape[0] == 1 else c.stride(0), c.stride(1), c.stride(2)
    raise ValueError(f"apply_rope: cos/sin must be [B, T, D], [1, T, D] or [T, D] for B={B}, T={T}, D={D}; "
                     f"got {tuple(c.shape)}")


def _launch(q, k, cos, sin, backward: bool, config, q_out=None, k_out=None, block_t: int | None = None):
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by cos/sin [B or 1, T, D] or [T, D] into q_out and
    k_out (of the same shapes; in place where None); the transpose of the rotation if backward.
    ``block_t``: tokens per program (default :func:`tokens_per_program`)."""
    q_out = q if q_out is None else q_out
    k_out = k if k_out is None else k_out
    B, n_q, T, D = q.shape
    n_k = k.shape[1]
    if (k.shape != (B, n_k, T, D) or D % 2 or k.dtype != q.dtype or k.device != q.device
            or q_out.shape != q.shape or k_out.shape != k.shape):
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T, D] "
                         "with the same B, T, even D, dtype and device")
    meta = dict(config)
    block_t = tokens_per_program(B * T, n_q, D) if block_t is None else block_t
    _rope_kernel[(triton.cdiv(B * T, block_t),)](
        q, k, q_out, k_out, cos, sin, B * T, T, n_q, n_k, *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *_btd_strides(cos, B, T, D), *_btd_strides(sin, B, T, D),
        HALF=D // 2, BLOCK_T=block_t, BLOCK_D=next_power_of_2(D // 2), BACKWARD=backward,
        COMPUTE=tl.float64 if q.dtype == torch.float64 else tl.float32, **meta)


def _problem(q: torch.Tensor, k: torch.Tensor) -> dict:
    B, n_q, T, D = q.shape
    return _key(q.dtype, n_q, k.shape[1], D, B * T)


def _key(dtype, n_q: int, n_k: int, head_dim: int, tokens: int) -> dict:
    return {"dtype": dtype_name(dtype), "q_heads": n_q, "k_heads": n_k,
            "head_dim": head_dim, "tokens": tokens}


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates q and k in place and bumps their version counters (see :class:`_RoPEFunction`)."""
    _launch(q, k, cos, sin, False, config_for(SPEC, "fwd", _problem(q, k)))
    increment_version(q)
    increment_version(k)


class _RoPEFunction(torch.autograd.Function):
    """Rotates its inputs' memory in place and returns them as outputs of this node.

    q and k are usually views of one projection output, and autograd cannot mark two views dirty in
    one Function; so instead their version counters are bumped, which makes autograd refuse any
    backward that saved the unrotated values.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        _rotate(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # in the incoming gradients' memory layout ([B, T, H, D] from SDPA), so that the projection's
        # backward can view them as [B*T, H*D] instead of copying
        grad_q, grad_k = (torch.empty_like(g) for g in (dq, dk))
        _launch(dq, dk, cos, sin, True, config_for(SPEC, "bwd", _problem(dq, dk)), grad_q, grad_k)
        return grad_q, grad_k, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] (any strides) in place; returns (q, k).

    Use the returned tensors from here on: they carry the rotation's autograd history, the arguments
    do not. Take q and k from a fused projection by slicing, not split/chunk: autograd refuses to
    use a multi-output view whose sibling was modified in place. cos/sin: [B, T, D], [1, T, D] or [T, D] as Hugging Face's rotary embedding returns them;
    they are constants here (no gradient flows to them).
    """
    if not torch.is_grad_enabled():  # (a checkpointed layer's forward) without the autograd Function's host cost
        _rotate(q, k, cos, sin)
        return q, k
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope does not differentiate with respect to cos/sin; pass them detached")
    if any(base.is_leaf and base.requires_grad for base in (x if x._base is None else x._base for x in (q, k))):
        raise RuntimeError("apply_rope rotates in place: q and k cannot be (views of) leaf tensors that "
                           "require grad")
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
    block_d = next_power_of_2(problem["head_dim"] // 2)
    block_h = min(32, next_power_of_2(problem["q_heads"]), max(1, 2048 // block_d))
    warps = max(1, min(16, block_h * block_d // 256))
    return {"BLOCK_H": block_h, "num_warps": warps, "num_stages": 1}


def problems(model_config, tokens: int, dtype) -> list[tuple[str, dict]]:
    n_q = model_config.num_attention_heads
    n_k = getattr(model_config, "num_key_value_heads", None) or n_q
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // n_q
    return [(p, _key(dtype, n_q, n_k, head_dim, tokens)) for p in ("fwd", "bwd")]


def tune_case(pass_name: str, problem, device) -> TuneCase:
    """Random q/k (batch 1) in the training layout (transposed [1, T, H, D] views of one projection
    output) and HF-style cos/sin; run returns the rotated (q, k) in fresh tensors of that layout."""
    dtype = getattr(torch, problem["dtype"])
    T, D, n_q, n_k = problem["tokens"], problem["head_dim"], problem["q_heads"], problem["k_heads"]

    def qk(proj):
        proj = proj.view(1, T, n_q + n_k, D)
        return proj[:, :, :n_q].transpose(1, 2), proj[:, :, n_q:].transpose(1, 2)

    q, k = qk(torch.randn(1, T, (n_q + n_k) * D, device=device, dtype=dtype))
    angle = torch.rand(T, D // 2, device=device) * 100
    cos, sin = (f(torch.cat((angle, angle), -1)).to(dtype) for f in (torch.cos, torch.sin))
    backward = pass_name == "bwd"

    def run(config):  # out of place, so that repeated runs see the same inputs
        out = qk(torch.empty(1, T, (n_q + n_k) * D, device=device, dtype=dtype))
        _launch(q, k, cos, sin, backward, config, *out)
        return out

    expected = reference(q, k, cos, -sin if backward else sin)
    return TuneCase(run, expected, 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)


SPEC = OpSpec("rope", CANDIDATES, heuristic, tune_case=tune_case, problems=problems,
              kernels=(_rope_kernel, _rotate_heads))
