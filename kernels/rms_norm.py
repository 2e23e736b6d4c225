"""RMSNorm: y = x * rsqrt(mean(x^2, -1) + eps) * (offset + w).

offset=0 is Llama's form, offset=1 Gemma's ``(1 + w)``. Statistics and math in fp32 (fp64 for fp64
inputs), output in x.dtype. With r = rsqrt(mean(x^2) + eps), xhat = x * r and g = dy * (offset + w):

    dx = r * (g - xhat * mean(g * xhat, -1))        dw = sum_rows(dy * xhat)

The backward recomputes r from x (nothing but x and w is saved). dw is reduced in two steps: each
program sums its rows into one row of an fp32 partial buffer, torch sums the partials.

:func:`rms_norm_residual` is the form a pre-norm decoder layer uses, where x also feeds the residual sum
after the norm: it returns (y, x), and its backward adds the gradient that reaches x by the residual path
to dx in the same kernel (dx = r * (...) + dx_residual), instead of autograd summing the two afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import OpSpec, TuneCase
from fastbench.kernels._tensors import as_rows, cdiv, compute_dtype, dtype_name, next_power_of_2

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, eps, offset,
                         BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(COMPUTE)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None] * (offset + w)[None, :]
    tl.store(y_ptr + rows * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, dres_ptr, dx_ptr, dw_ptr, n_rows, n_cols,
                         stride_dy, stride_x, stride_dres, stride_dx, eps, offset,
                         BLOCK_ROWS: tl.constexpr, ROW_STEPS: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_DW: tl.constexpr, HAS_RESIDUAL: tl.constexpr, COMPUTE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    wt = offset + tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(COMPUTE)
    dw = tl.zeros([BLOCK_N], dtype=COMPUTE)
    for step in range(ROW_STEPS):
        rows = (pid * ROW_STEPS + step) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(dy_ptr + rows * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)[:, None]
        xhat = x * rstd
        g = dy * wt[None, :]
        dx = (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None]) * rstd
        if HAS_RESIDUAL:
            dx += tl.load(dres_ptr + rows * stride_dres + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        tl.store(dx_ptr + rows * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += tl.sum(dy * xhat, axis=0)
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


def _block_n(n_cols: int) -> int:
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm supports hidden sizes up to {MAX_HIDDEN}, got {n_cols}")
    return next_power_of_2(n_cols)


def _forward(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float, config) -> torch.Tensor:
    """x: [rows, n] with unit last stride; returns a fresh contiguous y."""
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    meta = dict(config)
    grid = (cdiv(rows, meta["BLOCK_ROWS"]),)
    _rms_norm_fwd_kernel[grid](x, w, y, rows, n, x.stride(0), y.stride(0), eps, offset,
                               BLOCK_N=_block_n(n), COMPUTE=compute_dtype(x), **meta)
    return y


def _backward(dy, x, w, eps: float, offset: float, need_dw: bool, config, dres=None):
    """dy, x (and dres, the gradient added to dx, where given): [rows, n] with unit last stride; returns
    (dx, dw or None)."""
    rows, n = x.shape
    meta = dict(config)
    grid = (cdiv(rows, meta["BLOCK_ROWS"] * meta["ROW_STEPS"]),)
    dx = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty((grid[0] if need_dw else 1, n), dtype=compute, device=x.device)
    residual = dy if dres is None else dres  # never read without HAS_RESIDUAL
    _rms_norm_bwd_kernel[grid](dy, x, w, residual, dx, partial, rows, n, dy.stride(0), x.stride(0),
                               residual.stride(0), dx.stride(0), eps, offset, BLOCK_N=_block_n(n), HAS_DW=need_dw,
                               HAS_RESIDUAL=dres is not None, COMPUTE=compute_dtype(x), **meta)
    return dx, (partial.sum(0).to(w.dtype) if need_dw else None)


def _problem(pass_name: str, dtype: torch.dtype, hidden: int, rows: int, need_dw: bool = False) -> dict:
    problem = {"dtype": dtype_name(dtype), "hidden": hidden, "tokens": rows}
    if pass_name == "bwd":
        problem["dw"] = need_dw
    return problem


def _normalized(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    """(y in x's shape, x as rows, the weight contiguous): the forward, and what its backward needs."""
    x2 = as_rows(x)
    w = weight.contiguous()
    config = config_for(SPEC, "fwd", _problem("fwd", x.dtype, x2.shape[1], x2.shape[0]))
    return _forward(x2, w, eps, offset, config).view(x.shape), x2, w


def _forward_saving(ctx, x, weight, eps: float, offset: float) -> torch.Tensor:
    """The Functions' forward: y, with what the backward needs kept on ``ctx``."""
    y, x2, w = _normalized(x, weight, eps, offset)
    ctx.save_for_backward(x2, w)
    ctx.eps, ctx.offset = eps, offset
    return y


def _grads(ctx, grad, grad_residual=None):
    """The Functions' backward: (dx, dw, None, None), dx with ``grad_residual`` added where given."""
    x2, w = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    config = config_for(SPEC, "bwd", _problem("bwd", x2.dtype, x2.shape[1], x2.shape[0], need_dw))
    dres = None if grad_residual is None else as_rows(grad_residual)
    dx, dw = _backward(as_rows(grad), x2, w, ctx.eps, ctx.offset, need_dw, config, dres)
    return dx.view(grad.shape), dw, None, None


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        return _forward_saving(ctx, x, weight, eps, offset)

    @staticmethod
    def backward(ctx, grad):
        return _grads(ctx, grad)


class _RMSNormResidualFunction(torch.autograd.Function):
    """(y, x): the norm and its input passed on for the residual sum; the backward gets both outputs' gradients
    and adds the second to dx in the norm's kernel."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        return _forward_saving(ctx, x, weight, eps, offset), x

    @staticmethod
    def backward(ctx, grad, grad_residual):
        return _grads(ctx, grad, grad_residual)


def rms_norm_residual(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x, ...), x) for a pre-norm block ``x + f(rms_norm(x))``: use the second output in the residual
    sum, and the gradient it gets is added to the norm's dx inside the norm's backward kernel (one pass less
    over [tokens, hidden] than autograd's sum of the two). Without grad mode, (rms_norm(x), x) as they are."""
    if not torch.is_grad_enabled():
        return _normalized(x, weight, eps, offset)[0], x
    return _RMSNormResidualFunction.apply(x, weight, eps, offset)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading dims); offset=1.0 gives Gemma's (1 + w) form. Without grad mode
    (a checkpointed layer's forward) the kernel runs without the autograd Function's host cost."""
    if not torch.is_grad_enabled():
        return _normalized(x, weight, eps, offset)[0]
    return _RMSNormFunction.apply(x, weight, eps, offset)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """The oracle: the same math in eager PyTorch (fp32 statistics, output in x.dtype)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.to(compute))
    return y.to(x.dtype)


