"""``fastbench tune``: tune every op for the shapes of the chosen models on this GPU, and inspect,
verify or export the cache."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import click

from fastbench.interrupt import exit_code, sigterm_as_interrupt

NO_GPU = ("tuning needs a CUDA GPU (none is visible here, or TRITON_INTERPRET=1 is set); "
          "without one every op uses its heuristic default. `fastbench tune --list` still works.")


DEFAULT_JOBS = max(1, min(8, (os.cpu_count() or 2) // 2))


def _parse_tokens(text: str) -> list[int]:
    """``"1024-16384"`` -> power-of-two buckets over the range; ``"1024,4096"`` -> their buckets."""
    from . import key, tuner

    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if not 0 < lo <= hi:
                raise ValueError
            return tuner.token_buckets(lo, hi)
        return sorted({key.bucket(int(x)) for x in text.split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a range like 1024-16384 or a list like 1024,4096") from None


def _specs(ops: str | None):
    from . import tuner

    refs = tuner.discover()
    if ops:
        wanted = [o.strip() for o in ops.split(",") if o.strip()]
        unknown = sorted(set(wanted) - {r.name for r in refs})
        if unknown:
            raise click.BadParameter(f"unknown ops {', '.join(unknown)}; known: {', '.join(r.name for r in refs) or 'none'}")
        refs = [r for r in refs if r.name in wanted]
    return refs


def _jobs(refs, models: str | None, tokens: list[int], dtype: str):
    import torch

    from fastbench import presets

    from . import tuner

    names = [m.strip() for m in models.split(",")] if models else [n for n in presets.PRESETS if not n.endswith("-tiny")]
    try:
        configs = [presets.build_config(n) for n in names]
    except presets.UnknownPreset as e:
        raise click.BadParameter(str(e)) from None
    return tuner.plan(refs, configs, tokens, getattr(torch, dtype))


def _fmt_ms(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _list(refs, jobs) -> None:
    from . import compiled_cache, lookup

    lk = lookup.reset()
    info = lookup.describe()
    click.echo(f"cache dir: {info['cache_dir']}" + (f" (from ${info['cache_dir_env']})" if info["cache_dir_env"] else ""))
    if lk.device is None:
        click.echo("no CUDA GPU here: every op is served by the heuristic tier (pins still apply)")
    else:
        click.echo(f"device: {lk.device}  toolchain: {lk.tools}")
        click.echo(f"cache file: {info['user_file']} ({'present' if info['user_file_exists'] else 'absent'})")
        click.echo(f"bundled files for this device: {', '.join(info['bundled_in_use']) or 'none'}")
        click.echo(f"files of this device under another toolchain: {', '.join(info['other_toolchain_in_use']) or 'none'}")
    click.echo(compiled_cache.summary(info["compiled_cache"]))
    for title, files in (("files in the cache dir", info["files"]), ("bundled files", info["bundled"])):
        click.echo(f"{title}: {len(files)}")
        for f in files:
            counts = ", ".join(f"{k} {v}" for k, v in f.get("entries", {}).items())
            checks = ", ".join(f"{v} {k}" for k, v in f.get("checks", {}).items())
            click.echo(f"  {Path(f['file']).name}: {counts if f['valid'] else 'unreadable (ignored)'}"
                       + (f"; other-toolchain checks: {checks}" if checks else ""))
    tiers: dict[str, Counter] = {}
    for job in jobs:  # no check runs here: an unchecked other-toolchain config counts as serving
        tier = lk.resolve(job.ref.spec, job.pass_name, job.problem, check=False)[1]
        tiers.setdefault(f"{job.ref.name}/{job.pass_name}", Counter())[tier] += 1
    rows = [["op/pass", "problems", *lookup.TIERS]]
    rows += [[name, sum(c.values()), *(c.get(t, 0) or "" for t in lookup.TIERS)] for name, c in sorted(tiers.items())]
    click.echo("which tier serves each op for the chosen models and tokens:")
    click.echo(_table(rows) if len(rows) > 1 else "  (no op declares problems yet)")
    other = sum(c.get(lookup.OTHER, 0) for c in tiers.values())
    if other:
        click.echo(f"{other} problems are served by configs tuned for this GPU under another Triton/CUDA version "
                   f"({len(lk.unchecked)} not yet checked here: each is checked once against the reference at "
                   f"first use); `fastbench tune` tunes them for this toolchain")


def _export(path: str, refs, cache_file: Path, device, tools) -> None:
    from . import key, store

    doc = store.read(cache_file)
    if doc is None:
        raise click.ClickException(f"nothing to export: {cache_file} is absent or unreadable")
    current = {r.name: (r.spec, key.kernel_hash(r.spec)) for r in refs}
    keep = {k: e for k, e in doc["entries"].items()
            if e["op"] in current and e["kernel"] == current[e["op"]][1]
            and any(dict(c) == e["config"] for c in current[e["op"]][0].candidates.get(e["pass"], ()))}
    out = Path(path)
    if out.is_dir():
        out = out / cache_file.name
    out.parent.mkdir(parents=True, exist_ok=True)
    store.write_atomic(out, {"schema": key.SCHEMA, "device": dict(device), "toolchain": dict(tools), "entries": keep})
    click.echo(f"exported {len(keep)} of {len(doc['entries'])} entries (current kernels and candidates) to {out}")


@click.command("tune")
@click.option("--models", help="comma-separated presets (default: every full-size preset)")
@click.option("--tokens", default="1024-16384", show_default=True,
              help="token range (bucketed to powers of two) or a comma-separated list")
@click.option("--ops", help="comma-separated op names (default: every op that declares a spec)")
@click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--force", is_flag=True, help="re-tune problems already in the cache")
@click.option("--list", "list_", is_flag=True, help="show what the cache holds here and which tier serves each op")
@click.option("--verify", is_flag=True, help="re-time cached winners (the user cache's, and the bundled ones it "
              "does not override) against the default; flag those within noise or slower")
@click.option("--export", "export", metavar="PATH", help="write this GPU's cache as a bundled-format file (PATH or PATH/<name>.json)")
@click.option("--timeout", default=60.0, show_default=True, help="seconds a candidate may run before it is killed")
@click.option("--max-time", type=float, help="start no new problem after this many seconds (run again to carry on)")
@click.option("--jobs", default=DEFAULT_JOBS, show_default=True, type=click.IntRange(min=1),
              help="processes that compile and check the candidates in parallel before the serial timing; "
                   "each holds a CUDA context and one problem's inputs on the GPU (lower it to use less "
                   "memory); 1: one process compiles, checks and times, as before")
@click.option("--json-out", type=click.Path(dir_okay=False), help="write the per-problem results (tune or --verify) as JSON")
def tune(models, tokens, ops, dtype, force, list_, verify, export, timeout, max_time, jobs, json_out):
    """Tune every kernel op's launch configs for this GPU and cache the winners.

    Each candidate is checked against the op's reference, then timed (CUDA events, median of many
    repeats); it replaces the heuristic default only when faster by more than the noise. Results go
    to the per-GPU cache as soon as each problem is done, so an interrupted run keeps its progress.
    With --jobs N > 1, N processes first compile and check every candidate in parallel (Triton's
    on-disk cache keeps the kernels), then one process times the survivors.
    """
    from . import key, lookup, store, tuner

    refs = _specs(ops)
    n_jobs, jobs = jobs, _jobs(refs, models, _parse_tokens(tokens), dtype)
    if list_:
        _list(refs, jobs)
        return
    device = key.device_fingerprint()
    if device is None:
        click.echo(NO_GPU, err=True)
        sys.exit(2)
    tools = key.toolchain()
    cache_file = lookup.reset().user_path()
    if export:
        _export(export, refs, cache_file, device, tools)
        return
    if not jobs:
        raise click.ClickException("no op declares problems to tune (are the kernel modules installed?)")
    runner = tuner.Worker(timeout=timeout)
    started = time.monotonic()
    try:
        if verify:
            # the user cache's winners, and the bundled ones it does not override (what lookup serves)
            sources = {}
            for _, doc in reversed(lookup.default().bundled_files()):
                sources.update({k: (e, "bundled") for k, e in doc["entries"].items()})
            sources.update({k: (e, "cache") for k, e in (store.read(cache_file) or {}).get("entries", {}).items()})
            entries = {k: e for k, (e, _) in sources.items()}
            todo = [j for j in jobs if j.key in entries]
            with click.progressbar(length=len(todo), label="verifying", show_eta=True) as bar:
                rows = []
                for job in todo:
                    rows += [{**row, "source": sources[job.key][1]} for row in tuner.verify([job], entries, runner)]
                    bar.update(1)
            _print_verify(rows)
            if json_out:
                _write_json(json_out, {"device": device, "toolchain": tools, "cache_file": str(cache_file),
                                       "seconds": time.monotonic() - started, "summary": _verify_summary(rows),
                                       "rows": rows})
            return
        outcomes = []
        # phase 1 (--jobs > 1) reports each problem once as compiled and checked, phase 2 once as tuned
        checkers = [tuner.Worker(timeout=timeout, timer=None) for _ in range(n_jobs)] if n_jobs > 1 else []
        with click.progressbar(length=len(jobs) * (2 if checkers else 1), label="tuning", show_eta=True,
                               show_pos=True, item_show_func=lambda s: s or "") as bar:
            def progress(job, outcome):
                if outcome is not None:
                    outcomes.append(outcome)
                bar.update(1, ("checked " if outcome is None else "") + job.label)
            interrupted = False
            with sigterm_as_interrupt() as stop:  # a scheduler's SIGTERM keeps the results so far, as Ctrl-C does
                try:
                    tuner.tune(jobs, runner, cache_file, device, tools, force=force, progress=progress,
                               deadline=started + max_time if max_time is not None else math.inf, checkers=checkers)
                except KeyboardInterrupt:  # the cache file is replaced whole or not at all
                    interrupted = True
                    click.echo(f"\n{'terminated (SIGTERM)' if stop.terminated else 'interrupted'}: results so far "
                               f"are in {cache_file}", err=True)
        _print_summary(outcomes, time.monotonic() - started, cache_file)
        if json_out:
            _write_json(json_out, {"device": device, "toolchain": tools, "cache_file": str(cache_file),
                                   "seconds": time.monotonic() - started, "summary": tuner.summarise(outcomes),
                                   "rows": [_outcome_row(o) for o in outcomes]})
        if len(outcomes) < len(jobs):
            click.echo(f"incomplete: {len(outcomes)} of {len(jobs)} problems done; run again to carry on", err=True)
        if interrupted:
            sys.exit(exit_code(stop))
        if len(outcomes) < len(jobs):
            sys.exit(3)
    finally:
        runner.close()


def _outcome_row(o) -> dict:
    from . import key

    return {"op": o.job.ref.name, "pass": o.job.pass_name, "problem": key.canonical_problem(o.job.problem),
            "status": o.status, "config": dict(o.config) if o.config else None, "ms": o.ms,
            "default_ms": o.default_ms, "speedup": o.speedup, "failures": o.failures}


def _finite(x):
    """JSON without NaN/Infinity: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _write_json(path: str, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_finite(doc), indent=1, default=str) + "\n")
    click.echo(f"wrote {path}")


