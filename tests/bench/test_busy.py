"""How busy the machine was during the timed steps: arithmetic over /proc/stat samples, NVML's
utilisation samples, and the report's table."""
import sys
import types

import pytest

from fastbench.bench import busy
from fastbench.bench.report import busy_lines


def sample(wall, own, ticks, epoch_us=0):
    s = busy.Sample()
    s.wall, s.own, s.ticks, s.epoch_us = wall, own, ticks, epoch_us
    return s


def test_cores_and_steal_from_two_samples():
    # 2 s of wall clock at 100 ticks/s; ticks: user nice system idle iowait irq softirq steal
    start = sample(10.0, 5.0, [1000, 0, 500, 9000, 100, 0, 0, 0])
    end = sample(12.0, 6.5, [1000 + 700, 0, 500 + 100, 9000 + 1000, 100 + 100, 0, 0, 100])
    got = busy.between(start, end, ticks_per_s=100)
    assert got["host_own_cores"] == pytest.approx(0.75)  # 1.5 CPU s over 2 s
    assert got["host_other_cores"] == pytest.approx(800 / 100 / 2 - 0.75)  # busy = user + system
    assert got["host_steal_pct"] == pytest.approx(100 * 100 / 2000)
    assert got["gpu_busy_pct"] is None  # a CPU run


def test_missing_proc_stat_gives_none():
    assert busy.between(sample(1.0, 1.0, None), busy.Sample()) == dict.fromkeys(busy.FIELDS)


def test_this_machine_is_sampled():
    start = busy.Sample()
    sum(i * i for i in range(200_000))  # some CPU time of our own
    got = busy.between(start, busy.Sample())
    assert got["host_own_cores"] > 0 and got["host_other_cores"] >= 0 and 0 <= got["host_steal_pct"] <= 100


def test_gpu_busy_is_the_mean_of_the_samples_inside_the_interval(monkeypatch):
    def nvml_sample(t, value):
        return types.SimpleNamespace(timeStamp=t, sampleValue=types.SimpleNamespace(uiVal=value))
    asked = []
    fake = types.SimpleNamespace(
        NVML_GPU_UTILIZATION_SAMPLES=1, nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetSamples=lambda h, kind, since: asked.append((h, kind, since)) or (
            0, [nvml_sample(t, v) for t, v in ((90, 10), (110, 100), (150, 80), (210, 0))]))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert busy.gpu_busy_pct(3, 100, 200) == 90.0 and asked == [("gpu3", 1, 100)]
    assert busy.gpu_busy_pct(3, 300, 400) is None  # no sample inside
    got = busy.between(sample(1.0, 0.0, None, 100), sample(2.0, 0.5, None, 200), gpu_index=3)
    assert got == {**dict.fromkeys(busy.FIELDS), "gpu_busy_pct": 90.0}


def _fake_nvml(counters):
    """A pynvml with cumulative counters read from ``counters`` (a dict the test changes between samples)."""
    def violation(handle, policy):
        value = counters[{0: "power_ns", 1: "thermal_ns"}[policy]]
        if value is None:
            raise RuntimeError("not supported")
        return types.SimpleNamespace(referenceTime=0, violationTime=value)

    return types.SimpleNamespace(
        NVML_PERF_POLICY_POWER=0, NVML_PERF_POLICY_THERMAL=1, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetTotalEnergyConsumption=lambda h: counters["energy_mj"], nvmlDeviceGetViolationStatus=violation)


def test_gpu_energy_power_and_limits_between_two_samples(monkeypatch):
    counters = {"energy_mj": 1_000_000, "power_ns": 5 * 10**9, "thermal_ns": 0}
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(counters))
    start = busy.Sample(gpu_index=0)
    counters.update(energy_mj=1_000_000 + 1_400_000, power_ns=5 * 10**9 + 15 * 10**8)  # 1,400 J; 1.5 s limited
    end = busy.Sample(gpu_index=0)
    start.wall, end.wall = 10.0, 12.0
    got = busy.between(start, end, gpu_index=0)
    assert got["gpu_energy_j"] == pytest.approx(1400.0) and got["gpu_power_w"] == pytest.approx(700.0)
    assert got["gpu_power_capped_pct"] == pytest.approx(75.0) and got["gpu_thermal_capped_pct"] == 0.0


def test_gpu_counters_a_driver_lacks_give_none(monkeypatch):
    counters = {"energy_mj": 5, "power_ns": None, "thermal_ns": None}
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(counters))
    start, end = busy.Sample(gpu_index=0), busy.Sample(gpu_index=0)
    end.wall = start.wall + 1.0
    got = busy.between(start, end, gpu_index=0)
    assert got["gpu_power_capped_pct"] is None and got["gpu_thermal_capped_pct"] is None
    assert got["gpu_energy_j"] == 0.0
    assert busy.Sample().gpu is None  # a CPU run asks NVML nothing
    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace())  # no NVML at all
    assert busy.Sample(gpu_index=0).gpu is None
    assert busy.between(busy.Sample(gpu_index=0), busy.Sample(gpu_index=0), gpu_index=0)["gpu_power_w"] is None


