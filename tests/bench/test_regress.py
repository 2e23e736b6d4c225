import copy

import pytest

from fastbench.bench import regress
from fastbench.bench.cli import summarize_results


def _run(make_record, make_results, rng, tps=1000.0, mem=10.0, jitter=0.01, qlora_status="ok"):
    recs = []
    for i in range(3):
        recs.append(make_record("peft", repeat=i, tokens_per_s=tps, memory=mem, rng=rng, jitter=jitter))
        recs.append(make_record("qlora", repeat=i, tokens_per_s=500.0, memory=6.0, rng=rng, jitter=jitter,
                                status=qlora_status))
    res = make_results(recs, ["peft", "qlora"], repeats=3)
    res["summary"] = summarize_results(res)
    return res


def test_identical_baseline_does_not_trip(rng, make_record, make_results):
    old = _run(make_record, make_results, rng)
    assert regress.find_regressions(copy.deepcopy(old), old, 0.05) == []


def test_rerun_within_noise_does_not_trip(rng, make_record, make_results):
    old, new = (_run(make_record, make_results, rng) for _ in range(2))
    assert regress.find_regressions(new, old, 0.05) == []


def test_doctored_baseline_trips_naming_arm_model_metric(rng, make_record, make_results):
    new = _run(make_record, make_results, rng)
    old = _run(make_record, make_results, rng, tps=1250.0, mem=8.0)  # the old run was faster and leaner
    found = regress.find_regressions(new, old, 0.05)
    assert {(r["arm"], r["model"], r["metric"]) for r in found} == {
        ("peft", "m", "tokens/s"), ("peft", "m", "peak reserved GiB")}
    text = " ".join(regress.describe(r) for r in found)
    assert "REGRESSION peft on m: tokens/s" in text and "REGRESSION peft on m: peak reserved GiB" in text
    speed = next(r for r in found if r["metric"] == "tokens/s")
    assert speed["change"] == pytest.approx(-0.2, abs=0.03) and speed["noise"] < 0.05


def test_change_within_measured_spread_does_not_trip(rng, make_record, make_results):
    old = _run(make_record, make_results, rng)
    new = copy.deepcopy(old)
    for row in new["summary"]["rows"]:
        row["tokens_per_s"] *= 0.93
        row["repeat_spread"] = 0.10  # noisier than the drop
    assert regress.find_regressions(new, old, 0.05) == []
    new["summary"]["rows"][0]["repeat_spread"] = 0.0
    assert [r["arm"] for r in regress.find_regressions(new, old, 0.05)] == ["peft"]


def test_new_oom_is_a_regression(rng, make_record, make_results):
    old = _run(make_record, make_results, rng)
    new = _run(make_record, make_results, rng, qlora_status="oom")
    (r,) = regress.find_regressions(new, old, 0.05)
    assert r["arm"] == "qlora" and r["metric"] == "status" and "oom" in regress.describe(r)


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), ("5", 0.05), ("12.5%", 0.125)])
def test_parse_threshold(text, value):
    assert regress.parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "-5%", "150%"])
def test_parse_threshold_rejects(text):
    with pytest.raises(ValueError):
        regress.parse_threshold(text)


def test_reserved_memory_rise_is_a_regression_though_allocated_stays(rng, make_record, make_results):
    """What decides whether a run fits a card is what the allocator reserved: a rise there counts even where
    the allocated peak did not move."""
    old = _run(make_record, make_results, rng)
    new = copy.deepcopy(old)
    for r in new["runs"]:
        if r["arm"] == "peft":
            r["peak_reserved_gib"] *= 1.3
    new["summary"] = summarize_results(new)
    (r,) = regress.find_regressions(new, old, 0.05)
    assert (r["arm"], r["metric"]) == ("peft", "peak reserved GiB") and r["change"] == pytest.approx(0.3)


def test_config_differences_name_what_changed(rng, make_record, make_results):
    old = _run(make_record, make_results, rng)
    new = copy.deepcopy(old)
    assert regress.config_differences(new, old) == []
    new["compare"]["run"].update(seq_len=1024, targets=["q_proj"], steps=99)  # steps: not a change of what is measured
    new["compare"]["alloc_conf"] = "expandable_segments:True"
    new["environment"]["gpu"] = "NVIDIA H200"
    assert regress.config_differences(new, old) == [
        "seq_len 2048 there, 1024 here",
        "targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj there, q_proj here",
        "allocator unset there, expandable_segments:True here", "GPU none (CPU) there, NVIDIA H200 here"]
