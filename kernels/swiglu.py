"""SwiGLU: h = silu(gate) * up, silu(g) = g * sigmoid(g).

Backward (recomputed from gate and up, nothing else saved), with s = sigmoid(gate):

    dgate = dh * up * s * (1 + gate * (1 - s))        dup = dh * gate * s

The kernels and the autograd Function are shared with geglu (fastbench.kernels._glu).
"""
from __future__ import annotations

import torch

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import OpSpec
from fastbench.kernels import _glu


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over any leading dims (last dim with unit stride, e.g. halves of a fused gate_up)."""
    return _glu.GLUFunction.apply(gate, up, "silu", SPEC)


def swiglu_backward(grad, gate, up, dgate=None, dup=None, h=None):
    """(dgate, dup) for a caller that saved gate and up itself (the fused MLP). dgate/dup: output
    buffers of gate's shape, fresh where None; they may be gate and up themselves (in place). ``h``: where
    given, the forward's output is written into it too (it may be grad itself)."""
    config = config_for(SPEC, "bwd", _glu.problem(gate, "silu"))
    return _glu.backward(grad, gate, up, "silu", config, dgate, dup, h)


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The oracle: silu(gate) * up in eager fp32, cast back to gate.dtype."""
    return _glu.reference(gate, up, "silu")


def problems(model_config, tokens: int, dtype):
    return _glu.problems(model_config, tokens, dtype, "silu")


SPEC = OpSpec("swiglu", _glu.CANDIDATES, _glu.heuristic, tune_case=_glu.tune_case, problems=problems,
              kernels=_glu.KERNELS)
