"""``fastbench train`` end to end on a tiny checkpoint with a real BPE tokenizer and chat data: outputs, eval,
checkpoints and exact resume, config files, faults (NaN, Ctrl-C/SIGTERM while loading, damaged checkpoints)
and bad input refused before the model loads. The loop runs on plain PEFT here (fast on a CPU); the fused
path's packed step is checked in test_train_packing."""
import errno
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from chat_tokenizer import chat_records, ckpt, plain_peft, read_log, save_tiny_checkpoint, sentences  # noqa: F401
from fastbench.train import loop as loop_module
from fastbench.train.cli import train_command


def invoke(*args):
    return CliRunner().invoke(train_command, [str(a) for a in args])


@pytest.fixture
def no_model_load(monkeypatch):
    from fastbench import FastLanguageModel

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", staticmethod(fail))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


FAST = ["--max-seq-length", 64, "--batch", 2, "--grad-accum", 2, "--r", 4, "--checkpointing", "false",
        "--warmup-steps", 1, "--lr", 1e-3]


def test_chat_run_with_eval_and_checkpoints(tmp_path, ckpt, plain_peft, seed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data, out = write_jsonl(tmp_path / "chat.jsonl", chat_records(24, seed=seed % 1000)), tmp_path / "run"
    result = invoke(ckpt, "--data", data, "--output", out, "--steps", 4, "--eval-fraction", 0.25, "--eval-every", 2,
                    "--save-every", 2, "--seed", seed % 10_000, *FAST)
    assert result.exit_code == 0, result.output
    assert "18 chat examples" in result.output and "packed into" in result.output and "6 eval examples" in result.output
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(abs(r["eval_ppl"] - math.exp(r["eval_loss"])) < 1e-6 * r["eval_ppl"] for r in evals)
    summary = result.output.strip().splitlines()[-1]
    assert summary.startswith("4 steps; ") and "real tokens/s" in summary and f"eval loss {evals[-1]['eval_loss']:.4f}" \
        in summary and "perplexity" in summary and str(out) in summary
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(out / "checkpoint-2")) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors", "optimizer.pt", "rng.pt",
                                                        "scheduler.pt", "trainer_state.json"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    config = json.loads((out / "train_config.json").read_text())
    assert config["eval_fraction"] == 0.25 and config["r"] == 4 and config["packing"] is True
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), str(out))
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in model.named_parameters())


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, ckpt, plain_peft, monkeypatch, seed):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(10, seed=seed % 1000, turns=2))
    args = ["--data", data, "--steps", 6, "--save-every", 2, "--seed", seed % 10_000, *FAST]
    whole = invoke(ckpt, "--output", tmp_path / "whole", *args)
    assert whole.exit_code == 0, whole.output
    expected = [r["loss"] for r in read_log(tmp_path / "whole")]

    calls, accumulate = [], loop_module.accumulate

    def stop_in_step_5(model, micro_batches, *world):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return accumulate(model, micro_batches, *world)

    monkeypatch.setattr(loop_module, "accumulate", stop_in_step_5)
    first = invoke(ckpt, "--output", tmp_path / "split", *args)
    assert first.exit_code == 130 and "interrupted after step 4" in first.output
    monkeypatch.setattr(loop_module, "accumulate", accumulate)
    again = invoke(ckpt, "--output", tmp_path / "split", *args)
    assert again.exit_code == 2 and "already holds files" in again.output and "--resume" in again.output
    shutil.rmtree(tmp_path / "split" / "checkpoint-4")  # from checkpoint-2: steps 3-4 are logged again
    resumed = invoke(ckpt, "--output", tmp_path / "split", "--resume", *args)
    assert resumed.exit_code == 0, resumed.output
    log = read_log(tmp_path / "split")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    got = [r["loss"] for r in log]
    assert all(abs(a - b) <= 1e-6 * b for a, b in zip(got, expected)), (got, expected)
    done = invoke(ckpt, "--output", tmp_path / "split", "--resume", *args)
    assert done.exit_code == 2 and "already reaches --steps" in done.output


