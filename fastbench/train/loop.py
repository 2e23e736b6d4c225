"""The training loop: steps of accumulated micro-batches, evaluation, checkpoints, the log and the plot.

One optimizer step = ``grad_accum`` micro-batches. Each micro-batch's loss is its summed token loss divided
by N, the label count of the whole step (``num_items_in_batch``), so the accumulated gradient is that of the
mean token loss over the step, however the tokens fall across micro-batches and rows (padding, packing,
ragged lengths, a short last step). AdamW, linear warm-up then linear decay to 0, gradient norm clipped at 1.

Which examples a step takes depends only on the seed and the step: epoch e is the examples shuffled by a
generator seeded with (seed, e), packed into rows (or one per row), ``batch`` rows per micro-batch. A
checkpoint records (epoch, steps done in it), and a resumed run takes exactly the steps the uninterrupted
run would have taken.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass

from fastbench.train.data import IGNORE_INDEX
from fastbench.train.packing import MicroBatch, pack_rows, packed_batch, padded_batch


# ------------------------------------------------------------------------------------------------ plans
class ExamplePlan:
    """The steps over a list of examples, epoch after epoch (see the module docstring)."""

    def __init__(self, examples: list[dict], batch: int, grad_accum: int, max_seq_length: int, packing: bool,
                 pad_id: int, seed: int):
        self.examples, self.batch, self.grad_accum = examples, batch, grad_accum
        self.max_seq_length, self.packing, self.pad_id, self.seed = max_seq_length, packing, pad_id, seed
        self._cache: dict[int, list] = {}

    def epoch(self, e: int) -> list[list[list[list[int]]]]:
        """Epoch ``e`` as steps -> micro-batches -> rows -> example indices."""
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
            micro = [rows[j: j + self.batch] for j in range(0, len(rows), self.batch)]
            self._cache = {e: [micro[j: j + self.grad_accum] for j in range(0, len(micro), self.grad_accum)]}
        return self._cache[e]

    def steps_in(self, epochs: int) -> int:
        return sum(len(self.epoch(e)) for e in range(epochs))

    def micro_batch(self, rows: list[list[int]]) -> MicroBatch:
        if self.packing:
            return packed_batch([[self.examples[i] for i in row] for row in rows], self.pad_id)
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
    """Endless steps of seeded random token ids (no padding), for smoke tests of presets."""

    def __init__(self, vocab_size: int, seq_len: int, batch: int, grad_accum: int, seed: int):
        self.vocab_size, self.seq_len, self.batch, self.grad_accum, self.seed = vocab_size, seq_len, batch, \
            grad_accum, seed

    def stream(self, position: dict):
        import torch

        g = torch.Generator().manual_seed(self.seed)
        step = 0
        while True:
            micro = []
            for _ in range(self.grad_accum):
                ids = torch.randint(0, self.vocab_size, (self.batch, self.seq_len), generator=g)
                micro.append(MicroBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "labels": ids.clone()}, ids.numel()))
            step += 1
            if step > position["step"]:
                yield {"epoch": 0, "step": step}, micro


# ------------------------------------------------------------------------------------------------- step
def step_label_count(micro_batches: list[MicroBatch]) -> int:
    """N: the labels the loss sees in one optimizer step (shifted by one), over all its micro-batches. Across
    several processes this is where the count would be summed over all of them (an all-reduce), so every
    rank divides by the same N."""
    return sum(int((b.inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)


def accumulate(model, micro_batches: list[MicroBatch]) -> tuple[float, int]:
    """Forward and backward of one optimizer step's micro-batches, each loss normalised by the step's label
    count. Returns (mean token loss, real tokens). No KV cache: transformers reads packed rows from
    position_ids only without one."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    n = max(1, step_label_count(micro_batches))
    total = 0.0
    for b in micro_batches:
        inputs = {k: v.to(device) for k, v in b.inputs.items()}
        loss = model(**inputs, num_items_in_batch=n, use_cache=False).loss
        loss.backward()
        total = total + loss.detach()
    return float(total), sum(b.tokens for b in micro_batches)


def evaluate(model, micro_batches: list[MicroBatch]) -> float:
    """Mean token loss over all labels of ``micro_batches`` (no gradients; the model's mode is restored)."""
    import torch

    device = next(p for p in model.parameters() if p.requires_grad).device
    n = max(1, step_label_count(micro_batches))
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
    return total


def eval_batches(examples: list[dict], batch: int, max_seq_length: int, packing: bool, pad_id: int):
    """The evaluation set as micro-batches, in order (packed or padded like training)."""
    plan = ExamplePlan(examples, batch, 1, max_seq_length, packing, pad_id, seed=0)
    if packing:
        rows = pack_rows([len(e["input_ids"]) for e in examples], max_seq_length)
    else:
        rows = [[i] for i in range(len(examples))]
    return [plan.micro_batch(rows[j: j + batch]) for j in range(0, len(rows), batch)]


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
    path = os.path.join(output, "train_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_atomically(path: str, write) -> None:
    """Calls ``write(tmp_path)``, then renames the file into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def keep_log_until(output: str, step: int) -> None:
    """Drops the log rows after ``step`` (a run resumed from that step writes them again)."""
    rows = [r for r in read_log(output) if r["step"] <= step]

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    write_atomically(os.path.join(output, "train_log.jsonl"), write)


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
    ax.legend()
    path = os.path.join(output, "loss.png")
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
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
               progress=None) -> LoopState:
    """Runs the steps from ``resume`` (a loaded checkpoint) or from the start up to ``settings.steps``,
    updating ``state`` as it goes (so a caller catching an exception knows what finished). ``evaluation``:
    micro-batches of the eval set; evaluated every ``eval_every`` steps and at the end. Raises
    NonFiniteLoss for a step with a NaN/inf loss or gradient under ``on_nan="stop"``."""
    import torch

    from fastbench.train.checkpoint import restore, save_checkpoint

    params, optimizer, schedule = make_optimizer(model, settings.lr, settings.warmup_steps, settings.steps)
    position = {"epoch": 0, "step": 0}
    if resume is not None:
        restore(resume, model, optimizer, schedule)
        state.done, position = resume["step"], resume["position"]
        state.last_checkpoint = resume["path"]
    model.train()
    log_path = os.path.join(settings.output, "train_log.jsonl")

    def log(row):
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def run_eval():
        state.eval_loss = evaluate(model, evaluation)
        row = {"step": state.done, "eval_loss": state.eval_loss,
               "eval_ppl": math.exp(min(state.eval_loss, 700.0))}
        log(row)
        shown.update(eval_loss=f"{state.eval_loss:.4f}", eval_ppl=f"{row['eval_ppl']:.2f}")

    stream, shown = plan.stream(position), {}
    while state.done < settings.steps:
        after, micro_batches = next(stream)
        start = time.perf_counter()
        lr_now = schedule.get_last_lr()[0]
        loss, tokens = accumulate(model, micro_batches)
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
            log({"step": step, "loss": loss, "lr": float(f"{lr_now:.6g}"), "tokens": tokens,
                 "tokens_per_s": round(tokens / seconds, 1)})
            shown.update(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:,.0f}")
        if progress is not None:
            progress.set_postfix(shown, refresh=False)
            progress.update()
        if evaluation and settings.eval_every and step % settings.eval_every == 0 and step < settings.steps:
            run_eval()
        if settings.save_every and step % settings.save_every == 0:
            state.last_checkpoint = save_checkpoint(settings.output, step, model, optimizer, schedule, position)
    if evaluation:
        run_eval()
    return state
