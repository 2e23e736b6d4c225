"""Training data: read records from a file, detect and check their format, render the chat formats with the
tokenizer's chat template, and turn each record into ``input_ids`` and ``labels`` (IGNORE_INDEX where no
loss is taken).

Formats: ``text`` (a string field), ``chat`` ({"messages": [{"role", "content"}]}), ``sharegpt``
({"conversations": [{"from", "value"}]}), ``alpaca`` (instruction / input / output) and ``completion``
(prompt / completion). All but ``text`` become a conversation rendered with the chat template; the loss
then covers the assistant turns only (their content and the end-of-turn marker the template writes), or
every token with ``train_on_inputs``.

Which tokens belong to an assistant turn is read from the rendered text itself: for the k-th message, the
template rendered over messages[:k] with the generation prompt ends where the answer starts, and rendered
over messages[:k+1] ends where the turn ends; both must be prefixes of the whole conversation's rendering.
Tokens whose first character falls in such a span carry labels. A template that rewrites earlier turns
(so those renderings are not prefixes) falls back to finding the answer's text in the rendering.
"""
from __future__ import annotations

import csv
import io
import json
import os

IGNORE_INDEX = -100
FORMATS = ("text", "chat", "sharegpt", "alpaca", "completion")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}
FILE_KINDS = ".jsonl, .json, .csv, .parquet, .txt or a datasets.save_to_disk directory"


class DataError(ValueError):
    """Bad training data; the message names the file and line (or record) and what is wrong."""


