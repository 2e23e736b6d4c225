"""`fastbench compare` keeps what it measured and compares like with like: --against checks the
configurations first, the output directories are checked before the first process, results are written
atomically after every process, a killed or hung worker is recorded and --resume runs it again, and every
worker gets the same allocator setting. CPU, no models: workers are faked except where a real process is
the point (killed, hung); on the GPU (marked gpu), a worker killed from outside while it holds the GPU, and
SIGTERM to compare while one does."""
import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from child_processes import assert_ends, gpu_child, stopped_when
from fastbench.bench import runner
from fastbench.cli import main

TINY = ["--models", "llama-3-8b-tiny", "--arms", "peft,qlora"]


def compare(tmp_path, *args):
    result = CliRunner().invoke(main, ["compare", *args, "--results-dir", str(tmp_path / "r"),
                                       "--reports-dir", str(tmp_path / "p")])
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def fake_workers(monkeypatch, make_record):
    """Every worker process replaced by a record made here; returns the list of (arm, model, repeat) run."""
    ran = []

    def fake_run_one(label, model, repeat, run_config, workdir, env, timeout, **job):
        ran.append((label, model, repeat))
        return make_record(label, model=model, repeat=repeat)

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    return ran


def old_results(tmp_path, make_record, make_results, **run):
    """A finished results file of peft and qlora on llama-3-8b-tiny, with the CPU defaults and ``run`` changed."""
    res = make_results([make_record(a, model="llama-3-8b-tiny") for a in ("peft", "qlora")], ["peft", "qlora"],
                       models=["llama-3-8b-tiny"])
    res["compare"]["run"].update({"seq_len": 128, "steps": 4, "warmup": 1, **run})
    res["compare"]["alloc_conf"] = "expandable_segments:True"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(res))
    return path


def test_against_another_configuration_names_what_differs(tmp_path, make_record, make_results, fake_workers):
    path = old_results(tmp_path, make_record, make_results, seq_len=64, batch=4)
    result = compare(tmp_path, *TINY, "--against", str(path))
    assert result.exit_code == 2, result.output
    assert "seq_len 64 there, 128 here; batch 4 there, 2 here" in result.output
    assert "--allow-config-change" in result.output
    assert fake_workers == [] and not (tmp_path / "r").exists()

    allowed = compare(tmp_path, *TINY, "--against", str(path), "--allow-config-change")
    assert allowed.exit_code == 0, allowed.output
    assert "configuration change allowed: seq_len 64 there, 128 here" in allowed.output
    report = next((tmp_path / "p").glob("*.md")).read_text()
    assert "- configuration change (allowed): batch 4 there, 2 here" in report
    assert "- compared: peft on llama-3-8b-tiny, qlora on llama-3-8b-tiny" in report


def test_against_the_allocator_setting_is_part_of_the_configuration(tmp_path, make_record, make_results,
                                                                    fake_workers):
    path = old_results(tmp_path, make_record, make_results)
    result = compare(tmp_path, *TINY, "--against", str(path), "--alloc-conf", "none")
    assert result.exit_code == 2 and "allocator expandable_segments:True there, unset here" in result.output


@pytest.mark.parametrize("args", [["--models", "qwen3-8b-tiny", "--arms", "peft,qlora"],
                                  ["--models", "llama-3-8b-tiny", "--arms", "fused,fused-4bit"]])
def test_against_a_run_with_nothing_in_common_is_an_error(tmp_path, make_record, make_results, fake_workers, args):
    path = old_results(tmp_path, make_record, make_results)
    result = compare(tmp_path, *args, "--against", str(path))
    assert result.exit_code == 2, result.output
    assert "has nothing in common with this run" in result.output and "no regression" not in result.output
    assert fake_workers == []


def test_against_the_same_configuration_says_what_it_compared(tmp_path, make_record, make_results, fake_workers):
    path = old_results(tmp_path, make_record, make_results)
    result = compare(tmp_path, "--models", "llama-3-8b-tiny", "--arms", "peft,fused", "--against", str(path))
    assert result.exit_code == 0, result.output
    assert "against " + str(path) + ": 1 arm/model pair(s) compared" in result.output
    report = next((tmp_path / "p").glob("*.md")).read_text()
    assert "- compared: peft on llama-3-8b-tiny\n- no regression" in report