def test_damaged_checkpoint_is_named_before_the_model_loads(tmp_path, ckpt, plain_peft, no_model_load):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"step": 3, "position": {"epoch": 0, "step": 3}}')
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(4))
    result = invoke(ckpt, "--data", data, "--output", out, "--resume", "--steps", 5)
    assert result.exit_code == 2 and "checkpoint-3 is damaged (adapter_model.safetensors" in result.output
    assert "delete that directory" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("damage, message", [
    ("trainer_state.json", "checkpoint-1 is damaged (trainer_state.json: "),
    ("optimizer.pt", "checkpoint-1 is damaged (optimizer.pt: "),
    ("scheduler.pt", "checkpoint-1 is damaged (scheduler.pt: "),
    ("rng.pt", "checkpoint-1 is damaged (rng.pt: "),
    ("--r 8", "checkpoint-1 holds an adapter of another shape or model"),
])
def test_a_checkpoint_that_cannot_be_resumed_is_one_line(tmp_path, ckpt, plain_peft, damage, message):
    """A file of a real checkpoint cut in half, or a resume with another LoRA rank: exit 2, one line naming the
    checkpoint and what to do, nothing trained further."""
    data, out = write_jsonl(tmp_path / "chat.jsonl", chat_records(8)), tmp_path / "run"
    args = [ckpt, "--data", data, "--output", out, "--save-every", 1, *FAST]
    assert invoke(*args, "--steps", 1).exit_code == 0
    if damage.startswith("--"):
        args += damage.split()
    else:
        path = out / "checkpoint-1" / damage
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = invoke(*args, "--steps", 2, "--resume")
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and "--overwrite" in result.output
    assert [r["step"] for r in read_log(out)] == [1] and not (out / "checkpoint-2").exists()


