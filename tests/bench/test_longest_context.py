"""tools/longest_context.py: the search (a pure function of a try_length callable), the card's fraction, the
results file kept through stopped processes, argument errors, and one search on the CPU with out-of-memory
simulated above a length."""
import json
import os
import random

import pytest
from click.testing import CliRunner

from tool_scripts import load_tool

GIB = 2**30


@pytest.fixture(scope="module")
def lc():
    return load_tool("longest_context")


def threshold(longest, tried=None, error_at=None):
    """A try_length under which every length up to ``longest`` trains; records what it was asked."""
    tried = [] if tried is None else tried

    def try_length(seq):
        tried.append(seq)
        if seq == error_at:
            return "error"
        return "ok" if seq <= longest else "oom"
    return try_length


@pytest.mark.parametrize("longest", [4096, 5000, 49152, 50000, 65535, 65536, 99999])
def test_doubling_then_bisection_finds_the_threshold_at_the_granularity(lc, longest):
    tried = []
    found = lc.search(threshold(longest, tried), start=4096, granularity=1024, ceiling=1 << 20)
    assert found == {"longest_ok": longest // 1024 * 1024, "first_failure": longest // 1024 * 1024 + 1024,
                     "stopped": "granularity"}
    doubling = [4096 << i for i in range(len(tried)) if 4096 << i <= 2 * longest][:len(tried)]
    first_oom = next(i for i, s in enumerate(tried) if s > longest)
    assert tried[:first_oom + 1] == doubling[:first_oom + 1]  # doubled up to the first failure
    assert len(set(tried)) == len(tried) and all(s % 1024 == 0 for s in tried)


