"""``fastbench train`` on two gloo processes (CPU, fp32, plain PEFT) against one process with twice the --batch:
the same losses, eval loss and adapter; files from rank 0 alone; resume by the same number of processes. The
training worlds are started as torchrun starts them (its variables; rank 0 in this process, which saves a
process start); ``--nproc 2`` itself launches the run that a signal stops (its processes start without
Triton's interpreter, so the fused path steps aside). What is refused is refused before anything is
launched."""
import json
import math
import os
import shutil
import signal
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from _worlds import run_world
from fastbench.train.cli import train_command

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chat_tokenizer import chat_records, ckpt, launched, plain_peft, read_log, save_tiny_checkpoint  # noqa: E402,F401

LR = 1e-3
FAST = ["--max-seq-length", 64, "--grad-accum", 2, "--r", 4, "--checkpointing", "false", "--warmup-steps", 1,
        "--lr", LR]


def invoke(*args):
    return CliRunner().invoke(train_command, [str(a) for a in args])


def _train_rank(rank, args):
    """One process of a training world: the command as torchrun's process runs it (plain PEFT)."""
    if rank:  # rank 0 runs in the test's process, where the plain_peft fixture did this
        import fastbench.fused.causal_lm as causal_lm

        causal_lm.unsupported_reason = lambda model: "a fast CPU test"
    result = invoke(*args)
    assert result.exit_code == 0, f"rank {rank}: {result.output}"
    if rank == 0:
        assert "4 steps of 2 processes x 1 x 2" in result.output or "--resume" in args, result.output
        assert result.output.count("real tokens/s on 2 processes") == 1, result.output


@pytest.fixture
def no_launch(monkeypatch):
    import fastbench.distributed.launch as launch

    def fail(*args, **kwargs):
        raise AssertionError("processes were launched")

    monkeypatch.setattr(launch, "launch", fail)


def assert_same_run(got, expected, rtol=1e-5):
    """Two outputs trained the same: logged losses, eval losses and tokens, and the adapter."""
    def rows(out):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in read_log(out)]

    a, b = rows(got), rows(expected)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss"):
            if key in y:
                assert abs(x[key] - y[key]) <= rtol * abs(y[key]), (key, x, y)
        assert x.get("tokens") == y.get("tokens") and x["step"] == y["step"]
    got_adapter = load_file(got / "adapter_model.safetensors")
    expected_adapter = load_file(expected / "adapter_model.safetensors")
    assert got_adapter.keys() == expected_adapter.keys()
    steps = max(r["step"] for r in b)
    for name, tensor in expected_adapter.items():
        # AdamW moves a weight by about lr a step whatever its gradient's size, so where a gradient is near zero
        # the other order of the sums (two processes' halves against one batch) can flip the step's sign: a few
        # weights may differ by up to 2 lr a step; the rest must agree closely
        diff = (got_adapter[name] - tensor).abs()
        close = diff <= 2e-5 + 1e-4 * tensor.abs()
        assert close.float().mean() >= 0.99, (name, diff.max().item(), (~close).sum().item())
        assert diff.max() <= 2 * LR * steps, (name, diff.max().item())