def test_config_file_with_command_line_overrides(tmp_path, ckpt, plain_peft):
    data, out = write_jsonl(tmp_path / "chat.jsonl", chat_records(6)), tmp_path / "run"
    (tmp_path / "train.yaml").write_text(f"model: {ckpt}\ndata: {data}\nmax_seq_length: 48\ngrad_accum: 3\n"
                                         "packing: false\nr: 4\nsteps: 2\ncheckpointing: false\n"
                                         "targets: [q_proj, v_proj]\n")
    result = CliRunner().invoke(train_command, ["--config", str(tmp_path / "train.yaml"), "--output", str(out),
                                                "--grad-accum", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["grad_accum"] == 1 and saved["max_seq_length"] == 48 and saved["packing"] is False
    assert saved["model"] == ckpt and saved["targets"] == "q_proj,v_proj" and saved["steps"] == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert "packed" not in result.output  # packing: false


@pytest.mark.parametrize("name, text", [("c.toml", 'steps = 3\nmax_seq_length = 32\npacking = false\n'),
                                        ("c.json", '{"steps": 3, "max-seq-length": 32, "packing": false}')])
def test_toml_and_json_config_files(tmp_path, name, text):
    import click

    from fastbench.train.config import apply_config

    (tmp_path / name).write_text(text)
    ctx = click.Context(train_command)
    apply_config(ctx, None, str(tmp_path / name))
    assert ctx.default_map == {"steps": 3, "max_seq_length": 32, "packing": False}


@pytest.fixture
def bad(tmp_path, ckpt):
    good = chat_records(2)
    write_jsonl(tmp_path / "roles.jsonl", good + [{"messages": [{"role": "robot", "content": "x"}]}])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "bogus.yaml").write_text("steps: 2\nbogus_key: 1\n")
    (tmp_path / "broken.yaml").write_text("steps: [2\n")
    (tmp_path / "code.yaml").write_text(f"steps: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "adapter_model.safetensors").write_text("x")
    no_template = tmp_path / "no-template"
    shutil.copytree(ckpt, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    return {"ckpt": ckpt, "chat": write_jsonl(tmp_path / "chat.jsonl", good), "roles": tmp_path / "roles.jsonl",
            "latin1": tmp_path / "latin1.jsonl", "bogus": tmp_path / "bogus.yaml", "broken": tmp_path / "broken.yaml",
            "code": tmp_path / "code.yaml",
            "file": tmp_path / "a-file", "full": tmp_path / "full", "no_template": no_template}


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "--data", "{roles}"], "roles.jsonl:3: turn 1 has unknown role 'robot'"),
    (["{ckpt}", "--data", "{latin1}"], "latin1.jsonl:1: not UTF-8 text"),
    (["{ckpt}", "--data", "{chat}", "--format", "dialog"], "'dialog' is not one of"),
    (["{ckpt}", "--data", "{chat}", "--chat-template", "llama-9"], "'llama-9' is not one of"),
    (["{ckpt}", "--data", "{chat}", "--format", "alpaca"], "no field 'instruction', which a alpaca record has"),
    (["{ckpt}", "--data", "{chat}", "--config", "{bogus}"], "'bogus_key' is not an option of train"),
    (["{ckpt}", "--data", "{chat}", "--config", "{broken}"], "broken.yaml: cannot parse it"),
    (["{ckpt}", "--data", "{chat}", "--config", "{code}"], "code.yaml: cannot parse it (could not determine a "
                                                           "constructor for the tag"),
    (["{no_template}", "--data", "{chat}"], "has none; give --chat-template (llama-3, chatml"),
    (["{ckpt}", "--data", "{chat}", "--output", "{file}"], "is a file; give a directory"),
    (["{ckpt}", "--data", "{chat}", "--output", "{full}"], "already holds files (adapter_model.safetensors)"),
    (["{ckpt}", "--data", "{chat}", "--output", "{full}", "--resume"], "no checkpoint-N/ to resume from"),
    (["{ckpt}", "--data", "{chat}", "--eval-every", "2"], "--eval-every needs --eval-data or --eval-fraction"),
    (["{ckpt}", "--data", "{chat}", "--resume", "--overwrite"], "not both"),
    (["{ckpt}", "--data", "{chat}", "--offload-host-gib", "2"], "--offload-host-gib applies to --checkpointing offload"),
    (["{ckpt}", "--data", "{chat}", "--checkpointing", "offload", "--offload-host-gib", "1e-9"],
     "cannot hold a forward of --batch x --max-seq-length = 4096 tokens: it needs at least"),
])
def test_bad_input_is_one_line_and_exit_2_before_the_model_loads(bad, tmp_path, no_model_load, args, message):
    args = [a.format(**bad) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    assert not (tmp_path / "ran").exists()  # a config file's tags never run code


def test_output_that_is_not_writable(tmp_path, ckpt, no_model_load, monkeypatch):
    import fastbench.train.cli as cli

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(2))
    monkeypatch.setattr(cli.os, "access", lambda path, mode: path != str(tmp_path))
    result = invoke(ckpt, "--data", data, "--output", tmp_path / "new" / "out")
    assert result.exit_code == 2 and f"{tmp_path} is not writable" in result.output


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_interrupted_while_the_model_loads(tmp_path, ckpt, monkeypatch, stop):
    """Exit 130 / 143 with a line saying nothing was trained; --trust-remote-code and --allow-pickle reach the
    loader as keywords."""
    from fastbench import FastLanguageModel

    seen = {}

    def loading(name, **kwargs):
        seen.update(kwargs)
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", staticmethod(loading))
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(2))
    result = invoke(ckpt, "--data", data, "--output", tmp_path / "out", "--trust-remote-code", "--allow-pickle")
    assert result.exit_code == {"ctrl-c": 130, "sigterm": 143}[stop], result.output
    assert "before training started; nothing was trained" in result.output
    assert seen["trust_remote_code"] is True and seen["allow_pickle"] is True


