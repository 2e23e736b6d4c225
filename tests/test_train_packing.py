"""Packing: rows never split an example; a packed step equals, in fp32, the same examples unpacked with padding
(loss and LoRA gradients), on each family's tiny model, through transformers and through the fused path."""
import random
import warnings

import pytest
import torch

from chat_tokenizer import FAMILY_PRESETS, build_tokenizer, chat_records
from fastbench.train.data import IGNORE_INDEX, tokenize_records
from fastbench.train.loop import accumulate, step_label_count
from fastbench.train.packing import PackingCollator, pack_examples, pack_rows, packed_batch, padded_batch, row_width


def test_pack_rows_fills_rows_without_splitting(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 64 + 1  # best fit leaves little room
    with pytest.raises(ValueError, match="truncate it first"):
        pack_rows([3, 70], 64)


def random_examples(seed, lengths, vocab=512):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        labels = [t if torch.rand((), generator=g) < 0.6 else IGNORE_INDEX for t in ids]
        labels[0] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_packed_batch_layout(seed):
    examples = random_examples(seed % 10_000, [3, 5, 2])
    batch = packed_batch([[examples[0], examples[1]], [examples[2]]], pad_id=7, capacity=8)
    assert batch.tokens == 10
    assert batch.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch.inputs["input_ids"][1, 2:].tolist() == [7] * 6
    assert (batch.inputs["labels"][1, 2:] == IGNORE_INDEX).all() and "attention_mask" not in batch.inputs
    assert step_label_count([batch]) == step_label_count([padded_batch(examples, 0)])
    wide = packed_batch([[examples[0], examples[1]], [examples[2]]], pad_id=7)  # width a multiple of 64
    assert wide.inputs["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4] + list(range(56))
    assert wide.tokens == 10 and (wide.inputs["labels"][:, 8:] == IGNORE_INDEX).all()


def test_row_width_is_a_multiple_of_64_within_the_capacity():
    assert [row_width(n) for n in (1, 64, 65, 1990)] == [64, 64, 128, 2048]
    assert [row_width(n, 2048) for n in (1, 1990, 2048)] == [64, 2048, 2048]
    assert [row_width(n, 1000) for n in (10, 970, 1000)] == [64, 1000, 1000]


def test_collator_and_pack_examples_for_trainer_users(seed):
    tok = build_tokenizer()
    examples = tokenize_records(chat_records(8, seed=seed % 1000), tok, max_seq_length=48)
    batch = PackingCollator(96, tok.pad_token_id)(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape[1] <= 96
    real = batch["labels"] != IGNORE_INDEX
    assert int(real.sum()) == sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in examples)
    rows = pack_examples(examples, 96)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    again = PackingCollator(96, tok.pad_token_id)(rows)
    assert again["input_ids"].shape[0] == len(rows)
    assert int((again["labels"] != IGNORE_INDEX).sum()) == int(real.sum())


def lora_model(preset, seed, fused):
    from fastbench import FastLanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained(preset, dtype=torch.float32,
                                                    device="cuda" if torch.cuda.is_available() else "cpu", seed=seed)
        if fused:
            model = FastLanguageModel.get_peft_model(base, r=4, random_state=seed, use_gradient_checkpointing=False,
                                                     fallback=False)
        else:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                        "down_proj"]))
    for name, p in model.named_parameters():  # B = 0 at init: give the LoRA terms some weight
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def check_parity(model, seed, lengths, capacity):
    examples = random_examples(seed, lengths)
    rows = pack_rows(lengths, capacity)
    assert len(rows) < len(examples)

    def step(micro_batches):
        model.zero_grad(set_to_none=True)
        loss, tokens = accumulate(model, micro_batches)
        return loss, tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed = step([packed_batch([[examples[i] for i in row] for row in rows[:1]], 0),
                   packed_batch([[examples[i] for i in row] for row in rows[1:]], 0)])
    padded = step([padded_batch(examples, 0)])
    assert packed[1] == padded[1] == sum(lengths)
    assert abs(packed[0] - padded[0]) <= 1e-5 * padded[0]
    assert packed[2].keys() == padded[2].keys() and padded[2]
    for name, g in padded[2].items():
        assert torch.linalg.norm(packed[2][name] - g) <= 1e-4 * torch.linalg.norm(g), name


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_packed_step_equals_padded_step_through_transformers(seed, family):
    model = lora_model(FAMILY_PRESETS[family], seed % 10_000, fused=False)
    check_parity(model, seed % 10_000, [9, 4, 13, 6, 3], capacity=16)


@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_packed_step_equals_padded_step_on_the_fused_path(seed, family):
    model = lora_model(FAMILY_PRESETS[family], seed % 10_000, fused=True)
    check_parity(model, seed % 10_000, [7, 4, 9, 3], capacity=12)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILY_PRESETS)
def test_packed_step_equals_padded_step_on_the_fused_path_every_family(seed, family):
    model = lora_model(FAMILY_PRESETS[family], seed % 10_000, fused=True)
    check_parity(model, seed % 10_000, [37, 12, 90, 55, 8, 23], capacity=128)
