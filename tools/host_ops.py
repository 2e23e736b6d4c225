"""Probe: where the host's time to issue a training step goes, on the GPU machine. llama-3-8b arms given as
bits:ckpt (e.g. 4bit:offload), all-ones attention_mask as the harness passes. Per arm: 3 warm-up steps, the
host issue time of 4 plain steps (perf_counter around each step's calls, no synchronisation inside), then 2
steps under torch.profiler with CPU activity only (the profiler's own cost inflates each op by a few
microseconds, so shares matter more than totals): self CPU time by op (top 25), by fastbench source line
that called it (top 25, from the Python stack), and the count of kernel launches (cudaLaunchKernel,
cuLaunchKernel, cudaMemcpyAsync) per step."""
import collections, sys, time, warnings, torch
warnings.simplefilter("ignore")
from probe_step import build, random_batch, train_step

for arg in sys.argv[1:]:
    m, opt = build(arg)
    batch = random_batch(m)

    def step():
        train_step(m, opt, batch)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    issue = []
    for _ in range(4):
        t = time.perf_counter(); step(); issue.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    print(f"{arg}: host issue ms per step {[round(x, 1) for x in issue]}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.events()
    by_op = collections.Counter()
    by_site = collections.Counter()
    launches = collections.Counter()
    for e in events:
        by_op[e.name] += e.self_cpu_time_total / 2e3  # ms per step
        if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync"):
            launches[e.name] += 0.5
        site = next((f for f in (e.stack or []) if "fastbench" in f or "/kernels/" in f), None)
        if site is not None:
            by_site[site.split("/work/")[-1].split("site-packages/")[-1]] += e.self_cpu_time_total / 2e3
    total = sum(by_op.values())
    print(f"  profiled: {total:.1f} ms of self CPU time per step; launches per step: {dict(launches)}")
    print("  by op (ms per step):")
    for name, ms in by_op.most_common(25):
        print(f"    {ms:8.2f}  {name[:100]}")
    print("  by fastbench source line (ms per step, self time of the ops it called):")
    for site, ms in by_site.most_common(25):
        print(f"    {ms:8.2f}  {site[:110]}")
    sys.stdout.flush()
    del m, opt; torch.cuda.empty_cache()
