"""``fastbench export``: bad input refused with one line and exit 2 before any model loads; an adapter
directory merged onto its base and written as GGUF files and a merged checkpoint."""
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from fastbench.cli import main
from fastbench.export import merged_tensors
from fastbench.model import FastLanguageModel
from test_export import gguf_tensors, rel, tokenizer

gguf = pytest.importorskip("gguf")


def run(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


@pytest.fixture
def adapter(tmp_path):
    """An adapter of the llama-3-8b-tiny preset (base seed 5) with its tokenizer, and the trained model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cpu", seed=5)
        model = FastLanguageModel.get_peft_model(base, r=4, lora_alpha=8, random_state=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "adapter"))
    tokenizer().save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter", model


@pytest.mark.parametrize("args,message", [
    (["--gguf", "q4_k_xl"], "unknown method 'q4_k_xl'; valid: q4_k_m, q4_k_s"),
    (["--gguf", "q8_0,iq1_s"], "unknown method 'iq1_s'"),
    ([], "nothing to write: give --gguf METHOD and/or --merged DIR"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run(tmp_path, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_refuses_a_non_empty_output_and_a_source_that_is_no_model(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    result = run(tmp_path / "empty", "--gguf", "q8_0", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "exists and is not empty; pass --overwrite" in result.output
    result = run(tmp_path / "empty", "--gguf", "q8_0", "--output", tmp_path / "new")
    assert result.exit_code == 2 and "neither adapter_config.json" in result.output
    assert not (tmp_path / "new").exists()


def test_adapter_without_a_named_base_asks_for_base(adapter):
    path, _ = adapter
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (path / "adapter_config.json").write_text(json.dumps(config))
    result = run(path, "--gguf", "f16")
    assert result.exit_code == 2 and "give --base" in result.output


def test_adapter_is_merged_onto_its_base_and_exported(adapter, tmp_path):
    path, model = adapter
    result = run(path, "--base", "llama-3-8b-tiny", "--seed", 5, "--dtype", "float16", "--gguf", "f32,q8_0",
                 "--output", tmp_path / "gguf", "--merged", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["model.F32.gguf", "model.Q8_0.gguf"]
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tokenizer.json").exists()
    want = dict(merged_tensors(model))["model.layers.1.mlp.down_proj.weight"]
    got = gguf_tensors(gguf.GGUFReader(str(tmp_path / "gguf" / "model.F32.gguf")))["blk.1.ffn_down.weight"][2]
    assert rel(got, want) < 2e-3  # the base loaded in fp16 (--dtype)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "adapter_model.safetensors is damaged (Error while deserializing header: incomplete metadata"),
    ("header", "adapter_model.safetensors is damaged (Error while deserializing header"),
    ("config", "adapter_config.json is damaged (Unterminated string"),
    ("missing", "has adapter_config.json but no adapter_model.safetensors; copy the adapter's weights beside it"),
])
def test_a_damaged_adapter_is_named_before_the_base_loads(adapter, tmp_path, monkeypatch, damage, message):
    path, _ = adapter
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "header":
        weights.write_bytes(b"\xff" * 8 + b"{")
    elif damage == "config":
        config.write_text(config.read_text()[:40])
    else:
        weights.unlink()

    def fail(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(FastLanguageModel, "from_pretrained", staticmethod(fail))
    result = run(path, "--base", "llama-3-8b-tiny", "--gguf", "q8_0", "--output", tmp_path / "gguf")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    if damage != "missing":
        assert "export from an intact copy of the adapter (a checkpoint-N/ of its training run holds one)" in result.output
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_sigterm_while_writing_leaves_the_finished_files_and_nothing_half_written(adapter, tmp_path, monkeypatch,
                                                                                  stop):
    """The second GGUF is cut off mid-write: exit 143 (130 on Ctrl-C), the merged checkpoint and the first GGUF
    are whole, no temporary file is left, and SIGTERM's own handler is back."""
    import os
    import signal

    path, _ = adapter
    write_tensors, calls = gguf.GGUFWriter.write_tensors_to_file, []

    def cut_off_in_the_second_file(writer, **kw):
        calls.append(1)
        if len(calls) == 2:
            writer.fout[0].write(b"\0" * 1000)
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return write_tensors(writer, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", cut_off_in_the_second_file)
    before = signal.getsignal(signal.SIGTERM)
    result = run(path, "--base", "llama-3-8b-tiny", "--seed", 5, "--gguf", "f32,q8_0", "--output", tmp_path / "gguf",
                 "--merged", tmp_path / "merged")
    assert signal.getsignal(signal.SIGTERM) is before
    assert result.exit_code == {"sigterm": 143, "ctrl-c": 130}[stop], result.output
    said = "terminated (SIGTERM)" if stop == "sigterm" else "interrupted"
    assert f"{said} while exporting; no half-written file is left (the files named above are complete)" \
        in result.output and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path / "gguf")) == ["model.F32.gguf"]
    assert len(gguf_tensors(gguf.GGUFReader(str(tmp_path / "gguf" / "model.F32.gguf")))) > 0
    assert (tmp_path / "merged" / "config.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_a_disk_that_fills_while_the_merged_checkpoint_is_written_is_one_line(adapter, tmp_path, monkeypatch):
    import errno

    from fastbench.export import merge

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge, "save_pretrained_merged", full)
    path, _ = adapter
    result = run(path, "--base", "llama-3-8b-tiny", "--seed", 5, "--merged", tmp_path / "merged")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no space left on device while exporting" in result.output and "run it again" in result.output
