"""Collect the compiled kernels of the fused training step on this GPU into the archive fastbench ships
(fastbench.autotune.compiled_cache), so that the first step on a fresh machine loads them instead of compiling.

One process per model family (at most --jobs at a time), all on one new, empty Triton cache (TRITON_CACHE_DIR)
and fastbench cache (FASTBENCH_CACHE_DIR: the bundled tuned configs serve, as on a fresh machine), with no
shipped archive installed (FASTBENCH_COMPILED_CACHE=off), builds the family's preset with --layers decoder layers
(the kernels depend on the widths, head sizes and vocabulary, not on the depth) and random weights, for each base
(--bases: nf4, bf16) and checkpointing (--checkpointing: offload, true) puts it on the fused path and trains two
steps (forward, backward, AdamW) at each shape. Then the entries of the cache that a hit reads are packed into
one archive, ``<out-dir>/<gpu>-sm<cc>-<sms>sm__triton-<v>__cuda-<v>.tar.xz``, with a manifest beside it (same
name, ``.json``: families, shapes, kernels, counts, sizes).

--shapes, comma-separated: ``SEQxBATCH`` random tokens with an all-ones attention mask, as the harness trains;
``SEQxBATCH:packed`` rows of several sequences (position_ids from 0, no mask), as ``fastbench train`` packs;
``SEQxBATCH:padded`` right-padded examples of several lengths, the longest SEQ (``--no-packing``). Kernels are
specialised on whether their sizes divide by 16 and get their configs per power-of-two bucket of tokens: an odd
SEQ and shapes of several token counts cover more of what users train.

    python tools/collect_compile_cache.py                  # GPU; writes autotune/bundled/compiled/<name>.tar.xz

``--child FAMILY --out FILE`` runs one family's process (what the parent starts) and writes what it ran and
compiled to FILE as JSON; with the shipped archive installed instead of an empty cache it tells how many kernels
still compile (tests/autotune/test_compiled_cache_gpu.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

FAMILIES = ("llama-3-8b", "mistral-7b", "gemma-7b", "qwen2.5-7b", "qwen3-8b")
SHAPES = "2048x2,8192x1,2048x2:packed,1001x2:padded"
KINDS = ("", "packed", "padded")
CHECKPOINTING = {"offload": "offload", "true": True}
ROOT = Path(__file__).resolve().parent.parent


def parse_shape(text: str) -> tuple[int, int, str]:
    """``"2048x2:packed"`` -> ``(2048, 2, "packed")``."""
    size, _, kind = text.strip().partition(":")
    seq, _, batch = size.partition("x")
    if not (seq.isdigit() and batch.isdigit() and int(seq) > 1 and int(batch) > 0 and kind in KINDS):
        raise argparse.ArgumentTypeError(f"{text!r}: write SEQxBATCH, SEQxBATCH:packed or SEQxBATCH:padded")
    return int(seq), int(batch), kind


def shape_label(shape: tuple[int, int, str]) -> str:
    """``(2048, 2, "packed")`` -> ``"2048x2:packed"``, as :func:`parse_shape` reads it."""
    seq, batch, kind = shape
    return f"{seq}x{batch}" + (f":{kind}" if kind else "")


def _words(valid):
    def parse(text: str) -> list[str]:
        words = [w.strip() for w in text.split(",") if w.strip()]
        bad = [w for w in words if w not in valid]
        if bad or not words:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(valid)}")
        return words
    return parse


def parse_args(argv=None):
    from fastbench.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Needs a CUDA GPU; about a minute or two on an H200 with the defaults.")
    p.add_argument("--families", type=_words([n for n in PRESETS if not n.endswith("-tiny")]),
                   default=list(FAMILIES), help=f"presets, comma-separated (default: {','.join(FAMILIES)})")
    p.add_argument("--bases", type=_words(("nf4", "bf16")), default=["nf4", "bf16"], help="nf4,bf16 (default)")
    p.add_argument("--checkpointing", type=_words(tuple(CHECKPOINTING)), default=list(CHECKPOINTING),
                   help="offload,true (default)")
    p.add_argument("--shapes", type=lambda t: [parse_shape(s) for s in t.split(",") if s.strip()],
                   default=[parse_shape(s) for s in SHAPES.split(",")], help=f"default: {SHAPES}")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of each model (default: 2)")
    p.add_argument("--jobs", type=int, default=len(FAMILIES), help="families compiled at a time (default: 5)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "autotune" / "bundled" / "compiled",
                   help="where the archive and its manifest go (default: autotune/bundled/compiled)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per family's process (default: 600)")
    p.add_argument("--child", metavar="FAMILY", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test under TRITON_INTERPRET=1
    args = p.parse_args(argv)
    if args.layers < 1 or args.jobs < 1:
        p.error("--layers and --jobs must be at least 1")
    return args


# --- one family's process --------------------------------------------------------------------------------------

def short_model(family: str, layers: int, base: str, device: str):
    """The preset ``family`` with ``layers`` decoder layers and random weights, bf16, NF4-quantized (bitsandbytes
    Linear4bit, double quantization, as ``load_in_4bit`` makes them) for ``base="nf4"``, in train mode."""
    import dataclasses

    import torch

    from fastbench import presets
    from fastbench.model import quantize_nf4

    preset = presets.get_preset(family)
    short = dataclasses.replace(preset, config={**preset.config, "num_hidden_layers": layers})
    model = presets.build_model(short, dtype=torch.bfloat16, device=device, seed=0)
    if base == "nf4":
        quantize_nf4(model, torch.bfloat16, device)
    model.config.use_cache = False
    return model.train()


def batch_of(shape: tuple[int, int, str], vocab: int, step: int) -> dict:
    """Random inputs of one micro-batch at ``shape`` (see the module docstring), on the CPU."""
    import torch

    from fastbench.bench.data import make_batch
    from fastbench.train.data import IGNORE_INDEX
    from fastbench.train.packing import packed_batch, padded_batch

    seq, batch, kind = shape
    if not kind:
        return make_batch(0, step, 0, batch, seq, vocab)
    g = torch.Generator().manual_seed(step)

    def example(n):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}

    if kind == "packed":  # each row: three sequences filling it but for a few tokens of padding
        cuts = [seq // 2, seq // 3, seq - seq // 2 - seq // 3 - 7]
        return packed_batch([[example(n) for n in cuts] for _ in range(batch)], 0, width=seq).inputs
    lengths = [seq] + [max(2, seq - 97 * (i + 1)) for i in range(batch - 1)]
    return padded_batch([example(n) for n in lengths], 0).inputs


def _cache_entries() -> int:
    from triton import knobs

    return len(os.listdir(knobs.cache.dir)) if os.path.isdir(knobs.cache.dir) else 0


def run_family(args) -> dict:
    """Every base x checkpointing x shape of one family, two steps each; what ran and what compiled."""
    import torch
    from triton import knobs

    from fastbench.autotune import compiled_cache
    from fastbench.model import FastLanguageModel

    compiled, seen = [], set()

    def listener(src, metadata, metadata_group, times, cache_hit, **_):
        seen.add(metadata["name"])
        if not cache_hit:
            compiled.append(metadata["name"])

    knobs.compilation.listener = listener
    family, started, runs = args.child, time.perf_counter(), []
    for base in args.bases:
        for ckpt in args.checkpointing:
            t = time.perf_counter()
            model = FastLanguageModel.get_peft_model(
                short_model(family, args.layers, base, args.device), use_gradient_checkpointing=CHECKPOINTING[ckpt],
                random_state=0, fallback=False)
            build_s = time.perf_counter() - t
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                          fused=args.device.startswith("cuda"))
            for shape in args.shapes:
                t, before, entries = time.perf_counter(), len(compiled), _cache_entries()
                for step in range(2):
                    batch = {k: v.to(args.device) for k, v in batch_of(shape, model.config.vocab_size, step).items()}
                    model(**batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                run = {"base": base, "checkpointing": ckpt, "shape": shape_label(shape),
                       "seconds": round(time.perf_counter() - t, 2),
                       "compiled": len(compiled) - before, "cache_entries_added": _cache_entries() - entries}
                runs.append(run)
                print(f"[{family}] {base} ckpt={ckpt} {run['shape']}: {run['seconds']:.1f} s (model "
                      f"{build_s:.1f} s), {run['compiled']} kernels compiled here, cache "
                      f"+{run['cache_entries_added']} entries", flush=True)
                build_s = 0.0
            del model, optimizer
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"family": family, "layers": args.layers, "seconds": round(time.perf_counter() - started, 1),
            "runs": runs, "compiled": len(compiled), "kernels": sorted(seen),
            "compiled_cache": compiled_cache.describe()}


# --- the parent ------------------------------------------------------------------------------------------------

def _write_json(path: Path, doc: dict) -> None:
    from fastbench.files import atomic_path

    with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _child_command(args, family: str, out: Path) -> list[str]:
    shapes = ",".join(shape_label(shape) for shape in args.shapes)
    return [sys.executable, __file__, "--child", family, "--out", str(out), "--layers", str(args.layers),
            "--bases", ",".join(args.bases), "--checkpointing", ",".join(args.checkpointing), "--shapes", shapes,
            "--device", args.device]


def collect(args, tmp: Path) -> list[dict]:
    """Every family's process, at most ``args.jobs`` at a time, on the caches under ``tmp``; their results."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp / "triton"), "FASTBENCH_CACHE_DIR": str(tmp / "fastbench"),
           "FASTBENCH_COMPILED_CACHE": "off"}
    env.pop("FASTBENCH_AUTOTUNE", None)
    env.pop("FASTBENCH_PIN", None)
    waiting, running, done = list(args.families), {}, []
    while waiting or running:
        while waiting and len(running) < args.jobs:
            family = waiting.pop(0)
            out = tmp / f"{family}.json"
            running[family] = (subprocess.Popen(_child_command(args, family, out), env=env), out, time.monotonic())
        for family, (proc, out, began) in list(running.items()):
            if proc.poll() is None and time.monotonic() - began < args.timeout:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            del running[family]
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"{family}: its process failed (exit {proc.returncode}); see its output above")
            done.append(json.loads(out.read_text()))
            print(f"[{family}] done in {done[-1]['seconds']:.0f} s: {done[-1]['compiled']} kernels compiled",
                  flush=True)
        time.sleep(0.2)
    return sorted(done, key=lambda r: args.families.index(r["family"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_family(args)
        if args.out:
            _write_json(args.out, result)
        return 0
    import torch

    from fastbench.autotune import compiled_cache, key

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("collect_compile_cache.py compiles kernels on a CUDA GPU: none here (or TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    device, tools = key.device_fingerprint(), key.toolchain()
    out = args.out_dir / compiled_cache.archive_name(device, tools)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compile-cache-") as tmp:
        print(f"collecting {', '.join(args.families)} ({args.jobs} at a time) on {device}, {tools}, into a fresh "
              f"Triton cache {tmp}/triton", flush=True)
        try:
            families = collect(args, Path(tmp))
        except RuntimeError as e:
            print(f"no archive written: {e}", file=sys.stderr)
            return 1
        about = {"collected": {
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "layers": args.layers,
            "bases": args.bases, "checkpointing": args.checkpointing,
            "shapes": [shape_label(shape) for shape in args.shapes],
            "families": {r["family"]: {"kernels": r["kernels"], "compiled": r["compiled"], "seconds": r["seconds"]}
                         for r in families},
            "seconds": round(time.perf_counter() - started, 1)}}
        index = compiled_cache.pack(Path(tmp) / "triton", out, device, tools, about)
        raw = sum((Path(tmp) / "triton" / entry / f).stat().st_size
                  for entry, e in index["entries"].items() for f in e["files"])
    data = out.read_bytes()
    entries = index.pop("entries")
    manifest = {**index, "archive": {"name": out.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                     "raw_bytes": raw},
                "entries": len(entries), "kernels": compiled_cache.kernel_names(entries),
                "modules": sum(1 for e in entries.values() if not e["groups"])}
    manifest_path = out.with_name(out.name.removesuffix(compiled_cache.SUFFIX) + ".json")
    _write_json(manifest_path, manifest)
    print(f"\n{out}: {len(data) / 2**20:.2f} MiB ({raw / 2**20:.1f} MiB unpacked), {len(entries)} entries: "
          f"{sum(len(e['groups']) for e in entries.values())} kernels ({len(manifest['kernels'])} distinct names), "
          f"{manifest['modules']} host modules; manifest {manifest_path}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
