"""``fastbench train``: LoRA/QLoRA fine-tuning on the fused path, with a plain training loop.

One optimizer step = ``grad_accum`` micro-batches. Each micro-batch's loss is its summed token loss
divided by N, the label count of the whole step (``num_items_in_batch``), so the accumulated
gradient is that of the mean token loss over the step, however the tokens fall across micro-batches
(padding, ragged lengths, a short last step). AdamW, linear warm-up then linear decay to 0, gradient
norm clipped at 1. The adapter is saved to --output at the end, every --save-every steps, when a step
fails (the finished steps'; out of memory says what to change), and on Ctrl-C or SIGTERM (what job
schedulers and ``timeout`` send); ``train_log.jsonl`` there has one line per step.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings

import click

from fastbench.interrupt import exit_code, sigterm_as_interrupt
from fastbench.presets import DEFAULT_TARGETS

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".jsonl", ".txt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def read_texts(path: str, text_field: str) -> list[str]:
    """The examples of a data file: one per line of a .txt file, or the ``text_field`` of each record of
    a .jsonl file (blank lines skipped)."""
    if not path.endswith(TEXT_SUFFIXES):
        raise click.BadParameter(f"{path!r}: expected a .jsonl or .txt file, or 'random'", param_hint="--data")
    if not os.path.isfile(path):
        raise click.BadParameter(f"{path!r}: no such file", param_hint="--data")
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".txt"):
                texts.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise click.BadParameter(f"{path}:{number}: not JSON ({e})", param_hint="--data") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise click.BadParameter(f"{path}:{number}: no string field {text_field!r} (see --text-field)",
                                         param_hint="--data")
            texts.append(record[text_field])
    return texts


def tokenize(texts: list[str], tokenizer, max_seq_length: int) -> list[list[int]]:
    """Token ids per example (BOS as the tokenizer adds it, EOS appended), truncated to
    ``max_seq_length``; examples of fewer than 2 tokens (nothing to predict) are dropped."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    examples = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        if len(ids) >= 2:
            examples.append(ids[:max_seq_length])
    return examples


def collate(examples: list[list[int]], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE_INDEX on padding)."""
    import torch

    width = max(map(len, examples))
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example)
        mask[row, : len(example)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def example_steps(examples: list[list[int]], batch: int, grad_accum: int, pad_id: int, seed: int):
    """Optimizer steps, each a list of up to ``grad_accum`` micro-batches, over endless epochs; every
    epoch a fresh seeded shuffle, its last micro-batch and step possibly short."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=g).tolist()
        micro = [collate([examples[i] for i in order[j: j + batch]], pad_id) for j in range(0, len(order), batch)]
        for j in range(0, len(micro), grad_accum):
            yield micro[j: j + grad_accum]


def random_steps(vocab_size: int, seq_len: int, batch: int, grad_accum: int, seed: int):
    """Endless steps of seeded random token ids (no padding), for smoke tests of presets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        step = []
        for _ in range(grad_accum):
            ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
            step.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        yield step


def accumulate(model, micro_batches: list[dict]) -> tuple[float, int]:
    """Forward and backward of one optimizer step's micro-batches, each loss normalised by the step's
    label count (labels shifted by one, as the loss sees them). Returns (mean token loss, tokens)."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    n = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        loss = model(**{k: v.to(device) for k, v in b.items()}, num_items_in_batch=n).loss
        loss.backward()
        total = total + loss.detach()
    return float(total), tokens


