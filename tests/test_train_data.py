"""Training data: reading each kind of file, format detection, chat rendering with fastbench's templates,
which token ids carry labels (checked exactly), and bad records refused naming file and line."""
import csv
import json

import pytest

from chat_tokenizer import build_tokenizer, chat_records
from fastbench.chat_templates import TEMPLATE_NAMES, get_chat_template
from fastbench.train.data import (IGNORE_INDEX, DataError, detect_format, encode_record, read_records,
                                  tokenize_records, truncate)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, segments):
    """(input_ids, labels) built piece by piece from (text, labelled) segments."""
    input_ids, labels = [], []
    for text, labelled in segments:
        piece = ids(tok, text)
        input_ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    labels[0] = IGNORE_INDEX
    return input_ids, labels


def test_chat_labels_exactly_the_assistant_turns_and_their_end_markers(tok):
    messages = [{"role": "system", "content": "Be quick."}, {"role": "user", "content": "Why is the river blue?"},
                {"role": "assistant", "content": "The light, the stone."}, {"role": "user", "content": "How?"},
                {"role": "assistant", "content": "It reads the data!"}]
    example = encode_record({"messages": messages}, tok, "chat")
    want = expected(tok, [("<|im_start|>system\nBe quick.<|im_end|>\n<|im_start|>user\nWhy is the river blue?"
                           "<|im_end|>\n<|im_start|>assistant\n", False),
                          ("The light, the stone.<|im_end|>\n", True),
                          ("<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\n", False),
                          ("It reads the data!<|im_end|>\n", True)])
    assert (example["input_ids"], example["labels"]) == want
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [t for t in example["labels"] if t != IGNORE_INDEX].count(im_end) == 2
    everything = encode_record({"messages": messages}, tok, "chat", train_on_inputs=True)
    assert everything["input_ids"] == want[0] and everything["labels"] == [IGNORE_INDEX] + want[0][1:]


@pytest.mark.parametrize("fmt, record, user, answer", [
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hello world?"}, {"from": "gpt", "value": "Yes."}]},
     "Hello world?", "Yes."),
    ("alpaca", {"instruction": "Write two words.", "input": "red blue", "output": "Red blue."},
     "Write two words.\n\nred blue", "Red blue."),
    ("alpaca", {"instruction": "Write two words.", "input": "", "output": "Red blue."}, "Write two words.",
     "Red blue."),
    ("completion", {"prompt": "The quick model", "completion": "runs slow."}, "The quick model", "runs slow."),
])
def test_other_formats_become_a_user_and_an_assistant_turn(tok, fmt, record, user, answer):
    assert detect_format([("r", record)]) == fmt
    example = encode_record(record, tok, fmt)
    assert (example["input_ids"], example["labels"]) == expected(tok, [
        (f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False), (f"{answer}<|im_end|>\n", True)])


def test_text_records_label_everything_with_bos_and_eos(tok):
    example = encode_record({"body": "Hello world."}, tok, "text", text_field="body")
    assert example["input_ids"] == ids(tok, "Hello world.") + [tok.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] + example["input_ids"][1:]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_each_template_labels_the_answers_and_nothing_of_the_prompts(tok, name):
    tok = get_chat_template(build_tokenizer(), name)
    for record in chat_records(4, seed=3, turns=2):
        example = encode_record(record, tok, "chat")
        labelled = tok.decode([t for t in example["labels"] if t != IGNORE_INDEX])
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        prompts = [m["content"] for m in record["messages"] if m["role"] != "assistant"]
        for answer in answers:
            assert answer in labelled
        for prompt in prompts:
            assert prompt not in labelled or any(prompt in a for a in answers)
        assert len(labelled) < sum(map(len, answers)) + 2 * 40  # the answers and their end markers only


def test_unknown_template_name_is_refused(tok):
    with pytest.raises(ValueError, match="unknown chat template 'llama-9'.*chatml"):
        get_chat_template(tok, "llama-9")


def write_all_kinds(tmp_path, records):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "d.json").write_text(json.dumps(records))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    import datasets

    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    return ["d.jsonl", "d.json", "d.csv", "d.parquet", "saved"]


