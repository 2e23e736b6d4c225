"""One benchmark process: ``python -m fastbench.bench.worker <spec.json> <out.json>``.

The spec holds ``arm`` (a label), ``repeat``, ``config`` (a RunConfig dict) and, for a run on a data file,
``data``: the path of the steps the parent prepared (fastbench.bench.file_data.prepare, as JSON). The worker builds the
arm (load time: its libraries' imports, torch's included, and its build, without writing the seed's checkpoint),
runs ``warmup`` steps timed on the wall clock (the first one is the time to first step) and ``steps`` timed
steps (CUDA events on a GPU, no synchronisation in between; perf_counter on a CPU), and writes one record:
per-step times, tokens and losses, peak memory three ways (torch allocated, torch reserved, NVML for this
process), the autotune tier per op, how busy the CPUs and the GPU were during the timed steps and the GPU's
energy, power and power-limit time meanwhile (fastbench.bench.busy), and the allocator settings as the arm left
them (``alloc_env``: an arm may set its own on import). Running out of memory gives status "oom"
(simulate with FASTBENCH_SIMULATE_OOM=<label or arm name>); any other failure status "error" with its
message (FASTBENCH_SIMULATE_KILL and _HANG: :func:`simulate_fault`). A step is: forward with labels and
backward for each micro-batch, optimizer step, zero grad; each micro-batch's loss (the mean over its label
tokens) is weighted by its share of the step's label tokens, so the step's loss is the mean over all of
them however they fall into micro-batches. ``tokens_per_step`` counts the real tokens of each timed step,
``positions_per_step`` every position computed, padding included. Started by torchrun (a label with
``nproc=N``), each process is one rank of a job (fastbench.distributed): the model under DDP, each rank its
rows of every global micro-batch; rank 0 writes the record, with the whole job's tokens and its own step
times and peak memory. With
``config.profile``, one more step after
everything above is measured runs under torch.profiler and gives ``profile`` (time per region, see
fastbench.bench.profile; ``{"error": ...}`` if that step fails); it is in no other figure.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import traceback

from fastbench.bench import busy
from fastbench.bench.profile import offloading
from fastbench.memory import is_out_of_memory

GIB = 2**30
ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
IGNORE_INDEX = -100  # the caching allocator's settings (new name, old name)


def _nvml_gib(device_index: int) -> tuple[float | None, float | None]:
    """(this process's GPU memory, the whole device's used memory) in GiB from NVML, None if unknown."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        device_used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / GIB
        mine = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == os.getpid() and p.usedGpuMemory]
        return (mine[0] / GIB if mine else None), device_used
    except Exception:  # no NVML, no permission, or PIDs in another namespace
        return None, None


def _autotune_tiers() -> dict | None:
    try:
        from fastbench.autotune import lookup
    except ImportError:
        return None
    tiers = getattr(lookup, "tiers_used", None)
    return dict(tiers()) if callable(tiers) else None


def _compiled_cache() -> dict | None:
    """The shipped compiled kernels as this process found them (installed by the fused path's install, see
    fastbench.autotune.compiled_cache), or None where that module is missing."""
    try:
        from fastbench.autotune import compiled_cache
    except ImportError:
        return None
    return compiled_cache.describe()


def _triton_compiled() -> int | None:
    """How many kernels Triton's on-disk cache holds (one entry per compiled kernel), or None where that
    cache cannot be read (an old Triton). A cache directory not yet made (a fresh machine) holds 0. The
    difference over the first step says how many kernels it compiled: a first step slowed by compiling, not
    by the code."""
    try:
        from triton import knobs

        cache_dir = knobs.cache.dir
        return len(os.listdir(cache_dir)) if os.path.exists(cache_dir) else 0
    except (ImportError, AttributeError, OSError, TypeError):
        return None


def _gc_timer(pauses: list):
    """A gc.callbacks entry appending (generation, seconds) of each collection to ``pauses``."""
    started = [0.0]

    def timer(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))
    return timer


def new_record(label: str, model: str, repeat: int, config: dict, status: str = "ok",
               error: str | None = None, world_size: int = 1) -> dict:
    """A worker record with nothing measured yet (the runner also uses it for processes that died)."""
    return {"arm": label, "model": model, "repeat": repeat, "world_size": world_size, "status": status,
            "error": error,
            "phase": "load", "load_s": None, "materialize_s": 0.0, "first_step_s": None, "first_step_compiles": None,
            "warmup_step_s": [], "step_s": [], "tokens_per_step": [], "positions_per_step": [], "losses": [],
            "peak_allocated_gib": None, "peak_reserved_gib": None, "nvml_process_gib": None,
            "nvml_device_gib": None, **dict.fromkeys(busy.FIELDS), "gc_timed": None, "offload_queue_waits": None,
            "checkpointing_plan": None,
            "autotune_tiers": None, "compiled_cache": None, "profile": None, "alloc_env": None, "config": config}