def _verify_summary(rows: list[dict]) -> list[dict]:
    """Per op/pass: verdict counts and the geometric mean of the re-timed speedups."""
    by_op: dict[str, list[dict]] = {}
    for r in rows:
        by_op.setdefault(f"{r['op']}/{r['pass']}", []).append(r)
    out = []
    for name, rs in sorted(by_op.items()):
        ups = [r["speedup"] for r in rs if r["speedup"] > 0]
        counts = Counter(r["verdict"] for r in rs)
        out.append({"op": name, "problems": len(rs), **{v: counts[v] for v in ("faster", "within noise", "slower")},
                    "geomean_speedup": math.exp(sum(map(math.log, ups)) / len(ups)) if ups else None})
    return out


def _print_summary(outcomes, seconds: float, cache_file: Path) -> None:
    from . import tuner

    rows = [["op/pass", "problems", "non-default", "failed", "most frequent winner", "tuned ms", "default ms", "speedup", "best"]]
    for r in tuner.summarise(outcomes):
        rows.append([r["op"], r["problems"], r["non_default"], r["failed"], r["winner"], _fmt_ms(r["ms"]),
                     _fmt_ms(r["default_ms"]), f"{r['speedup']:.3f}x" if math.isfinite(r["speedup"]) else "-",
                     f"{r['best_speedup']:.3f}x" if math.isfinite(r["best_speedup"]) else "-"])
    click.echo(_table(rows))
    cached = sum(o.status == "cached" for o in outcomes)
    click.echo(f"{len(outcomes)} problems ({cached} already cached) in {seconds:.0f} s; cache: {cache_file}")


def _print_verify(rows: list[dict]) -> None:
    from . import key

    if not rows:
        click.echo("no cached winner differs from its default: nothing to verify")
        return
    table = [["op/pass", "problem", "config", "from", "ms", "default ms", "speedup", "verdict"]]
    for r in rows:
        table.append([f"{r['op']}/{r['pass']}", key.problem_string(r["problem"]), key.problem_string(r["config"]),
                      r.get("source", "cache"), _fmt_ms(r["ms"]), _fmt_ms(r["default_ms"]), f"{r['speedup']:.3f}x",
                      r["verdict"]])
    click.echo(_table(table))
    summary = [["op/pass", "problems", "faster", "within noise", "slower", "geomean speedup"]]
    for s in _verify_summary(rows):
        summary.append([s["op"], s["problems"], s["faster"], s["within noise"], s["slower"],
                        f"{s['geomean_speedup']:.3f}x" if s["geomean_speedup"] else "-"])
    click.echo(_table(summary))
    counts = Counter(r["verdict"] for r in rows)
    click.echo(", ".join(f"{v}: {counts[v]}" for v in ("faster", "within noise", "slower")))
