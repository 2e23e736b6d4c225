"""What `fastbench compare` prints after each process."""
from fastbench.bench.runner import describe_record, time_left


def test_progress_line_says_how_busy_the_machine_was(rng, make_record):
    r = make_record("peft", rng=rng)
    assert "other processes" not in describe_record(r)
    r["host_other_cores"] = 3.3
    assert describe_record(r).endswith("first step 2.00 s, other processes busy on 3.3 cores)")
    r["gpu_busy_pct"] = 96.6
    assert describe_record(r).endswith("first step 2.00 s, GPU busy 97%, other processes busy on 3.3 cores)")


def test_progress_line_says_when_the_first_step_compiled_kernels(rng, make_record):
    r = make_record("fused", rng=rng)
    r["first_step_compiles"] = 0
    assert "compiles" not in describe_record(r)
    r["first_step_compiles"] = 12
    assert "first step 2.00 s with 12 Triton compiles" in describe_record(r)


def test_report_names_the_first_steps_that_compiled(tmp_path, rng, make_record, make_results):
    from fastbench.bench import report
    from fastbench.bench.cli import summarize_results

    recs = [make_record("fused", rng=rng), make_record("peft", rng=rng)]
    recs[0]["first_step_compiles"] = 12
    res = make_results(recs, ["fused", "peft"])
    res["summary"] = summarize_results(res)
    text = open(report.write_report(res, str(tmp_path))).read()
    assert "fused on " in text and ": 12 kernels, 2.00 s." in text
    recs[0]["first_step_compiles"] = 0
    assert "compiled Triton kernels" not in open(report.write_report(res, str(tmp_path))).read()


def test_worker_counts_tritons_cache_entries(tmp_path, monkeypatch):
    from triton import knobs

    from fastbench.bench.worker import _triton_compiled

    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    assert _triton_compiled() == 0
    (tmp_path / "A1B2").mkdir()
    (tmp_path / "C3D4").mkdir()
    assert _triton_compiled() == 2
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path / "missing"))  # a fresh machine: nothing compiled yet
    assert _triton_compiled() == 0
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path / "afile"))  # unreadable as a cache
    assert _triton_compiled() is None


def test_time_left_extrapolates_the_mean_process():
    assert time_left(90.4, 2, 6) == " [1 min 30 s so far, about 3 min 1 s left]"
    assert time_left(42.0, 3, 3) == " [42 s so far]"
