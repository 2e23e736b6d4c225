"""Batches of examples ({"input_ids", "labels"}): packed rows or padded ones.

A packed row holds several whole examples one after another, each with ``position_ids`` from 0; the rest of
the row is padding laid out as one more sequence (its own positions from 0, no labels). A packed batch is as
wide as its longest row rounded up to a multiple of ``ROW_MULTIPLE`` tokens: Triton specializes a kernel on
whether its sizes divide by 16, so widths that do, and few distinct ones, keep the kernels (and the pinned
host buffers and allocator blocks) of earlier steps in use instead of making new ones for each step. No
attention mask is passed: transformers and the fused path both read sequence starts from ``position_ids`` and
let each token attend only within its own sequence, so a packed row computes exactly what the examples would
alone. The first label of each example is IGNORE_INDEX (see data.encode_record), so no token learns to predict
the next example.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from fastbench.train.data import IGNORE_INDEX

ROW_MULTIPLE = 64


def row_width(longest: int, capacity: int | None = None) -> int:
    """The width of a packed batch whose longest row holds ``longest`` tokens: rounded up to a multiple of
    ROW_MULTIPLE, but never past ``capacity`` (the rows' maximum length) when that is more than ``longest``."""
    width = -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE
    return width if capacity is None else max(longest, min(width, capacity))


@dataclass
class MicroBatch:
    """Model inputs of one forward and the number of real (non-padding) tokens in them."""

    inputs: dict
    tokens: int


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens, best fit: each example goes
    to the fullest row that still has room for it (a new row when none has), in the given order. Examples
    are never split; one longer than ``capacity`` must have been truncated before."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}; truncate it first")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            room, row = capacity - n, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def packed_batch(rows: list[list[dict]], pad_id: int, width: int | None = None,
                 capacity: int | None = None) -> MicroBatch:
    """Rows of examples as one packed micro-batch: input_ids, labels, position_ids of [len(rows), width]
    (width: by default ``row_width`` of the longest row and the rows' ``capacity``)."""
    import torch

    lengths = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = width or row_width(max(lengths), capacity)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    positions = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example["input_ids"])
            ids[r, at: at + n] = torch.tensor(example["input_ids"])
            labels[r, at: at + n] = torch.tensor(example["labels"])
            positions[r, at: at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return MicroBatch({"input_ids": ids, "labels": labels, "position_ids": positions}, sum(lengths))


def padded_batch(examples: list[dict], pad_id: int) -> MicroBatch:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on padding), one example per row."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return MicroBatch({"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum()))


def pack_examples(examples: list[dict], max_seq_length: int) -> list[dict]:
    """Examples packed into rows of at most ``max_seq_length`` tokens (best fit, see pack_rows), each row a
    dict of lists {"input_ids", "labels", "position_ids"} (no padding): a dataset of packed rows."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], max_seq_length)
    out = []
    for row in rows:
        members = [examples[i] for i in row]
        out.append({"input_ids": [t for e in members for t in e["input_ids"]],
                    "labels": [t for e in members for t in e["labels"]],
                    "position_ids": [p for e in members for p in range(len(e["input_ids"]))]})
    return out


class PackingCollator:
    """A ``data_collator`` for HF ``Trainer`` / TRL over examples from
    :func:`fastbench.train.data.tokenize_records`: the batch's examples packed into as few rows of
    ``max_seq_length`` tokens as fit them (each with position_ids from 0, see the module docstring), as
    tensors input_ids, labels, position_ids. Rows already packed by :func:`pack_examples` are kept as rows.

    The fused path reads packed rows as they are; transformers' own forward does so only without a KV cache:
    set ``model.config.use_cache = False`` when training an unpatched model on them."""

    def __init__(self, max_seq_length: int, pad_id: int):
        self.max_seq_length, self.pad_id = max_seq_length, pad_id

    def __call__(self, features: list[dict]) -> dict:
        if all("position_ids" in f for f in features):  # already packed rows: pad them to one width
            import torch

            width = row_width(max(len(f["input_ids"]) for f in features), self.max_seq_length)
            batch = packed_batch([[]] * len(features), self.pad_id, width).inputs
            for r, f in enumerate(features):
                n = len(f["input_ids"])
                batch["input_ids"][r, :n] = torch.as_tensor(f["input_ids"])
                batch["labels"][r, :n] = torch.as_tensor(f["labels"])
                batch["position_ids"][r, :n] = torch.as_tensor(f["position_ids"])
                batch["position_ids"][r, n:] = torch.arange(width - n)
            return batch
        examples = [{"input_ids": list(f["input_ids"])[: self.max_seq_length],
                     "labels": list(f["labels"])[: self.max_seq_length]} for f in features]
        rows = pack_rows([len(e["input_ids"]) for e in examples], self.max_seq_length)
        return packed_batch([[examples[i] for i in row] for row in rows], self.pad_id,
                            capacity=self.max_seq_length).inputs