def save_adapter(model, tokenizer, output: str) -> None:
    """Writes the adapter (and tokenizer) to ``output``: first to a scratch folder inside it, then each
    file moved into place, so an interruption never leaves a half-written adapter file."""
    import shutil
    import tempfile

    os.makedirs(output, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".saving-", dir=output)
    try:
        model.save_pretrained(scratch)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
        for name in os.listdir(scratch):
            os.replace(os.path.join(scratch, name), os.path.join(output, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def parse_checkpointing(value: str):
    from fastbench.fused.checkpointing import parse_setting

    setting = {"true": True, "false": False}.get(value.lower(), value)
    try:
        parse_setting(setting)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use true, false, offload, auto or a budget in GiB (e.g. 20)",
                                 param_hint="--checkpointing") from None
    return setting


def _echo_warnings(caught) -> None:
    for w in caught:
        click.echo(f"note: {w.message}", err=True)


def _load_tokenizer(source):
    from transformers import AutoTokenizer

    if source.path is None:
        raise click.BadParameter(f"{source.name} is a preset: random weights and no tokenizer; text data needs "
                                 "a checkpoint directory with a tokenizer (or use --data random)", param_hint="--data")
    if not any(os.path.exists(os.path.join(source.path, f)) for f in TOKENIZER_FILES):
        raise click.ClickException(f"{source.name} has no tokenizer ({', '.join(TOKENIZER_FILES)}), which text "
                                   "data needs")
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot load the tokenizer of {source.name}: {e}") from None


@click.command("train")
@click.argument("model")
@click.option("--data", required=True, help="A .jsonl file (one record per example), a .txt file (one example "
              "per line), or 'random' (random token ids; presets, smoke tests; needs --steps).")
@click.option("--text-field", default="text", show_default=True, help="The field of each .jsonl record to train on.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Where the adapter and "
              "train_log.jsonl go.")
@click.option("--max-seq-length", default=2048, show_default=True, type=click.IntRange(min=2),
              help="Examples are truncated to this many tokens; the length of random sequences.")
@click.option("--load-in-4bit", is_flag=True, help="QLoRA: quantize the base weights to NF4.")
@click.option("--r", "rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank.")
@click.option("--lora-alpha", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--targets", default=",".join(DEFAULT_TARGETS), show_default=True,
              help="Comma-separated module names that get LoRA adapters.")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1), help="Examples per micro-batch.")
@click.option("--grad-accum", default=4, show_default=True, type=click.IntRange(min=1),
              help="Micro-batches per optimizer step.")
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (default: --epochs 1).")
@click.option("--epochs", type=click.IntRange(min=1), help="Passes over the data (a short last step each).")
@click.option("--warmup-steps", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--checkpointing", default="true", show_default=True, callback=lambda c, p, v: parse_checkpointing(v),
              help="Activation checkpointing: true (recompute every layer), false, offload (recompute, with the "
                   "inputs and every 2nd layer's MLP activations kept in pinned CPU memory), auto, or a memory "
                   "budget in GiB.")
@click.option("--seed", default=3407, show_default=True, type=int, help="Seeds the LoRA init, data order, "
              "random data and preset weights.")
