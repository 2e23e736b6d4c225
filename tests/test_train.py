"""``fastbench train`` on tiny models (CPU, fp32): adapters PEFT can load, an overfit check, Ctrl-C and SIGTERM,
exact gradient accumulation, and clean errors for bad input; on the GPU (marked gpu), a real out-of-memory in a
step and while loading, and a SIGTERM from outside while it trains."""
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import warnings

import pytest
import torch
from click.testing import CliRunner

from chat_tokenizer import launched, read_log
from child_processes import stopped_when
from fastbench.train import loop as loop_module
from fastbench.train.checkpoint import ADAPTER_FILE as ADAPTER
from fastbench.train.cli import train_command

PRESET = "llama-3-8b-tiny"


def invoke(*args):
    return CliRunner().invoke(train_command, [str(a) for a in args])


def lora_tensors(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint with a word-level tokenizer (words t0..t251)."""
    from fastbench.bench.checkpoint_cache import save_checkpoint

    return save_checkpoint(PRESET, str(tmp_path_factory.mktemp("ckpt") / "llama-tiny"), seed=11)


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def test_preset_on_random_data_saves_an_adapter_peft_loads(seed, tmp_path):
    from peft import PeftModel

    from fastbench.presets import build_model

    out = tmp_path / "adapter"
    result = invoke(PRESET, "--data", "random", "--output", out, "--steps", 3, "--max-seq-length", 9, "--batch", 1,
                    "--grad-accum", 2, "--r", 4, "--seed", seed % 10_000, "--save-every", 2)
    assert result.exit_code == 0, result.output
    log = read_log(out)
    assert [row["step"] for row in log] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) and row["tokens"] == 18 and row["tokens_per_s"] > 0 for row in log)
    assert log[0]["lr"] < log[1]["lr"]  # warm-up
    loaded = PeftModel.from_pretrained(build_model(PRESET, seed=seed % 10_000), str(out))
    b = [p for n, p in lora_tensors(loaded).items() if "lora_B" in n]
    assert len(b) == 2 * 7 and all(torch.isfinite(p).all() for p in b)
    assert all(p.abs().max() > 0 for p in b)  # trained: LoRA B starts at zero


def test_checkpoint_with_tokenizer_overfits_a_repeated_example(seed, tmp_path, checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(seed)
    text = " ".join(f"t{rng.randrange(252)}" for _ in range(6))
    data, out = write_jsonl(tmp_path / "data.jsonl", [text]), tmp_path / "adapter"
    result = invoke(checkpoint, "--data", data, "--output", out, "--steps", 15, "--batch", 1, "--grad-accum", 1,
                    "--lr", 1e-2, "--lora-alpha", 32, "--r", 8, "--warmup-steps", 0, "--checkpointing", "false",
                    "--max-seq-length", 32, "--seed", seed % 10_000)
    assert result.exit_code == 0, result.output
    losses = [row["loss"] for row in read_log(out)]
    assert len(losses) == 15 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses

    tok = AutoTokenizer.from_pretrained(str(out))  # saved beside the adapter
    ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), str(out)).eval()
    with torch.no_grad():
        trained = model(input_ids=ids, labels=ids).loss.item()
        with model.disable_adapter():
            untrained = model(input_ids=ids, labels=ids).loss.item()
    tol = 1e-2 if torch.cuda.is_available() else 1e-4  # trained in bf16 on a GPU, checked in fp32 here
    assert abs(untrained - losses[0]) < tol * losses[0]  # the first step's loss is the base model's
    assert trained < losses[0] - 0.5


def test_txt_epochs_of_ragged_batches_with_offloaded_checkpoints(seed, tmp_path, checkpoint):
    """One example per line; short last step per epoch; offload buffers reused for other shapes."""
    rng = random.Random(seed)
    lines = [" ".join(f"t{rng.randrange(252)}" for _ in range(n)) for n in (3, 7, 5)]
    data, out = tmp_path / "data.txt", tmp_path / "adapter"
    data.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    result = invoke(checkpoint, "--data", data, "--output", out, "--epochs", 2, "--batch", 2, "--grad-accum", 1,
                    "--no-packing", "--checkpointing", "offload", "--r", 4, "--seed", seed % 10_000)
    assert result.exit_code == 0, result.output
    log = read_log(out)
    assert len(log) == 4 and all(math.isfinite(row["loss"]) for row in log)
    tokens_per_epoch = sum(len(line.split()) + 1 for line in lines)  # + EOS
    assert log[0]["tokens"] + log[1]["tokens"] == log[2]["tokens"] + log[3]["tokens"] == tokens_per_epoch


def train_with_third_step(monkeypatch, tmp_path, seed, third_step, *options):
    """fastbench train for 5 steps whose third step first runs ``third_step()`` (which raises, signals or
    limits the memory); ``options`` override the small default sizes. Returns (the output directory, click's
    result)."""
    calls, accumulate = [], loop_module.accumulate

    def patched(model, micro_batches, *world):
        calls.append(1)
        if len(calls) == 3:
            third_step()
        return accumulate(model, micro_batches, *world)

    monkeypatch.setattr(loop_module, "accumulate", patched)
    out = tmp_path / "adapter"
    return out, invoke(PRESET, "--data", "random", "--output", out, "--steps", 5, "--max-seq-length", 7,
                       "--batch", 1, "--grad-accum", 1, "--r", 4, "--seed", seed % 10_000, *options)


@contextlib.contextmanager
def gpu_memory_capped():
    """Inside: ``cap()`` empties this process's CUDA cache and lets the caching allocator hold no more than it
    holds then (torch.cuda.set_per_process_memory_fraction), so the next allocation that needs new memory
    fails as on a full card: a real CUDA out-of-memory. Lifted on leaving."""
    def cap():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)

    try:
        yield cap
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_the_adapter_of_the_finished_steps(seed, tmp_path, monkeypatch, stop):
    def interrupt():
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # what a job scheduler or `timeout` sends

    before = signal.getsignal(signal.SIGTERM)
    out, result = train_with_third_step(monkeypatch, tmp_path, seed, interrupt)
    assert signal.getsignal(signal.SIGTERM) is before
    assert result.exit_code == {"ctrl-c": 130, "sigterm": 143}[stop]
    assert f"{'interrupted' if stop == 'ctrl-c' else 'terminated (SIGTERM)'} after step 2" in result.output
    assert len(read_log(out)) == 2
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert not list(out.glob(".saving-*"))


@pytest.mark.gpu
def test_sigterm_from_outside_while_the_gpu_trains(seed, tmp_path):
    """``fastbench train`` in a process of its own, a checkpoint every step, stopped by a SIGTERM from outside
    (as a scheduler sends it) at whatever point of a step or of a checkpoint's write it comes: exit 143, one line
    naming the last finished step N; the log and the checkpoints whole up to N or N - 1 (what the signal cut
    short left nothing half-written); the adapter saved; --resume from the latest checkpoint trains on (its
    optimizer and CUDA random states restored)."""
    from safetensors.torch import load_file

    from fastbench.train.checkpoint import checkpoints, load_checkpoint

    out = tmp_path / "run"
    args = [PRESET, "--data", "random", "--output", out, "--max-seq-length", 256, "--batch", 2, "--grad-accum", 1,
            "--r", 4, "--save-every", 1, "--seed", seed % 10_000]
    proc = launched(*args, "--steps", 100_000)
    output, _ = stopped_when(proc, lambda: True if (out / "checkpoint-2").is_dir() else None,
                             lambda _: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 143, output
    said = re.findall(r"terminated \(SIGTERM\) after step (\d+): adapter saved to (\S+)", output)
    assert len(said) == 1 and said[0][1] == str(out) and "Traceback" not in output, output
    assert "fused LoRA" in output, output
    done = int(said[0][0])
    logged = [r["step"] for r in loop_module.read_log(str(out))]  # a line cut short is left out
    assert logged == list(range(1, len(logged) + 1)) and done - 1 <= len(logged) <= done, (done, logged)
    saved = checkpoints(str(out))
    last = saved[-1][0]
    assert [step for step, _ in saved] == list(range(1, last + 1)) and done - 1 <= last <= done, (done, saved)
    states = [load_checkpoint(path) for _, path in saved]  # each whole: a damaged one raises, naming it
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    adapter = load_file(out / ADAPTER)
    assert all(t.isfinite().all() for t in adapter.values())
    if last == done:
        assert all(torch.equal(adapter[k], t) for k, t in states[-1]["adapter"].items())
    resumed = launched(*args, "--steps", last + 2, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "Traceback" not in output, output
    assert [r["step"] for r in loop_module.read_log(str(out))] == list(range(1, last + 3))
    assert (out / f"checkpoint-{last + 2}").is_dir()


def _host_short():
    from fastbench.fused.checkpointing.offload import PinnedMemoryShort

    return PinnedMemoryShort("offloaded checkpointing needs 3.00 GiB more host memory")


FAILURES = {"oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "driver-oom": lambda: RuntimeError("Triton Error [CUDA]: out of memory"),  # no OutOfMemoryError
            "host-short": _host_short,  # the offload mode's host buffers
            "other": lambda: RuntimeError("boom")}


@pytest.mark.parametrize("error", [*FAILURES, pytest.param("cuda-oom", marks=pytest.mark.gpu)])
def test_a_failing_step_keeps_the_finished_ones(seed, tmp_path, monkeypatch, error):
    """Out of memory in step 3 (raised by the caching allocator, or said by another error; on the GPU a real
    one, the memory capped before the step): a clear message with what to change, exit 1, no traceback;
    another error propagates. Either way the adapter of steps 1-2 is saved, the one checkpoint-2 holds."""
    from safetensors.torch import load_file

    options = ["--save-every", 1]
    with contextlib.ExitStack() as stack:
        if error == "cuda-oom":  # a step of tens of MiB, far more than any scraps the emptied cache keeps
            step = stack.enter_context(gpu_memory_capped())
            options += ["--max-seq-length", 4096, "--batch", 4]
        else:
            def step():
                raise FAILURES[error]()
        out, result = train_with_third_step(monkeypatch, tmp_path, seed, step, *options)
    assert len(read_log(out)) == 2
    assert "the adapter of the 2 finished steps is saved" in result.output
    saved, kept = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-2" / ADAPTER)
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in kept)
    assert not (out / "checkpoint-3").exists() and not [p for p in os.listdir(out) if p.startswith(".")]
    if error == "other":
        assert isinstance(result.exception, RuntimeError) and "failed in step 3" in result.output
        return
    if error == "host-short":
        assert result.exit_code == 1 and "out of host memory in step 3; the adapter of the 2 finished steps is " \
            f"saved to {out}. offloaded checkpointing needs 3.00 GiB more host memory. Lower --batch (raise " \
            "--grad-accum to keep the step size) or --max-seq-length, or use --checkpointing with a budget in GiB " \
            "(it offloads only what does not fit the GPU) or true (nothing in host memory)" in result.output
        assert "Traceback" not in result.output
        return
    assert result.exit_code == 1 and "out of GPU memory in step 3; the adapter of the 2 finished steps is saved " \
        f"to {out}. Lower --batch (raise --grad-accum to keep the step size) or --max-seq-length, or use " \
        "--checkpointing offload or --load-in-4bit" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    if error == "cuda-oom":
        assert "fused LoRA" in result.output  # the fused path ran out, on the GPU


def test_accumulated_step_equals_one_batch_of_ragged_padded_examples(seed):
    from fastbench import FastLanguageModel
    from fastbench.train.loop import accumulate
    from fastbench.train.packing import padded_batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained(PRESET, dtype=torch.float32, device="cpu", seed=seed % 10_000)
    model = FastLanguageModel.get_peft_model(base, r=4, random_state=seed, use_gradient_checkpointing=False,
                                             fallback=False)
    for name, p in lora_tensors(model).items():  # B = 0 at init: give the LoRA terms some weight
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    examples = [torch.randint(0, 512, (n,)).tolist() for n in (9, 4, 6)]

    def step(micro_batches):
        model.zero_grad(set_to_none=True)
        loss, tokens = accumulate(model, micro_batches)
        return loss, tokens, {n: p.grad.clone() for n, p in lora_tensors(model).items()}

    examples = [{"input_ids": e, "labels": e} for e in examples]
    loss_a, tokens_a, grads_a = step([padded_batch(examples[:2], 0), padded_batch(examples[2:], 0)])
    loss_b, tokens_b, grads_b = step([padded_batch(examples, 0)])
    assert tokens_a == tokens_b == 19
    assert abs(loss_a - loss_b) < 1e-5 * loss_b
    for name, g in grads_b.items():
        assert torch.linalg.norm(grads_a[name] - g) <= 1e-5 * torch.linalg.norm(g), name


@pytest.fixture
def bad_inputs(tmp_path, checkpoint):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{checkpoint}/{name}", no_tokenizer / name)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    write_jsonl(tmp_path / "body.jsonl", ["t1 t2 t3"], field="body")
    (tmp_path / "data.xml").write_text("<text>t1 t2</text>\n")
    return {"ckpt": checkpoint, "missing": tmp_path / "missing.jsonl", "empty": tmp_path / "empty.jsonl",
            "body": tmp_path / "body.jsonl", "xml": tmp_path / "data.xml", "no_tokenizer": no_tokenizer}


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "--data", "{missing}"], "no such file"),
    (["{ckpt}", "--data", "{empty}"], "has no examples"),
    (["{ckpt}", "--data", "{body}"], "cannot tell the format from the fields 'body'"),
    (["{ckpt}", "--data", "{xml}"], "unknown kind of file"),
    (["{no_tokenizer}", "--data", "{body}", "--text-field", "body"], "has no tokenizer"),
    ([PRESET, "--data", "{body}", "--text-field", "body"], "is a preset"),
    (["llama-9-70b", "--data", "random", "--steps", "1"], "valid presets: llama-3-8b"),
    ([PRESET, "--data", "random"], "give --steps"),
    ([PRESET, "--data", "random", "--steps", "1", "--epochs", "1"], "not both"),
    ([PRESET, "--data", "random", "--steps", "1", "--checkpointing", "sometimes"], "offload, auto"),
    ([PRESET, "--data", "random", "--steps", "0"], "--steps"),
    ([PRESET, "--data", "random", "--steps", "1", "--batch", "0"], "--batch"),
    ([PRESET, "--data", "random", "--steps", "1", "--grad-accum", "-1"], "--grad-accum"),
    ([PRESET, "--data", "random", "--steps", "1", "--lr", "0"], "--lr"),
    ([PRESET, "--data", "random", "--steps", "1", "--r", "0"], "--r"),
    ([PRESET, "--data", "random", "--steps", "1", "--max-seq-length", "1"], "--max-seq-length"),
    ([PRESET, "--data", "random", "--steps", "1", "--targets", "qkv_proj"], "qkv_proj"),
    ([PRESET, "--data", "random", "--steps", "1", "--gguf", "q3"], "unknown quantization_method 'q3'; valid: q4_k_m"),
    ([PRESET, "--data", "random", "--steps", "1", "--gguf", "q8_0"], "--data random loads no tokenizer"),
    (["{ckpt}", "--data", "{body}", "--text-field", "body", "--gguf", "q8_0"],
     "llama.cpp reads BPE tokenizers (byte-level, or with byte fallback as sentencepiece's); this one is WordLevel"),
])
def test_bad_input_is_a_clean_error(bad_inputs, tmp_path, args, message):
    result = invoke(*[a.format(**bad_inputs) for a in args], "--output", tmp_path / "out")
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit)  # a click error, no traceback
    assert message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_loader_failure_is_a_clean_error(tmp_path, monkeypatch):
    from fastbench import FastLanguageModel

    def missing_bitsandbytes(*args, **kwargs):
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", staticmethod(missing_bitsandbytes))
    result = invoke(PRESET, "--data", "random", "--steps", "1", "--load-in-4bit", "--output", tmp_path / "out")
    assert result.exit_code == 1 and "cannot load llama-3-8b-tiny" in result.output and "bitsandbytes" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("where", ["said", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_out_of_memory_while_loading_is_one_line(tmp_path, monkeypatch, where):
    """The base does not fit (said by a loader, or on the GPU with the memory capped before a 1B model loads):
    one line saying what to use instead, exit 1, nothing trained or written."""
    from fastbench import FastLanguageModel

    model = "llama-3.2-1b" if where == "gpu" else PRESET  # on the GPU: weights that need new memory, not scraps
    with contextlib.ExitStack() as stack:
        if where == "gpu":
            stack.enter_context(gpu_memory_capped())()
        else:
            def too_big(*args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.96 GiB")

            monkeypatch.setattr(FastLanguageModel, "from_pretrained", staticmethod(too_big))
        result = invoke(model, "--data", "random", "--steps", "1", "--output", tmp_path / "out")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"out of GPU memory loading {model}, before training started; use --load-in-4bit (NF4 base " \
           "weights) or a smaller model, or free the GPU of other processes" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_from_pretrained_takes_what_unsloths_notebooks_pass(checkpoint):
    """token, device_map, and load_in_8bit / full_finetuning when False; True is refused with the reason."""
    from fastbench import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(checkpoint, max_seq_length=512, dtype=None, load_in_4bit=False,
                                                   token=None, device_map="cpu", load_in_8bit=False,
                                                   full_finetuning=False)
    assert model.device.type == "cpu" and tok is not None and model.max_seq_length == 512
    with pytest.raises(ValueError, match="8 bits"):
        FastLanguageModel.from_pretrained(checkpoint, load_in_8bit=True, device="cpu")
    with pytest.raises(ValueError, match="full fine-tuning"):
        FastLanguageModel.from_pretrained(checkpoint, full_finetuning=True, device="cpu")


def test_a_budget_logs_and_shows_its_plan_where_it_changes(seed, tmp_path):
    """--checkpointing with a budget in GiB: the first step's log row, and the output, say what the plan kept,
    recomputed and offloaded; the later rows, with the same plan, do not repeat it."""
    out = tmp_path / "run"
    result = invoke(PRESET, "--data", "random", "--output", out, "--steps", 3, "--max-seq-length", 8, "--batch", 1,
                    "--grad-accum", 1, "--r", 4, "--checkpointing", 1, "--seed", seed % 10_000)
    assert result.exit_code == 0, result.output
    log = read_log(out)
    assert log[0]["checkpointing_plan"].startswith("2 layers kept, 0 recomputed"), log[0]
    assert all("checkpointing_plan" not in row for row in log[1:])
    assert f"step 1: checkpointing plan: {log[0]['checkpointing_plan']}" in result.output
