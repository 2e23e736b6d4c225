"""`fastbench compare` end to end on a CPU: tiny preset, peft and qlora, real worker processes (one run
with every feature that needs a real worker: the profiled step, the busy counters, the loss check, an OOM)."""
import json

import pytest
from click.testing import CliRunner

from fastbench.cli import main

pytestmark = pytest.mark.slow
TINY = ["--models", "llama-3.2-1b-tiny", "--arms", "peft,qlora", "--seq-len", "32", "--batch", "2",
        "--steps", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu", "--pad-fraction", "0.1", "--profile"]


def test_compare_then_rerun_with_oom_against_doctored_baseline(tmp_path, monkeypatch):
    results, reports = tmp_path / "results", tmp_path / "reports"
    dirs = ["--results-dir", str(results), "--reports-dir", str(reports)]
    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path / "ckpt"))
    first = CliRunner().invoke(main, ["compare", *TINY, *dirs])
    assert first.exit_code == 0, first.output
    assert "prove the pipeline" in first.output
    (path,) = results.glob("*.json")
    run = json.loads(path.read_text())
    assert run["status"] == "complete" and [r["status"] for r in run["runs"]] == ["ok", "ok"]
    assert path.name.startswith(run["id"]) and "-cpu-" in run["id"]
    assert run["compare"]["run"]["profile"] is True
    for r in run["runs"]:
        assert len(r["step_s"]) == 2 and len(r["losses"]) == 3 and r["load_s"] > 0  # the profiled step in neither
        p = r["profile"]
        assert p["activity"] == "cpu" and p["ms"]["matmul"] > 0 and p["ms"]["attention"] > 0
        assert p["total_ms"] == pytest.approx(sum(p["ms"].values()))
        assert 0 < sum(r["tokens_per_step"]) < 2 * 2 * 32  # padding is not counted
        assert r["host_own_cores"] > 0 and r["host_other_cores"] >= 0 and 0 <= r["host_steal_pct"] <= 100
        gc_timed = r["gc_timed"]  # the collections during the timed steps (a full one is done before them)
        assert len(gc_timed["collections"]) == 3 and gc_timed["ms"] >= gc_timed["max_ms"] >= 0
        assert r["offload_queue_waits"] is None  # not a fused arm: the worker never imported the offloader
    (check,) = run["summary"]["loss_checks"]
    assert check["arm"] == "qlora" and not check["mismatch"]  # same weights, same data, NF4 vs bf16
    report = (reports / (run["id"] + ".md")).read_text()
    assert "| llama-3.2-1b-tiny | qlora |" in report and "ok: qlora vs peft" in report
    assert "## How busy the machine was during the timed steps" in report
    assert "| llama-3.2-1b-tiny | peft | 1 |" in report
    assert "## Where the time goes" in report and "### llama-3.2-1b-tiny" in report and "| matmul |" in report
    assert (reports / (run["id"] + "-tokens_per_s.png")).stat().st_size > 0
    assert (results / (run["id"] + ".csv")).exists()

    doctored = tmp_path / "doctored.json"
    for r in run["runs"]:
        if r["arm"] == "peft":  # the old peft ran at 10^12 tokens/s: no step of this machine beats it, however fast
            r["step_s"] = [t / 1e12 for t in r["tokens_per_step"]]
    doctored.write_text(json.dumps(run))
    monkeypatch.setenv("FASTBENCH_SIMULATE_OOM", "qlora")
    second = CliRunner().invoke(main, ["compare", "--from", str(path), "--no-profile", "--against", str(doctored),
                                       *dirs])
    assert second.exit_code == 1, second.output
    assert "REGRESSION peft on llama-3.2-1b-tiny: tokens/s" in second.output
    assert "REGRESSION qlora on llama-3.2-1b-tiny: ran before (ok), now oom" in second.output
    new = json.loads(next(p for p in results.glob("*.json") if p != path).read_text())
    run["compare"]["run"]["profile"] = False  # the one thing --from lets change
    assert new["compare"] == run["compare"] and all(r["profile"] is None for r in new["runs"])
    assert {r["arm"]: r["status"] for r in new["runs"]} == {"peft": "ok", "qlora": "oom"}
    assert any("simulated out of memory" in (r["error"] or "") for r in new["runs"])
