"""Probe: is the step bound by the host or by the GPU, and where does the GPU wait for its host?
llama-3-8b arms given as bits:ckpt (e.g. 4bit:offload 4bit:40), all-ones attention_mask as the harness passes.
Per arm: 3 warm-up steps; per phase (forward, backward, optimizer) of 4 steps started from an idle GPU, the
host's time to issue it and the GPU's time to run it (CUDA events); then one step under torch.profiler, whose
trace gives the compute stream's kernel time, its idle time, and each idle gap > 5 us charged to the phase and
the innermost host op that launched the kernel ending the gap, when that launch came after the gap began
(the GPU was waiting for the host). ``--pipelined N``: the trace is of N steps issued one after another without
waiting for the GPU in between (as ``fastbench compare`` times them), its figures per step.

    python tools/gpu_gaps.py 4bit:offload bf16:auto [--pipelined 3]"""
import argparse, bisect, collections, os, sys, tempfile, time, warnings, torch
warnings.simplefilter("ignore")
from probe_step import build, compute_stream_kernels, kernel_time_by_stream, load_trace, random_batch


def phases(m, opt, batch, sync=True):
    """One step, each phase under record_function; returns [(name, host_ms, gpu_ms)], or nothing without
    ``sync`` (the step only issued, the GPU not waited for)."""
    if sync:
        torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    host = []
    ev[0].record(); t = time.perf_counter()
    with torch.profiler.record_function("PHASE_fwd"):
        loss = m(**batch).loss
    ev[1].record(); host.append(time.perf_counter() - t); t = time.perf_counter()
    with torch.profiler.record_function("PHASE_bwd"):
        loss.backward()
    ev[2].record(); host.append(time.perf_counter() - t); t = time.perf_counter()
    with torch.profiler.record_function("PHASE_opt"):
        opt.step(); opt.zero_grad(set_to_none=True)
    ev[3].record(); host.append(time.perf_counter() - t)
    if not sync:
        return None
    torch.cuda.synchronize()
    return [(n, h * 1e3, ev[i].elapsed_time(ev[i + 1])) for i, (n, h) in enumerate(zip(("fwd", "bwd", "opt"), host))]


def gaps(trace_path, steps=1):
    tr = load_trace(trace_path)
    streams = kernel_time_by_stream(tr)
    compute = streams.most_common(1)[0][0]
    ks = compute_stream_kernels(tr)
    # runtime launches (cuBLAS, PyTorch's kernels) and driver launches (Triton's cuLaunchKernel) both count:
    # without the driver's, the gap before every Triton kernel would go unexplained
    launches = {e["args"]["correlation"]: e for e in tr
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = sorted((e for e in tr if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X"), key=lambda e: e["ts"])
    phase_ranges = [(e["name"][6:], e["ts"], e["ts"] + e["dur"]) for e in ops if e["name"].startswith("PHASE_")]
    by_tid = collections.defaultdict(list)
    for e in ops:
        if not e["name"].startswith("PHASE_"):
            by_tid[e["tid"]].append(e)
    starts = {tid: [e["ts"] for e in es] for tid, es in by_tid.items()}
    top = {}  # per thread, the ops no other op contains
    for tid, es in by_tid.items():
        top[tid] = []
        for e in es:
            if not top[tid] or e["ts"] >= top[tid][-1]["ts"] + top[tid][-1]["dur"]:
                top[tid].append(e)
    top_starts = {tid: [e["ts"] for e in es] for tid, es in top.items()}

    def outermost(launch):
        i = bisect.bisect_right(top_starts.get(launch["tid"], []), launch["ts"]) - 1
        return top[launch["tid"]][i]["name"] if i >= 0 else "?"

    def innermost(launch):
        """The latest-starting op on the launching thread that still contains the launch: the innermost."""
        es, ts = by_tid.get(launch["tid"], []), launch["ts"]
        i = bisect.bisect_right(starts.get(launch["tid"], []), ts)
        for e in reversed(es[max(0, i - 5000):i]):
            if e["ts"] + e["dur"] >= ts:
                return e["name"]
        return "?"

    def phase(ts):
        return next((n for n, a, b in phase_ranges if a <= ts <= b), "between")

    busy = sum(k["dur"] for k in ks) / 1e3 / steps
    span = (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 1e3 / steps
    idle_host = collections.Counter(); idle_other = collections.Counter(); by_op = collections.Counter()
    by_outer = collections.Counter()
    count = collections.Counter()
    for prev, k in zip(ks, ks[1:]):
        gap = k["ts"] - (prev["ts"] + prev["dur"])
        if gap <= 5:
            continue
        launch = launches.get(k["args"].get("correlation"))
        ph = phase(launch["ts"]) if launch else "?"
        if launch and launch["ts"] + launch["dur"] > prev["ts"] + prev["dur"]:
            idle_host[ph] += gap / 1e3 / steps
            by_op[(ph, innermost(launch))] += gap / 1e3 / steps
            by_outer[(ph, outermost(launch))] += gap / 1e3 / steps
            count[ph] += 1 / steps
        else:
            idle_other[ph] += gap / 1e3 / steps
    per = "" if steps == 1 else f" (a step, the mean of {steps} pipelined steps)"
    print(f"  compute stream {compute}: kernels {busy:.1f} ms over a span of {span:.1f} ms{per}; other streams "
          + ", ".join(f"{s}: {d / 1e3 / steps:.1f} ms" for s, d in streams.items() if s != compute))
    for ph in ("fwd", "bwd", "opt", "between", "?"):
        if idle_host[ph] or idle_other[ph]:
            print(f"  {ph}: GPU waited for the host {idle_host[ph]:.1f} ms ({count[ph]:.0f} gaps), other idle {idle_other[ph]:.1f} ms")
    print("  largest host waits by (phase, launching op):")
    for (ph, name), ms in by_op.most_common(14):
        print(f"    {ms:7.2f} ms  {ph}  {name[:110]}")
    print("  largest host waits by (phase, outermost host op):")
    for (ph, name), ms in by_outer.most_common(10):
        print(f"    {ms:7.2f} ms  {ph}  {name[:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="+", help="bits:ckpt, e.g. 4bit:offload bf16:auto")
    ap.add_argument("--pipelined", type=int, default=0, metavar="N",
                    help="trace N steps issued back to back (default: one step from an idle GPU)")
    args = ap.parse_args()
    for arg in args.arms:
        m, opt = build(arg)
        batch = random_batch(m)
        for _ in range(3):
            phases(m, opt, batch)
        rows = [phases(m, opt, batch) for _ in range(4)]
        print(f"{arg}: per phase, host issue / GPU run ms (4 steps from an idle GPU, median):")
        for i, name in enumerate(("fwd", "bwd", "opt")):
            h = sorted(r[i][1] for r in rows); g = sorted(r[i][2] for r in rows)
            print(f"  {name}: host {(h[1] + h[2]) / 2:.1f}  GPU {(g[1] + g[2]) / 2:.1f}")
        path = os.path.join(tempfile.gettempdir(), f"trace-{arg.replace(':', '-')}.json")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            if args.pipelined:
                torch.cuda.synchronize()
                for _ in range(args.pipelined):
                    phases(m, opt, batch, sync=False)
                torch.cuda.synchronize()
            else:
                phases(m, opt, batch)
        prof.export_chrome_trace(path)
        gaps(path, max(1, args.pipelined))
        sys.stdout.flush()
        del m, opt; torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
