"""`fastbench compare --nproc N`: each fused arm also runs as a job of N ranks (torch.distributed, gloo on a
CPU), every row records its world size, and the report gives the scaling against one rank."""
import json

import pytest
from click.testing import CliRunner

from fastbench.bench.stats import scaling, single_rank_label
from fastbench.cli import main

TINY = ["--models", "llama-3.2-1b-tiny", "--device", "cpu", "--seq-len", "16", "--batch", "1", "--steps", "2",
        "--warmup", "1"]


@pytest.mark.slow
def test_nproc_2_on_gloo_records_world_sizes_and_reports_the_scaling(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path / "ckpt"))
    out = CliRunner().invoke(main, ["compare", *TINY, "--arms", "fused", "--nproc", "2", "--dist-backend", "gloo",
                                    "--results-dir", str(tmp_path / "r"), "--reports-dir", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    results = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert results["compare"]["arms"] == ["fused", "fused:nproc=2"] and results["compare"]["nproc"] == 2
    assert {r["arm"]: (r["status"], r["world_size"]) for r in results["runs"]} == {
        "fused": ("ok", 1), "fused:nproc=2": ("ok", 2)}
    assert {r["arm"]: r["world_size"] for r in results["summary"]["rows"]} == {"fused": 1, "fused:nproc=2": 2}
    one, two = (next(r for r in results["runs"] if r["arm"] == a) for a in ("fused", "fused:nproc=2"))
    assert two["tokens_per_step"] == [2 * t for t in one["tokens_per_step"]] == [32, 32]  # the whole job's tokens
    (s,) = results["summary"]["scaling"]
    assert s["world_size"] == 2 and s["factor"] == pytest.approx(s["tokens_per_s"] / s["single_tokens_per_s"])
    report = next((tmp_path / "r").glob("*.md")).read_text()
    assert "## Scaling over GPUs" in report
    assert "- fused:nproc=2 on llama-3.2-1b-tiny: 2 CPU ranks " in report and "vs fused on 1 CPU rank" in report
    assert "scaling" in out.output and "of linear" in out.output


@pytest.mark.parametrize("extra, message", [
    (["--arms", "fused", "--nproc", "2"], "pass --dist-backend gloo"),
    (["--arms", "peft,qlora", "--nproc", "2", "--dist-backend", "gloo"], "--arms names none"),
    (["--arms", "fused:nproc=0"], "nproc=0: a job has 1 rank or more")])
def test_nproc_refusals_exit_2_before_any_process(tmp_path, monkeypatch, extra, message):
    from fastbench.bench import runner

    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("a process was started"))
    out = CliRunner().invoke(main, ["compare", *TINY, *extra, "--results-dir", str(tmp_path / "r"),
                                    "--reports-dir", str(tmp_path / "r")])
    assert out.exit_code == 2, out.output
    assert message in out.output and "Traceback" not in out.output


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    import torch

    from fastbench.bench.cli import _check_ranks

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    compare = {"arms": ["fused", "fused:nproc=2"], "run": {"device": "cuda"}, "dist_backend": "nccl"}
    with pytest.raises(ValueError, match="shows 1 GPU.*use --nproc 1"):
        _check_ranks(compare)


def test_scaling_against_the_same_arm_on_one_rank():
    rows = [{"model": "m", "arm": "fused-4bit:ckpt=offload", "world_size": 1, "ok_runs": 1, "tokens_per_s": 1000.0},
            {"model": "m", "arm": "fused-4bit:ckpt=offload:nproc=4", "world_size": 4, "ok_runs": 1,
             "tokens_per_s": 3800.0},
            {"model": "m", "arm": "fused:nproc=2", "world_size": 2, "ok_runs": 1, "tokens_per_s": 500.0}]
    assert single_rank_label("fused-4bit:ckpt=offload:nproc=4") == "fused-4bit:ckpt=offload"
    four, two = scaling(rows)
    assert four == {"model": "m", "arm": "fused-4bit:ckpt=offload:nproc=4", "single": "fused-4bit:ckpt=offload",
                    "world_size": 4, "tokens_per_s": 3800.0, "tokens_per_s_per_gpu": 950.0,
                    "single_tokens_per_s": 1000.0, "factor": 3.8, "efficiency": 0.95}
    assert "factor" not in two  # its single-rank arm did not run
