"""What swiglu and geglu share: h = act(gate) * up over rows, and its backward

    dgate = dh * up * act'(gate)        dup = dh * act(gate)

recomputed from gate and up (no activation is saved). Elementwise on [BLOCK_M, BLOCK_N] tiles of a
[rows, width] view with unit last stride; math in fp32 (fp64 for fp64 inputs). The backward may also
write h itself (a caller that needs h after the GLU's gradients, as the fused MLP does for the down
projection's LoRA gradient, then gets it without a second forward), and may write dgate/dup/h over any
of its inputs: each tile is read completely before it is written.

Activations (the ACT constexpr):
- "silu":      a = g * sigmoid(g),              a' = s * (1 + g * (1 - s)),  s = sigmoid(g)
- "gelu":      a = g * Phi(g),                  a' = Phi(g) + g * phi(g)     (erf form)
- "gelu_tanh": a = g/2 * (1 + tanh(z)),         z = sqrt(2/pi) * (g + 0.044715 g^3)
               a' = (1 + t)/2 + g/2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 g^2),  t = tanh(z)
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import TuneCase
from fastbench.kernels._tensors import as_rows, cdiv, compute_dtype, dtype_name, next_power_of_2

_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)); tanh(z) is written as 2 * sigmoid(2z) - 1 (triton.language has no portable tanh)."""
    if ACT == "silu":
        s = tl.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    elif ACT == "gelu":
        cdf = 0.5 * (1 + tl.math.erf(g * _INV_SQRT_2))
        return g * cdf, cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
    else:
        z = tl.minimum(tl.maximum((g + g * g * g * _GELU_CUBIC) * _SQRT_2_OVER_PI, -20.0), 20.0)
        t = 2 * tl.sigmoid(z * 2) - 1  # tanh(z); |z| <= 20 keeps exp finite, tanh(20) is 1 in fp64
        dz = (1 + g * g * _GELU_CUBIC * 3) * _SQRT_2_OVER_PI
        return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * dz


