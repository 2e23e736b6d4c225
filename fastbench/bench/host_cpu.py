"""What the CPUs did while a benchmark process was timed.

A step whose CPU issues kernels as fast as the GPU runs them is only as steady as that CPU: when other
processes take the machine's cores, its steps slow down and the GPU waits. Each process therefore records,
over its timed steps, how many cores it used itself (``host_own_cores``: its CPU seconds per wall second,
every thread), how many the rest of the machine used (``host_other_cores``), and the share of CPU time the
hypervisor took (``host_steal_pct``). From Linux's ``/proc/stat`` (the whole machine, inside most
containers too) and ``time.process_time``; None where there is no ``/proc/stat``.
"""
from __future__ import annotations

import os
import time

FIELDS = ("host_own_cores", "host_other_cores", "host_steal_pct")

# /proc/stat's first line: cpu user nice system idle iowait irq softirq steal guest guest_nice (in ticks;
# guest time is already counted in user and nice)
_IDLE, _IOWAIT, _STEAL = 3, 4, 7


def sample() -> tuple[float, float, list[int]] | None:
    """(wall clock, this process's CPU seconds, the machine's CPU ticks per state), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return time.perf_counter(), time.process_time(), ticks


def between(start, end, ticks_per_s: float | None = None) -> dict:
    """The :data:`FIELDS` over the interval between two :func:`sample` calls (all None if either is None)."""
    if start is None or end is None or end[0] <= start[0]:
        return dict.fromkeys(FIELDS)
    wall, own = end[0] - start[0], end[1] - start[1]
    delta = [b - a for a, b in zip(start[2], end[2])]
    total = sum(delta)
    busy = total - delta[_IDLE] - delta[_IOWAIT] - delta[_STEAL]
    hz = ticks_per_s or os.sysconf("SC_CLK_TCK")
    return {"host_own_cores": own / wall,
            "host_other_cores": max(0.0, busy / hz / wall - own / wall),
            "host_steal_pct": 100.0 * delta[_STEAL] / total if total else 0.0}
