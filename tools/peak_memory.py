"""Probe: when in a step the peak of allocated GPU memory falls, and what is allocated then.
Arms given as [MODEL/]bits:ckpt[@SEQxBATCH] (e.g. 4bit:offload, mistral-7b/4bit:offload, 4bit:offload@16384x1;
llama-3-8b and seq 2048 x batch 2 when not given), all-ones attention_mask as the harness passes. Per arm:
2 warm-up steps, then one step with torch.cuda.memory's allocation history recorded; replaying it (alloc adds a
block, free_completed removes it) from memory_allocated() at the step's start gives the peak and the blocks alive
then, each named by its innermost frame in fastbench/kernels (else the innermost frame with a file name).
Whatever is not freed between steps (weights, LoRA, optimizer state, the host-offload bookkeeping) is the
baseline; the rest is the step's own."""
import collections, sys, warnings, torch
warnings.simplefilter("ignore")
from probe_step import build, random_batch, train_step

MiB = 1 << 20


def where(frames):
    names = [f for f in frames if f.get("filename")]
    ours = [f for f in names if "fastbench" in f["filename"] or "/kernels/" in f["filename"]]
    f = (ours or names or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{f['filename'].split('/site-packages/')[-1].split('/work/')[-1]}:{f['line']} {f['name']}"


def replay(events, start):
    """(peak bytes, index of the event that reached it, {addr: (size, site, index)} alive then)."""
    live, now, peak, at, peak_live = {}, start, start, 0, {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", [])), i)
            now += e["size"]
            if now > peak:
                peak, at, peak_live = now, i, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            now -= live.pop(e["addr"])[0]
    return peak, at, peak_live


for arg in sys.argv[1:]:
    arm, _, shape = arg.partition("@")
    model, _, arm = arm.rpartition("/")
    seq, batch_size = map(int, (shape or "2048x2").split("x"))
    m, opt = build(arm, model or "llama-3-8b")
    batch = random_batch(m, seq, batch_size)

    def step():
        train_step(m, opt, batch)

    for _ in range(2):
        step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    peak, at, peak_live = replay(events, start)
    print(f"{arg}: baseline {start / 2**30:.2f} GiB; step's peak {peak / 2**30:.2f} GiB (replayed), torch's "
          f"max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; peak at event {at} of {len(events)} "
          f"({100 * at / max(1, len(events)):.0f}% through the step's allocations)")
    groups = collections.defaultdict(lambda: [0, 0])
    for size, site, _ in peak_live.values():
        groups[site][0] += size; groups[site][1] += 1
    print(f"  alive at the peak beyond the baseline: {sum(g[0] for g in groups.values()) / MiB:.0f} MiB in {len(peak_live)} blocks")
    for site, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:16]:
        print(f"    {size / MiB:8.1f} MiB  {n:4d} blocks  {site}")
    sys.stdout.flush()
    del m, opt; torch.cuda.empty_cache()
