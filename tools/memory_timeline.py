"""The GPU memory of one training step of the fused path, as the caching allocator saw it: a preset with
random weights (default llama-3-8b, NF4, offloaded checkpointing) trains ``--warmup`` steps, then one step is
recorded with ``torch.cuda.memory._record_memory_history``. Writes, under ``--out``:

- ``snapshot.pickle``: the allocator's snapshot with that step's history (open it at
  https://pytorch.org/memory_viz, or with ``python -m torch.cuda._memory_viz trace_plot snapshot.pickle``);
- ``summary.txt``: the step's peaks (allocated, reserved), the reserved memory per stream, what was allocated
  at the step's most allocated moment (grouped by the Python frames that allocated it), and the moments
  where the most memory was reserved but not allocated, each with what was pending (freed by Python but held
  for another stream's work, ``record_stream``) and the allocation that came then, with its Python frames.

    python tools/memory_timeline.py                                   # llama-3-8b, NF4, offload, seq 2048 x 2
    python tools/memory_timeline.py --layers 8 --seq 4096 --batch 1 --checkpointing true --bf16

The allocator's settings are the process's: ``PYTORCH_ALLOC_CONF`` when set, else expandable segments
(fastbench's default); they are written at the top of the summary.
"""
from __future__ import annotations

import argparse
import functools
import os
import pickle
import sys

GiB, MiB = 1 << 30, 1 << 20


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    p.add_argument("--bf16", action="store_true", help="a bf16 base instead of NF4")
    p.add_argument("--checkpointing", default="offload", help="true, false, offload, auto or a budget in GiB")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="steps before the recorded one")
    p.add_argument("--top", type=int, default=8, help="moments of the most reserved-but-unallocated memory")
    p.add_argument("--out", default="results/memory_timeline")
    return p.parse_args(argv)


def build(args):
    """The LoRA model of ``args`` on the GPU (random weights from seed 0), and its AdamW."""
    import dataclasses
    import warnings

    import torch

    from fastbench import FastLanguageModel
    from fastbench.fused.checkpointing import setting_from_text
    from fastbench.model import quantize_nf4
    from fastbench.presets import build_model, get_preset

    preset = get_preset(args.preset)
    if args.layers:
        preset = dataclasses.replace(preset, config={**preset.config, "num_hidden_layers": args.layers})
    model = build_model(preset, dtype=torch.bfloat16, device="cuda", seed=0)
    if not args.bf16:
        quantize_nf4(model, torch.bfloat16, "cuda")
    torch.cuda.empty_cache()  # the bf16 weights quantized away: not the step's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FastLanguageModel.get_peft_model(model, r=args.rank, use_gradient_checkpointing=setting_from_text(
            args.checkpointing), fallback=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def step(model, optimizer, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def record(args) -> dict:
    """Trains the warm-up steps, then records one step; returns the allocator's snapshot."""
    import torch

    model, optimizer = build(args)
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), device="cuda", generator=g)
               for _ in range(args.warmup + 1)]
    for ids in batches[:-1]:
        step(model, optimizer, ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")  # C++ frames: slow to read
    step(model, optimizer, batches[-1])
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    snapshot["fastbench_peaks"] = {"allocated": torch.cuda.max_memory_allocated(),
                                   "reserved": torch.cuda.max_memory_reserved()}
    return snapshot


_RESERVE = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}


def timeline(snapshot: dict, device: int = 0) -> list[dict]:
    """The recorded history replayed: for each event, the bytes allocated, reserved and pending (freed by
    Python, held for another stream's work) right after it. The state before the first event is worked back
    from the snapshot's segments (the state after the last)."""
    trace = snapshot["device_traces"][device]
    segments = [s for s in snapshot["segments"] if s.get("device", device) == device]
    reserved = sum(s["total_size"] for s in segments)
    allocated = sum(s["allocated_size"] for s in segments)
    pending = sum(b["size"] for s in segments for b in s["blocks"] if b["state"] == "active_pending_free")
    for e in trace:  # back to the start
        size, action = e["size"], e["action"]
        reserved -= _RESERVE.get(action, 0) * size
        allocated -= {"alloc": size, "free_requested": -size}.get(action, 0)
        pending -= {"free_requested": size, "free_completed": -size}.get(action, 0)
    moments = []
    for i, e in enumerate(trace):
        size, action = e["size"], e["action"]
        reserved += _RESERVE.get(action, 0) * size
        allocated += {"alloc": size, "free_requested": -size}.get(action, 0)
        pending += {"free_requested": size, "free_completed": -size}.get(action, 0)
        moments.append({"index": i, "event": e, "allocated": allocated, "reserved": reserved, "pending": pending})
    return moments


def widest_gaps(moments: list[dict], top: int) -> list[dict]:
    """The ``top`` moments of the most reserved-but-unallocated memory, one per stretch between reserved
    growths (a gap that lasts many events is one moment: its first event with the widest gap)."""
    best: dict[int, dict] = {}
    stretch = 0
    for m in moments:
        if _RESERVE.get(m["event"]["action"], 0) > 0:
            stretch += 1
        gap = m["reserved"] - m["allocated"]
        if stretch not in best or gap > best[stretch]["reserved"] - best[stretch]["allocated"]:
            best[stretch] = m
    return sorted(best.values(), key=lambda m: m["allocated"] - m["reserved"])[:top]