# --- launch configs -------------------------------------------------------------------------------

_ROWS = (1, 2, 4, 8, 16)
CANDIDATES = {
    "fwd": [{"BLOCK_ROWS": r, "num_warps": w, "num_stages": 1} for r in _ROWS for w in (1, 2, 4, 8, 16)],
    "bwd": [{"BLOCK_ROWS": r, "ROW_STEPS": s, "num_warps": w, "num_stages": 1}
            for r in _ROWS for s in (1, 16) for w in (1, 2, 4, 8, 16)],
}


def heuristic(pass_name: str, problem) -> dict:
    """One row per program for wide rows, several for narrow ones; ~16 elements per thread."""
    block_n = next_power_of_2(problem["hidden"])
    rows = max(1, min(16, 2048 // block_n))
    warps = max(1, min(16, rows * block_n // 512))
    if pass_name == "fwd":
        return {"BLOCK_ROWS": rows, "num_warps": warps, "num_stages": 1}
    return {"BLOCK_ROWS": rows, "ROW_STEPS": 16 if problem["dw"] else 1, "num_warps": warps, "num_stages": 1}


def problems(model_config, tokens: int, dtype) -> list[tuple[str, dict]]:
    """The norms of a training step with frozen norm weights: the layer norms over hidden_size and,
    for Qwen3, the per-head q/k norms over head_dim."""
    shapes = [(model_config.hidden_size, tokens)]
    if getattr(model_config, "model_type", "") == "qwen3":
        head_dim = model_config.head_dim
        shapes += [(head_dim, tokens * model_config.num_attention_heads),
                   (head_dim, tokens * model_config.num_key_value_heads)]
    return [(p, _problem(p, dtype, n, rows)) for n, rows in shapes for p in ("fwd", "bwd")]


def tune_case(pass_name: str, problem, device) -> TuneCase:
    """Random inputs of the problem's shape; fwd returns y, bwd returns (dx,) or (dx, dw), dx with a residual
    path's gradient added (as the decoder layers' norms run it)."""
    dtype = getattr(torch, problem["dtype"])
    rows, n = problem["tokens"], problem["hidden"]
    x = torch.randn(rows, n, device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    if pass_name == "fwd":
        return TuneCase(lambda config: _forward(x, w, 1e-6, 0.0, config), reference(x, w), tolerance)
    need_dw = problem["dw"]
    dy = torch.randn_like(x)
    dres = torch.randn_like(x)  # a decoder layer's norms add the residual path's gradient
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_(need_dw)
    dx, *dw = torch.autograd.grad(reference(xr, wr), [xr, wr] if need_dw else [xr], dy.float())

    def run(config):
        dx, dw = _backward(dy, x, w, 1e-6, 0.0, need_dw, config, dres)
        return (dx, dw) if need_dw else (dx,)

    return TuneCase(run, (dx + dres.float(), *dw), tolerance)


SPEC = OpSpec("rms_norm", CANDIDATES, heuristic, tune_case=tune_case, problems=problems,
              kernels=(_rms_norm_fwd_kernel, _rms_norm_bwd_kernel))