class NoTokenizer(DataError):
    """A directory without a saved tokenizer."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_saved_tokenizer(path: str, what: str, trust_remote_code: bool = False):
    """The tokenizer saved in directory ``path``; DataError naming ``what`` when there is none or it does not
    load."""
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise NoTokenizer(f"{what} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the tokenizer of {what}: {e}") from None


# ---------------------------------------------------------------------------------------------- reading
def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") \
            from None


def read_records(path: str, text_field: str = "text") -> list[tuple[str, object]]:
    """The records of a data file as (where, record) pairs, ``where`` naming the file and line (or record
    number) for messages. .txt files give one {text_field: line} record per non-blank line."""
    if os.path.isdir(path):
        return _read_saved_dataset(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".jsonl", ".json", ".csv", ".txt"):
        raise DataError(f"{path}: unknown kind of file; expected {FILE_KINDS}")
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    if suffix == ".json":
        try:
            records = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}:{getattr(e, 'lineno', 1)}: not JSON ({e})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json data file holds a list of records (use .jsonl for one per line)")
        return [(f"{path}: record {i}", r) for i, r in enumerate(records, 1)]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        for row in reader:
            rows.append((f"{path}:{reader.line_num}", dict(row)))
        return rows
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if suffix == ".txt":
            out.append((f"{path}:{number}", {text_field: line}))
            continue
        try:
            out.append((f"{path}:{number}", json.loads(line)))
        except ValueError as e:
            raise DataError(f"{path}:{number}: not JSON ({e})") from None
    return out


def _read_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise DataError(f"{path}: cannot read it as parquet ({e})") from None
    return [(f"{path}: row {i}", r) for i, r in enumerate(rows, 1)]


def _read_saved_dataset(path: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset directory needs datasets (pip install datasets)") \
            from None
    try:
        data = datasets.load_from_disk(path)
    except Exception as e:  # FileNotFoundError for a directory that is not a saved dataset, others when damaged
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({e})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: a dataset with splits {', '.join(data)} and none named 'train'; give the "
                            "split's own directory")
        data = data["train"]
    return [(f"{path}: row {i}", r) for i, r in enumerate(data, 1)]


# ---------------------------------------------------------------------------------------------- formats
def detect_format(records, text_field: str = "text") -> str:
    """The format of the records, from the fields of the first one."""
    if not records:
        raise DataError("no records")
    where, first = records[0]
    if not isinstance(first, dict):
        raise DataError(f"{where}: a record must be an object with fields, got {type(first).__name__}")
    if "messages" in first:
        return "chat"
    if "conversations" in first:
        return "sharegpt"
    if "instruction" in first and "output" in first:
        return "alpaca"
    if "prompt" in first and "completion" in first:
        return "completion"
    if text_field in first:
        return "text"
    raise DataError(f"{where}: cannot tell the format from the fields {', '.join(map(repr, first)) or '(none)'}; "
                    f"expected 'messages' (chat), 'conversations' (sharegpt), 'instruction'/'output' (alpaca), "
                    f"'prompt'/'completion' or {text_field!r} (text; see --text-field), or give --format")


def _text(value, where: str, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got "
                        f"{'nothing' if value is None else type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {what} is empty")
    return value


def _field(record, name: str, where: str, fmt: str):
    if not isinstance(record, dict) or name not in record:
        raise DataError(f"{where}: no field {name!r}, which a {fmt} record has (wrong format? see --format)")
    return record[name]


def to_messages(record, fmt: str, where: str) -> list[dict]:
    """The conversation of a chat/sharegpt/alpaca/completion record as [{"role", "content"}], checked: known
    roles, non-empty string contents, at least one assistant turn."""
    if fmt == "chat":
        turns = _field(record, "messages", where, fmt)
        role_key, content_key, roles = "role", "content", {r: r for r in CHAT_ROLES}
    elif fmt == "sharegpt":
        turns = _field(record, "conversations", where, fmt)
        role_key, content_key, roles = "from", "value", SHAREGPT_ROLES
    elif fmt == "alpaca":
        instruction = _text(_field(record, "instruction", where, fmt), where, "'instruction'")
        extra = _text(record.get("input") or "", where, "'input'", allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        answer = _text(_field(record, "output", where, fmt), where, "'output'")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    elif fmt == "completion":
        prompt = _text(_field(record, "prompt", where, fmt), where, "'prompt'")
        answer = _text(_field(record, "completion", where, fmt), where, "'completion'")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    else:
        raise DataError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {'messages' if fmt == 'chat' else 'conversations'} must be a non-empty list")
    messages = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {n} must be an object with {role_key!r} and {content_key!r}")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: turn {n} has unknown role {role!r}; known: {', '.join(roles)}")
        messages.append({"role": roles[role], "content": _text(turn.get(content_key), where,
                                                               f"the content of turn {n}")})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return messages


# -------------------------------------------------------------------------------------------- rendering
def _render(tokenizer, messages, where: str, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2 errors, raise_exception() in the template, ValueError without a template
        raise DataError(f"{where}: the chat template does not render this conversation ({e}); fix the record "
                        "or pick another template with --chat-template") from None


def render_chat(tokenizer, messages: list[dict], where: str = "record") -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans [start, end) of its assistant turns)."""
    full = _render(tokenizer, messages, where, False)
    spans, cursor = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = None
        try:
            before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) \
                if k else ""
            through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False, add_generation_prompt=False)
            if through.startswith(before) and full.startswith(through) and len(before) >= cursor:
                span = (len(before), len(through))
        except Exception:  # a template that refuses a partial conversation: find the answer in the text
            pass
        if span is None:
            span = _find_answer(full, message["content"], cursor, tokenizer.eos_token, where, k)
        spans.append(span)
        cursor = span[1]
    return full, spans


def _find_answer(full: str, content: str, cursor: int, eos: str | None, where: str, k: int) -> tuple[int, int]:
    """The span of an assistant answer located by its text (and the EOS right after it, if any)."""
    stripped = content.strip()
    start = full.find(stripped, cursor)
    if start < 0:
        raise DataError(f"{where}: the chat template does not write assistant turn {k + 1} as given, so its "
                        "tokens cannot be found; pick another template with --chat-template")
    end = start + len(stripped)
    if eos and full.startswith(eos, end):
        end += len(eos)
    return start, end


