# One profiled step of an arm (bits:ckpt) on a preset: kernels on the compute stream by name (count, total, mean),
# by region, and the compute stream's idle time; argv: arm model
import collections, os, sys, tempfile, warnings, torch
sys.path.insert(0, "tools")
warnings.simplefilter("ignore")
from probe_step import build, compute_stream_kernels, load_trace, random_batch, train_step
from fastbench.bench.profile import classify
arm, model = sys.argv[1], sys.argv[2]
m, opt = build(arm, model)
batch = random_batch(m)
for _ in range(4): train_step(m, opt, batch)
torch.cuda.synchronize()
path = os.path.join(tempfile.mkdtemp(), "trace.json")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as p:
    train_step(m, opt, batch); torch.cuda.synchronize()
p.export_chrome_trace(path)
ks = compute_stream_kernels(load_trace(path))
span = (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 1e3
busy = sum(k["dur"] for k in ks) / 1e3
print(f"{arm} {model}: compute stream kernels {busy:.1f} ms over {span:.1f} ms (idle {span - busy:.1f}), {len(ks)} kernels")
by_name = collections.defaultdict(list)
for k in ks: by_name[k["name"]].append(k["dur"])
regions = collections.Counter()
for n, d in by_name.items(): regions[classify(n)] += sum(d) / 1e3
print("regions:", {r: round(v, 1) for r, v in regions.most_common()})
for n, d in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:45]:
    print(f"{sum(d) / 1e3:8.2f} ms {len(d):5d}x {sum(d) / len(d):8.1f} us  {classify(n):11s} {n[:150]}")
