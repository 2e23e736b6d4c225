# What the pipelined steps' idle time is made of: one model, steps timed back to back (CUDA events, no sync between
# steps) under variants interleaved round by round: base (all-ones attention mask, as the harness passes), gc-off
# (Python's garbage collector disabled), no-mask (the batch without attention_mask: no mask flags read back, so no
# drain of the queue at the first attention), both. Also the host's time to issue each step. argv: arm model
import gc, statistics, sys, time, warnings, torch
sys.path.insert(0, "tools")
warnings.simplefilter("ignore")
from probe_step import build, random_batch, train_step
arm, model = sys.argv[1], sys.argv[2]
m, opt = build(arm, model)
full = random_batch(m)
nomask = {k: v for k, v in full.items() if k != "attention_mask"}
variants = {"base": (full, False), "gc-off": (full, True), "no-mask": (nomask, False), "no-mask+gc-off": (nomask, True)}
gpu, host = {v: [] for v in variants}, {v: [] for v in variants}
for r in range(4):
    for name, (batch, gc_off) in variants.items():
        gc.collect()
        if gc_off: gc.disable()
        for _ in range(2): train_step(m, opt, batch)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(9)]
        ev[0].record(); t = [time.perf_counter()]
        for i in range(8):
            train_step(m, opt, batch); ev[i + 1].record(); t.append(time.perf_counter())
        torch.cuda.synchronize()
        gc.enable()
        gpu[name] += [ev[i].elapsed_time(ev[i + 1]) for i in range(1, 8)]  # the first step starts from an idle GPU
        host[name] += [(t[i + 1] - t[i]) * 1e3 for i in range(1, 8)]
print(f"{arm} {model}: 4 rounds x 7 pipelined steps per variant (ms a step: median, min, max; host issue median)")
for name in variants:
    g = sorted(gpu[name])
    print(f"  {name:16s} {statistics.median(g):7.1f} {g[0]:7.1f} {g[-1]:7.1f}   host {statistics.median(host[name]):7.1f}")