@pytest.mark.parametrize("which", ["--results-dir", "--reports-dir"])
def test_unwritable_output_directory_is_refused_before_anything_runs(tmp_path, fake_workers, which):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    dirs = {"--results-dir": str(tmp_path / "r"), "--reports-dir": str(tmp_path / "p"), which: str(blocker / "sub")}
    result = CliRunner().invoke(main, ["compare", *TINY, *[x for kv in dirs.items() for x in kv]])
    assert result.exit_code == 2, result.output
    assert f"{which} {blocker / 'sub'}: cannot write there" in result.output
    assert fake_workers == [] and "Traceback" not in result.output


@pytest.mark.parametrize("value", ["-1", "0"])
def test_timeout_must_be_positive(tmp_path, fake_workers, value):
    result = compare(tmp_path, *TINY, "--timeout", value)
    assert result.exit_code == 2 and "--timeout" in result.output and fake_workers == []


@pytest.mark.parametrize("value", ["expandable", "a:b,,c:d", ":x"])
def test_bad_allocator_setting_is_refused(tmp_path, fake_workers, value):
    result = compare(tmp_path, *TINY, "--alloc-conf", value)
    assert result.exit_code == 2 and "--alloc-conf" in result.output and "write key:value" in result.output


def test_results_are_written_whole_after_every_process(tmp_path, make_record, monkeypatch):
    """Each process's record is on disk (JSON and CSV, no temporary files left) before the next starts."""
    seen = []

    def fake_run_one(label, model, repeat, run_config, workdir, env, timeout, **job):
        files = list((tmp_path / "r").glob("*")) if (tmp_path / "r").exists() else []
        runs = json.loads(next(f for f in files if f.suffix == ".json").read_text())["runs"] if seen else []
        seen.append(([r["arm"] for r in runs], sorted(f.suffix for f in files)))
        return make_record(label, model=model, repeat=repeat)

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    assert compare(tmp_path, *TINY, "--repeats", "2").exit_code == 0
    assert [arms for arms, _ in seen] == [[], ["peft"], ["peft", "qlora"], ["peft", "qlora", "qlora"]]
    assert all(suffixes == [".csv", ".json"] for _, suffixes in seen[1:])
    assert not [f for f in (tmp_path / "r").iterdir() if f.name.endswith(".tmp")]
    assert not [f for f in (tmp_path / "p").iterdir() if f.name.endswith(".tmp")]


@pytest.mark.parametrize("fault, status, message", [("KILL", "crashed", "worker killed by SIGKILL"),
                                                    ("HANG", "timeout", "no result after 3 s")])
def test_a_killed_or_hung_worker_is_recorded(tmp_path, monkeypatch, fault, status, message):
    """A real worker process dies by SIGKILL (as under the kernel's out-of-memory killer) or hangs: the
    runner records it and returns."""
    monkeypatch.setenv(f"FASTBENCH_SIMULATE_{fault}", "peft")
    env = runner.worker_env(str(tmp_path / "ckpt"), None)
    record = runner.run_one("peft", "llama-3-8b-tiny", 0, {"device": "cpu"}, str(tmp_path), env,
                            timeout=3 if fault == "HANG" else None)
    assert record["status"] == status and record["error"].startswith(message)


def test_resume_runs_again_what_crashed_or_timed_out(tmp_path, make_record, make_results, fake_workers):
    """A run whose workers crashed or hung goes on; --resume replaces exactly those records."""
    recs = [make_record("peft", model="llama-3-8b-tiny"), make_record("qlora", model="llama-3-8b-tiny"),
            make_record("qlora", model="llama-3-8b-tiny", repeat=1), make_record("peft", model="llama-3-8b-tiny",
                                                                                repeat=1)]
    recs[1].update(status="crashed", error="worker killed by SIGKILL; log:\n")
    recs[3].update(status="timeout", error="no result after 60 s; log:\n")
    res = make_results(recs, ["peft", "qlora"], models=["llama-3-8b-tiny"], repeats=2)
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(res))
    result = compare(tmp_path, "--resume", str(path))
    assert result.exit_code == 0, result.output
    assert sorted(fake_workers) == [("peft", "llama-3-8b-tiny", 1), ("qlora", "llama-3-8b-tiny", 0)]
    done = json.loads((tmp_path / "r" / (res["id"] + ".json")).read_text())
    assert done["status"] == "complete" and sorted(r["status"] for r in done["runs"]) == ["ok"] * 4


