import math

import numpy as np
import pytest

from fastbench.bench import stats


def test_summary_medians_and_percentiles(rng, make_record):
    rates = rng.uniform(900, 1100, size=(3, 7))
    records = []
    for i, row in enumerate(rates):
        r = make_record("peft", repeat=i, rng=rng)
        r["step_s"] = list(4096 / row)
        r["tokens_per_step"] = [4096] * len(row)
        records.append(r)
    s = stats.summarize_arm(records)
    flat = rates.ravel()
    assert s["tokens_per_s"] == pytest.approx(np.median(flat), rel=1e-12)
    assert s["tokens_per_s_p10"] == pytest.approx(np.percentile(flat, 10), rel=1e-12)
    assert s["tokens_per_s_p90"] == pytest.approx(np.percentile(flat, 90), rel=1e-12)
    per_repeat = np.median(rates, axis=1)
    assert s["repeat_spread"] == pytest.approx((per_repeat.max() - per_repeat.min()) / np.median(per_repeat))
    assert s["ok_runs"] == 3 and s["status"] == "ok"


def test_bootstrap_ratio_ci_brackets_the_ratio_and_is_seeded(rng, make_record):
    base = [1000 * (1 + 0.02 * rng.standard_normal(20)) for _ in range(3)]
    fast = [1500 * (1 + 0.02 * rng.standard_normal(20)) for _ in range(3)]
    point, lo, hi = stats.bootstrap_ratio(fast, base, samples=500)
    assert lo < point < hi and point == pytest.approx(1.5, rel=0.03) and 1.35 < lo and hi < 1.65
    assert stats.bootstrap_ratio(fast, base, samples=500) == (point, lo, hi)  # same seed, same CI
    p_same, lo_same, hi_same = stats.bootstrap_ratio(base, base, samples=500)
    assert p_same == 1.0 and lo_same <= 1.0 <= hi_same


def test_loss_rel_diff():
    assert stats.loss_rel_diff([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert stats.loss_rel_diff([1.1, 2.0], [1.0, 2.0]) == pytest.approx(0.1)
    assert stats.loss_rel_diff([math.nan, 2.0], [1.0, 2.0]) == math.inf
    assert stats.loss_rel_diff([1.0], [1.0, 2.0]) == math.inf  # stopped early
    assert stats.loss_rel_diff([1.0, 2.0, 3.0, 99.0], [1.0, 2.0, 3.0, 4.0]) == 0.0  # only the first steps


def test_summarize_flags_loss_mismatch_against_same_kind(rng, make_record):
    recs = [make_record("peft", rng=rng), make_record("liger", rng=rng, loss=5.0 * 1.001),
            make_record("qlora", rng=rng, loss=5.05), make_record("fused-4bit", rng=rng, loss=5.05 * 1.05)]
    kinds = {"peft": "bf16", "liger": "bf16", "qlora": "nf4", "fused-4bit": "nf4"}
    s = stats.summarize(recs, list(kinds), ["m"], "peft", kinds)
    checks = {c["arm"]: c for c in s["loss_checks"]}
    assert not checks["liger"]["mismatch"] and checks["liger"]["reference"] == "peft"
    assert not checks["qlora"]["mismatch"] and checks["qlora"]["tolerance"] == stats.LOSS_TOLERANCE["cross"]
    assert checks["fused-4bit"]["reference"] == "qlora" and checks["fused-4bit"]["mismatch"]


def test_summarize_nan_loss_is_a_mismatch_and_oom_is_not(rng, make_record):
    bad = make_record("liger", rng=rng)
    bad["losses"][1] = math.nan
    recs = [make_record("peft", rng=rng), bad, make_record("qlora", status="oom")]
    kinds = {"peft": "bf16", "liger": "bf16", "qlora": "nf4"}
    s = stats.summarize(recs, list(kinds), ["m"], "peft", kinds)
    assert [c["arm"] for c in s["loss_checks"] if c["mismatch"]] == ["liger"]
    qrow = next(r for r in s["rows"] if r["arm"] == "qlora")
    assert qrow["status"] == "oom" and qrow["ok_runs"] == 0 and "ratio" not in qrow


def test_aa_noise_floor(rng, make_record):
    recs = [make_record(a, repeat=i, rng=rng, memory=10.0 + 0.1 * (a == "peft#2"))
            for i in range(2) for a in ("peft", "peft#2")]
    s = stats.summarize(recs, ["peft", "peft#2"], ["m"], "peft", {"peft": "bf16", "peft#2": "bf16"})
    (n,) = s["noise_floor"]
    assert n["arm"] == "peft" and n["twin"] == "peft#2"
    assert n["ratio_lo"] <= n["ratio"] <= n["ratio_hi"] and n["ratio_hi"] - n["ratio_lo"] < 0.1
    assert n["tokens_per_s_noise"] == pytest.approx(abs(n["ratio"] - 1)) and n["tokens_per_s_noise"] < 0.05
    assert n["memory_noise"] == pytest.approx(0.1 / 10.05)
