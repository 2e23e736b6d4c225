"""The tuner behind ``fastbench tune``: check every candidate against the reference, time it, keep
the winner only when it beats the heuristic default by more than the noise.

For each op spec found under ``fastbench.kernels`` (modules with a ``SPEC`` or ``SPECS``) and each
``(pass, problem)`` of ``spec.problems(model_config, tokens, dtype)``:

- ``case = spec.tune_case(pass, problem, device)``; each candidate's output must be within
  ``case.tolerance`` relative norm error of ``case.expected`` (NaN fails);
- usable candidates are screened with a few repeats, then the default and the 4 fastest are timed
  in full (CUDA events after warm-up, L2 flushed, many repeats); a failure to compile, out of
  resources, OOM or a wrong answer scores ``inf`` and the sweep goes on;
- candidates run in a spawned worker process; one that hangs past the timeout or kills the process
  is scored ``inf``, the worker is restarted and the rest of the candidates go on;
- a candidate replaces the default only if its p90 is below the default's p10 and its median is more
  than 3% below the default's; of several, the fastest median, then the earliest (deterministic);
- each problem's result is written to the cache at once, so an interrupted run keeps its progress.

With ``checkers`` (``fastbench tune --jobs N``, N > 1) the tune has two phases. Phase 1 (:func:`check`):
N spawned workers take problems from a queue and run each candidate once against the reference, so
that Triton compiles it into its on-disk cache (shared by all processes) and wrong answers, compile
failures, OOM, hangs and crashes are recorded exactly as in the serial path; nothing is timed. Phase 2
(serial): only the candidates that passed are screened and timed, their kernels now cache hits. Each
phase-1 worker holds a CUDA context and the inputs of one problem, so the GPU memory of phase 1 is
bounded by N times the largest problem (fine on an 80+ GB GPU; fewer jobs use less); the workers are
closed before phase 2, whose timing never shares the GPU with them.
"""
from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import os
import pkgutil
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import key, store
from .spec import Config, OpSpec, Problem, TuneCase

log = logging.getLogger("fastbench.autotune")

KERNELS_PACKAGE = "fastbench.kernels"
MARGIN = 0.03
FINALISTS = 4
# timer(run, quick) -> per-repeat milliseconds; quick=True is the cheap screening pass
Timer = Callable[[Callable[[], Any], bool], Sequence[float]]
CHECKED = "checked"  # the status of a candidate that passed phase 1 (run once, right answer, not timed)


# --- discovery and planning ---

@dataclass(frozen=True)
class SpecRef:
    """Where a spec lives, so that a worker process can import it again."""
    module: str
    spec: OpSpec

    @property
    def name(self) -> str:
        return self.spec.name


def specs_of(module: Any) -> list[OpSpec]:
    found = [getattr(module, "SPEC", None), *getattr(module, "SPECS", ())]
    return [s for s in found if isinstance(s, OpSpec)]


def load_spec(module: str, name: str) -> OpSpec:
    for s in specs_of(importlib.import_module(module)):
        if s.name == name:
            return s
    raise LookupError(f"{module} declares no op spec named {name!r}")


