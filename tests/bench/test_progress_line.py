"""What `fastbench compare` prints after each process."""
from fastbench.bench.runner import describe_record, time_left


def test_progress_line_says_how_busy_the_machine_was(rng, make_record):
    r = make_record("peft", rng=rng)
    assert "other processes" not in describe_record(r)
    r["host_other_cores"] = 3.3
    assert describe_record(r).endswith("first step 2.00 s, other processes busy on 3.3 cores)")
    r["gpu_busy_pct"] = 96.6
    assert describe_record(r).endswith("first step 2.00 s, GPU busy 97%, other processes busy on 3.3 cores)")


def test_time_left_extrapolates_the_mean_process():
    assert time_left(90.4, 2, 6) == " [1 min 30 s so far, about 3 min 1 s left]"
    assert time_left(42.0, 3, 3) == " [42 s so far]"