@click.option("--save-every", type=click.IntRange(min=1), help="Also save the adapter every N steps.")
def train_command(model, data, text_field, output, max_seq_length, load_in_4bit, rank, lora_alpha, targets,
                  batch, grad_accum, lr, steps, epochs, warmup_steps, checkpointing, seed, save_every):
    """Fine-tune MODEL (a fastbench preset or a local checkpoint directory) with LoRA on the fused path."""
    from fastbench.presets import NotAModel, UnknownPreset, resolve_model

    if steps and epochs:
        raise click.UsageError("give --steps or --epochs, not both")
    target_modules = [t.strip() for t in targets.split(",") if t.strip()]
    if not target_modules:
        raise click.BadParameter("no module names", param_hint="--targets")
    try:
        source = resolve_model(model)
    except (UnknownPreset, NotAModel) as e:
        raise click.BadParameter(str(e), param_hint="MODEL") from None

    tokenizer = examples = None
    if data == "random":
        if not steps:
            raise click.UsageError("--data random is an endless stream: give --steps")
    else:
        tokenizer = _load_tokenizer(source)
        examples = tokenize(read_texts(data, text_field), tokenizer, max_seq_length)
        if not examples:
            raise click.BadParameter(f"{data!r} has no examples (of 2 tokens or more)", param_hint="--data")
        if max(map(max, examples)) >= source.vocab_size:
            raise click.ClickException(f"the tokenizer of {source.name} makes ids beyond its vocab_size "
                                       f"{source.vocab_size}")
        per_epoch = math.ceil(math.ceil(len(examples) / batch) / grad_accum)
        steps = steps or per_epoch * (epochs or 1)

    import torch

    from fastbench import FastLanguageModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            base, _ = FastLanguageModel.from_pretrained(source.path or source.name, max_seq_length=max_seq_length,
                                                        load_in_4bit=load_in_4bit, seed=seed)
        except (ImportError, OSError) as e:  # bitsandbytes missing for --load-in-4bit, an unreadable checkpoint
            raise click.ClickException(f"cannot load {source.name}: {e}") from None
        try:
            peft_model = FastLanguageModel.get_peft_model(base, r=rank, target_modules=target_modules,
                                                          lora_alpha=lora_alpha, random_state=seed,
                                                          use_gradient_checkpointing=checkpointing)
        except ValueError as e:  # PEFT: a target module that does not exist
            raise click.BadParameter(str(e), param_hint="--targets") from None
    _echo_warnings(w for w in caught if issubclass(w.category, UserWarning))
    for line in getattr(peft_model.get_base_model(), "fastbench_patches", ["plain PEFT (no fused path)"]):
        click.echo(f"fastbench: {line}", err=True)

    if examples is None:
        batches = random_steps(source.vocab_size, max_seq_length, batch, grad_accum, seed)
    else:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        batches = example_steps(examples, batch, grad_accum, pad_id, seed)
        click.echo(f"{len(examples)} examples, {steps} steps of {batch} x {grad_accum}", err=True)

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / (warmup_steps + 1), max(0.0, (steps - s) / max(1, steps - warmup_steps))))
    peft_model.train()
    os.makedirs(output, exist_ok=True)

    from tqdm.auto import tqdm

    done = 0
    with open(os.path.join(output, "train_log.jsonl"), "w") as log, sigterm_as_interrupt() as stop, \
            tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True) as bar:
        try:
            for micro_batches in itertools.islice(batches, steps):
                start = time.perf_counter()
                lr_now = schedule.get_last_lr()[0]
                loss, tokens = accumulate(peft_model, micro_batches)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
                rate = tokens / (time.perf_counter() - start)
                log.write(json.dumps({"step": done, "loss": loss, "lr": float(f"{lr_now:.6g}"), "tokens": tokens,
                                      "tokens_per_s": round(rate, 1)}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
                bar.update()
                if save_every and done % save_every == 0 and done < steps:
                    save_adapter(peft_model, tokenizer, output)
        except KeyboardInterrupt:
            bar.close()
            save_adapter(peft_model, tokenizer, output)
            click.echo(f"{'terminated (SIGTERM)' if stop.terminated else 'interrupted'} after step {done}: adapter "
                       f"saved to {output}", err=True)
            raise SystemExit(exit_code(stop)) from None
        except Exception as error:  # the optimizer has not stepped on a failed step: the finished ones are kept
            bar.close()
            if done:
                save_adapter(peft_model, tokenizer, output)
            kept = f"the adapter of the {done} finished steps is saved to {output}" if done else "no step finished"
            if isinstance(error, torch.OutOfMemoryError):
                raise click.ClickException(
                    f"out of GPU memory in step {done + 1}; {kept}. Lower --batch (raise --grad-accum to keep the "
                    "step size) or --max-seq-length, or use --checkpointing offload or --load-in-4bit") from None
            click.echo(f"failed in step {done + 1}; {kept}", err=True)
            raise
    save_adapter(peft_model, tokenizer, output)
    click.echo(f"{done} steps; adapter saved to {output}", err=True)
