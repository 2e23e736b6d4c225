"""Where the time of one training step goes: run one step under ``torch.profiler`` and sum the time of
every device kernel (on a GPU; every CPU op's self time on a CPU) per region, a region being picked
by the kernel's name from ``REGIONS``.

On a GPU the sum is kernel time over all streams: a copy on the offload stream that overlaps compute
counts in full, so the total can exceed the step's wall time (``wall_ms``, itself inflated by the
profiler). The logits matmul of a fused linear cross-entropy is a matmul; only its Triton kernel is
"loss". Element-wise work that no kernel name identifies (HF's eager RMSNorm and RoPE are chains of
pow/mean/mul/cat) lands in "other"; ``top_other`` names the largest such kernels.
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
from typing import Callable

# (region, pattern searched case-insensitively in the kernel or op name); the first match wins, so
# attention comes before matmul (flash and fmha kernels are cutlass templates) and the kernels of
# fastbench.kernels / bitsandbytes / PyTorch's loss before the generic patterns.
REGIONS = (
    # fastbench.kernels.nf4 `_dequantize_nf4_kernel`; bitsandbytes `kDequantizeBlockwise<...>` (GPU),
    # `bitsandbytes::dequantize_4bit` (CPU op)
    ("dequantize", r"dequantize"),
    # fastbench.kernels.rms_norm `_rms_norm_fwd_kernel`/`_rms_norm_bwd_kernel`; PyTorch's fused norms
    ("norms", r"rms_?norm|layer_?norm"),
    # fastbench.kernels.rope `_rope_kernel`; "rope" as a word only ("property" contains it)
    ("rope", r"(?<![a-z])rope(?![a-z])|rotary"),
    # fastbench.kernels._glu `_glu_fwd_kernel`/`_glu_bwd_kernel`; PyTorch `silu_kernel`, `gelu`, ...
    ("activations", r"_glu_(fwd|bwd)_kernel|silu|gelu|swiglu|geglu"),
    # fastbench.kernels.linear_cross_entropy `_cross_entropy_rows_kernel`; PyTorch's
    # `cunn_SoftMaxForward<..., LogSoftMaxForwardEpilogue>`, `nll_loss_forward_reduce_cuda_kernel_2d`
    ("loss", r"cross_?entropy|log_?softmax|nll_loss"),
    # flash (`pytorch_flash::flash_fwd_kernel`), memory-efficient (`fmha_cutlassF_*`), cuDNN (`*_sdpa_*`)
    ("attention", r"flash|fmha|sdpa|attention|attn"),
    # cuBLAS/cuBLASLt (`nvjet_*`, `sm90_xmma_gemm_*`, `ampere_bf16_s16816gemm_*`, `cublasLt::*`),
    # cutlass, Hopper wgmma; CPU ops aten::mm/addmm/bmm/baddbmm/matmul/linear
    ("matmul", r"gemm|nvjet|wgmma|cutlass|xmma|cublas|(?<![a-z])(add|b|baddb)?mm(?![a-z])|matmul|linear"),
    # host <-> device copies: checkpoint offload to pinned memory and back
    ("offload", r"memcpy (dtoh|htod)"),
    # fused AdamW `multi_tensor_apply_kernel<..., FusedAdamMathFunctor<...>>`; CPU `aten::_foreach_*`,
    # the `Optimizer.step#AdamW.step` annotation
    ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
)
OTHER = "other"
NAMES = tuple(name for name, _ in REGIONS) + (OTHER,)
_COMPILED = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in REGIONS)


def classify(name: str) -> str:
    """The region of a kernel or op name (``OTHER`` when no pattern matches)."""
    return next((region for region, pattern in _COMPILED if pattern.search(name)), OTHER)


def summarize_times(times_us: dict[str, float], top: int = 8) -> dict:
    """``{name: microseconds}`` -> ``{"ms": {region: ms} for every region, "total_ms": ...,
    "top_other": [[name, ms], ...]}`` (the ``top`` largest unclassified names, cut to 160 characters)."""
    ms = dict.fromkeys(NAMES, 0.0)
    for name, us in times_us.items():
        ms[classify(name)] += us / 1e3
    other = sorted(((n, us / 1e3) for n, us in times_us.items() if classify(n) == OTHER), key=lambda x: -x[1])
    return {"ms": ms, "total_ms": sum(ms.values()), "top_other": [[n[:160], t] for n, t in other[:top]]}


def union_ms(intervals_ns) -> float:
    """Milliseconds covered by at least one of the ``(start, end)`` intervals (nanoseconds)."""
    covered, reach = 0, None
    for start, end in sorted(intervals_ns):
        if reach is None or start > reach:
            covered, reach = covered + end - start, end
        elif end > reach:
            covered, reach = covered + end - reach, end
    return covered / 1e6


def compute_stream_busy_ms(kineto_events) -> float | None:
    """How long a kernel ran on the compute stream (the one with the most kernel time; copies and memsets
    aside): the step's time minus this is time the GPU's main stream sat idle, waiting for its host or for
    another stream."""
    from torch.autograd import DeviceType

    streams: dict[int, list[tuple[int, int]]] = {}
    for e in kineto_events:
        if e.device_type() == DeviceType.CUDA and not e.name().startswith(("Memcpy", "Memset")):
            streams.setdefault(e.device_resource_id(), []).append((e.start_ns(), e.start_ns() + e.duration_ns()))
    if not streams:
        return None
    return union_ms(max(streams.values(), key=lambda spans: sum(b - a for a, b in spans)))


def offloading(model):
    """The host offloader of ``model`` (a fused arm in offload mode: its counter ``queue_waits`` and
    ``timed_waits()``), else None. Imported once the model is built: the worker imports nothing of the
    fused path before (Unsloth's arms must import their packages first)."""
    from fastbench.fused.state import fused_state

    state = fused_state(model)
    return state.offloader if state is not None else None


def host_issue(run_step: Callable[[], object], sync: Callable[[], None], offload=None) -> dict:
    """One step from an idle GPU, unprofiled: ``issue_ms``, the host's time until ``run_step()`` returns
    (every kernel queued), and ``step_ms``, until the GPU has run them. Their ratio near 1 means the
    GPU finished as soon as the host had issued the last kernel: the step is bound by the CPU (Python,
    launches), and GPU work saved will not show. Well below 1: the GPU is the bottleneck. Where the step
    offloads to the host (``offload``, the model's offloader, see :func:`offloading`), also, on a GPU, how
    long the compute stream stood waiting for copies to the host (``copy_wait_ms``: the copy queue full) and
    for inputs fetched back (``fetch_wait_ms``), from its timed_waits; None for both without CUDA."""
    timing = offload.timed_waits() if offload is not None else contextlib.nullcontext()
    sync()
    with timing as waits_ms:
        t = time.perf_counter()
        run_step()
        issue = time.perf_counter() - t
        sync()
        out = {"issue_ms": issue * 1e3, "step_ms": (time.perf_counter() - t) * 1e3}
        if offload is not None:
            out["copy_wait_ms"], out["fetch_wait_ms"] = waits_ms() if _cuda_initialized() else (None, None)
    return out


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


def profile_step(run_step: Callable[[], object], cuda: bool, offload=None) -> dict:
    """Run ``run_step()`` once under ``torch.profiler`` (after one unprofiled step timed by :func:`host_issue`,
    given ``offload``); returns ``summarize_times`` of its device kernels (``cuda``) or CPU ops' self times, plus
    ``activity`` ("cuda"/"cpu"), ``wall_ms``, ``host`` (host_issue's times) and, on a GPU,
    ``gpu_busy_ms`` (:func:`compute_stream_busy_ms` of the profiled step)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    host = host_issue(run_step, sync, offload)
    sync()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        run_step()
        sync()
        wall_ms = (time.perf_counter() - t) * 1e3
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    times_us: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == want:
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            times_us[e.key] = times_us.get(e.key, 0.0) + us
    if not any(times_us.values()):
        raise RuntimeError(f"the profiler saw no {'device kernels (is CUPTI usable here?)' if cuda else 'ops'}")
    out = {"activity": "cuda" if cuda else "cpu", "wall_ms": wall_ms, "host": host, **summarize_times(times_us)}
    if cuda:
        kineto = getattr(prof.profiler, "kineto_results", None)  # torch's raw trace; None: the figure is missing
        out["gpu_busy_ms"] = compute_stream_busy_ms(kineto.events()) if kineto is not None else None
    return out