def discover(modules: Iterable[str] | None = None) -> list[SpecRef]:
    """The op specs of ``modules`` (default: every module of ``fastbench.kernels``); a module that
    fails to import is reported and skipped."""
    if modules is None:
        pkg = importlib.import_module(KERNELS_PACKAGE)
        modules = [f"{KERNELS_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    refs = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # a kernel module in progress must not stop the others
            log.warning("skipping %s: %s: %s", name, type(e).__name__, e)
            continue
        refs += [SpecRef(name, s) for s in specs_of(mod)]
    return refs


@dataclass(frozen=True)
class Job:
    """One (op, pass, problem) to tune; ``problem`` has its tokens set to the bucket."""
    ref: SpecRef
    pass_name: str
    problem: Mapping[str, Any]
    key: str

    @property
    def label(self) -> str:
        return f"{self.ref.name}/{self.pass_name} {key.problem_string(key.canonical_problem(self.problem))}"


def token_buckets(lo: int, hi: int) -> list[int]:
    """Powers of two covering [lo, hi]: 1000-5000 -> [1024, 2048, 4096, 8192]."""
    out, b = [], key.bucket(lo)
    while b < hi * 2 and (not out or out[-1] < hi):
        out.append(b)
        b *= 2
    return out


def make_job(ref: SpecRef, pass_name: str, problem: Problem) -> Job:
    canon = key.canonical_problem(problem)
    problem = dict(problem)
    if key.TOKENS in problem:
        problem[key.TOKENS] = canon[key.TOKENS]
    return Job(ref, pass_name, problem, key.entry_key(ref.name, pass_name, key.kernel_hash(ref.spec), canon))


def plan(refs: Sequence[SpecRef], model_configs: Sequence[Any], tokens: Sequence[int], dtype: Any) -> list[Job]:
    """Every distinct (op, pass, bucketed problem) that the models' steps launch, in a stable order."""
    jobs: dict[str, Job] = {}
    for ref in refs:
        if ref.spec.problems is None or ref.spec.tune_case is None:
            continue
        for cfg in model_configs:
            for t in tokens:
                for pass_name, problem in ref.spec.problems(cfg, t, dtype):
                    job = make_job(ref, pass_name, problem)
                    jobs.setdefault(job.key, job)
    return list(jobs.values())


# --- measuring one candidate ---

@dataclass(frozen=True)
class Measurement:
    """Milliseconds: median, p10, p90 of the repeats (all inf when unusable) and why."""
    median: float
    p10: float
    p90: float
    status: str = "ok"

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Measurement":
        s = sorted(float(x) for x in samples)
        if not s or not all(math.isfinite(x) for x in s):
            return cls.failed("timer returned no finite samples")
        q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
        return cls(q(0.5), q(0.1), q(0.9))

    @classmethod
    def checked(cls) -> "Measurement":
        """Usable but not timed (phase 1): zeros, so it is never mistaken for a timing."""
        return cls(0.0, 0.0, 0.0, CHECKED)

    @classmethod
    def failed(cls, why: str) -> "Measurement":
        return cls(math.inf, math.inf, math.inf, why)

    @property
    def usable(self) -> bool:
        return math.isfinite(self.median)


def rel_error(out: Any, expected: Any) -> float:
    """max over the outputs of ||out - expected|| / ||expected|| (fp64); inf on NaN or mismatch."""
    import torch

    if isinstance(expected, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(expected):
            return math.inf
        return max((rel_error(o, e) for o, e in zip(out, expected)), default=0.0)
    if expected is None:
        return 0.0 if out is None else math.inf
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
        return math.inf
    compute = torch.float64 if expected.dtype == torch.float64 else torch.float32
    o, e = out.detach().to(compute), expected.detach().to(device=out.device, dtype=compute)
    if not torch.isfinite(o).all():
        return math.inf
    err = torch.linalg.vector_norm(o - e).item()
    ref = torch.linalg.vector_norm(e).item()
    return err / ref if ref > 0 else err


def evaluate(case: TuneCase, config: Config, timer: Timer | None, quick: bool = False) -> Measurement:
    """Check ``config`` against the reference, then time it (``timer`` None: check only); any
    failure scores inf."""
    try:
        err = rel_error(case.run(config), case.expected)
        if not err <= case.tolerance:
            return Measurement.failed(f"wrong answer: relative error {err:.3g} > {case.tolerance:.3g}")
        if timer is None:
            return Measurement.checked()
        return Measurement.of(timer(lambda: case.run(config), quick))
    except Exception as e:  # compile error, out of resources, OOM, launch failure
        return Measurement.failed(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def cuda_timer(run: Callable[[], Any], quick: bool = False, warmup_ms: float = 10.0, rep_ms: float = 60.0,
               min_reps: int = 25, max_reps: int = 500) -> list[float]:
    """Per-repeat milliseconds by CUDA events, after warm-up, with L2 flushed before every repeat;
    ``quick``: a few repeats for screening."""
    import torch

    if quick:
        warmup_ms, rep_ms, min_reps, max_reps = 2.0, 5.0, 5, 20
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        run()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        run()
    n = min(max(int(rep_ms / estimate), min_reps), max_reps)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        flush.zero_()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def _device_broken(device: str) -> bool:
    """After a failure: is the CUDA context unusable (an illegal access is sticky)?"""
    if not device.startswith("cuda"):
        return False
    import torch

    try:
        torch.cuda.synchronize()
        return False
    except Exception:
        return True


# --- running candidates: in this process, or in a worker process that can be killed ---

class _Cases:
    """The tune case of the last job, kept for its second (finalists) pass."""

    def __init__(self, device: str):
        self.device, self.key, self.case = device, None, None

    def get(self, module: str, name: str, pass_name: str, problem: Mapping, job_key: str) -> TuneCase:
        if self.key != job_key:
            self.key = self.case = None
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            self.case = load_spec(module, name).tune_case(pass_name, dict(problem), self.device)
            self.key = job_key
        return self.case


class InProcess:
    """Evaluate in this process (tests with a fake timer; no protection against hangs); ``timer``
    None checks without timing."""

    def __init__(self, timer: Timer | None = cuda_timer, device: str = "cuda"):
        self.timer, self.cases = timer, _Cases(device)

    def measure(self, job: Job, configs: Sequence[Config], quick: bool = False) -> list[Measurement]:
        try:
            case = self.cases.get(job.ref.module, job.ref.name, job.pass_name, job.problem, job.key)
        except Exception as e:
            return [Measurement.failed(f"tune case failed: {type(e).__name__}: {e}")] * len(configs)
        return [evaluate(case, c, self.timer, quick) for c in configs]

    def close(self) -> None:
        pass

    abort = close


def _worker_main(conn, timer: Timer | None, device: str) -> None:
    """Child process: for each job, build (or reuse) the case, then report every candidate in turn
    (a pipe, not a queue: each message is written before the next candidate can kill the process)."""
    cases = _Cases(device)
    while True:
        item = conn.recv()
        if item is None:
            return
        module, name, pass_name, problem, job_key, quick, todo = item
        try:
            case = cases.get(module, name, pass_name, problem, job_key)
        except Exception as e:
            conn.send(("case_failed", f"{type(e).__name__}: {e}"))
            continue
        conn.send(("ready",))
        for i, config in todo:
            m = evaluate(case, config, timer, quick)
            conn.send(("result", i, (m.median, m.p10, m.p90, m.status)))
            if not m.usable and _device_broken(device):
                conn.send(("restart",))  # a sticky CUDA error: the next candidates need a new process
                os._exit(3)
        conn.send(("done",))


class Worker:
    """A spawned worker; a candidate that runs past ``timeout`` seconds (or kills the worker) scores
    inf, the worker is restarted and the remaining candidates go on. Building the case (inputs and
    reference) may take ``setup_timeout`` seconds. ``timer`` None: check only (phase 1). The process
    is spawned (never forked: CUDA cannot survive a fork) at the first ``measure``."""

    def __init__(self, timeout: float = 60.0, timer: Timer | None = cuda_timer, device: str = "cuda",
                 setup_timeout: float = 300.0):
        self.timeout, self.timer, self.device, self.setup_timeout = timeout, timer, device, setup_timeout
        self.ctx = mp.get_context("spawn")
        self.proc, self.aborted = None, False

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, args=(child, self.timer, self.device), daemon=True)
        self.proc.start()
        child.close()

    def _get(self, timeout: float) -> tuple:
        """The next message, ``("timeout",)`` or ``("died", exit code)``."""
        try:
            return self.conn.recv() if self.conn.poll(timeout) else ("timeout",)
        except (EOFError, OSError):
            self.proc.join(5)
            return ("died", self.proc.exitcode)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
            self.conn.close()
            self.proc = None

    def measure(self, job: Job, configs: Sequence[Config], quick: bool = False) -> list[Measurement]:
        out: list[Measurement | None] = [None] * len(configs)
        todo = list(range(len(configs)))
        while todo:
            if self.proc is None or not self.proc.is_alive():
                if self.aborted:
                    raise RuntimeError("the worker was aborted")
                self._start()
            try:
                self.conn.send((job.ref.module, job.ref.name, job.pass_name, dict(job.problem), job.key, quick,
                                [(i, dict(configs[i])) for i in todo]))
            except OSError:  # it died since the last job
                self.kill()
                continue
            msg = self._get(self.setup_timeout)
            if msg[0] != "ready":
                why = {"timeout": f"timed out after {self.setup_timeout:g} s",
                       "died": f"crashed the worker (exit code {msg[-1]})"}.get(msg[0], msg[-1])
                if msg[0] != "case_failed":
                    self.kill()
                for i in todo:
                    out[i] = Measurement.failed(f"tune case failed: {why}")
                break
            while todo:
                msg = self._get(self.timeout)
                if msg[0] == "restart":
                    self.kill()
                    break
                if msg[0] != "result":  # todo[0] hung or took the worker down
                    why = (f"hung: killed after {self.timeout:g} s" if msg[0] == "timeout"
                           else f"crashed the worker (exit code {msg[-1]})")
                    self.kill()
                    out[todo.pop(0)] = Measurement.failed(why)
                    break
                _, i, (median, p10, p90, status) = msg
                out[i] = Measurement(median, p10, p90, status)
                todo.remove(i)
            if not todo and self.proc is not None and self._get(self.timeout)[0] != "done":
                self.kill()
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)
        self.kill()

    def abort(self) -> None:
        """Kill the process now and start no other (Ctrl-C, from another thread than the caller of
        ``measure``: that call then raises)."""
        self.aborted = True
        self.kill()


# --- choosing and tuning ---

def beats(candidate: Measurement, default: Measurement, margin: float = MARGIN) -> bool:
    """More than the noise faster: p90 below the default's p10 and median more than ``margin`` lower."""
    return (candidate.usable and candidate.p90 < default.p10
            and candidate.median < default.median * (1 - margin))


def choose(measured: Sequence[Measurement], default: int, margin: float = MARGIN) -> int | None:
    """Index of the winner: the default unless some candidate beats it (then the fastest median, the
    earliest on ties); if the default is unusable, the fastest usable; None if nothing is usable."""
    pool = ([i for i, m in enumerate(measured) if i != default and beats(m, measured[default], margin)]
            if measured[default].usable else [i for i, m in enumerate(measured) if m.usable])
    if pool:
        return min(pool, key=lambda i: (measured[i].median, i))
    return default if measured[default].usable else None


def _configs(spec: OpSpec, pass_name: str, problem: Problem) -> tuple[list[Config], int]:
    """Today's candidates (+ the default if it is not one) and the index of the default."""
    configs = list(spec.candidates[pass_name])
    default = spec.heuristic(pass_name, problem)
    for i, c in enumerate(configs):
        if dict(c) == dict(default):
            return configs, i
    return configs + [default], len(configs)


@dataclass
class Outcome:
    job: Job
    status: str  # "tuned", "cached", "failed"
    config: Config | None = None
    ms: float = math.nan
    default_ms: float = math.nan
    is_default: bool = True
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.default_ms / self.ms if self.ms and math.isfinite(self.default_ms) else math.nan


def _entry(job: Job, config: Config, win: Measurement, default: Measurement) -> dict:
    return {"op": job.ref.name, "pass": job.pass_name, "kernel": key.kernel_hash(job.ref.spec),
            "problem": key.canonical_problem(job.problem), "config": dict(config),
            "ms": win.median, "p10": win.p10, "p90": win.p90, "default_ms": default.median,
            "speedup": default.median / win.median if default.usable else None,
            "tuned": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def finalists(screen: Sequence[Measurement], default: int, k: int = FINALISTS) -> list[int]:
    """The default (if usable) and the ``k`` fastest other usable candidates of the screening pass."""
    others = sorted((i for i, m in enumerate(screen) if m.usable and i != default), key=lambda i: (screen[i].median, i))
    return ([default] if screen[default].usable else []) + others[:k]


def _measure_into(out: list, runner, job: Job, configs: Sequence[Config], picks: Sequence[int], quick: bool = False) -> None:
    """``out[i] = `` the measurement of ``configs[i]`` for each ``i`` of ``picks`` (one worker call)."""
    for i, m in zip(picks, runner.measure(job, [configs[i] for i in picks], quick) if picks else []):
        out[i] = m


def tune_one(job: Job, runner, margin: float = MARGIN, k: int = FINALISTS,
             checked: Sequence[Measurement] | None = None) -> tuple[Outcome, dict | None]:
    """Screen every candidate of one job (correctness + a few repeats), time the default and the
    ``k`` fastest in full, choose; the outcome and the cache entry to store (or None). ``checked``:
    the job's phase-1 results (see :func:`check`); the candidates that failed there keep their
    failure and are not run again."""
    spec = job.ref.spec
    configs, d = _configs(spec, job.pass_name, job.problem)
    screen = list(checked) if checked is not None else [None] * len(configs)
    _measure_into(screen, runner, job, configs, [i for i, m in enumerate(screen) if m is None or m.usable], quick=True)
    picks = finalists(screen, d, k)
    measured = [m if not m.usable else Measurement.failed("screened out") for m in screen]
    _measure_into(measured, runner, job, configs, picks)
    failures = {str(dict(c)): m.status for c, m in zip(configs, measured) if not m.usable and m.status != "screened out"}
    w = choose(measured, d, margin)
    if w is None:
        return Outcome(job, "failed", failures=failures), None
    outcome = Outcome(job, "tuned", configs[w], measured[w].median, measured[d].median, w == d, failures)
    if w >= len(spec.candidates[job.pass_name]):  # the default won but is no candidate: heuristic serves it
        return outcome, None
    return outcome, _entry(job, configs[w], measured[w], measured[d])


def check(jobs: Sequence[Job], checkers: Sequence, deadline: float = math.inf,
          progress: Callable[[Job], None] | None = None) -> dict[str, list[Measurement]]:
    """Phase 1: run every candidate of every job once against the reference (compiling it into
    Triton's on-disk cache), on ``len(checkers)`` runners at once; job key -> one measurement per
    candidate of ``_configs`` (``Measurement.checked()`` or the failure). Each runner (a
    ``Worker(timer=None)``: its own spawned process) is driven by a thread that takes jobs from a
    queue, and is closed when the queue is empty. No job starts after ``deadline``; ``progress`` is
    called here, in the caller's thread, as each job is done; Ctrl-C kills the workers."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    done: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    results: dict[str, list[Measurement]] = {}

    def drive(runner) -> None:
        try:
            while not stop.is_set() and time.monotonic() <= deadline:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    break
                configs, _ = _configs(job.ref.spec, job.pass_name, job.problem)
                results[job.key] = runner.measure(job, configs)
                done.put(job)
        except Exception as e:  # after a Ctrl-C the runner is killed under this thread's feet
            if not stop.is_set():
                log.warning("a checking worker stopped: %s: %s", type(e).__name__, e)
        finally:
            if not stop.is_set():
                runner.close()
            done.put(None)

    threads = [threading.Thread(target=drive, args=(r,), daemon=True) for r in checkers]
    for t in threads:
        t.start()
    try:
        running = len(threads)
        while running:
            try:
                job = done.get(timeout=0.2)  # a timeout, so that Ctrl-C reaches this thread
            except queue.Empty:
                continue
            if job is None:
                running -= 1
            elif progress:
                progress(job)
    except BaseException:
        stop.set()
        for r in checkers:
            r.abort()
        raise
    return results


def tune(jobs: Sequence[Job], runner, path: Path, device: Mapping, tools: Mapping, force: bool = False,
         margin: float = MARGIN, progress: Callable[[Job, Outcome | None], None] | None = None,
         deadline: float = math.inf, checkers: Sequence = ()) -> list[Outcome]:
    """Tune ``jobs``, writing each result to the cache file ``path`` as soon as it is known; cached
    entries (still candidates) are kept unless ``force``. No job starts after ``deadline``
    (``time.monotonic()``): a later run carries on from the cache. With ``checkers``, phase 1
    (:func:`check`) runs first on the jobs not cached and ``progress(job, None)`` reports each job
    once there (cached ones at once); then every job is reported with its outcome."""
    cached = (store.read(path) or {}).get("entries", {}) if not force else {}

    def cached_outcome(job: Job) -> Outcome | None:
        hit = cached.get(job.key)
        if hit is None or not any(dict(c) == hit["config"] for c in job.ref.spec.candidates[job.pass_name]):
            return None
        return Outcome(job, "cached", hit["config"], hit.get("ms", math.nan), hit.get("default_ms") or math.nan,
                       hit["config"] == dict(job.ref.spec.heuristic(job.pass_name, job.problem)))

    checked: dict[str, list[Measurement]] = {}
    if checkers:
        todo = []
        for job in jobs:
            if cached_outcome(job) is None:
                todo.append(job)
            elif progress:
                progress(job, None)
        checked = check(todo, checkers, deadline, progress and (lambda j: progress(j, None)))
    outcomes = []
    for job in jobs:
        if time.monotonic() > deadline:
            break
        outcome = cached_outcome(job)
        if outcome is None:
            outcome, entry = tune_one(job, runner, margin, checked=checked.get(job.key))
            if entry is not None:
                store.update(path, device, tools, {job.key: entry})
            elif force:
                store.update(path, device, tools, {}, drop={job.key})
        outcomes.append(outcome)
        if progress:
            progress(job, outcome)
    return outcomes


def verify(jobs: Sequence[Job], entries: Mapping[str, Mapping], runner, margin: float = MARGIN) -> list[dict]:
    """Re-time each cached winner that is not the default against the default: "faster" (still beats
    it by more than the noise), "within noise" or "slower"."""
    rows = []
    for job in jobs:
        e = entries.get(job.key)
        default = job.ref.spec.heuristic(job.pass_name, job.problem)
        if e is None or e["config"] == dict(default):
            continue
        win, base = runner.measure(job, [e["config"], default])
        if beats(win, base, margin):
            verdict = "faster"
        elif not win.usable or win.median > base.median:
            verdict = "slower"
        else:
            verdict = "within noise"
        rows.append({"op": job.ref.name, "pass": job.pass_name, "problem": key.canonical_problem(job.problem),
                     "config": e["config"], "default": dict(default), "ms": win.median, "default_ms": base.median,
                     "speedup": base.median / win.median if win.usable else 0.0, "verdict": verdict,
                     "cached_speedup": e.get("speedup")})
    return rows


def summarise(outcomes: Sequence[Outcome]) -> list[dict]:
    """Per op/pass: problems, how many winners differ from the default, the most frequent winner,
    summed tuned vs default time (ms) and their ratio, the best single speedup, failures."""
    by_op: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_op.setdefault(f"{o.job.ref.name}/{o.job.pass_name}", []).append(o)
    rows = []
    for name, os_ in by_op.items():
        ok = [o for o in os_ if o.config is not None]
        timed = [o for o in ok if math.isfinite(o.ms) and math.isfinite(o.default_ms)]
        ms, dms = sum(o.ms for o in timed), sum(o.default_ms for o in timed)
        common = Counter(key.problem_string(dict(o.config)) for o in ok).most_common(1)
        rows.append({"op": name, "problems": len(os_), "non_default": sum(not o.is_default for o in ok),
                     "failed": sum(o.status == "failed" for o in os_), "winner": common[0][0] if common else "-",
                     "ms": ms, "default_ms": dms, "speedup": dms / ms if ms else math.nan,
                     "best_speedup": max((o.speedup for o in timed), default=math.nan)})
    return rows
