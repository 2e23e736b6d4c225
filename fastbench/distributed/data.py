"""Each rank's share of the batches: every rank builds the same global stream of optimizer steps (the same
data, seed and packing), skips the steps already trained, and takes its own rows of each micro-batch.

A global micro-batch of R rows gives rank r the contiguous rows ``torch.tensor_split(range(R), N)[r]``, so
N ranks with B rows each train exactly what one process trains with one micro-batch of N x B rows (with the
loss normalised over the whole step: fastbench.train.loop.accumulate). A rank whose share of a short last
micro-batch is empty gets one row without labels (loss 0, zero gradients): every rank still runs the same
number of forwards and backwards, which DDP's collectives need.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Mapping

import torch

from fastbench.distributed.ddp import IGNORE_INDEX


def row_share(rows: int, rank: int, world_size: int) -> range:
    """The rows of a micro-batch of ``rows`` rows that rank ``rank`` trains (empty when there are fewer rows
    than ranks and this rank's share is empty)."""
    share = torch.tensor_split(torch.arange(rows), world_size)[rank]
    return range(int(share[0]), int(share[-1]) + 1) if len(share) else range(0)


def without_labels(batch: Mapping) -> dict:
    """The first row of a collated micro-batch with every label ignored: the stand-in of an empty share."""
    out = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out["labels"] = torch.full_like(out["labels"], IGNORE_INDEX)
    return out


def shard_rows(batch: Mapping, rank: int, world_size: int) -> dict:
    """Rank ``rank``'s rows of a collated micro-batch (tensors with the rows in dim 0; other values kept)."""
    if world_size == 1:
        return dict(batch)
    rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    share = row_share(rows, rank, world_size)
    if not share:
        return without_labels(batch)
    return {k: v[share.start:share.stop] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def shard_steps(steps: Iterable[list[Mapping]], rank: int, world_size: int, start: int = 0) -> Iterator[list[dict]]:
    """Rank ``rank``'s share of each optimizer step of ``steps`` (each a list of global micro-batches), from
    step ``start`` on (the data position of a resumed run: optimizer steps already trained). Deterministic:
    the same global stream gives every rank the same steps, each its own rows."""
    for step in itertools.islice(steps, start, None):
        yield [shard_rows(b, rank, world_size) for b in step]
