"""Regression check of a new run against an old one, arm by arm and model by model.

A metric regressed when it got worse by more than the threshold AND by more than the noise: tokens/s
fell (relative to the old median) or peak allocated memory rose. The noise of a metric is the largest
of the process-to-process spreads of both runs and the A/A noise floor either run measured for that
arm. An arm that ran before and now runs out of memory or fails is a regression too.
"""
from __future__ import annotations


def parse_threshold(text: str) -> float:
    """"5%" -> 0.05; "0.05" -> 0.05; a bare number above 1 is a percentage."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a threshold; write e.g. 5%") from None
    value = value / 100 if value > 1 and not t.endswith("%") else value
    if not 0 <= value < 1:
        raise ValueError(f"threshold {text!r} must be between 0% and 100%")
    return value


def _noise(summary: dict, model: str, arm: str, key: str) -> float:
    return max((n[key] for n in summary.get("noise_floor", []) if n["model"] == model and n["arm"] == arm.split("#")[0]),
               default=0.0)


def find_regressions(new: dict, old: dict, threshold: float) -> list[dict]:
    """``new`` and ``old`` are results dicts with summaries; returns one entry per regressed
    (model, arm, metric), each with the old and new values, the change and the noise it beat."""
    old_rows = {(r["model"], r["arm"]): r for r in old["summary"]["rows"]}
    found = []
    for row in new["summary"]["rows"]:
        before = old_rows.get((row["model"], row["arm"]))
        if before is None or not before.get("ok_runs"):
            continue
        where = {"model": row["model"], "arm": row["arm"]}
        if not row.get("ok_runs"):
            found.append({**where, "metric": "status", "old": before["status"], "new": row["status"],
                          "change": None, "noise": None})
            continue
        checks = [("tokens/s", "tokens_per_s", "repeat_spread", "tokens_per_s_noise", -1),
                  ("peak allocated GiB", "peak_allocated_gib", "memory_spread", "memory_noise", +1)]
        for metric, key, spread, aa, worse in checks:
            if row.get(key) is None or before.get(key) is None:
                continue
            change = row[key] / before[key] - 1
            noise = max(row.get(spread, 0.0), before.get(spread, 0.0),
                        _noise(new["summary"], row["model"], row["arm"], aa),
                        _noise(old["summary"], row["model"], row["arm"], aa))
            if worse * change > threshold and worse * change > noise:
                found.append({**where, "metric": metric, "old": before[key], "new": row[key],
                              "change": change, "noise": noise})
    return found


def describe(regression: dict) -> str:
    r = regression
    if r["metric"] == "status":
        return f"REGRESSION {r['arm']} on {r['model']}: ran before ({r['old']}), now {r['new']}"
    spec = ",.0f" if abs(r["old"]) >= 100 else ".3g"  # tokens/s as 10,287; GiB as 7.02
    return (f"REGRESSION {r['arm']} on {r['model']}: {r['metric']} {r['old']:{spec}} -> {r['new']:{spec}} "
            f"({r['change']:+.1%}; noise {r['noise']:.1%})")
