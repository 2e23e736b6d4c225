"""Fused linear cross-entropy: from hidden states and the LM head straight to the loss, without the
[tokens x vocab] logits.

Per row: ``z = h @ W^T (+ b)``, with a logit softcap ``c``: ``z <- c * tanh(z / c)`` (Gemma-2);
``loss = logsumexp(z) - z[label]``; rows whose label is ``ignore_index`` contribute nothing. The loss
is ``scale * sum(loss)`` with ``scale`` = 1 / (number of non-ignored labels) for ``"mean"`` (0 tokens:
loss 0), 1 for ``"sum"``, or 1 / ``num_items_in_batch`` when that is given (gradient accumulation
normalising over the whole accumulated batch).

Rows are processed in chunks whose logits fit a bounded buffer (``CHUNK_BYTES``). For each chunk the
logits come from one matmul; one Triton launch computes, per row, the logsumexp in fp32, the row's
loss, and overwrites the logits with ``dloss/dz = scale * (softmax(z) - onehot(label))`` (times
``1 - tanh^2`` under the softcap); then ``dh = dz @ W`` and ``dW += dz^T @ h`` (``db += sum dz``).
The gradients are made in the forward and kept; the backward only multiplies them by its grad_output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import OpSpec, TuneCase
from fastbench.kernels._tensors import dtype_name

# Largest logits buffer of one chunk, in bytes (its dtype is the input's): 512 MiB.
CHUNK_BYTES = 1 << 29


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, grad_ptr, stride, labels_ptr, loss_ptr, scale_ptr, n_vocab, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: loss_ptr[row] = logsumexp(z) - z[label] (0 if ignored); with COMPUTE_GRAD,
    grad_ptr's row = scale * dloss/dz (grad_ptr may be logits_ptr: each block is read, then written)."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride
    grad_ptr += row * stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    cols = tl.arange(0, BLOCK_V)

    row_max = float("-inf")
    sum_exp = 0.0
    for start in range(0, n_vocab, BLOCK_V):
        z = tl.load(logits_ptr + start + cols, mask=start + cols < n_vocab, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        row_max = new_max
    lse = row_max + tl.log(sum_exp)

    z_label = tl.load(logits_ptr + tl.where(ignored, 0, label)).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * _tanh(z_label / softcap)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - z_label))

    if COMPUTE_GRAD:
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr))
        for start in range(0, n_vocab, BLOCK_V):
            idx = start + cols
            z = tl.load(logits_ptr + idx, mask=idx < n_vocab, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            grad = (tl.exp(z - lse) - tl.where(idx == label, 1.0, 0.0)) * scale
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=idx < n_vocab)


def problem_key(tokens: int, vocab: int, dtype: torch.dtype, softcap: bool) -> dict:
    return {"tokens": int(tokens), "vocab": int(vocab), "dtype": dtype_name(dtype), "softcap": bool(softcap)}


def rows_per_chunk(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows of one chunk: the fewest chunks whose logits fit CHUNK_BYTES, split evenly."""
    max_rows = max(1, CHUNK_BYTES // (vocab * element_size))
    return math.ceil(n_rows / math.ceil(n_rows / max_rows)) if n_rows else 1


def _launch_rows(logits, grad, labels, loss_rows, scale, ignore_index, softcap, compute_grad, config):
    _cross_entropy_rows_kernel[(logits.shape[0],)](
        logits, grad, logits.stride(0), labels, loss_rows, scale, logits.shape[1], ignore_index,
        1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def _loss_and_grads(hidden, weight, bias, labels, scale, ignore_index, softcap, needs, config):
    """Summed loss (fp32, unscaled) and the scaled gradients of (hidden, weight, bias) that ``needs``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs
    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    rows = rows_per_chunk(n, vocab, hidden.element_size())
    buffer = torch.empty(min(rows, n), vocab, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n, rows):
        h = hidden[start:start + rows]
        z = buffer[: h.shape[0]]
        if bias is None:
            torch.mm(h, weight.t(), out=z)
        else:
            torch.addmm(bias.to(z.dtype), h, weight.t(), out=z)
        _launch_rows(z, z, labels[start:start + rows], loss_rows[start:start + rows], scale, ignore_index,
                     softcap, any(needs), config)
        if need_h:
            torch.mm(z, weight, out=grad_h[start:start + rows])
        if need_w:
            if grad_w.dtype == z.dtype:
                grad_w.addmm_(z.t(), h)
            else:
                grad_w += z.t() @ h
        if need_b:
            grad_b += z.sum(0, dtype=torch.float32)
    to = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return loss_rows.sum(), grad_h, to(grad_w, weight), None if bias is None else to(grad_b, bias)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, ignore_index, softcap):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        problem = problem_key(hidden.shape[0], weight.shape[0], hidden.dtype, softcap is not None)
        config = config_for(SPEC, "fwd", problem)
        total, *grads = _loss_and_grads(hidden, weight, bias, labels, scale, ignore_index, softcap, needs, config)
        ctx.grads = grads
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy computes its gradients in the forward and releases "
                               "them in the first backward; a second backward needs a second forward")
        grads, ctx.grads = ctx.grads, None
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return (*grads, None, None, None, None)


def _scale(labels, ignore_index, reduction, num_items_in_batch, device):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_items_in_batch is not None:
        count = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=device)
    elif reduction == "mean":
        count = (labels != ignore_index).sum().float()
    else:
        return torch.ones((), dtype=torch.float32, device=device)
    return 1.0 / count.reshape(()).clamp(min=1.0)


def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None,
                               reduction="mean", num_items_in_batch=None):
    """Cross-entropy of ``hidden @ weight^T (+ bias)`` against ``labels`` (already shifted), as an fp32
    scalar; hidden [N, H] or [B, T, H], weight [V, H], labels [N] or [B, T]. See the module docstring."""
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden_2d.dtype != weight.dtype:
        hidden_2d = hidden_2d.to(weight.dtype)
    labels = labels.reshape(-1).contiguous()
    if labels.shape[0] != hidden_2d.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden_2d.shape[0]} rows of hidden states")
    # the kernel reads logits[label]: an out-of-range label would read another row's memory. Checked on
    # the device without a host sync (a CUDA device assert; a RuntimeError on the CPU)
    vocab = weight.shape[0]
    torch._assert_async(((labels == ignore_index) | ((labels >= 0) & (labels < vocab))).all(),
                        f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    scale = _scale(labels, ignore_index, reduction, num_items_in_batch, hidden.device)
    return _FusedLinearCrossEntropy.apply(hidden_2d.contiguous(), weight, bias, labels, scale, ignore_index, softcap)


def reference(hidden, weight, labels, *, bias=None, ignore_index=-100, softcap=None, reduction="mean",
              num_items_in_batch=None):
    """The same loss from the materialized fp32 logits and ``F.cross_entropy``."""
    z = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    labels = labels.reshape(-1)
    total = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is not None:
        return total / max(num_items_in_batch, 1)
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


# --- launch configs ------------------------------------------------------------------------------

_CANDIDATES = [{"BLOCK_V": b, "num_warps": w, "num_stages": 1}
               for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16) if b // (32 * w) >= 4]


def heuristic(pass_name, problem):
    if problem["vocab"] >= 4096:
        return {"BLOCK_V": 4096, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_V": 1024, "num_warps": 4, "num_stages": 1}


def problems(model_config, tokens, dtype):
    softcap = getattr(model_config, "final_logit_softcapping", None) is not None
    return [("fwd", problem_key(tokens, model_config.vocab_size, dtype, softcap))]


def tune_case(pass_name, problem, device):
    """The per-chunk kernel on one chunk of random logits (the matmuls around it take no config)."""
    dtype, vocab = getattr(torch, problem["dtype"]), problem["vocab"]
    rows = min(problem["tokens"], rows_per_chunk(problem["tokens"], vocab, dtype.itemsize))
    softcap = 30.0 if problem["softcap"] else None
    logits = (torch.randn(rows, vocab, device=device) * 4).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[torch.rand(rows, device=device) < 0.1] = -100
    scale = 1.0 / (labels != -100).sum().float().clamp(min=1.0)
    z = logits.float() if softcap is None else softcap * torch.tanh(logits.float() / softcap)
    loss_ref = F.cross_entropy(z, labels, ignore_index=-100, reduction="none")
    with torch.enable_grad():
        z_leaf = logits.float().requires_grad_()
        z = z_leaf if softcap is None else softcap * torch.tanh(z_leaf / softcap)
        (F.cross_entropy(z, labels, ignore_index=-100, reduction="sum") * scale).backward()
    loss_rows = torch.full((rows,), float("nan"), dtype=torch.float32, device=device)
    grad = torch.full_like(logits, float("nan"))  # every element must be written

    def run(config):
        _launch_rows(logits, grad, labels, loss_rows, scale, -100, softcap, True, config)
        return loss_rows, grad

    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    return TuneCase(run=run, expected=(loss_ref, z_leaf.grad.to(dtype)), tolerance=tolerance)


SPEC = OpSpec(name="linear_cross_entropy", candidates={"fwd": _CANDIDATES}, heuristic=heuristic,
              tune_case=tune_case, problems=problems, kernels=(_cross_entropy_rows_kernel, _tanh))