def test_two_processes_train_what_one_does_with_twice_the_batch(tmp_path, ckpt, plain_peft, seed):
    """... with eval and a checkpoint; rank 0 alone writes; a run resumed by two processes from the checkpoint
    ends as the uninterrupted one; one process or three are refused that checkpoint."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_records(20, seed=seed % 1000)))
    args = ["--data", data, "--steps", 4, "--save-every", 2, "--eval-fraction", 0.25, "--seed", seed % 10_000, *FAST]
    one = invoke(ckpt, "--output", tmp_path / "one", "--batch", 2, *args)
    assert one.exit_code == 0, one.output
    run_world(_train_rank, 2, [ckpt, "--output", tmp_path / "two", "--batch", 1, *args])
    assert_same_run(tmp_path / "two", tmp_path / "one")
    # rank 0's files only: the same as one process writes, nothing left half-written
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    for name in ("checkpoint-2", "checkpoint-4"):
        assert sorted(os.listdir(tmp_path / "two" / name)) == sorted(os.listdir(tmp_path / "one" / name))
        assert json.loads((tmp_path / "two" / name / "trainer_state.json").read_text())["world_size"] == 2
    config = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert config["nproc"] == 2 and config["batch"] == 1

    for n in (1, 3):  # another number of processes: refused before the model loads or processes start
        refused = invoke(ckpt, "--output", tmp_path / "two", "--resume", "--batch", 1, "--nproc", n, *args)
        assert refused.exit_code == 2 and "written by a run of 2 processes and this run has " \
            f"{n}: resume it with --nproc 2" in refused.output, refused.output
    shutil.rmtree(tmp_path / "two" / "checkpoint-4")  # from checkpoint-2: steps 3-4 trained again
    run_world(_train_rank, 2, [ckpt, "--output", tmp_path / "two", "--resume", "--batch", 1, "--nproc", 2, *args])
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_a_signal_stops_every_process_and_keeps_the_adapter(tmp_path, seed):
    """``--nproc 2`` launched; SIGTERM to the launcher (as a scheduler sends it) reaches both processes (a
    Ctrl-C reaches them from the terminal as well); rank 0 saves the adapter and says so once; exit 143."""
    stop = signal.SIGTERM
    out = tmp_path / "run"
    proc = launched("llama-3-8b-tiny", "--data", "random", "--output", out, "--steps", 10_000, "--batch", 1,
                    "--nproc", 2, "--max-seq-length", 8, "--r", 4, "--checkpointing", "false",
                    "--seed", seed % 10_000, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "train_log.jsonl").exists() or len(read_log(out)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(stop)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + stop, output
    done = len(read_log(out))
    assert output.count("terminated (SIGTERM) after step ") == 1 and "Traceback" not in output, output
    assert (out / "adapter_model.safetensors").exists() and done >= 2
    assert "launching 2 processes (gloo, CPU)" in output


def test_more_processes_than_gpus_are_refused(tmp_path, ckpt, no_launch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = invoke(ckpt, "--data", "random", "--steps", 2, "--output", tmp_path / "out", "--nproc", 2)
    assert result.exit_code == 2 and "this machine shows 1 GPU, one per process is needed: use --nproc 1 or less" \
        in result.output, result.output
    assert not (tmp_path / "out").exists()


def _launched(monkeypatch, *args):
    """(result, the command line each launched process would run) of `fastbench train ARGS`, the launch itself
    replaced; the command line None where nothing was launched."""
    import fastbench.distributed.launch as launch

    argv = []
    monkeypatch.setattr(launch, "launch", lambda command, nproc, gpus: argv.append(command) or 0)
    result = invoke(*args)
    return result, (argv[0] if argv else None)


def test_offload_on_several_processes_gives_each_its_share_of_the_host(tmp_path, monkeypatch):
    """--nproc N with --checkpointing offload: each process's command line limits its offloaded activations to
    its even share of the host (available / N, less the process's reserve and its embedding table), so that the
    processes decide alike what fits instead of racing for the same memory; a host short of one layer input a
    layer for each process is refused up front, with the numbers."""
    import fastbench.distributed.host_memory as host_memory
    from fastbench.presets import build_config

    GiB = host_memory.GiB
    table = host_memory.embedding_table_bytes(build_config("llama-3-8b-tiny"), dtype_bytes=4)
    args = ["llama-3-8b-tiny", "--data", "random", "--steps", 2, "--output", tmp_path / "out", "--nproc", 2,
            "--checkpointing", "offload"]
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: 64 * GiB)
    result, argv = _launched(monkeypatch, *args)
    assert result.exit_code == 0, result.output
    share = float(argv[argv.index("--offload-host-gib") + 1])
    assert share == math.floor((32 * GiB - host_memory.PROCESS_RESERVE - table) / GiB * 100) / 100

    result, argv = _launched(monkeypatch, *args, "--offload-host-gib", 3)  # the user's limit is kept
    assert result.exit_code == 0 and float(argv[argv.index("--offload-host-gib") + 1]) == 3

    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: 5 * GiB)
    result, argv = _launched(monkeypatch, *args)
    assert result.exit_code == 2 and argv is None
    assert "--checkpointing offload: each of 2 processes pins at least" in result.output \
        and "one layer input a layer" in result.output and "this host has 5.0 GiB available" in result.output, \
        result.output


def test_nproc_must_match_torchrun(tmp_path, monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    result = invoke("llama-3-8b-tiny", "--data", "random", "--steps", 2, "--output", tmp_path / "out", "--nproc", 3)
    assert result.exit_code == 2 and "torchrun started 2 processes" in result.output, result.output


def test_help_explains_nproc():
    text = " ".join(invoke("--help").output.split())
    assert "--nproc" in text and "torch.distributed.run" in text and "torchrun --nproc_per_node" in text


def test_the_offload_host_limit_reaches_the_offload_settings(tmp_path, monkeypatch):
    """--offload-host-gib becomes the model's OffloadConfig.host_limit_gib (each launched process's too)."""
    from fastbench import FastLanguageModel

    seen = []

    def get_peft_model(model, **kwargs):
        seen.append(kwargs.get("offload"))
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(FastLanguageModel, "get_peft_model", staticmethod(get_peft_model))
    invoke("llama-3-8b-tiny", "--data", "random", "--steps", 2, "--output", tmp_path / "out", "--checkpointing",
           "offload", "--offload-host-gib", 3)
    assert seen == [{"host_limit_gib": 3.0}]
