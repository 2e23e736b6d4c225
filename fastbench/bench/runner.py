"""Runs a comparison: every (arm, model, repeat) in a fresh ``python -m fastbench.bench.worker``
process, arms interleaved and rotated from one repeat to the next (so no arm always runs first or
right after a given one), results written after every process.

Workers run in a scratch directory (not the repository root, where ``import bitsandbytes`` would find
``kernels/`` under its bare name), offline (no hub access), with one shared directory for the preset
checkpoints that path-based loaders need (removed at the end unless $FASTBENCH_CHECKPOINT_CACHE names
one), under one allocator setting (``compare["alloc_conf"]`` as PYTORCH_ALLOC_CONF). Ctrl-C stops after
writing what was measured, status "interrupted".
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import click

from fastbench.bench import results as results_io
from fastbench.bench.arms import world_size
from fastbench.bench.worker import ALLOC_ENV, new_record


def runs_on(arm: str, model: str, arm_models: dict[str, list[str]] | None) -> bool:
    """Whether ``arm`` runs on ``model``: an arm named in ``arm_models`` only on the models listed for it."""
    return model in (arm_models or {}).get(arm, [model])


def plan(labels: list[str], models: list[str], repeats: int,
         arm_models: dict[str, list[str]] | None = None) -> list[tuple[int, str, str]]:
    """(repeat, model, arm) in run order: repeat r runs the arms rotated by r, each on the models it
    :func:`runs_on`."""
    order = []
    for r in range(repeats):
        rotated = labels[r % len(labels):] + labels[:r % len(labels)]
        order += [(r, model, arm) for model in models for arm in rotated if runs_on(arm, model, arm_models)]
    return order


def log_tail(path: str, chars: int = 1500) -> str:
    """The last ``chars`` characters of a worker's log ("" when it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def run_one(label: str, model: str, repeat: int, run_config: dict, workdir: str, env: dict,
            timeout: float | None, data: str | None = None, backend: str | None = None) -> dict:
    """One worker process (or, for a label with ``nproc=N``, N of them under torchrun: one job of N ranks
    joined through ``backend``); a crash or a timeout becomes a record with that status and the log tail.
    ``data``: the prepared steps of a data file (fastbench.bench.file_data) for this job, as a JSON file."""
    stem = os.path.join(workdir, f"{len(os.listdir(workdir)):04d}-{label.replace(':', '_').replace('#', '_')}"
                                 f"-{model.replace('/', '_')}-r{repeat}")
    config = {**run_config, "model": model}
    ranks = world_size(label)
    with open(stem + ".spec.json", "w") as f:
        json.dump({"arm": label, "repeat": repeat, "config": config, "data": data, "backend": backend}, f)
    out, log = stem + ".out.json", stem + ".log"
    argv = ["-m", "fastbench.bench.worker", stem + ".spec.json", out]
    if ranks > 1:  # one process per rank, started by torchrun on a free local port
        argv = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *argv]
        env = {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // ranks))}
    try:
        with open(log, "w") as logf:
            proc = subprocess.run([sys.executable, *argv], cwd=workdir, env=env, stdout=logf,
                                  stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return new_record(label, model, repeat, config, "timeout", f"no result after {timeout:.0f} s; log:\n"
                          + log_tail(log), world_size=ranks)
    # a job of several ranks ends non-zero when one fails; rank 0's record, if written, says how
    if not os.path.exists(out) or (proc.returncode != 0 and ranks == 1):
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        return new_record(label, model, repeat, config, "crashed", f"worker {how}; log:\n" + log_tail(log),
                          world_size=ranks)
    with open(out) as f:
        return json.load(f)


def worker_env(checkpoint_cache: str, alloc_conf: str | None) -> dict:
    """This process's environment for a worker, with the allocator setting every worker of a run shares
    (under both its names; None: PyTorch's defaults)."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOC_ENV}
    env.update(dict.fromkeys(ALLOC_ENV, alloc_conf) if alloc_conf else {})
    env.setdefault("FASTBENCH_CHECKPOINT_CACHE", checkpoint_cache)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


RUN_AGAIN = ("crashed", "timeout")  # statuses a resumed run replaces: the process, not the arm, failed


def run_compare(results: dict, results_dir: str, timeout: float | None = None,
                echo: Callable[..., None] = click.echo, prepared: dict[tuple[str, int], dict] | None = None) -> bool:
    """Run every planned process that ``results["runs"]`` lacks (all of them for a new run; the rest,
    and those that crashed or timed out, for a resumed one), appending records and rewriting the results
    file after each. ``prepared``: per (model, world size), the steps of a data file
    (fastbench.bench.file_data.prepare), handed to its workers as one file. Returns False if interrupted (Ctrl-C); the file then has status
    "interrupted"."""
    compare = results["compare"]
    results["runs"] = [r for r in results["runs"] if r["status"] not in RUN_AGAIN]
    done = {(r["arm"], r["model"], r["repeat"]) for r in results["runs"]}
    todo = [p for p in plan(compare["arms"], compare["models"], compare["repeats"], compare.get("arm_models"))
            if (p[2], p[1], p[0]) not in done]
    scratch = tempfile.mkdtemp(prefix="fastbench-compare-")
    env = worker_env(os.path.join(scratch, "checkpoints"), compare.get("alloc_conf"))
    workdir = os.path.join(scratch, "runs")
    os.makedirs(workdir)
    data = {}
    for n, (key, doc) in enumerate((prepared or {}).items()):
        data[key] = os.path.join(scratch, f"data-{n}.json")
        with open(data[key], "w") as f:
            json.dump({"pad_id": doc["pad_id"], "steps": doc["steps"]}, f)
    started = time.monotonic()
    try:
        for i, (repeat, model, label) in enumerate(todo, 1):
            echo(f"[{i}/{len(todo)}] {label} on {model}, repeat {repeat + 1}/{compare['repeats']} ... ", nl=False)
            record = run_one(label, model, repeat, compare["run"], workdir, env, timeout,
                             data=data.get((model, world_size(label))), backend=compare.get("dist_backend"))
            results["runs"].append(record)
            results_io.write(results, results_dir)
            echo(describe_record(record) + time_left(time.monotonic() - started, i, len(todo)))
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        results_io.write(results, results_dir)
        echo("\ninterrupted: kept the finished processes' measurements")
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["status"] = "complete"
    return True


def time_left(elapsed_s: float, done: int, total: int) -> str:
    """`` [3 min 20 s so far, about 5 min left]``: the processes still to run at the mean time of those run."""
    def fmt(s):
        s = round(s)
        return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"
    left = f", about {fmt(elapsed_s / done * (total - done))} left" if done < total else ""
    return f" [{fmt(elapsed_s)} so far{left}]"


def describe_record(r: dict) -> str:
    if r["status"] != "ok":
        first_line = (r["error"] or "").splitlines()[0] if r["error"] else ""
        return f"{r['status'].upper()} ({r['phase']}): {first_line[:200]}"
    from statistics import median

    from fastbench.bench.stats import step_tokens_per_s

    tps = median(step_tokens_per_s(r).tolist())  # the report's statistic: one slow step does not move it
    mem = f", peak {r['peak_allocated_gib']:.1f} GiB" if r["peak_allocated_gib"] is not None else ""
    gpu, others = r.get("gpu_busy_pct"), r.get("host_other_cores")
    machine = (f", GPU busy {gpu:.0f}%" if gpu is not None else "") + (
        f", other processes busy on {others:.1f} cores" if others is not None else "")
    compiles = r.get("first_step_compiles")
    first = f"first step {r['first_step_s']:.2f} s" + (f" with {compiles} Triton compiles" if compiles else "")
    return f"{tps:,.0f} tokens/s (median step){mem} (load {r['load_s']:.1f} s, {first}{machine})"
