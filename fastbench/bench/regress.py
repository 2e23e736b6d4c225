"""Regression check of a new run against an old one, arm by arm and model by model.

A metric regressed when it got worse by more than the threshold AND by more than the noise: tokens/s
fell (relative to the old median) or the peak memory PyTorch reserved rose (what decides whether a run fits a
card; allocated memory can stay flat while fragmentation grows reserved). The noise of a metric is the largest
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


# what makes two runs' figures comparable: the step's shape, the precision, the allocator, the GPU
COMPARABLE_RUN = ("seq_len", "batch", "grad_accum", "lora_r", "lora_alpha", "lora_dropout", "targets", "dtype",
                  "gradient_checkpointing", "pad_fraction", "device")


def _fmt_value(value) -> str:
    return ",".join(value) if isinstance(value, (list, tuple)) else str(value)


def data_identity(compare: dict) -> str:
    """What the arms trained on, as far as it changes the figures: "random tokens", or the data file (name and
    hash) with the settings that turn it into steps."""
    data, run = compare.get("data"), compare["run"]
    if not data:
        return "random tokens"
    settings = [f"{k} {run[k]}" for k, default in (("data_format", None), ("text_field", "text"),
                                                  ("chat_template", None), ("tokenizer", None))
                if run.get(k, default) != default]
    return (f"{data['name']} (sha256 {data['sha256'][:12]}{', packing off' if not run.get('packing', True) else ''}"
            + "".join(f", {x}" for x in settings) + ")")


def config_differences(new: dict, old: dict) -> list[str]:
    """What differs between two results' configurations that changes speed or memory, one phrase each
    (``"seq_len 2048 there, 1024 here"``); the allocator setting of files that predate it reads as unset."""
    found = []
    for key in COMPARABLE_RUN:
        there, here = old["compare"]["run"].get(key), new["compare"]["run"].get(key)
        if _fmt_value(there) != _fmt_value(here):
            found.append(f"{key} {_fmt_value(there)} there, {_fmt_value(here)} here")
    there, here = data_identity(old["compare"]), data_identity(new["compare"])
    if there != here:
        found.append(f"data {there} there, {here} here")
    there, here = old["compare"].get("alloc_conf"), new["compare"].get("alloc_conf")
    if there != here:
        found.append(f"allocator {there or 'unset'} there, {here or 'unset'} here")
    there, here = old["environment"].get("gpu"), new["environment"].get("gpu")
    if there != here:
        found.append(f"GPU {there or 'none (CPU)'} there, {here or 'none (CPU)'} here")
    return found


def planned_pairs(compare: dict) -> list[tuple[str, str]]:
    """(model, arm) of every pair a comparison runs."""
    from fastbench.bench.runner import runs_on

    return [(m, a) for m in compare["models"] for a in compare["arms"] if runs_on(a, m, compare.get("arm_models"))]


def pairs_in_common(new: dict, old: dict) -> list[tuple[str, str]]:
    """The (model, arm) pairs the new run plans that finished at least one process in the old run: what
    ``--against`` can compare."""
    finished = {(r["model"], r["arm"]) for r in old["runs"] if r["status"] == "ok"}
    return [pair for pair in planned_pairs(new["compare"]) if pair in finished]


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
                  ("peak reserved GiB", "peak_reserved_gib", "memory_spread", "memory_noise", +1)]
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