def poisoned_run(tmp_path, ckpt, seed, n=20):
    """(checkpoint, text data) for a real NaN loss in step 3 of a run of ``--no-packing`` and ``FAST``'s batch
    and grad-accum, one epoch long, seeded ``seed``: the checkpoint is ``ckpt`` with NaN embeddings for the
    tokens of a few bytes that only one example of step 3 holds (as a broken example would bring them)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from fastbench.train.loop import ExamplePlan

    texts = sentences(n, seed)
    plan = ExamplePlan([{"input_ids": [0, 0]}] * n, batch=2, grad_accum=2, max_seq_length=64, packing=False,
                       pad_id=0, seed=seed)
    assert len(plan.epoch(0)) >= 4
    broken = plan.epoch(0)[2][0][0][0]  # step 3, its first micro-batch's first row: the example
    texts[broken] += " \u00a4\u00a4"  # bytes no generated sentence has
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    others = {i for k, text in enumerate(texts) if k != broken for i in tokenizer(text)["input_ids"]}
    poison = sorted(set(tokenizer(texts[broken])["input_ids"]) - others)
    assert poison
    poisoned = tmp_path / "poisoned"
    shutil.copytree(ckpt, poisoned)
    weights = load_file(poisoned / "model.safetensors")
    weights["model.embed_tokens.weight"][poison] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    return poisoned, write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in texts])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_nan_loss(tmp_path, ckpt, request, seed, on_nan, device):
    """A real NaN loss and gradient in step 3 (an example of it meets NaN weights): ``--on-nan stop`` names the
    step and the likely cause, keeps checkpoint-2 and saves the adapter of steps 1-2 (exit 1, one line);
    ``--on-nan skip`` trains on, the adapter finite. On the CPU through plain PEFT, on the GPU the fused path."""
    from safetensors.torch import load_file

    from fastbench.train.checkpoint import ADAPTER_FILE, load_checkpoint

    if device == "cpu":
        request.getfixturevalue("plain_peft")
    seed %= 10_000
    poisoned, data = poisoned_run(tmp_path, ckpt, seed)
    out = tmp_path / "run"
    result = invoke(poisoned, "--data", data, "--output", out, "--steps", 4, "--save-every", 2, "--on-nan", on_nan,
                    "--no-packing", "--seed", seed, *FAST)
    log = read_log(out)
    assert ("fused LoRA" in result.output) == (device == "cuda"), result.output
    adapter = load_file(out / ADAPTER_FILE)
    assert all(t.isfinite().all() for t in adapter.values())
    if on_nan == "stop":
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert re.search(r"step 3: the loss is (nan|-?inf) and the gradient norm \S+, not finite; stopped; the last "
                         rf"checkpoint, {re.escape(str(out / 'checkpoint-2'))}, is kept\. Likely a learning rate too "
                         r"high.*lower --lr.*--on-nan skip skips such steps; the adapter of the 2 finished steps "
                         rf"is saved to {re.escape(str(out))}$", result.output.strip().splitlines()[-1]), result.output
        assert "Traceback" not in result.output
        assert [r["step"] for r in log] == [1, 2] and not (out / "checkpoint-4").exists()
        kept = load_checkpoint(str(out / "checkpoint-2"))["adapter"]
        assert all(torch.equal(adapter[k], kept[k]) for k in kept)  # the saved adapter is step 2's
    else:
        assert result.exit_code == 0, result.output
        assert [r["step"] for r in log] == [1, 2, 3, 4] and "skipped" in log[2] and math.isfinite(log[3]["loss"])
        assert "1 non-finite steps skipped" in result.output
        assert load_checkpoint(str(out / "checkpoint-4"))["step"] == 4


def test_tokenizer_without_pad_token_pads_with_eos_and_says_so(tmp_path, ckpt, plain_peft, monkeypatch):
    from fastbench.export import gguf_file, merge

    nopad = tmp_path / "nopad"
    shutil.copytree(ckpt, nopad)
    config = json.loads((nopad / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (nopad / "tokenizer_config.json").write_text(json.dumps(config))
    exported = []
    monkeypatch.setattr(merge, "save_pretrained_merged", lambda m, d, t=None, **k: exported.append(("merged", d)) or d)
    monkeypatch.setattr(gguf_file, "save_pretrained_gguf", lambda m, d, t=None, **k: exported.append((k, d)) or d)
    data, out = write_jsonl(tmp_path / "chat.jsonl", chat_records(4)), tmp_path / "run"
    result = invoke(nopad, "--data", data, "--output", out, "--steps", 1, "--merge", "--gguf", "q8_0", *FAST)
    assert result.exit_code == 0, result.output
    assert "no pad token; padding with its EOS token '</s>'" in result.output
    assert exported == [("merged", str(out / "merged")),
                        ({"quantization_method": "q8_0", "overwrite": True}, str(out / "gguf"))]


def no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_disk_full_while_saving_the_adapter_keeps_the_previous_one(tmp_path, ckpt, plain_peft, monkeypatch):
    """The adapter's files are written half, then the disk is full: the previous adapter stays as it was, no
    half-written file is left, one line says so (exit 1, as a failed run)."""
    from peft import PeftModel

    data, out = write_jsonl(tmp_path / "chat.jsonl", chat_records(6)), tmp_path / "run"
    first = invoke(ckpt, "--data", data, "--output", out, "--steps", 1, *FAST)
    assert first.exit_code == 0, first.output
    before = (out / "adapter_model.safetensors").read_bytes()

    def full_disk(self, directory, **kwargs):  # as safetensors reports it
        (Path(directory) / "adapter_model.safetensors").write_bytes(before[: len(before) // 2])
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PeftModel, "save_pretrained", full_disk)
    result = invoke(ckpt, "--data", data, "--output", out, "--steps", 2, "--overwrite", *FAST)
    assert result.exit_code == 1, result.output
    assert f"no space left on device to save the adapter of the 2 finished steps to {out}; the adapter files there " \
           "are as they were. Free some space" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()[-1]) > 50
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_disk_full_while_writing_a_checkpoint_keeps_the_earlier_ones(tmp_path, ckpt, plain_peft, monkeypatch):
    """checkpoint-2 fails half-written: none of it is left, checkpoint-1 is whole, the adapter of the finished
    steps is saved, and --resume finishes the run once there is room."""
    from fastbench.train import checkpoint as checkpoint_module

    save_torch = checkpoint_module._save_torch

    def full_disk_in_checkpoint_2(obj, path):
        if ".checkpoint-2-" in path and path.endswith("optimizer.pt"):
            Path(path).write_bytes(b"PK\x03\x04 half")
            raise no_space(path)
        save_torch(obj, path)

    monkeypatch.setattr(checkpoint_module, "_save_torch", full_disk_in_checkpoint_2)
    data, out = write_jsonl(tmp_path / "chat.jsonl", chat_records(8)), tmp_path / "run"
    args = [ckpt, "--data", data, "--output", out, "--steps", 3, "--save-every", 1, *FAST]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert f"no space left on device writing to {out} after step 2 (nothing half-written is left, the last " \
           f"checkpoint, {out / 'checkpoint-1'}, is kept); the adapter of the 2 finished steps is saved to {out}; " \
           "free some space, then train on with --resume" in result.output
    assert "Traceback" not in result.output
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint") or n.startswith(".")) == ["checkpoint-1"]
    assert checkpoint_module.load_checkpoint(str(out / "checkpoint-1"))["step"] == 1
    assert (out / "adapter_model.safetensors").exists()
    monkeypatch.setattr(checkpoint_module, "_save_torch", save_torch)
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


def test_merge_and_gguf_replace_an_earlier_runs_and_a_full_disk_is_one_line(tmp_path, ckpt, plain_peft, monkeypatch):
    """--merge and --gguf write OUT/merged and OUT/gguf, replacing those of the run --overwrite starts over from;
    a disk that fills while the merged model is written: one line (exit 1), the earlier merged model as it was,
    nothing half-written, the adapter saved."""
    from fastbench.export import merge

    data, out = write_jsonl(tmp_path / "chat.jsonl", chat_records(4)), tmp_path / "run"
    args = [ckpt, "--data", data, "--output", out, "--steps", 1, "--merge", "--gguf", "q8_0", *FAST]
    first = invoke(*args, "--seed", 1)
    assert first.exit_code == 0, first.output
    before = (out / "merged" / "model.safetensors").read_bytes()
    again = invoke(*args, "--seed", 2, "--overwrite")
    assert again.exit_code == 0, again.output
    replaced = (out / "merged" / "model.safetensors").read_bytes()
    assert replaced != before and (out / "gguf" / "model.Q8_0.gguf").exists()

    write_directory = merge.write_directory

    def disk_fills(save_directory, fill):
        def half(tmp):
            (Path(tmp) / "model.safetensors").write_bytes(replaced[: len(replaced) // 2])
            raise no_space(tmp)

        write_directory(save_directory, half)

    monkeypatch.setattr(merge, "write_directory", disk_fills)
    full = invoke(*args, "--seed", 3, "--overwrite")
    assert full.exit_code == 1 and "Traceback" not in full.output, full.output
    assert "no space left on device while exporting" in full.output and "nothing half-written is left, and the " \
        f"adapter is saved in {out}: free some space, then export it with fastbench export {out}" in full.output
    assert (out / "merged" / "model.safetensors").read_bytes() == replaced
    assert (out / "adapter_model.safetensors").exists() and not [n for n in os.listdir(out) if n.startswith(".")]


def test_sigterm_while_the_merged_model_is_written_keeps_the_adapter(tmp_path, ckpt, plain_peft, monkeypatch):
    """SIGTERM halfway through --merge's files: exit 143, one line, no merged directory or half of one left, the
    adapter saved."""
    from fastbench.export import merge

    write_directory = merge.write_directory

    def stopped_halfway(save_directory, fill):
        def half(tmp):
            (Path(tmp) / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)

        write_directory(save_directory, half)

    monkeypatch.setattr(merge, "write_directory", stopped_halfway)
    data, out = write_jsonl(tmp_path / "chat.jsonl", chat_records(4)), tmp_path / "run"
    result = invoke(ckpt, "--data", data, "--output", out, "--steps", 1, "--merge", *FAST)
    assert result.exit_code == 143, result.output
    assert f"terminated (SIGTERM) while exporting; the adapter is saved in {out}" in result.output
    assert "Traceback" not in result.output and (out / "adapter_model.safetensors").exists()
    assert not (out / "merged").exists() and not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_log_line_cut_short_is_left_out(tmp_path):
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    assert loop_module.read_log(str(tmp_path)) == [{"step": 1, "loss": 2.5}]


def test_the_loss_plot_of_a_run_stopped_before_its_first_step(tmp_path, recwarn):
    """No step finished (stopped at once): loss.png is drawn empty, without matplotlib's no-legend warning."""
    (tmp_path / "train_log.jsonl").write_text("")
    assert loop_module.plot_loss(str(tmp_path)) == str(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not [w for w in recwarn if "legend" in str(w.message)]


@pytest.mark.parametrize("error, full", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), True),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), True),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
    (OSError(errno.EACCES, os.strerror(errno.EACCES)), False),
    (RuntimeError("boom"), False),
])
def test_out_of_disk_space_is_told_from_other_errors(error, full):
    from fastbench.files import out_of_disk_space

    assert out_of_disk_space(error) is full

