"""cuDNN's attention kernels compiled in a background thread while a model loads.

On GPUs where torch runs causal attention with cuDNN (Hopper), cuDNN generates and compiles its fused attention
kernels at a process's first attention, forward and backward: about 2 s on an H200, up to 4.5 s where the CUDA
driver's kernel cache (``~/.nv/ComputeCache``) is still empty, as on a freshly started machine. Those kernels
depend on the head layout (heads, key/value heads, head size), the dtype and the mask, not on the batch or the
sequence length, and they serve every thread of the process: a later attention of another shape only makes its
plan (tens of milliseconds). So one causal attention forward and backward with the model's head layout at a
small shape, run in a thread while the weights load, takes that time out of the first training step.

The thread does only what torch would do for the model's own attention (nothing where torch would not pick
cuDNN: the CPU, fp32, other GPUs), leaves the process's SDPA settings and random stream alone (a preset's random
weights, drawn meanwhile, are the same with it and without), and never raises: a warm-up that
fails leaves the first step to compile as it would have.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the warm-up's sequence length: small, but long enough for the kernels a training shape uses
WARMUP_TOKENS = 256


@dataclass(frozen=True)
class AttentionLayout:
    """The head layout of a model's attention: what cuDNN's compiled kernels depend on."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> AttentionLayout | None:
        """The layout of a transformers config (its text model's), or None where it names no attention heads."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = getattr(config, "num_attention_heads", None)
        if not heads:
            return None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def _uses_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> bool:
    """Whether torch's own choice for causal attention on these inputs is cuDNN's."""
    from torch.nn.attention import SDPBackend

    return torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=gqa) == SDPBackend.CUDNN_ATTENTION.value


def causal_attention_step(layout: AttentionLayout, dtype: torch.dtype, device: torch.device,
                          tokens: int = WARMUP_TOKENS) -> bool:
    """One causal attention forward and backward of random [1, tokens] inputs with ``layout``, laid out as the
    fused decoder lays them ([batch, tokens, heads, head_dim] transposed), where torch would run it with cuDNN.
    Returns whether it ran."""
    gqa = layout.heads != layout.kv_heads
    with torch.cuda.device(device):
        # its own generator: the process's random stream (a preset's weights drawn meanwhile) stays untouched
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, tokens, h, layout.head_dim, dtype=dtype, device=device, generator=generator)
                   .transpose(1, 2) for h in (layout.heads, layout.kv_heads, layout.kv_heads))
        if not _uses_cudnn(q, k, v, gqa):
            return False
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        o.backward(torch.randn(o.shape, dtype=o.dtype, device=device, generator=generator))
        torch.cuda.current_stream(device).synchronize()
    return True


class AttentionWarmup:
    """:func:`causal_attention_step` running in a daemon thread from construction. ``ran``: whether it ran the
    attention; ``error``: what it raised (kept, not raised), once :meth:`join` returned."""

    def __init__(self, layout: AttentionLayout, dtype: torch.dtype, device: torch.device,
                 tokens: int = WARMUP_TOKENS):
        self.ran, self.error = False, None
        self._args = (layout, dtype, device, tokens)
        self._thread = threading.Thread(target=self._run, name="fastbench-attention-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.ran = causal_attention_step(*self._args)
        except Exception as error:  # the first step then compiles for itself, as without a warm-up
            self.error = error

    def join(self) -> None:
        self._thread.join()


def start_attention_warmup(config, dtype: torch.dtype, device) -> AttentionWarmup | None:
    """An :class:`AttentionWarmup` for a model of ``config`` computing in ``dtype`` on ``device``; None where
    there is nothing to compile (not a GPU, not fp16/bf16, no attention heads in the config)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not torch.cuda.is_available():
        return None
    layout = AttentionLayout.of(config)
    if layout is None:
        return None
    if device.index is None:  # the thread's current device is its own: name the caller's
        device = torch.device("cuda", torch.cuda.current_device())
    return AttentionWarmup(layout, dtype, device)


@contextlib.contextmanager
def attention_warmup(config, dtype: torch.dtype, device, enabled: bool = True):
    """Runs the body (a model's load) while :func:`start_attention_warmup` compiles its attention; waits for
    the warm-up at the end (also on an error or Ctrl-C), so no thread outlives the body. ``config`` may be
    None (no warm-up). Yields the AttentionWarmup or None."""
    warmup = start_attention_warmup(config, dtype, device) if enabled and config is not None else None
    try:
        yield warmup
    finally:
        if warmup is not None:
            warmup.join()
