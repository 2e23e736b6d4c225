"""Small tensor helpers shared by the op modules (host side only, no kernels)."""
from __future__ import annotations

import os

import torch
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's launch grids (``triton.cdiv`` costs more on the host: it goes through
    Triton's constexpr-function wrapper, and launches take several per layer and step)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (>= 1), as ``triton.next_power_of_2`` but a plain host function."""
    return 1 << max(0, n - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the form problem keys store."""
    return str(dtype).removeprefix("torch.")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D [rows, last dim] view with a unit last stride (a copy only where that needs one)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def compute_dtype(t: torch.Tensor):
    """The Triton dtype a kernel computes in: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def interpreting() -> bool:
    """True under Triton's interpreter (TRITON_INTERPRET=1: the CPU tests), where CPU tensors play the GPU's."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
