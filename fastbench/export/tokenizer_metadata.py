"""A Hugging Face tokenizer as the ``tokenizer.ggml.*`` metadata llama.cpp tokenizes with, so that
llama.cpp turns a prompt into the ids the tokenizer gives.

llama.cpp reads two kinds of BPE:
- byte-level BPE (``model = "gpt2"``: Llama 3, Qwen2/2.5/3): the vocabulary, the merges, and ``pre``,
  the name of llama.cpp's built-in split regex; it is chosen by comparing the tokenizer's own split
  pattern with the patterns those names stand for;
- sentencepiece-style BPE with byte fallback (``model = "llama"``: Llama 2, Mistral, Gemma): the pieces,
  their scores (llama.cpp merges the adjacent pair whose joined piece scores highest; a piece scores
  minus the rank of the first merge that makes it, which gives the tokenizer's merge order) and
  ``add_space_prefix``.
Whether BOS / EOS are added and whether a space is prefixed are read off what the tokenizer does to a
string, not off its flags (which do not always say what it does).

One difference no metadata can remove: llama.cpp's sentencepiece-style tokenizer prefixes its space as
sentencepiece itself does, also to text that already starts with a space and to every piece of text
after a special token; transformers' tokenizers (Metaspace, prepend_scheme "first") prefix it only at
the start of a text that does not start with a space.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# llama.cpp's pre-tokenizer names, by the split pattern of the tokenizer.json they stand for
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_PATTERNS = {
    _LLAMA3_PATTERN: "llama-bpe",
    _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",
}
GPT2_PRE = "gpt-2"  # ByteLevel's own regex (use_regex=True), GPT-2's split
# end-of-turn tokens of the chat formats of the supported families
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class UnsupportedTokenizer(ValueError):
    pass


@dataclass
class TokenizerMetadata:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] | None = None
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # role (bos, eos, eot, unk, pad) -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for role, token_id in self.special.items():
            getattr(writer, f"add_{role}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def tokenizer_metadata(tokenizer, vocab_size: int, bos_fallback: int | None = None) -> TokenizerMetadata:
    """The metadata of ``tokenizer`` for a model of ``vocab_size`` embedding rows. ``bos_fallback``: the
    model config's BOS id, written when the tokenizer names none (as Qwen's do)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizer(f"llama.cpp needs the tokenizer's vocabulary and merges; {type(tokenizer).__name__} "
                                   "is not a fast (tokenizers) tokenizer: load it with AutoTokenizer (use_fast=True)")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise UnsupportedTokenizer(f"llama.cpp reads BPE tokenizers (byte-level, or with byte fallback as "
                                   f"sentencepiece's); this one is {model['type']}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedTokenizer(f"the tokenizer has ids up to {max(vocab.values())}; the model's vocab_size "
                                   f"is {vocab_size}")
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # embedding rows no token reaches
    types = [T.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, T.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = T.CONTROL if added.special else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    if model.get("byte_fallback"):
        meta = TokenizerMetadata("llama", "default", tokens, types, scores=_merge_scores(tokens, merges))
        for i, text in enumerate(tokens):
            if types[i] == T.NORMAL and _BYTE_PIECE.fullmatch(text):
                types[i] = T.BYTE
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = T.UNKNOWN
            meta.special["unk"] = tokenizer.unk_token_id
        meta.add_space_prefix = _adds_space_prefix(tokenizer)
    elif _is_byte_level(spec.get("pre_tokenizer")):
        meta = TokenizerMetadata("gpt2", _bpe_pre(spec.get("pre_tokenizer")), tokens, types, merges=merges)
    else:
        raise UnsupportedTokenizer("llama.cpp reads BPE tokenizers that are byte-level (ByteLevel pre-tokenizer) or "
                                   "fall back to bytes (sentencepiece style); this one is neither")

    bos = tokenizer.bos_token_id
    if bos is None and bos_fallback is not None and 0 <= bos_fallback < vocab_size:
        bos = bos_fallback
    for role, token_id in (("bos", bos), ("eos", tokenizer.eos_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            meta.special[role] = token_id
    eot = next((vocab[t] for t in _END_OF_TURN if t in vocab), None)
    if eot is not None:
        meta.special["eot"] = eot
    meta.add_bos, meta.add_eos = _added_specials(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    meta.chat_template = template if isinstance(template, str) else None
    return meta


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Score of each piece: minus the rank of the first merge that makes it; pieces no merge makes (single
    characters, bytes, specials) score below every merge."""
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def _is_byte_level(pre) -> bool:
    if not pre:
        return False
    if pre["type"] == "Sequence":
        return any(_is_byte_level(p) for p in pre["pretokenizers"])
    return pre["type"] == "ByteLevel"


def _bpe_pre(pre) -> str:
    """llama.cpp's name for the split regex of a byte-level pre-tokenizer."""
    parts = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    splits = [p for p in parts if p["type"] == "Split"]
    byte_level = next(p for p in parts if p["type"] == "ByteLevel")
    if not splits and byte_level.get("use_regex", True):
        return GPT2_PRE
    if len(splits) == 1 and not byte_level.get("use_regex", True):
        pattern = splits[0]["pattern"].get("Regex")
        if pattern in BPE_PRE_PATTERNS:
            return BPE_PRE_PATTERNS[pattern]
        raise UnsupportedTokenizer(f"llama.cpp splits text with a fixed set of regexes; this tokenizer's split "
                                   f"pattern {pattern!r} is not one fastbench maps to them "
                                   f"({', '.join(BPE_PRE_PATTERNS.values())}, {GPT2_PRE})")
    raise UnsupportedTokenizer("llama.cpp splits text with one regex before byte-level BPE; this tokenizer's "
                               f"pre-tokenizer ({[p['type'] for p in parts]}) is not one it has")


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what encoding a word with special tokens adds around its plain encoding."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def _adds_space_prefix(tokenizer) -> bool:
    """Whether a text gains a leading space (sentencepiece's dummy prefix, the piece marker U+2581)."""
    ids = tokenizer("hello", add_special_tokens=False)["input_ids"]
    first = tokenizer.convert_ids_to_tokens(ids[:1])[0]
    return first.startswith("\u2581") or first == "<0x20>"
