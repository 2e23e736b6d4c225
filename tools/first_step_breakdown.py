"""Probe: where a fused arm's first training step spends its time, beside its second step (GPU).

One process on an arm given as ``bits:ckpt`` (tools/probe_step.py), llama-3-8b by default, seq 2048 x batch 2.
With ``--evict`` it first drops from the page cache every file the step may read (the Python packages on
sys.path with their shared libraries, the CUDA driver's libraries, the Triton and fastbench caches) with
``posix_fadvise(DONTNEED)``, before torch is imported: the state of a freshly started machine whose disk has not
been read yet, repeatable within one machine. Then it times the imports, the build (load, quantization, LoRA;
with cuDNN's attention compiled meanwhile unless ``--warmup-attention off``), optionally a warm-up
(``--prewarm tiny``: forward and backward of one row of 64 tokens, no optimizer step), and the first and second
steps phase by phase (forward, backward, optimizer), the GPU synchronised after each phase. Run it under
``py-spy record --native`` to see what the first step's time is spent on.

    python tools/first_step_breakdown.py 4bit:offload --evict --out first.json     # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def evict_page_cache(paths: list[str]) -> tuple[int, int]:
    """Asks the kernel to drop the cached pages of every regular file under ``paths``; (files, bytes)."""
    files = size = 0
    for top in paths:
        for root, _, names in os.walk(top):
            for name in names:
                path = os.path.join(root, name)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    size += os.fstat(fd).st_size
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    files += 1
                except OSError:
                    pass
                finally:
                    os.close(fd)
    return files, size


def read_paths() -> list[str]:
    """The directories a training process reads its code and kernels from."""
    home = os.path.expanduser("~")
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    paths += [os.environ.get("TRITON_CACHE_DIR", os.path.join(home, ".triton")), os.path.join(home, ".cache")]
    paths += ["/usr/lib/x86_64-linux-gnu", "/usr/local/cuda/lib64"]
    return sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arm", nargs="?", default="4bit:offload", help="bits:ckpt (default 4bit:offload)")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, help="the preset with this many decoder layers (random weights)")
    p.add_argument("--only-first", action="store_true", help="stop after the first step (for a sampling profiler)")
    p.add_argument("--evict", action="store_true", help="drop the page cache of what the step reads first")
    p.add_argument("--prewarm", choices=("none", "tiny"), default="none")
    p.add_argument("--warmup-attention", choices=("on", "off"), default="on",
                   help="compile cuDNN's attention while the model loads (from_pretrained's warmup_attention)")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test on a -tiny preset")
    p.add_argument("--out", help="append the figures as one JSON line here")
    args = p.parse_args(argv)

    row: dict = {"arm": args.arm, "model": args.model, "layers": args.layers, "seq": args.seq, "batch": args.batch,
                 "evict": args.evict, "prewarm": args.prewarm, "warmup_attention": args.warmup_attention,
                 "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF")}
    t0 = time.perf_counter()
    if args.evict:
        files, size = evict_page_cache(read_paths())
        row.update(evicted_files=files, evicted_gib=round(size / 2**30, 2), evict_s=round(time.perf_counter() - t0, 2))

    def lap(key: str, start: float) -> float:
        now = time.perf_counter()
        row[key] = round(now - start, 3)
        return now

    t = time.perf_counter()
    import torch
    t = lap("import_torch_s", t)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # probe_step, beside this file
        sys.path.insert(0, here)
    from probe_step import build, preset_with_layers, random_batch

    import fastbench.kernels
    t = lap("import_fastbench_s", t)
    row["fastbench_kernels"] = os.path.dirname(os.path.realpath(fastbench.kernels.__file__))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with preset_with_layers(args.model, args.layers) as model_name:
        model, optimizer = build(args.arm, model_name, args.device, warmup_attention=args.warmup_attention == "on")
    sync()
    t = lap("build_s", t)
    batch = random_batch(model, args.seq, args.batch)
    if args.prewarm == "tiny":
        tiny = random_batch(model, 64, 1)
        model(**tiny).loss.backward()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t = lap("prewarm_s", t)

    def phases(prefix: str) -> None:
        start = time.perf_counter()
        loss = model(**batch).loss
        sync()
        s = lap(f"{prefix}_forward_s", start)
        loss.backward()
        sync()
        s = lap(f"{prefix}_backward_s", s)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        lap(f"{prefix}_optimizer_s", s)
        row[f"{prefix}_step_s"] = round(time.perf_counter() - start, 3)

    phases("first")
    if not args.only_first:
        phases("second")
    row["process_s"] = round(time.perf_counter() - t0, 2)
    if args.device.startswith("cuda"):
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
