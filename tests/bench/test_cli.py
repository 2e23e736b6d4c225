"""Bad input to `fastbench compare`: a clear message, exit code 2, no traceback, no process started."""
import json

import pytest
from click.testing import CliRunner

from fastbench.cli import main


def _compare(*args, tmp_path):
    result = CliRunner().invoke(main, ["compare", *args, "--results-dir", str(tmp_path / "r"),
                                       "--reports-dir", str(tmp_path / "p")])
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists(), "nothing may run on bad input"
    return result


@pytest.mark.parametrize("args, message", [
    (["--models", "llama-9b"], "valid presets: llama-3-8b"),
    (["--arms", "peft,qlorra"], "valid arms: "),
    (["--arms", "peft,fused:ckpt"], "key=value"),
    (["--models", "./no/such/dir"], "is not a model"),
    (["--seq-len", "100000", "--models", "llama-3-8b-tiny"], "beyond llama-3-8b-tiny's limit"),
    (["--seq-len", "0"], "seq-len must be positive"),
    (["--batch", "-2"], "batch must be positive"),
    (["--steps", "0"], "steps must be positive"),
    (["--repeats", "0"], "repeats must be positive"),
    (["--warmup", "-1"], "warmup must be zero or more"),
    (["--arms", "qlora", "--baseline-arm", "peft"], "not among --arms"),
    (["--max-regression", "lots"], "write e.g. 5%"),
    (["--arm-models", "qlora"], "write ARM@MODEL"),
    (["--arm-models", "lora@llama-3.2-1b-tiny"], "'lora' is not among --arms"),
    (["--arm-models", "qlora@mistral-7b"], "mistral-7b not among --models"),
    (["--arms", "peft,fused:ckpt=banana"],
     "arm 'fused': ckpt='banana' is not valid; write ckpt=true|false|offload|auto|<GiB>"),
    (["--arms", "peft,fused:ckp=40"],
     "arm 'fused' has no option 'ckp'; valid: ckpt=true|false|offload|auto|<GiB>, autotune=on|off, "
     "save_every=<whole number>"),
    (["--arms", "fused-4bit:ckpt=offload:save_every=x"],
     "save_every='x' is not valid; write save_every=<whole number>"),
    (["--arms", "fused:ckpt=offload:streams=2"], "has no option 'streams'; valid: ckpt=true|false|offload|auto|<GiB>, "
     "autotune=on|off, save_every=<whole number>, embedding=0|1"),
    (["--arms", "fused:ckpt=offload:embedding=yes"], "write embedding=0|1"),
    (["--arms", "fused:autotune=maybe"], "write autotune=on|off"),
    (["--arms", "fused:ckpt=0"], "ckpt='0' is not valid"),
    (["--arms", "fused:ckpt=40:save_every=3"], "option save_every applies to ckpt=offload only"),
    (["--arms", "fused:ckpt=offload:host_limit_gib=0"], "host_limit_gib='0' is not valid; write host_limit_gib=<GiB>"),
    (["--arms", "peft:ckpt=true"], "arm 'peft' has no option 'ckpt'; it takes none"),
    (["--arms", "peft,qlora:ckpt=true"], "arm 'qlora' has no option 'ckpt'"),
    (["--device", "cuda:7"] , None),
])
def test_bad_options(tmp_path, args, message):
    import torch

    if args[:1] == ["--device"]:
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
        message = "no CUDA GPU"
    result = _compare(*args, tmp_path=tmp_path)
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and message in error[0], result.output  # one line says it all


def test_missing_package_names_it(tmp_path, monkeypatch):
    from fastbench.bench import arms

    monkeypatch.setitem(arms.table(), "peer", arms.ArmSpec(
        "peer", "test", ("fastbench_no_such_module",), "pip install peer-kernels", lambda cfg: None))
    result = _compare("--arms", "peft,peer", tmp_path=tmp_path)
    assert result.exit_code == 2
    assert "fastbench_no_such_module" in result.output and "pip install peer-kernels" in result.output


