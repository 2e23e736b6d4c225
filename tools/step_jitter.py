"""Probe: why do some steps of an arm take much longer than others? llama-3-8b arms given as bits:ckpt
(e.g. 4bit:offload 4bit:40), all-ones attention_mask as the harness passes. Per arm: 3 warm-up steps, then
N steps back to back (no synchronisation added) twice: plain, then under torch.profiler with CUDA activity
only (no host-op recording, so the host issues as fast as unprofiled). Per step: the GPU's time (CUDA events),
the host's time to issue it, and, from NVML sampled every 10 ms by a thread, the SM clock's minimum, the
highest power draw and the clock-event (throttle) reasons seen during the step. Under the profiler, per step:
the compute stream's kernel time, its idle time, and the three longest idle gaps with the kernel after each.
A step marker kernel (torch.cuda._sleep) separates the steps in the trace."""
import os, sys, tempfile, threading, time, warnings, torch
warnings.simplefilter("ignore")
import pynvml
from probe_step import build, compute_stream_kernels, load_trace, random_batch, train_step

N = int(os.environ.get("JITTER_STEPS", "12"))
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
REASONS = {0x1: "idle", 0x2: "app-setting", 0x4: "sw-power-cap", 0x8: "hw-slowdown", 0x20: "sw-thermal",
           0x40: "hw-thermal", 0x80: "hw-power-brake", 0x100: "display-clock"}


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop = [], False

    def run(self):
        while not self.stop:
            t = time.perf_counter()
            self.samples.append((t, pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                                 pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, reasons_fn(handle)))
            time.sleep(0.01)


def run_steps(m, opt, batch, profiled):
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(N + 1)]
    host = []
    ev[0].record(); t0 = time.perf_counter()
    for i in range(N):
        t = time.perf_counter()
        if profiled:
            torch.cuda._sleep(1000)  # marker kernel at each step's start
        train_step(m, opt, batch)
        host.append((time.perf_counter() - t) * 1e3)
        ev[i + 1].record()
    torch.cuda.synchronize()
    gpu_edges = [t0 + ev[0].elapsed_time(ev[i]) / 1e3 for i in range(N + 1)]  # ev[0] ran at once: queue empty
    return [ev[i].elapsed_time(ev[i + 1]) for i in range(N)], host, gpu_edges


def nvml_rows(samples, edges):
    rows = []
    for a, b in zip(edges, edges[1:]):
        s = [x for x in samples if a <= x[0] < b]
        if not s:
            rows.append("no sample"); continue
        reasons = 0
        for x in s:
            reasons |= x[3]
        names = [n for bit, n in REASONS.items() if reasons & bit] or ["none"]
        rows.append(f"sm clock min {min(x[1] for x in s)} MHz, power max {max(x[2] for x in s):.0f} W, reasons {'+'.join(names)}")
    return rows


def trace_steps(path):
    tr = load_trace(path)
    ks = compute_stream_kernels(tr)
    marks = [i for i, k in enumerate(ks) if "sleep" in k["name"].lower() or "spin" in k["name"].lower()]
    memcpy = [e for e in tr if e.get("cat") in ("gpu_memcpy",)]
    out = []
    for s, (a, b) in enumerate(zip(marks, marks[1:] + [len(ks)])):
        step = ks[a + 1:b]
        if not step:
            continue
        start, end = ks[a]["ts"] + ks[a]["dur"], step[-1]["ts"] + step[-1]["dur"]
        busy = sum(k["dur"] for k in step) / 1e3
        gaps = sorted(((k["ts"] - (p["ts"] + p["dur"])) / 1e3, (p["ts"] + p["dur"] - start) / 1e3, k["name"][:60])
                      for p, k in zip([ks[a]] + step, step))[::-1]
        big = [g for g in gaps if g[0] > 0.05]
        copies = sum(e["dur"] for e in memcpy if start <= e["ts"] < end) / 1e3
        out.append(f"  step {s}: span {(end - start) / 1e3:.1f} ms, kernels {busy:.1f}, idle {(end - start) / 1e3 - busy:.1f} "
                   f"({len(big)} gaps > 50 us, {sum(g[0] for g in big):.1f} ms); copies {copies:.1f} ms; longest: "
                   + "; ".join(f"{g:.2f} ms at {at:.1f} before {name}" for g, at, name in gaps[:3]))
    return out


for arg in sys.argv[1:]:
    m, opt = build(arg)
    batch = random_batch(m)
    for _ in range(3):
        train_step(m, opt, batch)
    sampler = Sampler(); sampler.start()
    gpu, host, edges = run_steps(m, opt, batch, profiled=False)
    nv = nvml_rows(sampler.samples, edges)
    print(f"{arg}: {N} steps back to back, plain: median {sorted(gpu)[N // 2]:.1f} ms", flush=True)
    for i in range(N):
        print(f"  step {i}: GPU {gpu[i]:.1f} ms, host issue {host[i]:.1f} ms; {nv[i]}")
    path = os.path.join(tempfile.gettempdir(), f"jitter-{arg.replace(':', '-')}.json")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gpu, host, edges = run_steps(m, opt, batch, profiled=True)
    prof.export_chrome_trace(path)
    nv = nvml_rows(sampler.samples, edges)
    sampler.stop = True
    print(f"{arg}: {N} steps under the CUDA-only profiler: median {sorted(gpu)[N // 2]:.1f} ms", flush=True)
    for i in range(N):
        print(f"  step {i}: GPU {gpu[i]:.1f} ms, host issue {host[i]:.1f} ms; {nv[i]}")
    print("\n".join(trace_steps(path)), flush=True)
    del m, opt; torch.cuda.empty_cache()
