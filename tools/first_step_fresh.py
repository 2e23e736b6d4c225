"""Probe: load time and first-step time of a fused arm on a fresh machine, with the shipped compiled kernels
installed and without.

Each run is one harness worker process (`python -m fastbench.bench.worker`, as `fastbench compare` starts them)
with an EMPTY temporary Triton cache (TRITON_CACHE_DIR) and fastbench autotune cache (FASTBENCH_CACHE_DIR). With
`--compiled-cache on` the fused path installs this GPU's archive (fastbench.autotune.compiled_cache) into that
cache as the model is made, so the first step should load its kernels; `off` sets FASTBENCH_COMPILED_CACHE=off,
so every kernel the first step needs is compiled by it. The preset's random-weight checkpoint is written once
beforehand (fastbench.bench.checkpoint_cache), so no run writes it. One warm-up step (the first step) and
--steps timed steps per run.

Printed and written as JSON (--out) per run: load_s (the worker's load time: the arm's imports and build: load,
quantization, LoRA and the archive's installation), first_step_s, first_step_compiles (Triton cache entries the
first step added: kernels and their launchers), step_s (the later steps), compiled_cache (what the worker
installed: archive, entries, installed, skipped_reason), alloc_env (the allocator settings the worker ran under),
triton_cache_entries (in the run's Triton cache at its end), process_s (the whole worker process, the
interpreter's start included), load_plus_first_step_s.

`--baseline unsloth-qlora` also runs that arm (if installed) the same way, for its load and first-step times.

    python tools/first_step_fresh.py --out first_step.json          # GPU; llama-3-8b fused-4bit:ckpt=offload
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SETTINGS = ("off", "on")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Needs a CUDA GPU. Takes about 2 minutes on an H200 for llama-3-8b (the "
                                       "first call also writes the preset's checkpoint, ~16 GB, to the temp dir).")
    p.add_argument("--model", default="llama-3-8b", help="preset or checkpoint directory (default: llama-3-8b)")
    p.add_argument("--arm", default="fused-4bit:ckpt=offload",
                   help="fused arm label (default: fused-4bit:ckpt=offload)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps after the first (default: 2)")
    p.add_argument("--compiled-cache", default="off,on",
                   help="shipped compiled kernels off and/or on, runs in this order (default: off,on)")
    p.add_argument("--baseline", action="append", default=[],
                   help="another arm label to run the same way (e.g. unsloth-qlora), for its load time")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test with a -tiny preset "
                                                     "under TRITON_INTERPRET=1 (nothing compiles on a CPU)")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds per worker process (default: 400)")
    p.add_argument("--out", help="write the runs as JSON here")
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.compiled_cache.split(",") if s.strip()]
    if not args.settings or any(s not in SETTINGS for s in args.settings):
        p.error(f"--compiled-cache {args.compiled_cache!r}: write off, on, off,on or on,off")
    return args


def _entries(directory: str) -> int:
    return len(os.listdir(directory)) if os.path.isdir(directory) else 0


def run_one(label: str, setting: str | None, args) -> dict:
    """One worker process on fresh caches (``setting``: the compiled cache on or off; None for a baseline arm);
    the record's figures that matter here."""
    from fastbench.autotune.compiled_cache import OFF_ENV
    from fastbench.bench.arms import RunConfig

    config = RunConfig(model=args.model, seq_len=args.seq_len, batch=args.batch, steps=args.steps, warmup=1,
                       device=args.device)
    with tempfile.TemporaryDirectory(prefix="first-step-") as tmp:
        triton_cache, fastbench_cache = os.path.join(tmp, "triton"), os.path.join(tmp, "fastbench")
        spec, out = os.path.join(tmp, "spec.json"), os.path.join(tmp, "record.json")
        with open(spec, "w") as f:
            json.dump({"arm": label, "repeat": 0, "config": config.to_dict()}, f)
        env = {**os.environ, "TRITON_CACHE_DIR": triton_cache, "FASTBENCH_CACHE_DIR": fastbench_cache}
        env.pop(OFF_ENV, None)
        if setting == "off":
            env[OFF_ENV] = "off"
        t0 = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "fastbench.bench.worker", spec, out], env=env,
                                  capture_output=True, text=True, timeout=args.timeout)
            problem = None if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"
        except subprocess.TimeoutExpired:
            problem = f"timed out after {args.timeout:g} s"
        row = {"arm": label, "compiled_cache_setting": setting, "process_s": round(time.perf_counter() - t0, 2),
               "triton_cache_entries": _entries(triton_cache)}
        if problem is not None or not os.path.exists(out):
            return {**row, "status": "error", "error": problem or "no record written"}
        with open(out) as f:
            record = json.load(f)
    keys = ("status", "error", "load_s", "materialize_s", "first_step_s", "first_step_compiles", "step_s",
            "peak_reserved_gib", "compiled_cache", "autotune_tiers", "alloc_env")
    row.update({k: record.get(k) for k in keys})
    if record.get("load_s") is not None and record.get("first_step_s") is not None:
        row["load_plus_first_step_s"] = round(record["load_s"] + record["first_step_s"], 3)
    return row


def materialize(args) -> None:
    """Writes the preset's checkpoint (once per machine) outside the measured runs."""
    code = ("import sys; from fastbench.bench.checkpoint_cache import checkpoint_dir; "
            "print(checkpoint_dir(sys.argv[1], 'bfloat16', sys.argv[2], 0))")
    subprocess.run([sys.executable, "-c", code, args.model, args.device], check=True, timeout=args.timeout)


def _fmt(v) -> str:
    if isinstance(v, list):
        return "/".join(_fmt(x) for x in v) or "-"
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("first_step_fresh.py measures a GPU's first step: no CUDA GPU here", file=sys.stderr)
        return 2
    materialize(args)
    runs = [(args.arm, s) for s in args.settings] + [(label, None) for label in args.baseline]
    rows = []
    for label, setting in runs:
        rows.append(run_one(label, setting, args))
        print(json.dumps(rows[-1]), flush=True)
    columns = ("arm", "compiled_cache_setting", "status", "load_s", "first_step_s", "load_plus_first_step_s",
               "first_step_compiles", "installed", "step_s", "triton_cache_entries", "process_s")
    print("\n" + " | ".join(columns))
    for row in rows:
        installed = (row.get("compiled_cache") or {}).get("installed")
        print(" | ".join(_fmt(installed if c == "installed" else row.get(c)) for c in columns))
    if args.out:
        result = {"model": args.model, "seq_len": args.seq_len, "batch": args.batch, "device": args.device,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "runs": rows}
        from fastbench.files import atomic_path

        with atomic_path(args.out) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
