"""`fastbench compare --data`: every arm trains the same examples per step (packed for the fused arms, padded
for the others), real tokens are counted exactly, the results record the data, a bad file exits 2 first."""
import hashlib
import json
import random

import pytest
import torch
from click.testing import CliRunner

from chat_tokenizer import chat_records
from fastbench.bench import file_data, worker
from fastbench.bench.arms import RunConfig
from fastbench.cli import main

TINY = "llama-3.2-1b-tiny"


def write_chat(path, n, seed):
    """A chat JSONL of ``n`` conversations of 1-3 exchanges (lengths spread from ~20 to ~150 tokens)."""
    rng = random.Random(seed)
    records = [r for i in range(n) for r in chat_records(1, seed=seed + i, turns=rng.randint(1, 3))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def examples_of(micro_batches, pad_id):
    """The examples (token id tuples) a step's micro-batches hold: packed rows split at position 0 (the
    trailing padding segment dropped), padded rows cut at their attention mask."""
    found = []
    for b in micro_batches:
        for r in range(b["input_ids"].shape[0]):
            ids = b["input_ids"][r].tolist()
            if "attention_mask" in b:
                found.append(tuple(ids[: int(b["attention_mask"][r].sum())]))
                continue
            starts = [i for i, p in enumerate(b["position_ids"][r].tolist()) if p == 0] + [len(ids)]
            segments = [tuple(ids[a:z]) for a, z in zip(starts, starts[1:])]
            found += [s for s in segments if set(s) != {pad_id}]
    return found


def test_packed_and_padded_arms_train_the_same_examples_with_exact_real_tokens(tmp_path, seed):
    data = write_chat(tmp_path / "chat.jsonl", 30, seed % 10_000)
    cfg = RunConfig(model=TINY, data=str(data), seq_len=96, batch=2, grad_accum=2, steps=3, warmup=1, seed=seed,
                    device="cpu")
    prepared = file_data.prepare(cfg, cfg.warmup + cfg.steps)
    assert prepared == file_data.prepare(cfg, cfg.warmup + cfg.steps)  # the built tokenizer is deterministic
    spec = {"data": str(tmp_path / "steps.json")}
    with open(spec["data"], "w") as f:
        json.dump(prepared, f)
    packed, packed_real = worker.training_steps(spec, cfg, 512, packs=True)
    padded, padded_real = worker.training_steps(spec, cfg, 512, packs=False)
    assert len(packed) == len(padded) == len(prepared["steps"]) == cfg.warmup + cfg.steps
    for step, p, q, pr, qr in zip(prepared["steps"], packed, padded, packed_real, padded_real):
        planned = [tuple(e["input_ids"]) for e in step]
        assert examples_of(q, prepared["pad_id"]) == planned  # padded: in stream order, batch at a time
        assert sorted(examples_of(p, prepared["pad_id"])) == sorted(planned)  # packed: the same examples
        assert len(p) <= cfg.grad_accum and all(b["input_ids"].shape[0] <= cfg.batch for b in p)
        assert all(b["input_ids"].shape[1] <= cfg.seq_len for b in p + q)
        assert pr == qr == sum(len(e) for e in planned)  # real tokens: exactly the examples' tokens
        labels = [sum(int((b["labels"][:, 1:] != -100).sum()) for b in mbs) for mbs in (p, q)]
        assert labels[0] == labels[1] == sum(sum(t != -100 for t in e["labels"][1:]) for e in step)
    # padding arm: steps made of more examples than a micro-batch holds take several micro-batches
    assert any(len(q) > 1 for q in padded)


def test_a_packed_step_has_the_loss_of_the_same_examples_padded(tmp_path, seed):
    """The loss check across arms: the weighted micro-batch losses of a step are its mean token loss, the
    same for the packed and the padded batching of its examples (HF model, fp32)."""
    from fastbench.presets import build_model

    data = write_chat(tmp_path / "chat.jsonl", 12, seed % 10_000)
    cfg = RunConfig(model=TINY, data=str(data), seq_len=128, batch=2, grad_accum=2, steps=1, warmup=0, seed=seed,
                    device="cpu", dtype="float32")
    spec = {"data": str(tmp_path / "steps.json")}
    with open(spec["data"], "w") as f:
        json.dump(file_data.prepare(cfg, 1), f)
    model = build_model(TINY, dtype=torch.float32, device="cpu", seed=seed % 1000).eval()
    model.config.use_cache = False
    losses = []
    for packs in (True, False):
        (step,), _ = worker.training_steps(spec, cfg, 512, packs)
        with torch.no_grad():
            losses.append(sum(float(model(**b).loss) * w for b, w in zip(step, worker.label_shares(step))))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
def test_compare_on_a_data_file_records_the_data(tmp_path, monkeypatch):
    data = write_chat(tmp_path / "chat.jsonl", 16, 3)
    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path / "ckpt"))
    out = CliRunner().invoke(main, ["compare", "--models", TINY, "--arms", "peft", "--data", str(data),
                                    "--seq-len", "64", "--batch", "2", "--steps", "2", "--warmup", "1",
                                    "--device", "cpu", "--results-dir", str(tmp_path / "r"),
                                    "--reports-dir", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    (path,) = (tmp_path / "r").glob("*.json")
    results = json.loads(path.read_text())
    recorded = results["compare"]["data"]
    assert recorded["name"] == "chat.jsonl" and recorded["bytes"] == data.stat().st_size
    assert recorded["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    stats = recorded["models"][TINY]
    assert stats["format"] == "chat" and stats["examples"] == 16 and "byte-level BPE" in stats["tokenizer"]
    assert stats["lengths"]["min"] <= stats["lengths"]["median"] <= stats["lengths"]["max"]
    (run,) = results["runs"]
    cfg = RunConfig.from_dict({**results["compare"]["run"], "model": TINY})
    planned = file_data.prepare(cfg, cfg.warmup + cfg.steps)["steps"][cfg.warmup:]
    assert run["tokens_per_step"] == [sum(len(e["input_ids"]) for e in step) for step in planned]
    assert all(p >= t for p, t in zip(run["positions_per_step"], run["tokens_per_step"]))
    (row,) = results["summary"]["rows"]
    assert row["padding"] == pytest.approx(1 - sum(run["tokens_per_step"]) / sum(run["positions_per_step"]))
    report = next((tmp_path / "r").glob("*.md")).read_text()
    assert "data: chat.jsonl" in report and "real tokens/s" in report and "| padding |" in report


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "no such file"),
    ("{not json\n", [], "not JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', [], "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
     ["--format", "alpaca"], "no field 'instruction'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
     ["--pad-fraction", "0.1"], "pad-fraction pads random tokens")])
