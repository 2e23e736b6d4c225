"""Benchmark data from a file (``fastbench compare --data FILE``): the records read, rendered and labelled as
``fastbench train`` does it (fastbench.train.data), tokenized once per model in the parent process, and a
plan of steps that every arm trains alike.

A step is defined by the tokens it consumes: the next examples of the stream (the file shuffled with the
run's seed, epoch after epoch) for as long as they pack into ``batch x grad_accum`` rows of ``seq_len``
tokens. Each arm trains the same examples in each step, batched as its users batch them:

- packing arms (the fused ones, unless packing is off): the step's examples packed best-fit into rows of at
  most ``seq_len`` tokens, each example with its own ``position_ids`` from 0, ``batch`` rows per micro-batch
  (fastbench.train.packing.packed_batch);
- the others: the step's examples in stream order, ``batch`` per micro-batch, right-padded to the longest
  of them (fastbench.train.packing.padded_batch).

So every arm's step holds the same real (non-padding) tokens and the same labels: real tokens/s compares the
same work, and a step's loss (the mean over its label tokens, however they fall into micro-batches) compares
the same examples. Examples are truncated at ``seq_len``; those left without a label token are dropped
(counted in the stats).

Tokenizer: a checkpoint directory's own; for a preset (random weights and no tokenizer) a byte-level BPE
trained here on the file's own text, at most the preset's vocab size, with ``<pad>``, ``<s>``, ``</s>`` and
ChatML's markers as special tokens and the ChatML chat template (deterministic: the same file gives the same
tokenizer); ``tokenizer`` names another directory. ``chat_template`` replaces the template of either.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Iterator

from fastbench.train.data import IGNORE_INDEX, DataError, check_can_render, detect_format, encode_records, \
    load_saved_tokenizer, read_records, truncate
from fastbench.train.packing import pack_rows, packed_batch, padded_batch

SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
BUILT_TEMPLATE = "chatml"


def digest(path: str) -> str:
    """sha256 of a data file (of a saved dataset directory: of its files' relative names and contents)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                _feed(h, full)
    else:
        _feed(h, path)
    return h.hexdigest()


def _feed(h, path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def describe_file(path: str) -> dict:
    """What results record of a data file: its name, path, size and hash."""
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, fs in os.walk(path) for n in fs) \
        if os.path.isdir(path) else os.path.getsize(path)
    return {"name": os.path.basename(os.path.normpath(path)), "path": os.path.abspath(path), "bytes": size,
            "sha256": digest(path)}


# -------------------------------------------------------------------------------------------- tokenizers
def _strings(value) -> Iterator[str]:
    """Every string inside a record (field values, message contents), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def trained_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts`` with at most ``vocab_size`` tokens (fewer when the text runs out
    of merges), BOS ``<s>``, EOS ``</s>``, pad ``<pad>``, ChatML's markers special, the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastbench.chat_templates import get_chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=list(SPECIALS[3:]))
    return get_chat_template(fast, BUILT_TEMPLATE)


def tokenizer_for(cfg, source, records) -> tuple[object, str]:
    """(tokenizer, how it was chosen) for ``cfg``'s model (``source``), see the module docstring."""
    if cfg.tokenizer:
        tokenizer, how = load_saved_tokenizer(cfg.tokenizer, f"--tokenizer {cfg.tokenizer}"), f"from {cfg.tokenizer}"
    elif source.path:
        tokenizer, how = load_saved_tokenizer(source.path, f"the model {source.path}"), f"the model's ({source.path})"
    else:
        texts = [s for _, record in records for s in _strings(record)]
        tokenizer = trained_tokenizer(texts, source.vocab_size)
        how = (f"byte-level BPE trained on the data file, {len(tokenizer)} tokens (vocab_size "
               f"{source.vocab_size}), {BUILT_TEMPLATE} template")
    if cfg.chat_template:
        from fastbench.chat_templates import get_chat_template

        get_chat_template(tokenizer, cfg.chat_template)
        how += f", chat template {cfg.chat_template}"
    return tokenizer, how


def pad_id(tokenizer) -> int:
    """The id padding is written with (it carries no labels): pad, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ------------------------------------------------------------------------------------------------- plan
def stream(n: int, seed: int) -> Iterator[int]:
    """Example indices, endlessly: epoch e is range(n) shuffled by a generator seeded with (seed, e)."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        yield from order
        epoch += 1


def plan_steps(lengths: list[int], rows: int, seq_len: int, steps: int, seed: int) -> list[list[int]]:
    """The example indices of ``steps`` steps: each takes the next examples of :func:`stream` for as long
    as they pack (pack_rows, best fit) into ``rows`` rows of ``seq_len`` tokens; at least one each."""
    order = stream(len(lengths), seed)
    out, nxt = [], next(order)
    for _ in range(steps):
        step = [nxt]
        nxt = next(order)
        while len(pack_rows([lengths[i] for i in step + [nxt]], seq_len)) <= rows:
            step.append(nxt)
            nxt = next(order)
        out.append(step)
    return out


def length_stats(lengths: list[int], seq_len: int) -> dict:
    """min, p10, median, p90, max and mean of example lengths (before truncation), and how many exceed
    ``seq_len``."""
    s = sorted(lengths)

    def at(q):
        return s[min(len(s) - 1, int(q * len(s)))]
    return {"min": s[0], "p10": at(0.1), "median": at(0.5), "p90": at(0.9), "max": s[-1],
            "mean": round(sum(s) / len(s), 1), f"over_{seq_len}": sum(x > seq_len for x in s)}


def prepare(cfg, steps: int, world_size: int = 1) -> dict:
    """The data of one model for a run: ``{"pad_id", "steps": [[example, ...], ...], "stats"}`` with
    ``steps`` steps of examples ({"input_ids", "labels"} lists), see the module docstring; for a job of
    ``world_size`` ranks each step fills ``world_size`` times the rows (each rank gets ``batch`` rows per
    micro-batch). DataError for a file, record or tokenizer that cannot be used (the message says which and
    what to do)."""
    from fastbench.presets import resolve_model

    source = resolve_model(cfg.model)
    records = read_records(cfg.data, cfg.text_field)
    if not records:
        raise DataError(f"{cfg.data}: no records")
    fmt = cfg.data_format or detect_format(records, cfg.text_field)
    tokenizer, how = tokenizer_for(cfg, source, records)
    check_can_render(tokenizer, fmt)
    examples = encode_records(records, tokenizer, fmt, cfg.text_field)
    if not examples:
        raise DataError(f"{cfg.data}: no example of 2 tokens or more")
    lengths = [len(e["input_ids"]) for e in examples]
    top = max(max(e["input_ids"]) for e in examples)
    if top >= source.vocab_size:
        raise DataError(f"the tokenizer ({how}) makes token id {top}, beyond {source.name}'s vocab_size "
                        f"{source.vocab_size}; give --tokenizer with one that fits")
    truncated = truncate(examples, cfg.seq_len)
    kept = [e for e in examples if any(t != IGNORE_INDEX for t in e["labels"])]
    if not kept:
        raise DataError(f"{cfg.data}: no example keeps a label token within --seq-len {cfg.seq_len}")
    plan = plan_steps([len(e["input_ids"]) for e in kept], world_size * cfg.batch * cfg.grad_accum, cfg.seq_len,
                      steps, cfg.seed)
    stats = {"format": fmt, "tokenizer": how, "records": len(records), "examples": len(examples),
             "truncated": truncated, "dropped_without_labels": len(examples) - len(kept),
             "lengths": length_stats(lengths, cfg.seq_len),
             "examples_per_step": [len(step) for step in plan]}
    return {"pad_id": pad_id(tokenizer), "steps": [[kept[i] for i in step] for step in plan], "stats": stats}


# -------------------------------------------------------------------------------------------- batching
def micro_batches(examples: list[dict], pack: bool, batch: int, seq_len: int, pad: int) -> list:
    """One step's examples as MicroBatches: packed (``batch`` rows of at most ``seq_len`` tokens each) or
    padded (``batch`` examples each, in order)."""
    if pack:
        rows = [[examples[i] for i in row] for row in pack_rows([len(e["input_ids"]) for e in examples], seq_len)]
        return [packed_batch(rows[j: j + batch], pad, capacity=seq_len) for j in range(0, len(rows), batch)]
    return [padded_batch(examples[j: j + batch], pad) for j in range(0, len(examples), batch)]
