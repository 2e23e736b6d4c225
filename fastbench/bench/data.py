"""Benchmark data: seeded random token ids, identical in every arm and process.

Batch (step, micro) depends only on (seed, step, micro, sizes), drawn on the CPU. With
``pad_fraction > 0`` each row ends in right padding (attention mask 0, label -100) of a random length
with that mean; tokens/s counts only the unmasked tokens.
"""
from __future__ import annotations

import torch

PAD_ID = 0
IGNORE_INDEX = -100


def make_batch(seed: int, step: int, micro: int, batch: int, seq_len: int, vocab_size: int,
               pad_fraction: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if pad_fraction > 0:
        pads = (torch.rand(batch, generator=g) * 2 * pad_fraction * seq_len).long().clamp(max=seq_len - 1)
        mask = (torch.arange(seq_len) < (seq_len - pads)[:, None]).long()
        input_ids = input_ids.masked_fill(mask == 0, PAD_ID)
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_steps(cfg, vocab_size: int, device) -> list[list[dict[str, torch.Tensor]]]:
    """All batches of a run (warm-up and timed steps, each ``grad_accum`` micro-batches) on ``device``."""
    return [[{k: v.to(device) for k, v in make_batch(cfg.seed, step, micro, cfg.batch, cfg.seq_len,
                                                   vocab_size, cfg.pad_fraction).items()}
             for micro in range(cfg.grad_accum)]
            for step in range(cfg.warmup + cfg.steps)]


def count_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in micro_batches))
