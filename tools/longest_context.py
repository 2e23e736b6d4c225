"""The longest sequence (batch 1) each arm trains within a card of a given size, found the same way for every arm.

For each arm and each card size one fresh process (as `fastbench compare` runs its workers: offline, in a scratch
directory, one shared preset-checkpoint cache, one allocator setting for all) limits PyTorch's caching allocator to
the card (``torch.cuda.set_per_process_memory_fraction``: the card's GiB less the CUDA context the process holds,
as a fraction of this GPU's memory), builds the arm once as the harness does (model, LoRA, AdamW) and searches the
longest sequence that trains: from ``--start`` it doubles the length while a step trains, then bisects between the
last length that trained and the first that ran out of memory, down to ``--granularity`` tokens, never above the
ceiling (``--max-seq``, else the model's max_position_embeddings). At each length it trains ``--steps`` steps
(forward with labels, backward, AdamW step; the first may compile) on random tokens and records the step times,
the peaks of allocated and reserved memory (reset before each length) and NVML's memory of the process. Running
out of memory (torch.OutOfMemoryError, or a MemoryError such as the offload mode's host buffers finding the host
short) frees what the step held and the search goes on; any other error ends it.

Every process writes its record after each length; the parent gathers the records into one results file written
atomically after each process (and, if a process is stopped by ``--timeout`` or dies, with the lengths it
measured), then prints a table. Ctrl-C or SIGTERM keeps everything measured so far.

    python tools/longest_context.py --arms fused-4bit:ckpt=offload,unsloth-qlora --card-gib 16,24 \\
        --model llama-3-8b --max-seq 131072 --start 4096 --granularity 4096 --out results/longest-context.json

What a card's limit leaves out: the CUDA context (measured, subtracted) and memory a library takes outside the
caching allocator after the start (e.g. kernels loaded later); the per-length NVML figure shows the whole
process, to be read against the card. Lengths above the model's positions (``--max-seq`` beyond them) measure
memory and time only: the rotary embedding extrapolates. On a machine without CUDA the processes run with no
limit (only to test the tool).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

import click

GIB = 2**30
SCHEMA = "fastbench.longest_context/1"
# the CUDA context's memory where NVML cannot tell this process's use (no NVML, or PIDs in another namespace)
ASSUMED_CONTEXT_GIB = 0.5
SIMULATE_OOM_ABOVE = "FASTBENCH_SIMULATE_OOM_ABOVE"  # tests: lengths above this many tokens run out of memory


# ---------------------------------------------------------------------------------------------------- the search

def search(try_length: Callable[[int], str], start: int, granularity: int, ceiling: int) -> dict:
    """The longest length for which ``try_length(seq)`` gives "ok" ("oom": too long; "error": stop).

    Doubles from ``start`` while lengths train (the ceiling itself is tried once when doubling would pass it), then
    bisects the gap between the longest length that trained (0 if none) and the shortest that failed over the
    multiples of ``granularity`` strictly inside it, until none is left. Assumes that a length trains if a longer
    one does. Returns ``longest_ok`` (None if nothing trained), ``first_failure`` (None if the ceiling trained) and
    ``stopped``: "ceiling", "granularity" or "error"."""
    if not 0 < start <= ceiling or granularity <= 0:
        raise ValueError(f"need 0 < start <= ceiling and granularity > 0, got {start}, {ceiling}, {granularity}")
    ok, failed = 0, None
    seq = start
    while failed is None:
        result = try_length(seq)
        if result == "error":
            return _found(ok, failed, "error")
        if result == "oom":
            failed = seq
        elif seq == ceiling:
            return _found(seq, None, "ceiling")
        else:
            ok, seq = seq, min(2 * seq, ceiling)
    while (seq := _middle(ok, failed, granularity)) is not None:
        result = try_length(seq)
        if result == "error":
            return _found(ok, failed, "error")
        ok, failed = (seq, failed) if result == "ok" else (ok, seq)
    return _found(ok, failed, "granularity")


def _middle(ok: int, failed: int, granularity: int) -> int | None:
    """The multiple of ``granularity`` nearest below the middle of (ok, failed), kept strictly inside; None if the
    gap holds no multiple."""
    first = (ok // granularity + 1) * granularity
    if first >= failed:
        return None
    return max(first, (ok + failed) // 2 // granularity * granularity)


def _found(ok: int, failed: int | None, stopped: str) -> dict:
    return {"longest_ok": ok or None, "first_failure": failed, "stopped": stopped}


def bounds(trials: list[dict]) -> tuple[int | None, int | None]:
    """(the longest length that trained, the shortest longer one that ran out of memory) among ``trials``: the
    answer of a search, or what a stopped one had found."""
    longest = max((t["seq"] for t in trials if t["result"] == "ok"), default=None)
    failures = [t["seq"] for t in trials if t["result"] == "oom" and t["seq"] > (longest or 0)]
    return longest, min(failures, default=None)


def card_fraction(card_gib: float, context_bytes: int | None, total_bytes: int) -> dict:
    """The allocator's share of this GPU that leaves a process ``card_gib`` GiB in all: (card - context) / total.
    ``context_bytes``: the CUDA context this process holds (None: unknown, :data:`ASSUMED_CONTEXT_GIB` is taken).
    Raises ValueError if the card is larger than this GPU or the context fills it."""
    card = card_gib * GIB
    if card > total_bytes:
        raise ValueError(f"a {card_gib:g} GiB card is larger than this GPU ({total_bytes / GIB:.1f} GiB)")
    source = "nvml" if context_bytes is not None else "assumed"
    context = context_bytes if context_bytes is not None else ASSUMED_CONTEXT_GIB * GIB
    available = card - context
    if available <= 0:
        raise ValueError(f"the CUDA context ({context / GIB:.2f} GiB) fills a {card_gib:g} GiB card")
    return {"context_gib": context / GIB, "context_source": source, "available_gib": available / GIB,
            "device_total_gib": total_bytes / GIB, "fraction": available / total_bytes}


# ------------------------------------------------------------------------------- one process: an arm on one card

def measure(spec: dict, write: Callable[[dict], None]) -> dict:
    """One arm on one card (``spec``: its label, card, the RunConfig and the search's bounds), ``write(record)``
    after every length. Never raises: a failure is the record's status."""
    from fastbench.bench import arms

    cfg = arms.RunConfig.from_dict(spec["run"])
    if not cfg.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused arms' kernels on a CPU, before triton loads
    label = spec["arm"]
    arm = arms.get_arm(label)
    for module in arm.import_first:  # Unsloth patches transformers on import: it comes first
        __import__(module)
    import torch

    from fastbench.bench.worker import ALLOC_ENV
    from fastbench.memory import is_out_of_memory
    from fastbench.presets import resolve_model

    cfg.arm_options = {**cfg.arm_options, **arms.parse_label(label)[1]}
    record = new_record(label, spec["card_gib"])
    record["status"] = "running"
    try:
        if cfg.device.startswith("cuda"):
            record.update(limit_memory(spec["card_gib"], cfg))
        write(record)
        t0 = time.perf_counter()
        model = arm.build(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=cfg.device.startswith("cuda"))
        record["load_s"] = time.perf_counter() - t0
        vocab_size = resolve_model(cfg.model).vocab_size
        simulate = os.environ.get(SIMULATE_OOM_ABOVE)

        def try_length(seq: int) -> str:
            trial = one_length(model, optimizer, cfg, vocab_size, seq, spec["steps"],
                               int(simulate) if simulate else None)
            record["trials"].append(trial)
            record["error"] = trial["error"] if trial["result"] == "error" else None
            write(record)
            return trial["result"]

        found = search(try_length, spec["start"], spec["granularity"], spec["ceiling"])
        record.update(found, status="error" if found["stopped"] == "error" else "ok")
    except Exception as exc:  # the build (or the limit) failed: recorded, the parent goes on
        record["status"] = "oom" if is_out_of_memory(exc) else "error"
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    record["alloc_env"] = {k: os.environ[k] for k in ALLOC_ENV if k in os.environ}  # as the arm left them
    write(record)
    return record


def new_record(label: str, card_gib: float) -> dict:
    """A record with nothing measured yet (the parent's, for a process that left none)."""
    return {"arm": label, "card_gib": card_gib, "status": "pending", "error": None, "fraction": None,
            "context_gib": None, "context_source": None, "available_gib": None, "device_total_gib": None,
            "materialize_s": None, "load_s": None, "longest_ok": None, "first_failure": None, "stopped": None,
            "trials": [], "alloc_env": None}


def limit_memory(card_gib: float, cfg) -> dict:
    """Limit this process's caching allocator to what a ``card_gib`` card leaves after the CUDA context, before
    the arm allocates anything. A preset's checkpoint (which the path-based loaders read) is written first, with
    no limit: building it holds the whole bf16 model."""
    import torch

    from fastbench.bench import checkpoint_cache
    from fastbench.bench.arms.hf import checkpoint_path
    from fastbench.bench.worker import _nvml_gib

    torch.cuda.init()
    device = torch.cuda.current_device()
    checkpoint_path(cfg)
    torch.empty(1, device=device)  # the context exists now, whatever came before
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    process_gib, _ = _nvml_gib(device)
    context = int(process_gib * GIB) - torch.cuda.memory_reserved(device) if process_gib else None
    limit = card_fraction(card_gib, context, torch.cuda.get_device_properties(device).total_memory)
    torch.cuda.set_per_process_memory_fraction(limit["fraction"], device)
    torch.cuda.reset_peak_memory_stats(device)
    return {**limit, "materialize_s": checkpoint_cache.materialize_seconds}


def one_length(model, optimizer, cfg, vocab_size: int, seq: int, steps: int, simulate_oom_above: int | None) -> dict:
    """``steps`` training steps of one random sequence of ``seq`` tokens: the trial's result ("ok", "oom" or
    "error" with its message), step times, peak allocated and reserved GiB and NVML's GiB of the process. After a
    failure, everything the step held is freed (gradients, the optimizer's state, cached blocks)."""
    import torch

    from fastbench.bench.worker import _nvml_gib
    from fastbench.memory import is_out_of_memory

    cuda = cfg.device.startswith("cuda")
    trial = {"seq": seq, "result": "ok", "error": None, "step_s": [], "peak_allocated_gib": None,
             "peak_reserved_gib": None, "nvml_process_gib": None}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        train_steps(model, optimizer, cfg, vocab_size, seq, steps, trial["step_s"], simulate_oom_above)
    except Exception as exc:
        trial["result"] = "oom" if is_out_of_memory(exc) or isinstance(exc, MemoryError) else "error"  # GPU or host
        trial["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    if cuda:
        trial["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        trial["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        trial["nvml_process_gib"] = _nvml_gib(torch.cuda.current_device())[0]
    if trial["result"] != "ok":  # the exception and the frames it held are gone here
        free_after_failure(model, optimizer, cuda)
    return trial


def train_steps(model, optimizer, cfg, vocab_size: int, seq: int, steps: int, step_s: list,
                simulate_oom_above: int | None) -> None:
    import torch

    from fastbench.bench.data import make_batch

    batch = {k: v.to(cfg.device) for k, v in make_batch(cfg.seed, 0, 0, 1, seq, vocab_size).items()}
    for _ in range(steps):
        t = time.perf_counter()
        if simulate_oom_above is not None and seq > simulate_oom_above:
            raise torch.OutOfMemoryError(f"simulated out of memory ({SIMULATE_OOM_ABOVE}={simulate_oom_above})")
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)


def free_after_failure(model, optimizer, cuda: bool) -> None:
    import gc

    import torch

    for p in model.parameters():
        p.grad = None
    optimizer.state.clear()  # a step that failed inside AdamW may have left it half made; the next step remakes it
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def child_main(spec_path: str, out_path: str) -> int:
    from fastbench.bench.worker import simulate_fault

    with open(spec_path) as f:
        spec = json.load(f)
    simulate_fault(spec["arm"])
    measure(spec, lambda record: write_results(record, out_path))
    return 0


# ------------------------------------------------------------------------------------------------------ the parent

def run_process(spec: dict, stem: str, env: dict, timeout: float | None) -> dict:
    """The record of one process for ``spec`` (files ``stem``.*); a process that timed out, died or was interrupted
    (KeyboardInterrupt, re-raised with the record as its argument) gives the lengths it had written."""
    from fastbench.bench.runner import log_tail

    with open(stem + ".spec.json", "w") as f:
        json.dump(spec, f)
    out, log = stem + ".out.json", stem + ".log"
    argv = [sys.executable, os.path.abspath(__file__), "--child", stem + ".spec.json", out]
    try:
        with open(log, "w") as logf:
            proc = subprocess.run(argv, cwd=os.path.dirname(stem), env=env, stdout=logf, stderr=subprocess.STDOUT,
                                  timeout=timeout)
    except subprocess.TimeoutExpired:
        return stopped_record(spec, out, "timeout", f"stopped after {timeout:g} s; log:\n" + log_tail(log))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(stopped_record(spec, out, "interrupted", "interrupted")) from None
    if proc.returncode != 0 or not os.path.exists(out):
        return stopped_record(spec, out, "crashed", f"exited with code {proc.returncode}; log:\n" + log_tail(log))
    with open(out) as f:
        return json.load(f)


def stopped_record(spec: dict, out: str, status: str, message: str) -> dict:
    """The record a stopped process left (or an empty one) with ``status``, its bounds from the lengths it tried."""
    try:
        with open(out) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = new_record(spec["arm"], spec["card_gib"])
    record["longest_ok"], record["first_failure"] = bounds(record["trials"])
    record.update(status=status, error=message[-3000:])
    return record


def write_results(results: dict, path: str) -> None:
    from fastbench.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=1)


def run_all(results: dict, specs: list[dict], path: str, env: dict, workdir: str, timeout: float | None,
            echo: Callable[[str], None] = print) -> bool:
    """Every spec's process in turn, the results file rewritten after each; False if interrupted (the file then
    has status "interrupted" and the interrupted process's lengths)."""
    try:
        write_results(results, path)
        for i, spec in enumerate(specs, 1):
            echo(f"[{i}/{len(specs)}] {spec['arm']} on a {spec['card_gib']:g} GiB card ...")
            results["records"].append(run_process(spec, os.path.join(workdir, f"{i:03d}"), env, timeout))
            write_results(results, path)
            echo("    " + describe(results["records"][-1]))
    except KeyboardInterrupt as stop:
        if stop.args and isinstance(stop.args[0], dict):  # the process it stopped, with what that had measured
            results["records"].append(stop.args[0])
        results["status"] = "interrupted"
        write_results(results, path)
        return False
    results["status"] = "complete"
    write_results(results, path)
    return True


def at_longest(record: dict) -> dict | None:
    """The trial of the record's longest length that trained."""
    return next((t for t in record["trials"] if t["seq"] == record["longest_ok"] and t["result"] == "ok"), None)


def describe(record: dict) -> str:
    tried = ", ".join(f"{t['seq']} {t['result']}" for t in record["trials"])
    head = f"{record['status']}: longest {record['longest_ok'] or 'none'}"
    if record["first_failure"]:
        head += f", {record['first_failure']} ran out of memory"
    error = f"; {record['error'].splitlines()[0][:200]}" if record["error"] and record["status"] != "ok" else ""
    return f"{head} (tried {tried or 'nothing'}){error}"


def table(records: list[dict], ceiling: int) -> list[str]:
    """arm, card, longest length (``=`` the ceiling, ``>=`` a search that did not finish), peak reserved and
    NVML's GiB of the process at that length, its last step's seconds, status."""
    def gib(x):
        return f"{x:.2f}" if x is not None else "-"

    rows = [("arm", "card GiB", "longest seq", "peak reserved GiB", "process GiB (NVML)", "s/step", "status")]
    for r in records:
        best = at_longest(r)
        longest = "none" if r["longest_ok"] is None else str(r["longest_ok"])
        if r["longest_ok"] == ceiling:
            longest += " (ceiling)"
        elif r["status"] != "ok" and r["longest_ok"] is not None:
            longest = ">= " + longest
        rows.append((r["arm"], f"{r['card_gib']:g}", longest, gib(best and best["peak_reserved_gib"]),
                     gib(best and best["nvml_process_gib"]), f"{best['step_s'][-1]:.2f}" if best else "-",
                     r["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _numbers(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"{option} {text!r}: write sizes in GiB separated by commas, e.g. 16,24") from None
    if not values or any(not 0 < v < float("inf") for v in values):
        raise click.UsageError(f"{option} {text!r}: every card size must be a positive number of GiB")
    return values


def _labels(text: str) -> list[str]:
    """The arm labels, checked as `fastbench compare --arms` checks them (names, options, packages)."""
    from fastbench.bench import arms

    labels = [x.strip() for x in text.split(",") if x.strip()]
    if not labels:
        raise click.UsageError("--arms must name at least one arm")
    for label in labels:
        try:
            arms.check_label(label)
            arms.get_arm(label)
        except (arms.UnknownArm, arms.MissingPackage) as e:
            raise click.UsageError(str(e)) from None
        if arms.world_size(label) > 1:
            raise click.UsageError(f"--arms {label!r}: the search runs one process on one card; drop nproc")
    return list(dict.fromkeys(labels))


def _help() -> str:
    """The module's docstring as click shows it: the example kept as written."""
    paragraphs = __doc__.replace("``", "'").split("\n\n")
    return "\n\n".join("\b\n" + p if p.startswith("    ") else p for p in paragraphs)


@click.command(help=_help())
@click.option("--arms", "arms_text", default="fused-4bit:ckpt=offload,unsloth-qlora", show_default=True,
              metavar="LIST", help="Comma-separated arm labels, as `fastbench compare --arms` takes them.")
@click.option("--card-gib", default="16,24", show_default=True, metavar="LIST",
              help="Card sizes in GiB, comma-separated: each arm is searched once per card.")
@click.option("--model", default="llama-3-8b", show_default=True, help="A preset (random weights) or checkpoint.")
@click.option("--start", type=int, default=2048, show_default=True, help="The first length tried (tokens).")
@click.option("--granularity", type=int, default=1024, show_default=True,
              help="The bisection stops when the gap between trained and failed holds no multiple of this.")
@click.option("--max-seq", type=int, default=None,
              help="The longest length tried; above the model's max_position_embeddings it measures memory and "
                   "time only (the rotary embedding extrapolates) [the model's max_position_embeddings].")
@click.option("--steps", type=int, default=2, show_default=True,
              help="Training steps per length (the first may compile; the second has AdamW's state resident).")
@click.option("--alloc-conf", default="expandable_segments:True", show_default=True,
              help="PYTORCH_ALLOC_CONF of every process, as in `fastbench compare`; 'none': PyTorch's defaults.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=900, show_default=True,
              help="Seconds one process may take; a stopped one keeps the lengths it measured (status timeout).")
@click.option("--out", "out_path", default="results/longest-context.json", show_default=True,
              type=click.Path(dir_okay=False), help="The results file (JSON), rewritten after every process.")
@click.pass_context
def main(ctx, arms_text, card_gib, model, start, granularity, max_seq, steps, alloc_conf, timeout, out_path):
    import shutil
    import tempfile

    from fastbench.bench.arms import RunConfig
    from fastbench.bench.runner import worker_env
    from fastbench.interrupt import exit_code, sigterm_as_interrupt
    from fastbench.presets import NotAModel, UnknownPreset, resolve_model

    labels = _labels(arms_text)
    cards = _numbers(card_gib, "--card-gib")
    try:
        positions = resolve_model(model).max_seq_len
    except (UnknownPreset, NotAModel) as e:
        raise click.UsageError(str(e)) from None
    ceiling = max_seq if max_seq is not None else positions
    for name, value in (("--start", start), ("--granularity", granularity), ("--max-seq", ceiling),
                        ("--steps", steps)):
        if value <= 0:
            raise click.UsageError(f"{name} must be positive, got {value}")
    if start > ceiling:
        raise click.UsageError(f"--start {start} is above the ceiling {ceiling} (--max-seq, else the model's "
                               "max_position_embeddings): lower --start or raise --max-seq")
    from fastbench.env import collect_environment

    environment = collect_environment()
    device = "cuda" if environment["gpu"] else "cpu"
    if device == "cpu":
        click.echo("note: no CUDA GPU here: the processes run on the CPU with no card limit (a test of the tool)")
    alloc = None if alloc_conf.lower() == "none" else alloc_conf
    run = RunConfig(model=model, seq_len=ceiling, batch=1, grad_accum=1, steps=steps, warmup=0, device=device)
    searched = {"arms": labels, "card_gib": cards, "model": model, "model_max_positions": positions,
                "ceiling": ceiling, "ceiling_from": "--max-seq" if max_seq is not None else "max_position_embeddings",
                "start": start, "granularity": granularity, "steps": steps, "batch": 1, "alloc_conf": alloc,
                "timeout_s": timeout, "run": run.to_dict()}
    results = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "partial",
               "search": searched, "environment": environment, "records": []}
    specs = [{"arm": label, "card_gib": card, "run": run.to_dict(), "start": start, "granularity": granularity,
              "ceiling": ceiling, "steps": steps} for label in labels for card in cards]
    click.echo(f"longest context: {', '.join(labels)} on {model} within {', '.join(f'{c:g}' for c in cards)} GiB; "
               f"lengths {start}..{ceiling} (ceiling from {searched['ceiling_from']}), granularity {granularity}, "
               f"{steps} step(s) each; PYTORCH_ALLOC_CONF={alloc or '(PyTorch default)'}")
    scratch = tempfile.mkdtemp(prefix="fastbench-longest-")
    try:
        with sigterm_as_interrupt() as stop:
            finished = run_all(results, specs, out_path, worker_env(os.path.join(scratch, "checkpoints"), alloc),
                               scratch, timeout, echo=click.echo)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    click.echo("")
    click.echo("\n".join(table(results["records"], ceiling)))
    click.echo(f"\nresults: {out_path}")
    if not finished:
        ctx.exit(exit_code(stop))
    failed = [f"{r['arm']} at {r['card_gib']:g} GiB {r['status']}" for r in results["records"] if r["status"] != "ok"]
    if failed:
        click.echo("not finished: " + "; ".join(failed), err=True)
        ctx.exit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one process of a search, started by the parent below
        sys.exit(child_main(*sys.argv[2:4]))
    main()
