"""Probe: what bounds the fused step, its host or its GPU, and in which phase? Adds known work to one side at a
time and measures how much of it the step absorbs: a busy-wait of S us on the host at every recomputed unit's
forward (the forward's host thread) or backward (autograd's thread), or a GPU sleep kernel of S us queued there.
A slope near 1 (the step grows by the work added) says that side is the bound in that phase; near 0, that side
has at least that much slack. Steps run as the harness's worker runs them (pipelined, CUDA events between steps,
the loss summed on the device, an all-ones attention mask: its flags read back at the first attention); one
more variant passes no mask (no read-back).

    python 2026-12-04-h200-step-bound-probe.py MODEL ARM ROUNDS STEPS SPIN_US OUT.json
"""
import json
import statistics
import sys
import time
import os

sys.path.insert(0, os.path.join(os.getcwd(), "tools"))
import torch  # noqa: E402
import warnings  # noqa: E402

warnings.simplefilter("ignore")
from probe_step import build, random_batch  # noqa: E402
from fastbench.fused.checkpointing.recompute import RecomputedUnit  # noqa: E402

model_name, arm, rounds, steps, spin_us, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    float(sys.argv[5]), sys.argv[6]
model, opt = build(arm, model_name)
batch = random_batch(model)
nomask = {k: v for k, v in batch.items() if k != "attention_mask"}

# calibrate the sleep kernel: cycles per us
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda._sleep(1_000_000)
rates = []
for _ in range(5):
    s.record(); torch.cuda._sleep(2_000_000); e.record(); e.synchronize()
    rates.append(2_000_000 / (s.elapsed_time(e) * 1e3))
cycles_per_us = statistics.median(rates)

mode = {"where": None, "units": 0}
fwd, bwd = RecomputedUnit.forward, RecomputedUnit.backward


def spin(us):
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def add(phase):
    where = mode["where"]
    if where == f"host_{phase}":
        spin(spin_us)
    elif where == f"gpu_{phase}":
        torch.cuda._sleep(int(spin_us * cycles_per_us))


def forward(ctx, *args):
    mode["units"] += 1
    add("fwd")
    return fwd(ctx, *args)


def backward(ctx, *args):
    add("bwd")
    return bwd(ctx, *args)


RecomputedUnit.forward, RecomputedUnit.backward = staticmethod(forward), staticmethod(backward)


def block(b, n):
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    total = torch.zeros((), device="cuda")
    torch.cuda.synchronize()
    events[0].record()
    for i in range(n):
        loss = model(**b).loss
        loss.backward()
        total = total + loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        events[i + 1].record()
    torch.cuda.synchronize()
    return statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(n))


for _ in range(3):
    block(batch, 2)
mode["units"] = 0
block(batch, 1)
units = mode["units"]
variants = ["base", "host_fwd", "host_bwd", "gpu_fwd", "gpu_bwd", "nomask"]
ms = {v: [] for v in variants}
t0 = time.time()
for r in range(rounds):
    order = variants if r % 2 == 0 else variants[::-1]
    for v in order:
        mode["where"] = v
        ms[v].append(block(nomask if v == "nomask" else batch, steps))
    mode["where"] = None
    print(f"round {r}: " + ", ".join(f"{v} {ms[v][-1]:.1f}" for v in variants), flush=True)
med = {v: statistics.median(x) for v, x in ms.items()}
added = units * spin_us / 1e3
summary = {"model": model_name, "arm": arm, "units_per_step": units, "spin_us": spin_us, "added_ms_per_step": added,
           "cycles_per_us": cycles_per_us, "median_ms": med, "rounds_ms": ms,
           "slope": {v: (med[v] - med["base"]) / added for v in variants[1:5]},
           "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF"), "seconds": time.time() - t0}
print(json.dumps({k: summary[k] for k in ("model", "arm", "units_per_step", "added_ms_per_step", "median_ms", "slope")}))
json.dump(summary, open(out, "w"), indent=1)