def test_any_granularity_and_start(lc):
    rng = random.Random(0)
    for _ in range(200):
        g, start = rng.choice([1, 7, 64, 1000, 2048]), rng.randrange(1, 5000)
        ceiling = rng.randrange(start, 300_000)
        longest = rng.randrange(0, ceiling + 2000)
        tried = []
        found = lc.search(threshold(longest, tried), start, g, ceiling)
        assert max(tried) <= ceiling and len(set(tried)) == len(tried)
        if longest >= ceiling:
            assert found == {"longest_ok": ceiling, "first_failure": None, "stopped": "ceiling"}
            continue
        ok, failed = found["longest_ok"] or 0, found["first_failure"]
        assert ok <= longest < failed  # the answer is right ...
        assert (ok // g + 1) * g >= failed  # ... to the granularity: no multiple of g left between
        assert found["stopped"] == "granularity"


def test_the_ceiling_is_tried_once_and_never_passed(lc):
    tried = []
    assert lc.search(threshold(10**9, tried), 4096, 1024, 10000) == {"longest_ok": 10000, "first_failure": None,
                                                                     "stopped": "ceiling"}
    assert tried == [4096, 8192, 10000]
    tried = []
    found = lc.search(threshold(9000, tried), 4096, 1024, 10000)
    assert tried[:3] == [4096, 8192, 10000] and max(tried) == 10000
    assert (found["longest_ok"], found["first_failure"]) == (8192, 9216)


def test_out_of_memory_at_the_start_searches_below_it(lc):
    tried = []
    found = lc.search(threshold(3000, tried), 8192, 1024, 1 << 20)
    assert tried[0] == 8192 and max(tried[1:]) < 8192
    assert found == {"longest_ok": 2048, "first_failure": 3072, "stopped": "granularity"}
    nothing = lc.search(threshold(100), 8192, 1024, 1 << 20)
    assert nothing == {"longest_ok": None, "first_failure": 1024, "stopped": "granularity"}


def test_an_error_ends_the_search_with_what_it_had(lc):
    tried = []
    found = lc.search(threshold(50000, tried, error_at=32768), 4096, 1024, 1 << 20)
    assert tried == [4096, 8192, 16384, 32768]
    assert found == {"longest_ok": 16384, "first_failure": None, "stopped": "error"}
    tried = []
    found = lc.search(threshold(50000, tried, error_at=49152), 4096, 1024, 1 << 20)
    assert tried[-1] == 49152 and found["stopped"] == "error" and found["first_failure"] is not None


def test_bad_bounds_are_refused(lc):
    for start, g, ceiling in ((0, 1024, 8192), (9000, 1024, 8192), (2048, 0, 8192)):
        with pytest.raises(ValueError):
            lc.search(threshold(1), start, g, ceiling)


def test_bounds_of_the_lengths_a_stopped_search_tried(lc):
    trials = [{"seq": 4096, "result": "ok"}, {"seq": 8192, "result": "ok"}, {"seq": 16384, "result": "oom"},
              {"seq": 12288, "result": "oom"}, {"seq": 10240, "result": "error"}]
    assert lc.bounds(trials) == (8192, 12288)
    assert lc.bounds([]) == (None, None)
    assert lc.bounds([{"seq": 2048, "result": "oom"}]) == (None, 2048)


def test_the_fraction_leaves_the_card_less_the_context(lc):
    total = int(139.8 * GIB)
    limit = lc.card_fraction(16, int(0.6 * GIB), total)
    assert limit["available_gib"] == pytest.approx(15.4)
    assert limit["fraction"] == pytest.approx(15.4 * GIB / total)
    assert limit["context_source"] == "nvml" and limit["device_total_gib"] == pytest.approx(139.8)
    assumed = lc.card_fraction(24, None, total)
    assert assumed["context_source"] == "assumed" and assumed["context_gib"] == lc.ASSUMED_CONTEXT_GIB
    assert assumed["fraction"] * total == pytest.approx((24 - lc.ASSUMED_CONTEXT_GIB) * GIB)
    with pytest.raises(ValueError, match="larger than this GPU"):
        lc.card_fraction(160, int(0.5 * GIB), total)
    with pytest.raises(ValueError, match="fills"):
        lc.card_fraction(0.4, int(0.5 * GIB), total)


def record(lc, arm, card, longest):
    r = lc.new_record(arm, card)
    r.update(status="ok", longest_ok=longest, first_failure=longest + 1024, stopped="granularity",
             trials=[{"seq": longest, "result": "ok", "error": None, "step_s": [2.0, 1.5], "peak_allocated_gib": 9.0,
                      "peak_reserved_gib": 10.0, "nvml_process_gib": 11.0}])
    return r


def test_the_results_file_is_written_after_each_process_and_kept_when_interrupted(lc, tmp_path, monkeypatch):
    path = str(tmp_path / "out" / "r.json")
    specs = [{"arm": a, "card_gib": c} for a in ("x", "y") for c in (16, 24)]
    seen = []

    def fake(spec, stem, env, timeout):
        with open(path) as f:
            seen.append(len(json.load(f)["records"]))  # what a kill now would leave
        if len(seen) == 3:
            partial = lc.new_record(spec["arm"], spec["card_gib"])
            partial.update(status="interrupted", longest_ok=8192, trials=[{"seq": 8192, "result": "ok"}])
            raise KeyboardInterrupt(partial)
        return record(lc, spec["arm"], spec["card_gib"], 8192)

    monkeypatch.setattr(lc, "run_process", fake)
    results = {"status": "partial", "records": []}
    assert lc.run_all(results, specs, path, {}, str(tmp_path), None, echo=lambda s: None) is False
    assert seen == [0, 1, 2]
    with open(path) as f:
        saved = json.load(f)
    assert saved["status"] == "interrupted"
    assert [(r["arm"], r["card_gib"], r["status"]) for r in saved["records"]] == [
        ("x", 16, "ok"), ("x", 24, "ok"), ("y", 16, "interrupted")]
    assert not [n for n in os.listdir(tmp_path / "out") if n != "r.json"]  # no temporary file left


def test_a_process_that_dies_or_hangs_keeps_what_it_wrote(lc, tmp_path, monkeypatch):
    out = str(tmp_path / "p.out.json")
    partial = lc.new_record("fused", 16)
    partial["trials"] = [{"seq": 4096, "result": "ok"}, {"seq": 8192, "result": "ok"}, {"seq": 16384, "result": "oom"}]
    with open(out, "w") as f:
        json.dump(partial, f)
    stopped = lc.stopped_record({"arm": "fused", "card_gib": 16}, out, "timeout", "stopped after 5 s")
    assert (stopped["status"], stopped["longest_ok"], stopped["first_failure"]) == ("timeout", 8192, 16384)
    assert lc.stopped_record({"arm": "q", "card_gib": 24}, str(tmp_path / "none.json"), "crashed", "x")["trials"] == []

    monkeypatch.setenv("FASTBENCH_SIMULATE_KILL", "peft")  # the worker's fault switches, before anything loads
    monkeypatch.setenv("FASTBENCH_SIMULATE_HANG", "qlora")
    path = str(tmp_path / "r.json")
    results = {"status": "partial", "records": []}
    specs = [{"arm": "peft", "card_gib": 16}, {"arm": "qlora", "card_gib": 16}]
    assert lc.run_all(results, specs, path, dict(os.environ), str(tmp_path), 4, echo=lambda s: None)
    with open(path) as f:
        saved = json.load(f)
    assert [r["status"] for r in saved["records"]] == ["crashed", "timeout"]
    assert "SIGKILL" in saved["records"][0]["error"] or "-9" in saved["records"][0]["error"]


@pytest.mark.parametrize("argv, message", [
    (["--arms", "nope"], "unknown arm 'nope'"),
    (["--arms", "fused:ckpt=sometimes"], "ckpt='sometimes' is not valid"),
    (["--arms", "fused:nproc=2"], "drop nproc"),
    (["--card-gib", "0"], "positive"),
    (["--card-gib", "16,-1"], "positive"),
    (["--card-gib", "big"], "sizes in GiB"),
    (["--start", "16384", "--model", "llama-3-8b-tiny"], "above the ceiling 8192"),
    (["--granularity", "0"], "--granularity must be positive"),
    (["--model", "no-such-model"], "unknown model preset"),
])
def test_bad_arguments_exit_2_with_one_line(lc, argv, message):
    result = CliRunner().invoke(lc.main, ["--arms", "peft", *argv])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and message in error[0]
    assert "Traceback" not in result.output


def test_the_table_marks_the_ceiling_and_unfinished_searches(lc):
    capped, timed_out, none = record(lc, "a", 16, 8192), record(lc, "b", 24, 4096), lc.new_record("c", 16)
    timed_out["status"] = "timeout"
    none.update(status="oom", error="OutOfMemoryError: while loading")
    lines = lc.table([capped, timed_out, none], ceiling=8192)
    assert lines[0].split() [:3] == ["arm", "card", "GiB"]
    assert lines[1].split() == ["a", "16", "8192", "(ceiling)", "10.00", "11.00", "1.50", "ok"]
    assert lines[2].split() == ["b", "24", ">=", "4096", "10.00", "11.00", "1.50", "timeout"]
    assert lines[3].split() == ["c", "16", "none", "-", "-", "-", "oom"]
    assert lc.describe(none).startswith("oom: longest none (tried nothing); OutOfMemoryError")


def test_a_search_in_one_process_with_out_of_memory_simulated(lc, monkeypatch):
    """What a process does but the card's limit (on a CPU there is none): the peft arm built on a tiny preset,
    lengths 64 ok, 128 out of memory (simulated), then 96; the record written after each length."""
    from fastbench.bench.arms import RunConfig

    monkeypatch.setenv(lc.SIMULATE_OOM_ABOVE, "100")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run = RunConfig(model="llama-3-8b-tiny", seq_len=256, batch=1, warmup=0, steps=1, device="cpu")
    spec = {"arm": "peft", "card_gib": 16, "run": run.to_dict(), "start": 64, "granularity": 32, "ceiling": 256,
            "steps": 2}
    written = []
    r = lc.measure(spec, lambda rec: written.append(json.loads(json.dumps(rec))))
    assert [(t["seq"], t["result"]) for t in r["trials"]] == [(64, "ok"), (128, "oom"), (96, "ok")]
    assert (r["status"], r["longest_ok"], r["first_failure"], r["stopped"]) == ("ok", 96, 128, "granularity")
    assert "simulated out of memory" in r["trials"][1]["error"] and r["error"] is None
    assert [len(w["trials"]) for w in written] == [0, 1, 2, 3, 3]  # before the build, after each length, at the end
    assert written[-1] == json.loads(json.dumps(r))
    assert r["load_s"] > 0 and all(len(t["step_s"]) == 2 for t in r["trials"] if t["result"] == "ok")


def test_the_host_running_short_for_offloaded_inputs_ends_a_length_not_the_search(lc, monkeypatch):
    """The offload mode's host buffers finding the host short (PinnedMemoryShort, a MemoryError) fail that
    length as running out of memory does: the search goes on below it."""
    from fastbench.bench.arms import RunConfig
    from fastbench.fused.checkpointing import OffloadConfig
    from fastbench.fused.checkpointing import offload as offload_module
    from fastbench.presets import resolve_model

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run = RunConfig(model="llama-3-8b-tiny", seq_len=256, batch=1, warmup=0, steps=1, device="cpu")
    hidden = resolve_model(run.model).preset.config["hidden_size"]
    # room for a layer input of 96 tokens (rounded up by at most 1/8), not of 128
    room = 112 * hidden * run.torch_dtype.itemsize
    monkeypatch.setattr(offload_module, "available_host_bytes", lambda: OffloadConfig().host_reserve_bytes + room)
    spec = {"arm": "fused:ckpt=offload:save_every=0", "card_gib": 16, "run": run.to_dict(), "start": 64,
            "granularity": 32, "ceiling": 256, "steps": 1}
    r = lc.measure(spec, lambda rec: None)
    assert [(t["seq"], t["result"]) for t in r["trials"]] == [(64, "ok"), (128, "oom"), (96, "ok")], r
    assert r["trials"][1]["error"].startswith("PinnedMemoryShort: offloaded checkpointing needs")
    assert (r["status"], r["longest_ok"]) == ("ok", 96)


def test_an_arm_that_fails_to_build_is_an_error_record(lc, monkeypatch):
    from fastbench.bench.arms import RunConfig

    run = RunConfig(model="llama-3-8b-tiny", seq_len=256, batch=1, device="cpu", targets=("no_such_module",))
    spec = {"arm": "peft", "card_gib": 16, "run": run.to_dict(), "start": 64, "granularity": 32, "ceiling": 256,
            "steps": 1}
    r = lc.measure(spec, lambda rec: None)
    assert r["status"] == "error" and r["trials"] == [] and "no_such_module" in r["error"]


@pytest.mark.gpu
def test_the_card_limit_holds_on_a_gpu(lc, tmp_path):
    """A tiny preset within a 2 GiB card: PEFT runs out of memory at some length, the fused arm trains at least
    as long a sequence (up to the ceiling), and the longest that trained reserved no more than the card leaves
    after the context."""
    path = str(tmp_path / "r.json")
    result = CliRunner().invoke(lc.main, ["--arms", "peft,fused", "--card-gib", "2", "--model", "llama-3-8b-tiny",
                                          "--start", "8192", "--granularity", "8192", "--max-seq", "262144",
                                          "--out", path])
    assert result.exit_code == 0, result.output
    with open(path) as f:
        saved = json.load(f)
    records = {r["arm"]: r for r in saved["records"]}
    for r in records.values():
        assert r["status"] == "ok" and r["stopped"] in ("granularity", "ceiling"), r
        assert 0 < r["fraction"] < 1 and r["context_gib"] > 0
        best = next(t for t in r["trials"] if t["seq"] == r["longest_ok"])
        assert best["peak_reserved_gib"] <= r["available_gib"] + 1e-6
    assert records["peft"]["stopped"] == "granularity"
    assert any(t["result"] == "oom" for t in records["peft"]["trials"])
    assert records["fused"]["longest_ok"] >= records["peft"]["longest_ok"]
