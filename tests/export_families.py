"""Offline tokenizers in each supported family's style, and small models of each family, for the GGUF
export tests (no download): sentencepiece BPE with byte fallback (Llama 2, Mistral, Gemma; trained
with the sentencepiece package when it is installed) and byte-level BPE (Llama 3, Qwen2/2.5/3; trained
with the tokenizers package)."""
from __future__ import annotations

import json
import random

import torch

WORDS = ("the quick brown fox jumps over lazy dog hello world fastbench writes gguf files llama tokenizer "
         "café naïve über 東京 数学 emoji 🙂 🚀 numbers 12345 2026 don't it's we'll tab\tnew line ü ß").split(" ")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

CHAT_TEMPLATES = {
    "llama2": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
              "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    "mistral": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
               "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
    "gemma": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
             "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}"
             "<start_of_turn>model\n{% endif %}",
    "llama3": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "qwen2": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}
# family -> transformers model_type of its small model
MODEL_TYPES = {"llama2": "llama", "mistral": "mistral", "gemma": "gemma", "llama3": "llama", "qwen2": "qwen2",
               "qwen3": "qwen3"}


def corpus(lines: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(lines)]


def tokenizer(family: str, directory):
    """The family's tokenizer, saved in ``directory`` and loaded back with AutoTokenizer."""
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    if family in ("llama2", "mistral", "gemma"):
        _sentencepiece(family, directory)
    else:
        _byte_level(family, directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.chat_template = CHAT_TEMPLATES["qwen2" if family == "qwen3" else family]
    return tok


def _sentencepiece(family, directory):
    import sentencepiece as spm

    text = directory / "corpus.txt"
    text.write_text("\n".join(corpus()))
    gemma = family == "gemma"
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    user = {"gemma": ["<start_of_turn>", "<end_of_turn>"], "mistral": ["[INST]", "[/INST]"]}.get(family, [])
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "tokenizer"), vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=not gemma, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=user, minloglevel=2, **ids, **(dict(pad_piece="<pad>", bos_piece="<bos>", eos_piece="<eos>") if gemma else {}))
    specials = dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>") if gemma else \
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = dict(tokenizer_class="GemmaTokenizer" if gemma else "LlamaTokenizer", add_bos_token=True,
                  add_eos_token=False, **specials)
    if user:
        config["additional_special_tokens"] = user
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def _byte_level(family, directory):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama3 = family == "llama3"
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"] if llama3 else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=llama3))
    if not llama3:
        tok.normalizer = normalizers.NFC()
    split = LLAMA3_SPLIT if llama3 else QWEN2_SPLIT
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=460, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if llama3:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
        named = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    else:
        named = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in named.values()]})
    fast.save_pretrained(str(directory))


def small_model(family: str, vocab_size: int, hidden: int = 256, layers: int = 4, seed: int = 0):
    """A random-weight model of the family, wide enough for the k-quants (rows of 256), fp32, CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = MODEL_TYPES[family]
    extra = dict(head_dim=64, tie_word_embeddings=model_type == "gemma")
    if model_type == "gemma":
        extra.update(hidden_activation="gelu_pytorch_tanh")
    config = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-6,
                                  rope_theta=10000.0, **extra)
    if family == "llama3":
        config.rope_parameters = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=128)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # weights of the spread trained ones have, norms not all ones
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.6 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
            else:
                p.uniform_(0.8, 1.2) if "gemma" not in model_type else p.uniform_(-0.2, 0.2)
    return model
