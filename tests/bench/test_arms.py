import json
import sys

import pytest
import torch

from fastbench.bench import arms
from fastbench.bench.arms import ArmSpec, RunConfig, hf
from fastbench.bench.data import IGNORE_INDEX, count_tokens, make_batch, make_steps
from fastbench.presets import NotAModel, UnknownPreset, resolve_model


def test_labels_carry_options_and_repeats():
    assert arms.parse_label("fused-4bit:ckpt=offload") == ("fused-4bit", {"ckpt": "offload"})
    assert arms.parse_label("fused:ckpt=40:x=y#2") == ("fused", {"ckpt": "40", "x": "y"})
    assert arms.unique_labels(["peft", "peft", "qlora", "peft"]) == ["peft", "peft#2", "qlora", "peft#3"]
    with pytest.raises(arms.UnknownArm, match="key=value"):
        arms.parse_label("fused:offload")


def test_unknown_arm_lists_valid_ones():
    with pytest.raises(arms.UnknownArm, match="valid arms: .*peft.*qlora"):
        arms.get_arm("pefft")


def test_missing_package_says_which_and_how(monkeypatch):
    monkeypatch.setitem(arms.table(), "needs-nothing", ArmSpec(
        "needs-nothing", "test", ("fastbench_no_such_module",), "pip install no-such-thing", lambda cfg: None))
    with pytest.raises(arms.MissingPackage, match="fastbench_no_such_module.*pip install no-such-thing"):
        arms.get_arm("needs-nothing")
    assert arms.get_arm("needs-nothing", check_installed=False).name == "needs-nothing"


def test_the_table_lists_every_arm_with_its_loss_kind():
    kinds = {name: arms.get_arm(f"{name}:ckpt=offload", check_installed=False).loss_kind for name in arms.arm_names()}
    assert kinds == {"peft": "bf16", "qlora": "nf4", "liger": "bf16", "liger-qlora": "nf4", "unsloth": "bf16",
                     "unsloth-qlora": "nf4", "fused": "bf16", "fused-4bit": "nf4"}


