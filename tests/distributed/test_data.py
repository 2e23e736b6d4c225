"""Each rank's rows of the global micro-batches."""
import itertools

import torch

from fastbench.distributed.data import shard_rows, shard_steps


def batch(rows):
    ids = torch.randint(0, 100, (rows, 6)) + 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "note": "kept"}


def test_ranks_take_contiguous_rows_that_cover_the_batch():
    b = batch(5)
    shares = [shard_rows(b, r, 3) for r in range(3)]
    assert [s["input_ids"].shape[0] for s in shares] == [2, 2, 1]
    assert torch.equal(torch.cat([s["input_ids"] for s in shares]), b["input_ids"])
    assert all(s["note"] == "kept" for s in shares)


def test_a_rank_without_rows_gets_one_row_without_labels():
    b = batch(1)
    empty = shard_rows(b, 1, 2)
    assert torch.equal(empty["input_ids"], b["input_ids"]) and (empty["labels"] == -100).all()
    assert torch.equal(b["labels"], b["input_ids"])  # the global batch is left as it was


def test_steps_resume_from_a_data_position():
    steps = [[batch(4), batch(3)] for _ in range(4)]
    whole = list(shard_steps(steps, 1, 2))
    resumed = list(shard_steps(iter(steps), 1, 2, start=2))
    assert len(resumed) == 2
    for a, b in zip(itertools.chain.from_iterable(whole[2:]), itertools.chain.from_iterable(resumed)):
        assert torch.equal(a["input_ids"], b["input_ids"])
