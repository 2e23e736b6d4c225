"""How busy the machine was while a benchmark process ran its timed steps.

A step whose CPU issues kernels as fast as the GPU runs them is only as steady as that CPU: when other
processes take the machine's cores, its steps slow down and the GPU waits. Each process therefore records,
over its timed steps, how many cores it used itself (``host_own_cores``: its CPU seconds per wall second,
every thread), how many the rest of the machine used (``host_other_cores``), the share of CPU time the
hypervisor took (``host_steal_pct``), all from Linux's ``/proc/stat`` (the whole machine, inside most
containers too) and ``time.process_time``; and on a GPU the share of time a kernel was running
(``gpu_busy_pct``, NVML's utilisation samples, each over 1/6 to 1 s): well under 100 means the GPU waited
for the host.

A GPU held at its power limit lowers its clocks instead of running out of work: its steps then take as long as
the energy they need at that limit, whatever the host does. So each process also records, from NVML's counters,
the GPU's energy over the timed steps (``gpu_energy_j``), its mean power (``gpu_power_w``), and the share of the
time its clocks were held down by the power limit or by temperature (``gpu_power_capped_pct``,
``gpu_thermal_capped_pct``: NVML's violation counters). These count the whole GPU, every process on it. None
where a source is missing.
"""
from __future__ import annotations

import os
import time

FIELDS = ("host_own_cores", "host_other_cores", "host_steal_pct", "gpu_busy_pct", "gpu_energy_j", "gpu_power_w",
          "gpu_power_capped_pct", "gpu_thermal_capped_pct")

# /proc/stat's first line: cpu user nice system idle iowait irq softirq steal guest guest_nice (in ticks;
# guest time is already counted in user and nice)
_IDLE, _IOWAIT, _STEAL = 3, 4, 7


class Sample:
    """The clocks and counters at one moment (``ticks`` None off Linux); with ``gpu_index``, that GPU's NVML
    counters too (``gpu``: {"energy_mj", "power_ns", "thermal_ns"}, each None where NVML lacks it)."""

    def __init__(self, gpu_index: int | None = None):
        self.wall, self.own, self.epoch_us = time.perf_counter(), time.process_time(), int(time.time() * 1e6)
        try:
            with open("/proc/stat") as f:
                self.ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            self.ticks = None
        self.gpu = None if gpu_index is None else gpu_counters(gpu_index)


def _nvml_handle(device_index: int):
    """(pynvml, NVML's handle of the GPU), or None without NVML or its permission."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception:  # no NVML, no permission
        return None


def gpu_counters(device_index: int) -> dict | None:
    """NVML's cumulative counters of a GPU now: total energy (mJ) and the time its clocks were held down by the
    power limit and by temperature (ns); None without NVML."""
    nvml = _nvml_handle(device_index)
    if nvml is None:
        return None
    pynvml, handle = nvml
    reads = {"energy_mj": lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle),
             "power_ns": lambda: pynvml.nvmlDeviceGetViolationStatus(
                 handle, pynvml.NVML_PERF_POLICY_POWER).violationTime,
             "thermal_ns": lambda: pynvml.nvmlDeviceGetViolationStatus(
                 handle, pynvml.NVML_PERF_POLICY_THERMAL).violationTime}
    out = {}
    for key, read in reads.items():
        try:
            out[key] = int(read())
        except Exception:  # a counter this GPU or driver does not keep
            out[key] = None
    return out


def between(start: Sample, end: Sample, gpu_index: int | None = None, ticks_per_s: float | None = None) -> dict:
    """The :data:`FIELDS` over the interval between two samples; ``gpu_index``: the CUDA device to ask
    NVML about (None on a CPU run)."""
    out = dict.fromkeys(FIELDS)
    wall = end.wall - start.wall
    if gpu_index is not None:
        out["gpu_busy_pct"] = gpu_busy_pct(gpu_index, start.epoch_us, end.epoch_us)
    if start.gpu and end.gpu and wall > 0:
        out.update(_gpu_deltas(start.gpu, end.gpu, wall))
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


def _gpu_deltas(start: dict, end: dict, wall: float) -> dict:
    """The GPU fields from two :func:`gpu_counters` readings ``wall`` seconds apart (None where one lacks a
    counter)."""
    def delta(key):
        return None if start.get(key) is None or end.get(key) is None else end[key] - start[key]

    energy, power, thermal = delta("energy_mj"), delta("power_ns"), delta("thermal_ns")
    return {"gpu_energy_j": None if energy is None else energy / 1e3,
            "gpu_power_w": None if energy is None else energy / 1e3 / wall,
            "gpu_power_capped_pct": None if power is None else min(100.0, 100.0 * power / 1e9 / wall),
            "gpu_thermal_capped_pct": None if thermal is None else min(100.0, 100.0 * thermal / 1e9 / wall)}


def gpu_busy_pct(device_index: int, since_us: int, until_us: int) -> float | None:
    """Mean of NVML's GPU utilisation samples taken between the two times (microseconds since the epoch)."""
    nvml = _nvml_handle(device_index)
    if nvml is None:
        return None
    pynvml, handle = nvml
    try:
        _, samples = pynvml.nvmlDeviceGetSamples(handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, since_us)
    except Exception:  # no samples yet
        return None
    values = [s.sampleValue.uiVal for s in samples if since_us < s.timeStamp <= until_us]
    return sum(values) / len(values) if values else None