def test_every_kind_of_file_reads_the_same_records(tmp_path, tok):
    records = [{"instruction": f"Say {w}.", "input": "", "output": w.capitalize() + "."}
               for w in ("hello", "world", "yes")]
    for name in write_all_kinds(tmp_path, records):
        read = read_records(str(tmp_path / name))
        assert [r for _, r in read] == records, name
        assert detect_format(read) == "alpaca"
    assert [w for w, _ in read_records(str(tmp_path / "d.jsonl"))] == [f"{tmp_path}/d.jsonl:{i}" for i in (1, 2, 3)]
    assert [w for w, _ in read_records(str(tmp_path / "d.csv"))][0] == f"{tmp_path}/d.csv:2"


@pytest.mark.parametrize("module", ["pyarrow.parquet", "datasets"])
def test_missing_reader_library_is_named(tmp_path, monkeypatch, module):
    import sys

    name = write_all_kinds(tmp_path, [{"text": "a"}])[3 if module == "pyarrow.parquet" else 4]
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DataError, match=f"needs {module.split('.')[0]} \\(pip install"):
        read_records(str(tmp_path / name))


GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
     "turn 1 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     "the content of turn 2 is empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "the content of turn 1 must be a string, got int"),
    ({"messages": []}, "must be a non-empty list"),
    ({"prompt": "Hi", "completion": "x"}, "no field 'messages', which a chat record has"),
    (["not", "an", "object"], "no field 'messages'"),
])
def test_bad_records_name_file_and_line(tmp_path, tok, bad, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    records = read_records(str(path))
    with pytest.raises(DataError) as caught:
        for where, record in records:
            encode_record(record, tok, detect_format(records), where)
    assert str(caught.value).startswith(f"{path}:2: ") and message in str(caught.value)


def test_bad_files_name_file_and_line(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "obj.json").write_text('{"text": "ok"}')
    (tmp_path / "d.xml").write_text("<a/>")
    for name, message in [("latin1.jsonl", "latin1.jsonl:2: not UTF-8 text (byte 0xe9)"),
                          ("broken.jsonl", "broken.jsonl:2: not JSON"), ("obj.json", "holds a list of records"),
                          ("d.xml", "unknown kind of file"), ("missing.jsonl", "no such file")]:
        with pytest.raises(DataError, match=message.replace("(", "\\(").replace(")", "\\)")):
            read_records(str(tmp_path / name))
    with pytest.raises(DataError, match="cannot tell the format from the fields 'body'"):
        detect_format([("d.jsonl:1", {"body": "x"})])


def test_a_template_that_does_not_render_is_named(tok):
    mistral = get_chat_template(build_tokenizer(), "mistral")
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"},
                           {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match="d.jsonl:7: the chat template does not render.*mistral template has no role"):
        encode_record(record, mistral, "chat", "d.jsonl:7")


def test_python_api_for_trainer_users(tok):
    records = chat_records(6, seed=5)
    examples = tokenize_records(records, tok, max_seq_length=24)
    assert len(examples) == 6 and all(len(e["input_ids"]) <= 24 for e in examples)
    assert all(len(e["input_ids"]) == len(e["labels"]) for e in examples)
    full = tokenize_records(records, tok)
    assert truncate(full, 24) == sum(len(e["input_ids"]) > 24 for e in tokenize_records(records, tok))
    with pytest.raises(DataError, match="has none; give --chat-template"):
        tokenize_records(records, build_tokenizer(chat_template=None))
    with pytest.raises(DataError, match="record 2: .*no assistant turn"):
        tokenize_records([GOOD, {"messages": [{"role": "user", "content": "x"}]}], tok)


def test_benchmark_chat_dataset_generator_is_seeded_with_a_realistic_spread():
    import statistics

    from tool_scripts import load_tool

    module = load_tool("make_chat_dataset")
    data = module.make_dataset(1500, seed=4)
    assert data == module.make_dataset(1500, seed=4) and data != module.make_dataset(1500, seed=5)
    tokens = [module.TOKENS_PER_WORD * sum(len(m["content"].split()) for m in r["messages"]) for r in data]
    assert 300 < statistics.median(tokens) < 400 and 5 <= sum(t > 2048 for t in tokens) <= 60
    assert all(r["messages"][-1]["role"] == "assistant" for r in data)
