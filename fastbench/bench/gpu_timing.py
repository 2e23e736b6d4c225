"""GPU time of a short op without its CPU launch cost: the op is captured in a CUDA graph and replayed.

Events around a single eager call time the GPU *and* the Python that launches it: an op of ~100 us
whose launch (an autograd backward, say) takes as long is measured at twice its kernel time. Here
``n`` calls, each after a 256 MiB write that flushes the L2 cache, are captured into one graph; the
same number of flushes alone into another; the op's time is their difference over ``n``:

    ms = (median replay of [flush, fn] x n  -  median replay of [flush] x n) / n

A backward is timed as (forward + backward) minus forward: autograd runs a backward on the streams
its forward ran on, so both must be captured together.
"""
from __future__ import annotations

import statistics
from typing import Callable


def graph_ms(fn: Callable[[], object], n: int = 20, replays: int = 7) -> float:
    """Median GPU milliseconds of one ``fn()`` call, launch cost excluded (see the module docstring)."""
    import torch

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
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
        flush.zero_()
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

    with_fn, flush_only = capture(flushed), capture(flush.zero_)
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
