"""GPU time of a short op without its CPU launch cost: the op is captured in a CUDA graph and replayed.

Events around a single eager call time the GPU *and* the Python that launches it: an op of ~100 us
whose launch (an autograd backward, say) takes as long is measured at twice its kernel time. Here
``n`` calls, each after a 256 MiB write that flushes the L2 cache, are captured into one graph; the
same number of flushes alone into another; the op's time is their difference over ``n``:

    ms = (median replay of [flush, fn] x n  -  median replay of [flush] x n) / n

A backward is timed as (forward + backward) minus forward: autograd runs a backward on the streams
its forward ran on, so both must be captured together.

``FASTBENCH_BENCH_FLUSH=read`` flushes by reading the 256 MiB instead (a sum into one number): a write leaves
up to an L2's worth (60 MB on the H200) of dirty lines that the timed op then writes back while it runs,
which weighs on ops that move tens of MB; a read leaves clean lines. ``write`` (the default) is what every
committed kernel figure used.
"""
from __future__ import annotations

import os
import statistics
from typing import Callable

FLUSH_ENV = "FASTBENCH_BENCH_FLUSH"


def _flusher(torch, device="cuda"):
    """The L2 flush the graphs capture: write (zero 256 MiB) or read (sum 256 MiB into one int64)."""
    mode = os.environ.get(FLUSH_ENV, "write")
    if mode not in ("write", "read"):
        raise ValueError(f"{FLUSH_ENV}={mode!r}: give write (the default) or read")
    buf = torch.ones(256 << 18, dtype=torch.int32, device=device)  # 256 MiB
    if mode == "write":
        return buf.zero_
    total = torch.empty((), dtype=torch.int64, device=device)
    return lambda: torch.sum(buf, 0, dtype=torch.int64, out=total)


def graph_ms(fn: Callable[[], object], n: int = 20, replays: int = 7) -> float:
    """Median GPU milliseconds of one ``fn()`` call, launch cost excluded (see the module docstring)."""
    import torch

    flush = _flusher(torch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compilation, config lookups, lazy inits) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(body) -> "torch.cuda.CUDAGraph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                body()
        return graph

    def flushed():
        flush()
        fn()

    def replay_ms(graph) -> float:
        graph.replay()  # the first replay uploads the graph
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    with_fn, flush_only = capture(flushed), capture(flush)
    return max((replay_ms(with_fn) - replay_ms(flush_only)) / n, 0.0)


def eager_ms(fn: Callable[[], object], rep: int = 200) -> float:
    """Median ms of eager ``fn()`` calls by triton's do_bench (CUDA events, launch cost included): for
    ops long enough that launching them costs nothing measurable, or that a graph cannot capture."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def gpu_ms(fn: Callable[[], object]) -> tuple[float, str]:
    """(ms, how): :func:`graph_ms`, or triton's do_bench (launch cost included) where ``fn`` cannot be
    captured in a CUDA graph."""
    import torch

    try:
        return graph_ms(fn), "cuda_graph"
    except RuntimeError:
        torch.cuda.synchronize()
        return eager_ms(fn), "do_bench"
