"""What the CPUs did during the timed steps: arithmetic over /proc/stat samples, and the report's table."""
import pytest

from fastbench.bench import host_cpu
from fastbench.bench.report import host_lines


def test_cores_and_steal_from_two_samples():
    # 2 s of wall clock at 100 ticks/s; ticks: user nice system idle iowait irq softirq steal
    start = (10.0, 5.0, [1000, 0, 500, 9000, 100, 0, 0, 0])
    end = (12.0, 6.5, [1000 + 700, 0, 500 + 100, 9000 + 1000, 100 + 100, 0, 0, 100])
    got = host_cpu.between(start, end, ticks_per_s=100)
    assert got["host_own_cores"] == pytest.approx(0.75)  # 1.5 CPU s over 2 s
    assert got["host_other_cores"] == pytest.approx(800 / 100 / 2 - 0.75)  # busy = user + system
    assert got["host_steal_pct"] == pytest.approx(100 * 100 / 2000)


def test_missing_samples_give_none():
    assert host_cpu.between(None, host_cpu.sample()) == dict.fromkeys(host_cpu.FIELDS)


def test_this_machine_is_sampled():
    start = host_cpu.sample()
    sum(i * i for i in range(200_000))  # some CPU time of our own
    got = host_cpu.between(start, host_cpu.sample())
    assert got["host_own_cores"] > 0 and got["host_other_cores"] >= 0 and 0 <= got["host_steal_pct"] <= 100


def test_report_lists_each_process(rng, make_record, make_results):
    records = [make_record("peft", rng=rng), make_record("fused", rng=rng), make_record("fused", repeat=1, status="oom")]
    for r, own in zip(records, (1.0, 0.9)):
        r.update(host_own_cores=own, host_other_cores=3.25, host_steal_pct=0.5)
    results = make_results(records, ["peft", "fused"])
    results["environment"]["cpu_count"] = 16
    lines = host_lines(results)
    assert "of 16 on this machine" in lines[3]
    assert [l.split(" | ")[1:6] for l in lines[-2:]] == [["peft", "1", lines[-2].split(" | ")[3], "1.00", "3.25"],
                                                         ["fused", "1", lines[-1].split(" | ")[3], "0.90", "3.25"]]


def test_report_without_host_figures_has_no_section(rng, make_record, make_results):
    assert host_lines(make_results([make_record("peft", rng=rng)], ["peft"])) == []

