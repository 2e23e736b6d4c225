# Where the step's small kernels come from: one step (after warm-up) under torch.profiler with CPU and CUDA activity,
# shapes and Python stacks; each kernel charged to the op that launched it. Printed: kernels by (kernel, op, input
# shapes, the innermost fastbench/kernels source line), the largest total first, skipping the products and attention
# kernels that run longer than 60 us on average. argv: arm model
import collections, re, sys, warnings, torch
sys.path.insert(0, "tools")
warnings.simplefilter("ignore")
from probe_step import build, random_batch, train_step
arm, model = sys.argv[1], sys.argv[2]
m, opt = build(arm, model)
batch = random_batch(m)
for _ in range(3): train_step(m, opt, batch)
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                            record_shapes=True, with_stack=True) as p:
    train_step(m, opt, batch); torch.cuda.synchronize()
total, count = collections.Counter(), collections.Counter()
for e in p.events():
    for k in getattr(e, "kernels", []) or []:
        src = next((f for f in (e.stack or []) if "/fastbench/" in f or "/kernels/" in f), "?")
        src = re.sub(r".*/(fastbench|kernels)/", r"\1/", src)
        key = (re.sub(r"<.*", "", k.name)[:50], e.name, str(e.input_shapes)[:90], src[:90])
        total[key] += k.duration; count[key] += 1
launches = sum(count.values())
print(f"{arm} {model}: {launches} kernels in one step")
rows = [(key, total[key], count[key]) for key in total if total[key] / count[key] < 60]
for key, us, n in sorted(rows, key=lambda r: -r[1])[:45]:
    print(f"{us / 1e3:6.2f} ms {n:5d}x {us / n:6.1f} us | " + " | ".join(key))