def test_report_shows_power_and_energy_where_recorded(rng, make_record, make_results):
    records = [make_record("unsloth-qlora", rng=rng), make_record("fused-4bit", rng=rng)]
    for r in records:
        r.update(host_own_cores=1.0, host_other_cores=0.0, host_steal_pct=0.0, gpu_busy_pct=95.0)
    records[1].update(gpu_energy_j=2100.0, gpu_power_w=690.4, gpu_power_capped_pct=97.0, gpu_thermal_capped_pct=0.0)
    lines = busy_lines(make_results(records, ["unsloth-qlora", "fused-4bit"]))
    assert "power limit" in lines[3] and lines[5].endswith("J/step | J per 1k tokens |")
    steps, tokens = len(records[1]["step_s"]), sum(records[1]["tokens_per_step"])
    assert lines[-1].rstrip(" |").split(" | ")[-5:] == [
        "690", "97", "0", f"{2100.0 / steps:.1f}", f"{1e3 * 2100.0 / tokens:.1f}"]
    assert lines[-2].rstrip(" |").split(" | ")[-5:] == ["n/a"] * 5
    records[1]["world_size"] = 2  # a job on two GPUs: rank 0's energy stands for each GPU's
    assert busy_lines(make_results(records, ["unsloth-qlora", "fused-4bit"]))[-1].rstrip(" |").split(" | ")[-1] \
        == f"{2e3 * 2100.0 / tokens:.1f}"
    records[1]["gpu_energy_j"] = None  # results from before the counters: no columns
    assert "J/step" not in "".join(busy_lines(make_results(records, ["unsloth-qlora", "fused-4bit"])))


def test_report_lists_each_process(rng, make_record, make_results):
    records = [make_record("peft", rng=rng), make_record("fused", rng=rng), make_record("fused", repeat=1, status="oom")]
    records[0].update(host_own_cores=1.0, host_other_cores=3.25, host_steal_pct=0.5, gpu_busy_pct=97.4)
    records[1].update(host_own_cores=0.9, host_other_cores=3.25, host_steal_pct=0.5)
    results = make_results(records, ["peft", "fused"])
    results["environment"]["cpu_count"] = 16
    lines = busy_lines(results)
    assert "of 16 on this machine" in lines[3]
    assert [l.rstrip(" |").split(" | ")[4:] for l in lines[-2:]] == [["97", "1.00", "3.25", "0.5"],
                                                                     ["n/a", "0.90", "3.25", "0.5"]]


def test_report_shows_the_copy_queue_waits_where_recorded(rng, make_record, make_results):
    records = [make_record("unsloth-qlora", rng=rng), make_record("fused-4bit", rng=rng)]
    for r, waits in zip(records, (None, 2.25)):
        r.update(host_own_cores=1.0, host_other_cores=0.0, host_steal_pct=0.0, gpu_busy_pct=90.0,
                 offload_queue_waits=waits)
    lines = busy_lines(make_results(records, ["unsloth-qlora", "fused-4bit"]))
    assert "copy queue full" in lines[3] and lines[5].endswith("copy queue full, waits/step |")
    assert [l.rstrip(" |").split(" | ")[-1] for l in lines[-2:]] == ["n/a", "2.2"]
    records[1]["offload_queue_waits"] = None  # no fused arm, or results from before the counter: no column
    assert "copy queue" not in "".join(busy_lines(make_results(records, ["unsloth-qlora", "fused-4bit"])))


def test_report_without_busy_figures_has_no_section(rng, make_record, make_results):
    assert busy_lines(make_results([make_record("peft", rng=rng)], ["peft"])) == []


def test_report_header_names_the_switches_the_run_had(tmp_path, rng, make_record, make_results):
    """A run made with a behaviour switch (say the offload mode's saved MLPs off) says so at the top; an older
    result without the record says that instead of claiming defaults."""
    from fastbench.bench import report
    from fastbench.bench.cli import summarize_results

    res = make_results([make_record("peft", rng=rng)], ["peft"])
    res["summary"] = summarize_results(res)
    assert "- switches: not recorded" in open(report.write_report(res, str(tmp_path))).read()
    res["environment"]["switches"] = {"FASTBENCH_AUTOTUNE": "off"}
    assert "- switches: FASTBENCH_AUTOTUNE=off" in open(report.write_report(res, str(tmp_path))).read()


def test_report_says_what_the_intervals_cover(tmp_path, rng, make_record, make_results):
    """One process per arm: the interval is the steps' spread within it, and the report says so; with several
    processes it gives the widest difference between one arm's processes instead."""
    from fastbench.bench import report
    from fastbench.bench.cli import summarize_results

    one = make_results([make_record("peft", rng=rng), make_record("qlora", rng=rng)], ["peft", "qlora"])
    one["summary"] = summarize_results(one)
    text = open(report.write_report(one, str(tmp_path))).read()
    assert "One process for every arm: its interval covers the spread of the steps within that process" in text
    assert "Between processes" not in text

    records = [make_record(arm, repeat=k, tokens_per_s=rate, rng=rng)
               for arm, rates in (("peft", (1000.0, 1100.0)), ("qlora", (900.0, 900.0))) for k, rate in enumerate(rates)]
    two = make_results(records, ["peft", "qlora"], repeats=2)
    two["summary"] = summarize_results(two)
    text = open(report.write_report(two, str(tmp_path))).read()
    assert "One process for" not in text
    spread = next(r["repeat_spread"] for r in two["summary"]["rows"] if r["arm"] == "peft")
    assert f"differed by up to {spread:.1%} (peft on m)" in text and spread > 0.05


def test_report_lists_the_plan_of_each_budget_process(rng, make_record, make_results):
    from fastbench.bench.report import plan_lines

    planned, other = make_record("fused-4bit:ckpt=auto", rng=rng), make_record("unsloth-qlora", rng=rng)
    planned["checkpointing_plan"] = "32 layers kept, 0 recomputed from inputs on the GPU, 0 from inputs offloaded"
    lines = plan_lines(make_results([planned, other], ["unsloth-qlora", "fused-4bit:ckpt=auto"]))
    assert lines[1] == "## Checkpointing plans"
    assert lines[-1] == f"- fused-4bit:ckpt=auto on m, repeat 1: {planned['checkpointing_plan']}"
    assert not any("unsloth" in line for line in lines)
    assert plan_lines(make_results([other], ["unsloth-qlora"])) == []
