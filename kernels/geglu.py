"""GeGLU: h = gelu(gate) * up, with the exact (erf) or the tanh GELU.

    erf:  gelu(g) = g * Phi(g),                        gelu'(g) = Phi(g) + g * phi(g)
    tanh: gelu(g) = g/2 * (1 + tanh(z)),  z = sqrt(2/pi) * (g + 0.044715 g^3)

Backward (recomputed from gate and up): dgate = dh * up * gelu'(gate), dup = dh * gelu(gate).
The kernels and the autograd Function are shared with swiglu (fastbench.kernels._glu).
"""
from __future__ import annotations

import torch

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import OpSpec
from fastbench.kernels import _glu

_ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


def _activation(approximate: str) -> str:
    if approximate not in _ACTIVATION:
        raise ValueError(f"geglu: approximate must be 'tanh' or 'none', got {approximate!r}")
    return _ACTIVATION[approximate]


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) * up over any leading dims; approximate="tanh" (Gemma's gelu_pytorch_tanh) or "none" (erf)."""
    return _glu.GLUFunction.apply(gate, up, _activation(approximate), SPEC)


def geglu_backward(grad, gate, up, approximate: str = "tanh", dgate=None, dup=None, h=None):
    """(dgate, dup) for a caller that saved gate and up itself (the fused MLP). dgate/dup: output
    buffers of gate's shape, fresh where None; they may be gate and up themselves (in place). ``h``: where
    given, the forward's output is written into it too (it may be grad itself)."""
    activation = _activation(approximate)
    config = config_for(SPEC, "bwd", _glu.problem(gate, activation))
    return _glu.backward(grad, gate, up, activation, config, dgate, dup, h)


def reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """The oracle: torch's gelu(gate, approximate) * up in eager fp32, cast back to gate.dtype."""
    return _glu.reference(gate, up, _activation(approximate))


def problems(model_config, tokens: int, dtype):
    return [p for act in _ACTIVATION.values() for p in _glu.problems(model_config, tokens, dtype, act)]


SPEC = OpSpec("geglu", _glu.CANDIDATES, _glu.heuristic, tune_case=_glu.tune_case, problems=problems,
              kernels=_glu.KERNELS)