def test_importing_the_arms_imports_no_torch():
    """The worker imports Unsloth before torch and transformers: the arm modules must not import them."""
    import subprocess
    import sys

    code = ("import sys; from fastbench.bench import arms; arms.table(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_run_config_round_trip_and_validation():
    cfg = RunConfig(model="gemma-7b-tiny", seq_len=64, targets=("q_proj",), arm_options={"ckpt": "40"})
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.validate().model_type == "gemma"
    with pytest.raises(ValueError, match="unknown run config keys: bogus"):
        RunConfig.from_dict({"bogus": 1})
    for bad, message in [(dict(batch=0), "batch must be positive"), (dict(steps=-1), "steps must be positive"),
                         (dict(warmup=-1), "warmup"), (dict(seq_len=10**6), "beyond"),
                         (dict(dtype="int8"), "dtype"), (dict(model="nope"), "valid presets")]:
        with pytest.raises(ValueError, match=message):
            RunConfig(**{"model": "llama-3-8b-tiny", **bad}).validate()


def test_resolve_model_paths(tmp_path):
    assert resolve_model("llama-3-8b").max_seq_len == 8192
    with pytest.raises(UnknownPreset, match="llama-3-8b-tiny"):
        resolve_model("llama-9")
    with pytest.raises(NotAModel, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(NotAModel, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 10, "max_position_embeddings": 8}')
    with pytest.raises(NotAModel, match="no weights"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(tmp_path)).max_seq_len == 8


def test_data_is_seeded_padded_and_counted(seed):
    a = make_batch(seed, 3, 1, batch=3, seq_len=37, vocab_size=101, pad_fraction=0.3)
    b = make_batch(seed, 3, 1, batch=3, seq_len=37, vocab_size=101, pad_fraction=0.3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], make_batch(seed, 4, 1, 3, 37, 101, 0.3)["input_ids"])
    pad = a["attention_mask"] == 0
    assert torch.equal(a["labels"] == IGNORE_INDEX, pad) and (a["attention_mask"].sum(1) >= 1).all()
    assert (a["input_ids"] < 101).all()
    cfg = RunConfig(model="llama-3-8b-tiny", seq_len=37, batch=3, grad_accum=2, steps=2, warmup=1, seed=seed)
    steps = make_steps(cfg, 101, "cpu")
    assert len(steps) == 3 and len(steps[0]) == 2
    assert count_tokens(steps[0]) == sum(int(b["attention_mask"].sum()) for b in steps[0])
    assert count_tokens(make_steps(RunConfig(seq_len=37, batch=3, steps=1, warmup=0), 101, "cpu")[0]) == 111


def test_qlora_reads_a_prequantized_checkpoint_and_local_paths_match_presets(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(model="qwen2.5-7b-tiny", seq_len=32, device="cpu")
    ids = torch.randint(0, 512, (2, 32))
    hf.load_4bit(cfg).save_pretrained(tmp_path / "q4")
    assert resolve_model(str(tmp_path / "q4")).prequantized_4bit
    from_q4 = hf.build_qlora(RunConfig(model=str(tmp_path / "q4"), seq_len=32, device="cpu"))
    from_preset = hf.build_qlora(cfg)
    assert type(from_q4.base_model.model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(from_q4(input_ids=ids, labels=ids).loss, from_preset(input_ids=ids, labels=ids).loss)
    with pytest.raises(ValueError, match="4-bit checkpoint"):
        hf.build_peft(RunConfig(model=str(tmp_path / "q4"), seq_len=32, device="cpu"))
    local = hf.build_peft(RunConfig(model=hf.checkpoint_path(cfg), seq_len=32, device="cpu"))
    preset = hf.build_peft(cfg)
    with torch.no_grad():
        assert torch.equal(local(input_ids=ids, labels=ids).loss, preset(input_ids=ids, labels=ids).loss)
    assert sum(p.numel() for p in preset.parameters() if p.requires_grad) > 0
    assert all("lora_" in n for n, p in preset.named_parameters() if p.requires_grad)


def test_an_arms_load_counts_the_imports_it_needs_first(tmp_path, monkeypatch):
    """An arm's modules imported before anything else (Unsloth's) count in its load time, as the other arms' imports
    count inside their build: the load times of arms are compared as a user waits for them. The module imported
    first moves the worker's clock on by 1000 s."""
    import dataclasses
    import time
    import types

    from fastbench.bench import checkpoint_cache, worker

    monkeypatch.setattr(checkpoint_cache, "materialize_seconds", checkpoint_cache.materialize_seconds)
    clock = types.SimpleNamespace(offset=0.0)
    monkeypatch.setattr(worker, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock.offset))
    monkeypatch.setitem(sys.modules, "worker_clock_probe", clock)
    (tmp_path / "slow_to_import_probe.py").write_text("import worker_clock_probe\nworker_clock_probe.offset += 1000\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path / "ckpt"))
    peft = arms.get_arm("peft")
    monkeypatch.setattr(arms, "get_arm", lambda label: dataclasses.replace(peft, import_first=("slow_to_import_probe",)))
    cfg = arms.RunConfig(model="llama-3-8b-tiny", seq_len=8, batch=1, lora_r=2, dtype="float32", device="cpu", steps=1,
                         warmup=0).to_dict()
    checkpoint_cache.materialize_seconds += 5000  # what an earlier run in this process spent writing checkpoints
    record = worker.run({"arm": "peft", "config": cfg, "repeat": 0})
    assert record["status"] == "ok", record["error"]
    assert record["materialize_s"] < 100 and 1000 <= record["load_s"] < 1100 and all(t < 100 for t in record["step_s"])
    assert record["checkpointing_plan"] is None  # not a fused arm in the budget mode


@pytest.mark.parametrize("ckpt, kept", [("1", "2 layers kept"), ("0.0001", "0 layers kept")])
def test_a_budget_arm_records_the_plan_it_trained_with(tmp_path, monkeypatch, ckpt, kept):
    """A fused arm with a budget records, in words, the plan of its last step: what it kept, recomputed and
    offloaded (with ``ckpt=auto`` the plan depends on the card, so results must say which it was). A budget of
    1 GiB keeps both layers of the tiny preset; 0.0001 GiB cannot keep any."""
    from fastbench.bench import worker

    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path / "ckpt"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = arms.RunConfig(model="llama-3-8b-tiny", seq_len=8, batch=1, lora_r=2, dtype="float32", device="cpu", steps=1,
                         warmup=0).to_dict()
    record = worker.run({"arm": f"fused:ckpt={ckpt}", "config": cfg, "repeat": 0})
    assert record["status"] == "ok", record["error"]
    assert record["checkpointing_plan"].startswith(kept), record["checkpointing_plan"]
