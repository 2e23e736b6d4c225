"""The training loop: steps of accumulated micro-batches, evaluation, checkpoints, the log and the plot.

One optimizer step = ``grad_accum`` micro-batches. Each micro-batch's loss is its summed token loss divided
by N, the label count of the whole step (``num_items_in_batch``), so the accumulated gradient is that of the
mean token loss over the step, however the tokens fall across micro-batches and rows (padding, packing,
ragged lengths, a short last step). AdamW, linear warm-up then linear decay to 0, gradient norm clipped at 1.

Which examples a step takes depends only on the seed and the step: epoch e is the examples shuffled by a
generator seeded with (seed, e), packed into rows (or one per row), ``batch`` rows per micro-batch. A
checkpoint records (epoch, steps done in it), and a resumed run takes exactly the steps the uninterrupted
run would have taken.

Several processes (fastbench.distributed): every rank builds the same global steps, of micro-batches of
``batch`` x world-size rows, and trains its own ``batch`` rows of each (fastbench.distributed.data); the
label count of a step is summed over the ranks, and DDP sums the LoRA gradients, so N ranks train exactly
what one process trains with N times the batch. Rank 0 alone writes the log and the checkpoints; a
checkpoint records the world size, and only a world of that size resumes it.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass

from fastbench.files import atomic_path
from fastbench.train.data import IGNORE_INDEX
from fastbench.train.packing import MicroBatch, pack_rows, packed_batch, padded_batch


# ------------------------------------------------------------------------------------------------ plans
def _rank_share(rows: list, rank: int, world_size: int, build) -> MicroBatch:
    """``build``(this rank's rows of a global micro-batch): its contiguous share, or, when that is empty, the
    first row without labels (fastbench.distributed.data)."""
    if world_size == 1:
        return build(rows)
    from fastbench.distributed.data import row_share, without_labels

    share = row_share(len(rows), rank, world_size)
    if share:
        return build(rows[share.start:share.stop])
    return MicroBatch(without_labels(build(rows[:1]).inputs), 0)


class ExamplePlan:
    """The steps over a list of examples, epoch after epoch (see the module docstring). ``batch`` rows per
    micro-batch on each of ``world_size`` ranks; ``micro_batch`` builds rank ``rank``'s share."""

    def __init__(self, examples: list[dict], batch: int, grad_accum: int, max_seq_length: int, packing: bool,
                 pad_id: int, seed: int, rank: int = 0, world_size: int = 1):
        self.examples, self.batch, self.grad_accum = examples, batch, grad_accum
        self.max_seq_length, self.packing, self.pad_id, self.seed = max_seq_length, packing, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self._cache: dict[int, list] = {}

    def epoch(self, e: int) -> list[list[list[list[int]]]]:
        """Epoch ``e`` as steps -> global micro-batches (``batch`` x world size rows) -> rows -> example indices."""
        if e not in self._cache:
            rng = random.Random(f"{self.seed}:{e}")
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            if self.packing:
                rows = pack_rows([len(self.examples[i]["input_ids"]) for i in order], self.max_seq_length)
                rows = [[order[j] for j in row] for row in rows]
                rng.shuffle(rows)
            else:
                rows = [[i] for i in order]
            width = self.batch * self.world_size
            micro = [rows[j: j + width] for j in range(0, len(rows), width)]
            self._cache = {e: [micro[j: j + self.grad_accum] for j in range(0, len(micro), self.grad_accum)]}
        return self._cache[e]

    def steps_in(self, epochs: int) -> int:
        return sum(len(self.epoch(e)) for e in range(epochs))

    def micro_batch(self, rows: list[list[int]]) -> MicroBatch:
        """This rank's share of the global micro-batch ``rows``."""
        return _rank_share(rows, self.rank, self.world_size, self._build)

    def _build(self, rows: list[list[int]]) -> MicroBatch:
        if self.packing:
            return packed_batch([[self.examples[i] for i in row] for row in rows], self.pad_id,
                                capacity=self.max_seq_length)
        return padded_batch([self.examples[row[0]] for row in rows], self.pad_id)

    def stream(self, position: dict):
        """(position after the step, its micro-batches) from ``position`` {"epoch", "step"} on, endlessly."""
        e, k = position["epoch"], position["step"]
        while True:
            steps = self.epoch(e)
            for j in range(k, len(steps)):
                after = {"epoch": e, "step": j + 1} if j + 1 < len(steps) else {"epoch": e + 1, "step": 0}
                yield after, [self.micro_batch(rows) for rows in steps[j]]
            e, k = e + 1, 0


class RandomPlan:
    """Endless steps of seeded random token ids (no padding), for smoke tests of presets; global micro-batches
    of ``batch`` x ``world_size`` rows, of which rank ``rank`` trains its share."""

    def __init__(self, vocab_size: int, seq_len: int, batch: int, grad_accum: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.vocab_size, self.seq_len, self.batch, self.grad_accum, self.seed = vocab_size, seq_len, batch, \
            grad_accum, seed
        self.rank, self.world_size = rank, world_size

    def stream(self, position: dict):
        import torch

        g = torch.Generator().manual_seed(self.seed)
        step = 0
        while True:
            micro = []
            for _ in range(self.grad_accum):
                ids = torch.randint(0, self.vocab_size, (self.batch * self.world_size, self.seq_len), generator=g)
                micro.append(_rank_share(list(ids), self.rank, self.world_size, self._build))
            step += 1
            if step > position["step"]:
                yield {"epoch": 0, "step": step}, micro

    @staticmethod
    def _build(rows: list) -> MicroBatch:
        import torch

        ids = torch.stack(rows)
        return MicroBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()},
                          ids.numel())