def live_at_peak(moments: list[dict]) -> tuple[dict, int, list[tuple[str, int, int]]]:
    """At the history's moment of the most allocated memory: (that moment, the bytes still held of what was
    allocated before the history began, [(where, bytes, blocks)] of what the history allocated and had not freed
    then, grouped by the Python frames of the allocation, largest first)."""
    peak = max(moments, key=lambda m: m["allocated"])
    live: dict = {}
    for m in moments[: peak["index"] + 1]:
        e = m["event"]
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = {}
    for e in live.values():
        group = groups.setdefault(_frames(e), [0, 0])
        group[0] += e["size"]
        group[1] += 1
    before = peak["allocated"] - sum(e["size"] for e in live.values())
    return peak, before, sorted(((k, b, n) for k, (b, n) in groups.items()), key=lambda g: -g[1])


@functools.cache
def _subpackage_roots() -> tuple[str, ...]:
    """The folders of fastbench's kernels and autotune subpackages, each with a trailing separator (under an
    editable install, folders of the checkout outside the package's own)."""
    import fastbench.autotune
    import fastbench.kernels

    return tuple(os.path.dirname(m.__file__) + os.sep for m in (fastbench.kernels, fastbench.autotune))


def _ours(filename: str) -> bool:
    """Whether a frame's file is fastbench's: its package, or its kernels and autotune subpackages."""
    return "fastbench" in filename or filename.startswith(_subpackage_roots())


def _frames(event: dict, n: int = 4) -> str:
    frames = [f for f in event.get("frames", []) if f.get("filename", "").endswith(".py")]
    ours = [f for f in frames if _ours(f["filename"])] or frames
    return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in ours[:n]) or "(no frames)"


def summary(snapshot: dict, top: int = 8, settings: str = "") -> str:
    moments = timeline(snapshot)
    peaks = snapshot.get("fastbench_peaks", {})
    lines = [f"allocator settings: {settings or '(defaults)'}"]
    if peaks:
        lines.append(f"step peaks: allocated {peaks['allocated'] / GiB:.2f} GiB, reserved {peaks['reserved'] / GiB:.2f} "
                     f"GiB ({(peaks['reserved'] - peaks['allocated']) / GiB:.2f} GiB more)")
    if moments:
        high = max(moments, key=lambda m: m["reserved"])
        lines.append(f"highest reserved in the history: {high['reserved'] / GiB:.2f} GiB at event {high['index']} "
                     f"(allocated then {high['allocated'] / GiB:.2f} GiB, pending {high['pending'] / GiB:.2f} GiB)")
    by_stream: dict = {}
    for s in snapshot["segments"]:
        by_stream.setdefault(s["stream"], [0, 0])
        by_stream[s["stream"]][0] += s["total_size"]
        by_stream[s["stream"]][1] += s["allocated_size"]
    lines.append("reserved per stream at the end: " + ", ".join(
        f"stream {k}: {r / GiB:.2f} GiB ({a / GiB:.2f} allocated)" for k, (r, a) in sorted(by_stream.items())))
    if moments:
        peak, before, groups = live_at_peak(moments)
        lines.append(f"\nat the most allocated moment (event {peak['index']}, {peak['allocated'] / GiB:.2f} GiB): "
                     f"{before / GiB:.2f} GiB allocated before the step and held; the step's own, by where it was "
                     f"allocated ({top} largest):")
        lines += [f"- {size / MiB:,.1f} MiB in {blocks} block{'s' * (blocks > 1)}: {where}"
                  for where, size, blocks in groups[:top]]
    lines.append(f"\nthe {top} moments of the most reserved but unallocated memory:")
    for m in widest_gaps(moments, top):
        e = m["event"]
        lines.append(f"- event {m['index']}: reserved {m['reserved'] / GiB:.2f} GiB, allocated {m['allocated'] / GiB:.2f}, "
                     f"gap {(m['reserved'] - m['allocated']) / MiB:,.0f} MiB (pending frees {m['pending'] / MiB:,.0f} "
                     f"MiB); {e['action']} of {e['size'] / MiB:,.1f} MiB on stream {e.get('stream')}: {_frames(e)}")
    return "\n".join(lines) + "\n"


def write_atomically(path: str, data: bytes) -> None:
    from fastbench.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def main(argv=None) -> int:
    args = parse(argv)
    from fastbench.memory import use_expandable_segments

    use_expandable_segments()  # before CUDA starts, unless PYTORCH_ALLOC_CONF says otherwise
    import torch

    if not torch.cuda.is_available():
        print("memory_timeline needs a CUDA GPU", file=sys.stderr)
        return 2
    snapshot = record(args)
    os.makedirs(args.out, exist_ok=True)
    write_atomically(os.path.join(args.out, "snapshot.pickle"), pickle.dumps(snapshot))
    text = summary(snapshot, args.top, os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    header = (f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}, {'bf16' if args.bf16 else 'NF4'}, "
              f"checkpointing {args.checkpointing}, seq {args.seq} x batch {args.batch}, one step after {args.warmup}\n")
    write_atomically(os.path.join(args.out, "summary.txt"), (header + text).encode())
    print(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