@triton.jit
def _glu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_rows, n_cols, stride_g, stride_u, stride_h,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)[:, None]
    cols = cols[None, :]
    g = tl.load(g_ptr + rows * stride_g + cols, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(u_ptr + rows * stride_u + cols, mask=mask, other=0.0).to(COMPUTE)
    a, _ = _act_and_grad(g, ACT)
    tl.store(h_ptr + rows * stride_h + cols, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, n_rows, n_cols,
                    stride_dh, stride_g, stride_u, stride_dg, stride_du, stride_h,
                    ACT: tl.constexpr, WRITE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    COMPUTE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)[:, None]
    cols = cols[None, :]
    dh = tl.load(dh_ptr + rows * stride_dh + cols, mask=mask, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + rows * stride_g + cols, mask=mask, other=0.0).to(COMPUTE)
    u = tl.load(u_ptr + rows * stride_u + cols, mask=mask, other=0.0).to(COMPUTE)
    a, da = _act_and_grad(g, ACT)
    tl.store(dg_ptr + rows * stride_dg + cols, (dh * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows * stride_du + cols, (dh * a).to(du_ptr.dtype.element_ty), mask=mask)
    if WRITE_H:
        tl.store(h_ptr + rows * stride_h + cols, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


KERNELS = (_act_and_grad, _glu_fwd_kernel, _glu_bwd_kernel)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _grid(shape, meta):
    return cdiv(shape[0], meta["BLOCK_M"]), cdiv(shape[1], meta["BLOCK_N"])


def _check(*tensors: torch.Tensor):
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device for t in tensors):
        raise ValueError("gate, up, grad and output buffers must share shape, dtype and device; got "
                         + ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in tensors))


def forward(gate: torch.Tensor, up: torch.Tensor, activation: str, config) -> torch.Tensor:
    """h = act(gate) * up, a fresh contiguous tensor of gate's shape."""
    _check(gate, up)
    g, u = as_rows(gate), as_rows(up)
    h = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    meta = dict(config)
    _glu_fwd_kernel[_grid(g.shape, meta)](g, u, h, *g.shape, g.stride(0), u.stride(0), h.stride(0),
                                          ACT=activation, COMPUTE=compute_dtype(g), **meta)
    return h.view(gate.shape)


def backward(grad, gate, up, activation: str, config, dgate=None, dup=None, h=None):
    """(dgate, dup) written into the given buffers (fresh ones where None); where ``h`` is given, act(gate) * up
    is written into it as well. A given buffer must have gate's shape and dtype and may be gate, up or grad
    themselves (in place: saves memory; h over grad is what the fused MLP does)."""
    dgate = torch.empty_like(gate) if dgate is None else dgate
    dup = torch.empty_like(up) if dup is None else dup
    outputs = (dgate, dup) if h is None else (dgate, dup, h)
    _check(gate, up, grad, *outputs)
    views = [t.view(-1, t.shape[-1]) for t in (grad, gate, up, *outputs)]  # raises if not viewable
    if any(v.stride(-1) != 1 for v in views):
        raise ValueError("glu backward needs tensors whose last dim has unit stride")
    if h is None:  # h_ptr is never written: any pointer serves
        views.append(views[-1])
    meta = dict(config)
    _glu_bwd_kernel[_grid(views[0].shape, meta)](*views, *views[0].shape, *(v.stride(0) for v in views),
                                                 ACT=activation, WRITE_H=h is not None, COMPUTE=compute_dtype(gate),
                                                 **meta)
    return dgate, dup


class GLUFunction(torch.autograd.Function):
    """act(gate) * up with a backward that recomputes act from the saved gate and up; the launch
    configs come from ``spec`` (the swiglu or geglu OpSpec)."""

    @staticmethod
    def forward(ctx, gate, up, activation, spec):
        ctx.activation, ctx.spec = activation, spec
        ctx.save_for_backward(gate, up)
        return forward(gate, up, activation, config_for(spec, "fwd", problem(gate, activation)))

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        config = config_for(ctx.spec, "bwd", problem(gate, ctx.activation))
        g, u, dh = as_rows(gate), as_rows(up), as_rows(grad)
        dgate, dup = backward(dh, g, u, ctx.activation, config)
        return dgate.view(gate.shape), dup.view(up.shape), None, None


def reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """The oracle: act(gate) * up in eager fp32 (fp64 for fp64), cast back to gate.dtype."""
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g, u = gate.to(compute), up.to(compute)
    if activation == "silu":
        a = torch.nn.functional.silu(g)
    else:
        a = torch.nn.functional.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")
    return (a * u).to(gate.dtype)


# --- launch configs (shared by swiglu and geglu; each op keeps its own cache entries) --------------

def key(dtype, width: int, rows: int, activation: str) -> dict:
    return {"dtype": dtype_name(dtype), "activation": activation, "width": width, "tokens": rows}


def problem(gate: torch.Tensor, activation: str) -> dict:
    return key(gate.dtype, gate.shape[-1], gate.numel() // max(gate.shape[-1], 1), activation)


def _configs() -> list[dict]:
    out = []
    for m in (1, 2, 4, 8, 16):
        for n in (256, 512, 1024, 2048, 4096):
            for w in (2, 4, 8, 16):
                if 1024 <= m * n <= 8192 and 4 <= m * n // (32 * w) <= 32:
                    out.append({"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": 1})
    return out


CANDIDATES = {"fwd": _configs(), "bwd": _configs()}


def heuristic(pass_name: str, problem) -> dict:
    """Tiles of 4096 elements (several rows when the width is small), 16 elements per thread."""
    block_n = max(256, min(4096, next_power_of_2(problem["width"])))
    return {"BLOCK_M": 4096 // block_n, "BLOCK_N": block_n, "num_warps": 8, "num_stages": 1}


def problems(model_config, tokens: int, dtype, activation: str) -> list[tuple[str, dict]]:
    """The MLP's (pass, problem) pairs when the model's activation is ``activation``, else none."""
    act = getattr(model_config, "hidden_activation", None) or getattr(model_config, "hidden_act", "silu")
    names = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
    if names.get(act) != activation:
        return []
    k = key(dtype, model_config.intermediate_size, tokens, activation)
    return [("fwd", k), ("bwd", k)]


def tune_case(pass_name: str, problem, device) -> TuneCase:
    """Random gate/up of the problem's shape; fwd returns h, bwd returns (dgate, dup, h), as the fused MLP runs
    it (with h, into a buffer of its own here so that every run reads the same gradient)."""
    dtype = getattr(torch, problem["dtype"])
    activation = problem["activation"]
    gate = torch.randn(problem["tokens"], problem["width"], device=device, dtype=dtype)
    up = torch.randn_like(gate)
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    if pass_name == "fwd":
        return TuneCase(lambda config: forward(gate, up, activation, config),
                        reference(gate, up, activation), tolerance)
    grad = torch.randn_like(gate)
    g, u = gate.float().requires_grad_(), up.float().requires_grad_()
    expected = (*torch.autograd.grad(reference(g, u, activation), [g, u], grad.float()),
                reference(gate, up, activation))
    h = torch.empty_like(gate)

    def run(config):
        return (*backward(grad, gate, up, activation, config, h=h), h)

    return TuneCase(run, expected, tolerance)
