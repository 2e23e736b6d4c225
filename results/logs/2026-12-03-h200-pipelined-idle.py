# The compute stream's idle time in pipelined steps (as the harness times them: no sync between steps), from a
# CUDA-only profiler trace of 4 steps after warm-up, with the gaps summed by the kernels around them; and the
# steps' time without the profiler (CUDA events). argv: arm model [gc-off: Python's garbage collector disabled after
# the build]
import collections, os, re, sys, tempfile, warnings, torch
sys.path.insert(0, "tools")
warnings.simplefilter("ignore")
from probe_step import build, compute_stream_kernels, load_trace, random_batch, train_step
arm, model = sys.argv[1], sys.argv[2]
m, opt = build(arm, model)
batch = random_batch(m)
if sys.argv[3:] == ["gc-off"]:
    import gc; gc.collect(); gc.disable()
print("allocator:", os.environ.get("PYTORCH_ALLOC_CONF", "(default)"), "| gc:", "off" if sys.argv[3:] else "on")
for _ in range(4): train_step(m, opt, batch)
torch.cuda.synchronize()
ev = [torch.cuda.Event(enable_timing=True) for _ in range(9)]
ev[0].record()
for i in range(8):
    train_step(m, opt, batch); ev[i + 1].record()
torch.cuda.synchronize()
times = sorted(ev[i].elapsed_time(ev[i + 1]) for i in range(8))
print(f"{arm} {model}: 8 pipelined steps without the profiler: median {times[4]:.1f} ms, min {times[0]:.1f}, max {times[-1]:.1f}")
path = os.path.join(tempfile.mkdtemp(), "trace.json")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
    for _ in range(4): train_step(m, opt, batch)
    torch.cuda.synchronize()
p.export_chrome_trace(path)
ks = compute_stream_kernels(load_trace(path))
span = (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 1e3
busy = sum(k["dur"] for k in ks) / 1e3
print(f"4 pipelined steps, CUDA-only trace: compute stream kernels {busy / 4:.1f} ms a step over {span / 4:.1f} ms "
      f"(idle {(span - busy) / 4:.1f} ms a step)")
short = lambda n: re.sub(r"<.*", "", n)[:60]
gaps = collections.defaultdict(list)
for a, b in zip(ks, ks[1:]):
    g = b["ts"] - (a["ts"] + a["dur"])
    if g > 3:
        gaps[(short(a["name"]), short(b["name"]))].append(g)
print(f"gaps > 3 us: {sum(len(v) for v in gaps.values()) / 4:.0f} a step, {sum(sum(v) for v in gaps.values()) / 4e3:.1f} ms a step; largest by the kernels around them (ms a step, count a step, max us):")
for (a, b), v in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:25]:
    print(f"  {sum(v) / 4e3:6.2f} ms {len(v) / 4:6.1f}x max {max(v):8.1f} us  {a}  ->  {b}")