def test_a_bad_data_file_exits_2_before_any_process(tmp_path, monkeypatch, content, extra, message):
    from fastbench.bench import runner

    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("a process was started"))
    out = CliRunner().invoke(main, ["compare", "--models", TINY, "--arms", "peft", "--data", str(path),
                                    "--device", "cpu", "--results-dir", str(tmp_path / "r"),
                                    "--reports-dir", str(tmp_path / "r"), *extra])
    assert out.exit_code == 2, out.output
    assert message in out.output and "Traceback" not in out.output
    assert not list((tmp_path / "r").glob("*.json")) if (tmp_path / "r").exists() else True


def test_another_data_file_is_a_configuration_change(make_results, make_record):
    from fastbench.bench.regress import config_differences

    old, new = (make_results([make_record("peft")], ["peft"]) for _ in range(2))
    old["compare"]["data"] = {"name": "chat.jsonl", "sha256": "a" * 64, "models": {}}
    old["compare"]["run"]["data"] = "chat.jsonl"
    assert config_differences(new, old) == [f"data chat.jsonl (sha256 {'a' * 12}) there, random tokens here"]
    new["compare"] = json.loads(json.dumps(old["compare"]))
    assert config_differences(new, old) == []
    new["compare"]["data"]["sha256"] = "b" * 64
    new["compare"]["run"]["packing"] = False
    assert config_differences(new, old) == [f"data chat.jsonl (sha256 {'a' * 12}) there, chat.jsonl (sha256 "
                                            f"{'b' * 12}, packing off) here"]