def run(spec: dict, world=None) -> dict:
    """One arm's process, or rank ``world.rank`` of a job of several (fastbench.distributed.world.World: the
    arm's model under DDP, each rank its share of every global micro-batch; the record, written by rank 0,
    counts the tokens of the whole job and times rank 0's steps)."""
    if not str(spec["config"].get("device", "cpu")).startswith("cuda"):
        # Triton kernels (the fused arms) on a CPU: its interpreter, chosen before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from fastbench.bench import arms, checkpoint_cache

    label = spec["arm"]
    name, options = arms.parse_label(label)
    arm = arms.get_arm(label)
    # an arm's load counts its libraries' imports: Unsloth's come here (it patches transformers on import, so it
    # must come first), the other arms' inside their build
    started = time.perf_counter()
    for module in arm.import_first:
        __import__(module)
    import torch

    imported_s = time.perf_counter() - started

    from fastbench.distributed import ddp
    from fastbench.distributed.data import shard_rows
    from fastbench.distributed.world import World
    from fastbench.train.loop import accumulate
    from fastbench.train.packing import MicroBatch

    world = world or World()
    cfg = arms.RunConfig.from_dict(spec["config"])
    cfg.arm_options = {**cfg.arm_options, **options}
    record = new_record(label, cfg.model, spec.get("repeat", 0), cfg.to_dict(), world_size=world.world_size)
    if world.grouped:
        cfg.device = str(world.device)
    cuda = cfg.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses = []
    try:
        if cuda and torch.device(cfg.device).index is not None:
            torch.cuda.set_device(torch.device(cfg.device))
        vocab_size = cfg.validate().vocab_size
        t0, written = time.perf_counter(), checkpoint_cache.materialize_seconds  # (a process may run more than once)
        model = ddp.wrap(arm.build(cfg), world)
        sync()
        record["materialize_s"] = checkpoint_cache.materialize_seconds - written
        record["load_s"] = imported_s + time.perf_counter() - t0 - record["materialize_s"]
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"arm {label!r} built a model with no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=cuda)
        steps, real_tokens = training_steps(spec, cfg, vocab_size, arm.packs, world.world_size)
        positions = [sum(b["input_ids"].numel() for b in step) for step in steps]
        batches = [[{k: v.to(cfg.device) for k, v in shard_rows(b, world.rank, world.world_size).items()}
                    for b in step] for step in steps]
        weights = [label_shares(micro_batches) for micro_batches in batches]
        simulate = os.environ.get("FASTBENCH_SIMULATE_OOM", "")

        def step(i):
            if world.grouped:  # the loss normalised over every rank's label tokens, LoRA gradients summed
                loss, _ = accumulate(model, [MicroBatch(b, 0) for b in batches[i]], world)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss
            total = 0.0
            for b, share in zip(batches[i], weights[i]):
                loss = model(**b).loss * share
                loss.backward()
                total = total + loss.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return total

        record["phase"] = "warmup"
        compiled = _triton_compiled()
        for i in range(cfg.warmup):
            t = time.perf_counter()
            losses.append(step(i))
            sync()
            record["warmup_step_s"].append(time.perf_counter() - t)
            after = _triton_compiled() if i == 0 and compiled is not None else None
            if after is not None:
                record["first_step_compiles"] = after - compiled
        record["phase"] = "timed"
        if simulate in (label, name):
            raise torch.OutOfMemoryError(f"simulated out of memory (FASTBENCH_SIMULATE_OOM={simulate})")
        timed = range(cfg.warmup, len(batches))
        # the model's build and the warm-up's compiles leave many young objects; a full collection of them
        # (long enough to show, the host idle meanwhile) is done here, not inside a timed step
        gc.collect()
        gc_pauses = []  # (generation, seconds) of the collections during the timed steps: a long one starves the GPU
        gc.callbacks.append(timer := _gc_timer(gc_pauses))
        gpu_index = torch.cuda.current_device() if cuda else None
        busy_start = busy.Sample(gpu_index)
        offload = offloading(ddp.unwrap(model))
        waited = offload.queue_waits if offload is not None else None
        if cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(timed) + 1)]
            events[0].record()
            for i, b in enumerate(timed):
                losses.append(step(b))
                events[i + 1].record()
            sync()
            record["step_s"] = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(len(timed))]
        else:
            for b in timed:
                t = time.perf_counter()
                losses.append(step(b))
                record["step_s"].append(time.perf_counter() - t)
        record.update(busy.between(busy_start, busy.Sample(gpu_index), gpu_index))
        if offload is not None:
            record["offload_queue_waits"] = (offload.queue_waits - waited) / len(timed)
        from fastbench.fused.state import checkpointing_plan  # once built: Unsloth's arms import their packages first

        record["checkpointing_plan"] = checkpointing_plan(ddp.unwrap(model))
        gc.callbacks.remove(timer)
        record["gc_timed"] = {"collections": [sum(1 for g, _ in gc_pauses if g == gen) for gen in range(3)],
                              "ms": 1e3 * sum(t for _, t in gc_pauses),
                              "max_ms": 1e3 * max((t for _, t in gc_pauses), default=0.0)}
        record["first_step_s"] = (record["warmup_step_s"] or record["step_s"])[0]
        record["tokens_per_step"] = real_tokens[cfg.warmup:]
        record["positions_per_step"] = positions[cfg.warmup:]
        record["phase"] = "done"
    except Exception as exc:  # recorded, never raised: the run goes on with the next arm
        record["status"] = "oom" if is_out_of_memory(exc) else "error"
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
    record["losses"] = [float(x) for x in losses]
    if cuda:
        record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        record["nvml_process_gib"], record["nvml_device_gib"] = _nvml_gib(torch.cuda.current_device())
    record["autotune_tiers"] = _autotune_tiers()
    record["compiled_cache"] = _compiled_cache()
    record["alloc_env"] = {k: os.environ[k] for k in ALLOC_ENV if k in os.environ}  # as the arm left them
    if cfg.profile and record["status"] == "ok":
        from fastbench.bench.profile import profile_step

        try:
            record["profile"] = profile_step(lambda: step(len(batches) - 1), cuda, offloading(ddp.unwrap(model)))
        except Exception as exc:  # the measured steps stand; the breakdown is missing
            record["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return record


def training_steps(spec: dict, cfg, vocab_size: int, packs: bool,
                   world_size: int = 1) -> tuple[list[list[dict]], list[int]]:
    """(every step's global micro-batches, on the CPU; every step's real tokens): random tokens
    (fastbench.bench.data), or the steps of a data file the parent prepared (``spec["data"]``: for this job's
    world size), packed for an arm that ``packs`` (with ``cfg.packing``), padded for the others. A job of
    ``world_size`` ranks takes ``world_size x batch`` rows per micro-batch, ``batch`` on each rank."""
    import dataclasses

    cfg = dataclasses.replace(cfg, batch=cfg.batch * world_size)
    if not spec.get("data"):
        from fastbench.bench.data import count_tokens, make_steps

        steps = make_steps(cfg, vocab_size, "cpu")
        return steps, [count_tokens(s) for s in steps]
    from fastbench.bench.file_data import micro_batches

    with open(spec["data"]) as f:
        prepared = json.load(f)
    steps, real = [], []
    for examples in prepared["steps"][: cfg.warmup + cfg.steps]:
        mbs = micro_batches(examples, packs and cfg.packing, cfg.batch, cfg.seq_len, prepared["pad_id"])
        steps.append([mb.inputs for mb in mbs])
        real.append(sum(mb.tokens for mb in mbs))
    return steps, real


def label_shares(micro_batches: list[dict]) -> list[float]:
    """Each micro-batch's share of its step's label tokens (labels shifted by one, as the causal loss takes
    them): the weight of its mean loss in the step's mean."""
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches]
    total = sum(counts)
    return [c / total if total else 1 / len(counts) for c in counts]


def simulate_fault(label: str) -> None:
    """Tests of the harness: FASTBENCH_SIMULATE_KILL=<label or arm name> makes this worker die by SIGKILL
    (as the kernel's out-of-memory killer does), FASTBENCH_SIMULATE_HANG=<...> makes it hang; before it
    loads anything."""
    names = (label, label.split(":")[0].split("#")[0])
    if os.environ.get("FASTBENCH_SIMULATE_KILL") in names:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("FASTBENCH_SIMULATE_HANG") in names:
        time.sleep(24 * 3600)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    simulate_fault(spec["arm"])
    from fastbench.distributed.launch import torchrun_env

    if torchrun_env() is None:
        _write(run(spec), argv[1])
        return 0
    from fastbench.distributed.world import process_group  # a rank of a job torchrun started

    with process_group(spec.get("backend")) as world:
        record = run(spec, world)
        if world.is_main:
            _write(record, argv[1])
        if record["status"] != "ok":  # other ranks may wait in a collective: end the job (torchrun stops them)
            print(f"rank {world.rank}: {record.get('traceback') or record['error']}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
    return 0


def _write(record: dict, path: str) -> None:
    from fastbench.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