# ------------------------------------------------------------------------------------------------- step
def _world(world):
    from fastbench.distributed.world import World

    return world or World()


def step_label_count(micro_batches: list[MicroBatch], world=None) -> int:
    """N: the labels the loss sees in one optimizer step (shifted by one), over all its micro-batches and,
    in a ``world`` of several processes, over all of them (an all-reduce), so every rank divides by the
    same N."""
    from fastbench.distributed.world import all_reduce_sum

    local = sum(int((b.inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    return int(all_reduce_sum(local, _world(world)))


def accumulate(model, micro_batches: list[MicroBatch], world=None) -> tuple[float, int]:
    """Forward and backward of one optimizer step's micro-batches (this rank's, for a ``model`` under DDP:
    fastbench.distributed.ddp.wrap), each loss normalised by the step's label count over the world; the
    gradients are reduced over the ranks in the last micro-batch's backward only. Returns (mean token loss,
    real tokens), both of the whole world. No KV cache: transformers reads packed rows from position_ids
    only without one."""
    import torch

    from fastbench.distributed.ddp import sync_gradients
    from fastbench.distributed.world import all_reduce_sum

    world = _world(world)
    device = next(p for p in model.parameters() if p.requires_grad).device
    n = max(1, step_label_count(micro_batches, world))
    total = 0.0
    for i, b in enumerate(micro_batches):
        inputs = {k: v.to(device) for k, v in b.inputs.items()}
        with sync_gradients(model, last=i == len(micro_batches) - 1):
            loss = model(**inputs, num_items_in_batch=n, use_cache=False).loss
            loss.backward()
        total = total + loss.detach()
    if not world.grouped:
        return float(total), sum(b.tokens for b in micro_batches)
    summed = all_reduce_sum(torch.tensor([float(total), sum(b.tokens for b in micro_batches)],
                                         dtype=torch.float64), world)
    return float(summed[0]), int(summed[1])


def evaluate(model, micro_batches: list[MicroBatch], world=None) -> float:
    """Mean token loss over all labels of ``micro_batches`` (each rank's share in a ``world`` of several; no
    gradients; the model's mode is restored)."""
    import torch

    from fastbench.distributed.ddp import unwrap
    from fastbench.distributed.world import all_reduce_sum

    model = unwrap(model)
    device = next(p for p in model.parameters() if p.requires_grad).device
    n = max(1, step_label_count(micro_batches, world))
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for b in micro_batches:
                inputs = {k: v.to(device) for k, v in b.inputs.items()}
                total += float(model(**inputs, num_items_in_batch=n, use_cache=False).loss)
    finally:
        model.train(was_training)
    return float(all_reduce_sum(torch.tensor(total, dtype=torch.float64), _world(world)))


def eval_batches(examples: list[dict], batch: int, max_seq_length: int, packing: bool, pad_id: int, rank: int = 0,
                 world_size: int = 1):
    """The evaluation set as micro-batches, in order (packed or padded like training); rank ``rank``'s share
    of each of ``batch`` x ``world_size`` rows."""
    plan = ExamplePlan(examples, batch, 1, max_seq_length, packing, pad_id, 0, rank, world_size)
    if packing:
        rows = pack_rows([len(e["input_ids"]) for e in examples], max_seq_length)
    else:
        rows = [[i] for i in range(len(examples))]
    width = batch * world_size
    return [plan.micro_batch(rows[j: j + width]) for j in range(0, len(rows), width)]


def make_optimizer(model, lr: float, warmup_steps: int, total_steps: int):
    """AdamW over the trainable parameters and its schedule: linear warm-up, then linear decay to 0."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / (warmup_steps + 1), max(0.0, (total_steps - s) / max(1, total_steps - warmup_steps))))
    return params, optimizer, schedule


# -------------------------------------------------------------------------------------------------- log
def read_log(output: str) -> list[dict]:
    """The rows of train_log.jsonl; a last line without its newline (a write cut short by a full disk or a
    kill) is left out."""
    path = os.path.join(output, "train_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f.read().split("\n")[:-1] if line.strip()]


def keep_log_until(output: str, step: int) -> None:
    """Drops the log rows after ``step`` (a run resumed from that step writes them again)."""
    rows = [r for r in read_log(output) if r["step"] <= step]

    with atomic_path(os.path.join(output, "train_log.jsonl")) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def plot_loss(output: str) -> str | None:
    """loss.png: train (and eval) loss against step, from train_log.jsonl; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = read_log(output)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:  # no finished step (stopped at once): empty axes, no legend to draw
        ax.legend()
    path = os.path.join(output, "loss.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ------------------------------------------------------------------------------------------------- loop
class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"step {step}: loss {loss}, gradient norm {grad_norm}")


@dataclass
class LoopSettings:
    output: str
    steps: int
    lr: float
    warmup_steps: int
    save_every: int | None = None
    eval_every: int | None = None
    on_nan: str = "stop"


@dataclass
class LoopState:
    """What the loop has done so far (read by the caller when it stops early)."""

    done: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0
    last_checkpoint: str | None = None
    eval_loss: float | None = None


def train_loop(model, plan, settings: LoopSettings, state: LoopState, evaluation=None, resume: dict | None = None,
               progress=None, world=None) -> LoopState:
    """Runs the steps from ``resume`` (a loaded checkpoint) or from the start up to ``settings.steps``,
    updating ``state`` as it goes (so a caller catching an exception knows what finished). ``evaluation``:
    micro-batches of the eval set; evaluated every ``eval_every`` steps and at the end. Raises
    NonFiniteLoss for a step with a NaN/inf loss or gradient under ``on_nan="stop"``. In a ``world`` of
    several processes (``model`` under DDP, ``plan`` and ``evaluation`` this rank's shares) every rank runs
    it; rank 0 alone writes the log and the checkpoints."""
    import torch

    from fastbench.distributed.ddp import unwrap
    from fastbench.fused.state import checkpointing_plan
    from fastbench.train.checkpoint import restore, save_checkpoint

    world = _world(world)
    params, optimizer, schedule = make_optimizer(model, settings.lr, settings.warmup_steps, settings.steps)
    position = {"epoch": 0, "step": 0}
    if resume is not None:
        restore(resume, unwrap(model), optimizer, schedule)
        state.done, position = resume["step"], resume["position"]
        state.last_checkpoint = resume["path"]
    model.train()
    log_path = os.path.join(settings.output, "train_log.jsonl")

    def log(row):
        if world.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval():
        state.eval_loss = evaluate(model, evaluation, world)
        row = {"step": state.done, "eval_loss": state.eval_loss,
               "eval_ppl": math.exp(min(state.eval_loss, 700.0))}
        log(row)
        shown.update(eval_loss=f"{state.eval_loss:.4f}", eval_ppl=f"{row['eval_ppl']:.2f}")

    stream, shown, planned = plan.stream(position), {}, None
    while state.done < settings.steps:
        after, micro_batches = next(stream)
        start = time.perf_counter()
        lr_now = schedule.get_last_lr()[0]
        loss, tokens = accumulate(model, micro_batches, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        step = state.done + 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            if settings.on_nan == "stop":
                raise NonFiniteLoss(step, loss, grad_norm)
            schedule.step()
            state.done, state.skipped, position = step, state.skipped + 1, after
            log({"step": step, "skipped": f"loss {loss}, gradient norm {grad_norm}"})
        else:
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            state.done, position = step, after
            state.tokens += tokens
            state.seconds += seconds
            row = {"step": step, "loss": loss, "lr": float(f"{lr_now:.6g}"), "tokens": tokens,
                   "tokens_per_s": round(tokens / seconds, 1)}
            now = checkpointing_plan(unwrap(model))  # the budget mode's plan, logged and shown where it changed
            if now != planned:
                planned = row["checkpointing_plan"] = now
                if progress is not None and world.is_main:
                    progress.write(f"step {step}: checkpointing plan: {now}")
            log(row)
            shown.update(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:,.0f}")
        if progress is not None:
            progress.set_postfix(shown, refresh=False)
            progress.update()
        if evaluation and settings.eval_every and step % settings.eval_every == 0 and step < settings.steps:
            run_eval()
        if settings.save_every and step % settings.save_every == 0:
            path = os.path.join(settings.output, f"checkpoint-{step}")
            if world.is_main:
                path = save_checkpoint(settings.output, step, unwrap(model), optimizer, schedule, position,
                                       world.world_size)
            state.last_checkpoint = path
    if evaluation:
        run_eval()
    return state