def _tokens_with_spans(tokenizer, text: str, spans) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (no special tokens added: the template writes them) and, per token, whether its
    first character lies in one of ``spans``. A slow tokenizer (no offsets) tokenizes span by span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inside = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), inside
    ids, inside, cut = [], [], 0
    for a, b in list(spans) + [(len(text), len(text))]:
        for piece, flag in ((text[cut:a], False), (text[a:b], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                inside += [flag] * len(piece_ids)
        cut = b
    return ids, inside


# --------------------------------------------------------------------------------------------- encoding
def encode_record(record, tokenizer, fmt: str, where: str = "record", text_field: str = "text",
                  train_on_inputs: bool = False) -> dict:
    """One record as {"input_ids", "labels"} (lists of ints). Text: BOS as the tokenizer adds it, EOS
    appended, every token labelled. Conversations: labels on the assistant turns only (every token with
    ``train_on_inputs``). The first token never carries a label (nothing predicts it), so packed examples
    never learn across their boundary."""
    if fmt == "text":
        text = _text(_field(record, text_field, where, fmt), where, repr(text_field))
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
    else:
        text, spans = render_chat(tokenizer, to_messages(record, fmt, where), where)
        ids, inside = _tokens_with_spans(tokenizer, text, spans)
        labels = list(ids) if train_on_inputs else [t if flag else IGNORE_INDEX for t, flag in zip(ids, inside)]
    if labels:
        labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def check_can_render(tokenizer, fmt: str) -> None:
    """Raises DataError when conversations need a chat template and the tokenizer has none."""
    if fmt != "text" and not getattr(tokenizer, "chat_template", None):
        from fastbench.chat_templates import TEMPLATE_NAMES

        raise DataError(f"{fmt} records are rendered with the tokenizer's chat template and this tokenizer has none; "
                        f"give --chat-template ({', '.join(TEMPLATE_NAMES)})")


def encode_records(records, tokenizer, fmt: str, text_field: str = "text",
                   train_on_inputs: bool = False) -> list[dict]:
    """encode_record over (where, record) pairs; examples of fewer than 2 tokens (nothing to predict) are
    dropped."""
    check_can_render(tokenizer, fmt)
    out = []
    for where, record in records:
        example = encode_record(record, tokenizer, fmt, where, text_field, train_on_inputs)
        if len(example["input_ids"]) >= 2:
            out.append(example)
    return out


def truncate(examples: list[dict], max_seq_length: int) -> int:
    """Cuts every example to ``max_seq_length`` tokens in place; returns how many were cut."""
    cut = 0
    for example in examples:
        if len(example["input_ids"]) > max_seq_length:
            example["input_ids"] = example["input_ids"][:max_seq_length]
            example["labels"] = example["labels"][:max_seq_length]
            cut += 1
    return cut


def tokenize_records(records, tokenizer, format: str | None = None, max_seq_length: int | None = None,
                     text_field: str = "text", train_on_inputs: bool = False) -> list[dict]:
    """Records (dicts, e.g. a list or a ``datasets.Dataset``) as {"input_ids", "labels"} examples for HF
    ``Trainer`` / TRL: labels are IGNORE_INDEX (-100) everywhere but the assistant turns (or every token with
    ``train_on_inputs``). ``format``: one of FORMATS, detected from the first record when None; conversations
    use ``tokenizer.chat_template`` (see fastbench.chat_templates.get_chat_template for a tokenizer without
    one). Examples longer than ``max_seq_length`` are truncated. Bad records raise DataError naming the record.

    Batch them with :class:`fastbench.train.packing.PackingCollator` (packed rows) or pad them yourself."""
    pairs = [(f"record {i}", r) for i, r in enumerate(records, 1)]
    fmt = format or detect_format(pairs, text_field)
    examples = encode_records(pairs, tokenizer, fmt, text_field, train_on_inputs)
    if max_seq_length:
        truncate(examples, max_seq_length)
    return examples
