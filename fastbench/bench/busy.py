"""How busy the machine was while a benchmark process ran its timed steps.

A step whose CPU issues kernels as fast as the GPU runs them is only as steady as that CPU: when other
processes take the machine's cores, its steps slow down and the GPU waits. Each process therefore records,
over its timed steps, how many cores it used itself (``host_own_cores``: its CPU seconds per wall second,
every thread), how many the rest of the machine used (``host_other_cores``), the share of CPU time the
hypervisor took (``host_steal_pct``), all from Linux's ``/proc/stat`` (the whole machine, inside most
containers too) and ``time.process_time``; and on a GPU the share of time a kernel was running
(``gpu_busy_pct``, NVML's utilisation samples, each over 1/6 to 1 s): well under 100 means the GPU waited
for the host. None where a source is missing.
"""
from __future__ import annotations

import os
import time

FIELDS = ("host_own_cores", "host_other_cores", "host_steal_pct", "gpu_busy_pct")

# /proc/stat's first line: cpu user nice system idle iowait irq softirq steal guest guest_nice (in ticks;
# guest time is already counted in user and nice)
_IDLE, _IOWAIT, _STEAL = 3, 4, 7


class Sample:
    """The clocks and counters at one moment (``ticks`` None off Linux)."""

    def __init__(self):
        self.wall, self.own, self.epoch_us = time.perf_counter(), time.process_time(), int(time.time() * 1e6)
        try:
            with open("/proc/stat") as f:
                self.ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            self.ticks = None


def between(start: Sample, end: Sample, gpu_index: int | None = None, ticks_per_s: float | None = None) -> dict:
    """The :data:`FIELDS` over the interval between two samples; ``gpu_index``: the CUDA device to ask
    NVML about (None on a CPU run)."""
    out = dict.fromkeys(FIELDS)
    wall = end.wall - start.wall
    if gpu_index is not None:
        out["gpu_busy_pct"] = gpu_busy_pct(gpu_index, start.epoch_us, end.epoch_us)
    if start.ticks is None or end.ticks is None or wall <= 0:
        return out
    own = end.own - start.own
    delta = [b - a for a, b in zip(start.ticks, end.ticks)]
    total = sum(delta)
    busy = total - delta[_IDLE] - delta[_IOWAIT] - delta[_STEAL]
    hz = ticks_per_s or os.sysconf("SC_CLK_TCK")
    out.update(host_own_cores=own / wall, host_other_cores=max(0.0, busy / hz / wall - own / wall),
               host_steal_pct=100.0 * delta[_STEAL] / total if total else 0.0)
    return out


def gpu_busy_pct(device_index: int, since_us: int, until_us: int) -> float | None:
    """Mean of NVML's GPU utilisation samples taken between the two times (microseconds since the epoch)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        _, samples = pynvml.nvmlDeviceGetSamples(handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, since_us)
    except Exception:  # no NVML, no permission, or no samples yet
        return None
    values = [s.sampleValue.uiVal for s in samples if since_us < s.timeStamp <= until_us]
    return sum(values) / len(values) if values else None