def test_every_worker_gets_the_runs_allocator_setting(tmp_path, monkeypatch, fake_workers):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")  # the user's own: replaced
    env = runner.worker_env(str(tmp_path), "expandable_segments:True")
    assert env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    env = runner.worker_env(str(tmp_path), None)
    assert "PYTORCH_ALLOC_CONF" not in env and "PYTORCH_CUDA_ALLOC_CONF" not in env

    assert compare(tmp_path, *TINY).exit_code == 0
    done = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert done["compare"]["alloc_conf"] == "expandable_segments:True"
    report = next((tmp_path / "p").glob("*.md")).read_text()
    assert "- allocator: PYTORCH_ALLOC_CONF=expandable_segments:True in every process" in report


@pytest.mark.gpu
def test_a_worker_killed_on_the_gpu_is_recorded_and_resume_finishes_the_run(tmp_path):
    """The first worker (peft) is killed by SIGKILL from outside once it holds the GPU, as the kernel's
    out-of-memory killer does: recorded as crashed, the run goes on (fused trains on the same GPU), exit 1
    naming it; --resume runs only it again and completes the run. The loss check is not what this tests."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    dirs = ["--results-dir", str(tmp_path / "r"), "--reports-dir", str(tmp_path / "p")]
    command = [sys.executable, "-m", "fastbench", "compare"]
    proc = subprocess.Popen([*command, "--models", "llama-3-8b-tiny", "--arms", "peft,fused", "--device", "cuda",
                             "--seq-len", "128", "--batch", "2", "--steps", "3", "--warmup", "1", "--repeats", "1",
                             "--loss-tolerance", "0.5", *dirs], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    output, _ = stopped_when(proc, lambda: gpu_child(proc.pid, "fastbench.bench.worker", "-peft-"),
                             lambda worker: os.kill(worker, signal.SIGKILL))
    assert proc.returncode == 1 and "FAILED: peft on llama-3-8b-tiny (repeat 1) crashed" in output, output
    assert "Traceback" not in output
    (path,) = (tmp_path / "r").glob("*.json")
    runs = {r["arm"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["peft"]["status"] == "crashed" and runs["peft"]["error"].startswith("worker killed by SIGKILL")
    assert runs["fused"]["status"] == "ok" and len(runs["fused"]["step_s"]) == 3
    resumed = subprocess.run([*command, "--resume", str(path), *dirs], env=env, text=True, capture_output=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    done = json.loads(path.read_text())
    assert done["status"] == "complete" and sorted((r["arm"], r["status"]) for r in done["runs"]) == [
        ("fused", "ok"), ("peft", "ok")]


@pytest.mark.gpu
def test_sigterm_to_compare_stops_its_gpu_worker_and_keeps_the_run(tmp_path):
    """SIGTERM to `fastbench compare` (as a scheduler sends it) while its worker holds the GPU: exit 143, the worker
    ended with it, the results file "interrupted" and ready for --resume."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "fastbench", "compare", "--models", "llama-3-8b-tiny", "--arms",
                             "peft", "--device", "cuda", "--seq-len", "128", "--steps", "3", "--warmup", "1",
                             "--repeats", "1", "--results-dir", str(tmp_path / "r"), "--reports-dir",
                             str(tmp_path / "p")], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, worker = stopped_when(proc, lambda: gpu_child(proc.pid, "fastbench.bench.worker"),
                                  lambda _: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 143 and "interrupted: kept the finished processes' measurements" in output, output
    assert "Traceback" not in output
    assert_ends(worker, "the worker")
    (path,) = (tmp_path / "r").glob("*.json")
    assert json.loads(path.read_text())["status"] == "interrupted"