@pytest.mark.parametrize("option", ["--from", "--against", "--resume"])
@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), ("{oops", "not JSON"), ('{"schema": "other/1"}', "not a fastbench results file"),
    ('{"schema": "fastbench.compare/1", "id": "../../escaped", "compare": {}, "environment": {}, "runs": []}',
     "its id '../../escaped' is no plain file name")])
def test_unreadable_or_foreign_results_file(tmp_path, option, content, message):
    """Refused in one line, exit 2; an id that would put the files written from it elsewhere among them."""
    path = tmp_path / "old.json"
    if content is not None:
        path.write_text(content)
    result = _compare(option, str(path), tmp_path=tmp_path)
    assert result.exit_code == 2 and message in result.output
    assert not list(tmp_path.parent.glob("escaped*"))


def test_from_refuses_extra_options(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema": "fastbench.compare/1"}))
    result = _compare("--from", str(path), "--steps", "3", tmp_path=tmp_path)
    assert result.exit_code == 2 and "drop --steps" in result.output


def test_help_lists_the_public_options():
    out = CliRunner().invoke(main, ["compare", "--help"]).output
    for option in ("--models", "--arms", "--seq-len", "--batch", "--steps", "--warmup", "--repeats",
                   "--baseline-arm", "--from", "--against", "--max-regression", "--results-dir", "--reports-dir"):
        assert option in out


def test_resume_runs_only_what_is_missing(tmp_path, make_record, make_results, monkeypatch):
    from fastbench.bench import runner

    recs = [make_record("peft", model="llama-3-8b-tiny", repeat=r) for r in range(2)]
    recs.append(make_record("peft#2", model="llama-3-8b-tiny", repeat=0))
    res = make_results(recs, ["peft", "peft#2"], models=["llama-3-8b-tiny"], repeats=2)
    res["compare"]["run"]["seq_len"] = 64
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(res))
    ran = []

    def fake_run_one(label, model, repeat, run_config, workdir, env, timeout, **job):
        ran.append((label, model, repeat))
        return make_record(label, model=model, repeat=repeat)

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    result = CliRunner().invoke(main, ["compare", "--resume", str(path), "--results-dir", str(tmp_path / "r"),
                                       "--reports-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert ran == [("peft#2", "llama-3-8b-tiny", 1)]
    done = json.loads((tmp_path / "r" / (res["id"] + ".json")).read_text())
    assert done["status"] == "complete" and len(done["runs"]) == 4
    assert done["summary"]["noise_floor"][0]["twin"] == "peft#2"
    assert "A/A noise floor" in (tmp_path / "p" / (res["id"] + ".md")).read_text()


def test_resume_keeps_the_machine_the_runs_measured(tmp_path, make_record, make_results, monkeypatch):
    """A complete file resumed writes its report again, with the environment its runs recorded (not this
    machine's); a file measured on another kind of GPU is refused, naming both, and nothing runs."""
    from fastbench.bench import runner

    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("nothing was missing"))
    res = make_results([make_record("peft", model="llama-3-8b-tiny")], ["peft"], models=["llama-3-8b-tiny"])
    res["compare"]["run"]["seq_len"] = 64
    res["environment"]["versions"] = {"torch": "recorded"}
    path = tmp_path / "done.json"
    path.write_text(json.dumps(res))
    dirs = ["--results-dir", str(tmp_path / "r"), "--reports-dir", str(tmp_path / "p")]
    result = CliRunner().invoke(main, ["compare", "--resume", str(path), *dirs])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / (res["id"] + ".json")).read_text())["environment"] == res["environment"]
    assert "torch recorded" in (tmp_path / "p" / (res["id"] + ".md")).read_text()

    res["environment"]["gpu"] = "NVIDIA H200"
    path.write_text(json.dumps(res))
    result = CliRunner().invoke(main, ["compare", "--resume", str(path), *dirs])
    assert result.exit_code == 2
    assert "ran on NVIDIA H200 and this machine has no GPU" in result.output


