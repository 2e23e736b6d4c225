# Where the host waits in pipelined steps: steps issued back to back (no sync between them, as the harness times
# them), the host's time to issue each phase (perf_counter: forward, backward, optimizer step) beside the step's GPU
# time (CUDA events), and a CUDA-only trace of 3 pipelined steps (kernel time against span), with the all-ones attention mask (base) and without it (no-mask). A phase whose host time far
# exceeds its issue time from an idle GPU (printed first) holds a wait for the GPU. argv: arm model
import statistics, sys, time, warnings, torch
sys.path.insert(0, "tools")
warnings.simplefilter("ignore")
import os, tempfile
from probe_step import build, compute_stream_kernels, load_trace, random_batch
arm, model = sys.argv[1], sys.argv[2]
m, opt = build(arm, model)
full = random_batch(m)
variants = {"base": full, "no-mask": {k: v for k, v in full.items() if k != "attention_mask"}}

def step(batch):
    t0 = time.perf_counter(); loss = m(**batch).loss
    t1 = time.perf_counter(); loss.backward()
    t2 = time.perf_counter(); opt.step(); opt.zero_grad(set_to_none=True)
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3

for name, batch in variants.items():
    for _ in range(3): step(batch)
    torch.cuda.synchronize()
    idle = []
    for _ in range(4):
        idle.append(step(batch)); torch.cuda.synchronize()
    piped, ev = [], [torch.cuda.Event(enable_timing=True) for _ in range(9)]
    ev[0].record()
    for i in range(8):
        piped.append(step(batch)); ev[i + 1].record()
    torch.cuda.synchronize()
    med = lambda rows, j: statistics.median(r[j] for r in rows)
    gpu = statistics.median(ev[i].elapsed_time(ev[i + 1]) for i in range(1, 8))
    print(f"{arm} {model} {name}: host ms fwd/bwd/opt from an idle GPU {med(idle, 0):.1f}/{med(idle, 1):.1f}/{med(idle, 2):.1f}; "
          f"pipelined {med(piped[1:], 0):.1f}/{med(piped[1:], 1):.1f}/{med(piped[1:], 2):.1f}; GPU step {gpu:.1f}")
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(3): step(batch)
        torch.cuda.synchronize()
    p.export_chrome_trace(path)
    ks = compute_stream_kernels(load_trace(path))
    span, busy = (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 3e3, sum(k["dur"] for k in ks) / 3e3
    print(f"  CUDA-only trace, 3 pipelined steps: kernels {busy:.1f} ms a step over {span:.1f} ms (idle {span - busy:.1f})", flush=True)
