"""A real tokenizer built offline for tests: a byte-level BPE trained on a few hundred generated sentences,
with <pad>, <s>, </s> and ChatML's markers as special tokens and the ChatML chat template; tiny
checkpoints of each family (random weights) saved with it; and ``fastbench train`` run in a process of its own."""
from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys

import pytest

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the a one two three model answer question river stone light train data token small large quick "
         "slow red blue green why how what when where is are was were can will should runs reads writes packs "
         "learns loss step batch row hello world please thanks yes no maybe").split()
FAMILY_PRESETS = {"llama": "llama-3-8b-tiny", "mistral": "mistral-7b-tiny", "gemma": "gemma-7b-tiny",
                  "qwen2": "qwen2.5-7b-tiny", "qwen3": "qwen3-8b-tiny"}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + rng.choice(".?!")
            for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences(400), trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 480, chat_template: str | None = "chatml"):
    """A PreTrainedTokenizerFast (BOS <s>, EOS </s>, pad <pad>) with the named fastbench chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from fastbench.chat_templates import get_chat_template

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    return get_chat_template(tok, chat_template) if chat_template else tok


def save_tiny_checkpoint(directory: str, preset: str = "llama-3-8b-tiny", seed: int = 0,
                         chat_template: str | None = "chatml") -> str:
    """The preset's random-weight model and the test tokenizer saved as a checkpoint directory."""
    from fastbench.presets import build_model

    if not os.path.isdir(directory):
        build_model(preset, seed=seed).save_pretrained(directory)
        build_tokenizer(chat_template=chat_template).save_pretrained(directory)
    return directory


def chat_records(n: int, seed: int = 0, turns: int = 1) -> list[dict]:
    """Chat records: an optional system turn, then ``turns`` user/assistant pairs of generated sentences."""
    rng = random.Random(seed)
    text = sentences(4 * n * turns + 8, seed + 1)
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": rng.choice(text)}] if i % 2 else []
        for _ in range(turns):
            messages += [{"role": "user", "content": rng.choice(text)},
                         {"role": "assistant", "content": " ".join(rng.sample(text, rng.randint(1, 3)))}]
        records.append({"messages": messages})
    return records


def launched(*args, **popen):
    """``python -m fastbench train *args`` in a new process (without Triton's interpreter), its output and
    errors in one text pipe."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-m", "fastbench", "train", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def read_log(output):
    """The records of a training run's train_log.jsonl under ``output`` (a Path)."""
    with open(output / "train_log.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama checkpoint with the byte-level BPE chat tokenizer (base seed 5)."""
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama-bpe"), seed=5)


@pytest.fixture
def plain_peft(monkeypatch):
    """Trains through plain PEFT instead of the fused path (seconds instead of minutes under the interpreter)."""
    import fastbench.fused.causal_lm as causal_lm

    monkeypatch.setattr(causal_lm, "unsupported_reason", lambda model: "a fast CPU test")