def test_arm_models_restricts_an_arm_to_some_models(tmp_path, make_record, monkeypatch):
    """Peers on one model only: the other models run the rest; the report has no rows for the skipped
    pairs, and the loss check falls back to an arm of the same kind where the baseline did not run."""
    from fastbench.bench import runner

    ran = []

    def fake_run_one(label, model, repeat, run_config, workdir, env, timeout, **job):
        ran.append((label, model))
        return make_record(label, model=model, repeat=repeat)

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    result = CliRunner().invoke(main, ["compare", "--models", "llama-3-8b-tiny,qwen3-8b-tiny", "--arms",
                                       "qlora,fused-4bit,peft", "--baseline-arm", "qlora", "--arm-models",
                                       "qlora@llama-3-8b-tiny", "--results-dir", str(tmp_path / "r"),
                                       "--reports-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert ran == [("qlora", "llama-3-8b-tiny"), ("fused-4bit", "llama-3-8b-tiny"), ("peft", "llama-3-8b-tiny"),
                   ("fused-4bit", "qwen3-8b-tiny"), ("peft", "qwen3-8b-tiny")]
    done = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert done["compare"]["arm_models"] == {"qlora": ["llama-3-8b-tiny"]}
    rows = {(r["model"], r["arm"]) for r in done["summary"]["rows"]}
    assert ("qwen3-8b-tiny", "qlora") not in rows and ("qwen3-8b-tiny", "fused-4bit") in rows
    report = next((tmp_path / "p").glob("*.md")).read_text()
    assert "qlora on llama-3-8b-tiny only" in report


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_interrupted_compare_keeps_the_measured_processes(tmp_path, make_record, monkeypatch, stop):
    """Ctrl-C, or the SIGTERM a job scheduler sends, during the second process: the first one's record is
    kept with status "interrupted" and a report; exit 130 or 143; the SIGTERM handler is restored after."""
    import os
    import signal

    from fastbench.bench import runner

    def fake_run_one(label, model, repeat, run_config, workdir, env, timeout, **job):
        if repeat == 1:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return make_record(label, model=model, repeat=repeat)

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(main, ["compare", "--models", "llama-3-8b-tiny", "--arms", "peft", "--repeats", "2",
                                       "--results-dir", str(tmp_path / "r"), "--reports-dir", str(tmp_path / "p")])
    assert signal.getsignal(signal.SIGTERM) is before
    assert result.exit_code == {"ctrl-c": 130, "sigterm": 143}[stop], result.output
    done = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert done["status"] == "interrupted" and [r["repeat"] for r in done["runs"]] == [0]
    assert next((tmp_path / "p").glob("*.md")).exists()


def test_run_options_reach_every_process(tmp_path, make_record, monkeypatch):
    """Each option named after a RunConfig field sets it; the rest keep the CPU defaults."""
    from fastbench.bench import runner

    configs = []

    def fake_run_one(label, model, repeat, run_config, workdir, env, timeout, **job):
        configs.append(run_config)
        return make_record(label, model=model, repeat=repeat)

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    result = CliRunner().invoke(main, ["compare", "--models", "llama-3-8b-tiny", "--arms", "peft", "--seq-len", "48",
                                       "--lora-r", "4", "--targets", "q_proj, v_proj", "--no-gradient-checkpointing",
                                       "--lr", "1e-3", "--pad-fraction", "0.2", "--dtype", "float32",
                                       "--results-dir", str(tmp_path / "r"), "--reports-dir", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    (run,) = configs
    assert run["seq_len"] == 48 and run["lora_r"] == 4 and run["targets"] == ["q_proj", "v_proj"]
    assert run["gradient_checkpointing"] is False and run["lr"] == 1e-3 and run["pad_fraction"] == 0.2
    assert run["dtype"] == "float32" and run["device"] == "cpu"
    assert run["steps"] == 4 and run["warmup"] == 1 and run["batch"] == 2 and run["lora_alpha"] == 16
