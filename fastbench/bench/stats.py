"""Statistics over worker records: per (model, arm) medians and spreads, ratios against the baseline
arm with a bootstrap confidence interval, the A/A noise floor, and the loss check.

Throughput is real (non-padding) tokens/s, pooled over the timed steps of all repeats (of each step); beside
it ``padded_tokens_per_s`` counts every position computed and ``padding`` is the share of padding among
them. Its p10-p90 is the
step-to-step spread, and ``repeat_spread`` = (max - min) / median of the per-repeat medians is the
process-to-process spread. The ratio's CI resamples repeats, then steps within each chosen repeat
(two-level bootstrap, seeded), so a difference between processes widens it.
"""
from __future__ import annotations

import math

import numpy as np

from fastbench.bench import busy
from fastbench.bench.arms import NPROC_OPTION, world_size
from fastbench.bench.runner import runs_on

BOOTSTRAP_SAMPLES = 2000
LOSS_STEPS = 3  # the first steps' losses compared across arms
LOSS_TOLERANCE = {"same": 0.01, "cross": 0.02}  # relative; "cross": bf16 vs nf4 arms


def step_tokens_per_s(record: dict) -> np.ndarray:
    """Real (non-padding) tokens per second of each timed step."""
    return np.asarray(record["tokens_per_step"], float) / np.asarray(record["step_s"], float)


def positions(record: dict) -> list[int]:
    """Positions computed per timed step, padding included (records from before they were counted had none:
    their tokens)."""
    return record.get("positions_per_step") or record["tokens_per_step"]


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and r["step_s"]]


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _spread(values) -> float:
    values = [v for v in values if v is not None]
    return float((max(values) - min(values)) / np.median(values)) if len(values) > 1 else 0.0


def summarize_arm(records: list[dict]) -> dict:
    """One (model, arm): medians, p10/p90 and spreads; ``status`` is "ok", "oom", "error" or a mix."""
    ok = _ok(records)
    statuses = sorted({r["status"] for r in records})
    row = {"runs": len(records), "ok_runs": len(ok), "status": "/".join(statuses)}
    if not ok:
        return row
    tps = np.concatenate([step_tokens_per_s(r) for r in ok])
    step_s = np.concatenate([np.asarray(r["step_s"], float) for r in ok])
    row.update(
        tokens_per_s=float(np.median(tps)), tokens_per_s_p10=float(np.percentile(tps, 10)),
        tokens_per_s_p90=float(np.percentile(tps, 90)),
        step_s=float(np.median(step_s)), step_s_p10=float(np.percentile(step_s, 10)),
        step_s_p90=float(np.percentile(step_s, 90)),
        padded_tokens_per_s=float(np.median(np.concatenate(
            [np.asarray(positions(r), float) / np.asarray(r["step_s"], float) for r in ok]))),
        padding=1 - sum(sum(r["tokens_per_step"]) for r in ok) / sum(sum(positions(r)) for r in ok),
        repeat_spread=_spread([float(np.median(step_tokens_per_s(r))) for r in ok]),
        load_s=_median(r["load_s"] for r in ok), first_step_s=_median(r["first_step_s"] for r in ok))
    for key in ("peak_allocated_gib", "peak_reserved_gib", "nvml_process_gib", "nvml_device_gib"):
        row[key] = _median(r[key] for r in ok)
        values = [r[key] for r in ok if r[key] is not None]
        row[key + "_min"], row[key + "_max"] = (min(values), max(values)) if values else (None, None)
    row["memory_spread"] = _spread([r["peak_reserved_gib"] for r in ok])  # reserved: what decides a fit
    for key in busy.FIELDS:  # records written before fastbench measured the host lack them
        row[key] = _median(r.get(key) for r in ok)
    return row


def bootstrap_ratio(arm: list[np.ndarray], base: list[np.ndarray], samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Ratio of median tokens/s (arm / base) and its CI. Each argument holds one array of per-step
    values per repeat; each bootstrap sample draws repeats with replacement, then steps within them."""
    rng = np.random.default_rng(seed)

    def resample(groups):
        picks = rng.integers(0, len(groups), len(groups))
        return np.median(np.concatenate([rng.choice(groups[i], len(groups[i])) for i in picks]))

    point = float(np.median(np.concatenate(arm)) / np.median(np.concatenate(base)))
    ratios = np.array([resample(arm) / resample(base) for _ in range(samples)])
    lo, hi = np.percentile(ratios, [50 * (1 - level), 50 * (1 + level)])
    return point, float(lo), float(hi)


def loss_rel_diff(losses: list[float], reference: list[float], steps: int = LOSS_STEPS) -> float:
    """The largest relative difference over the first ``steps`` losses; inf where either is NaN or
    inf, or where ``losses`` is shorter than the reference's first steps."""
    n = min(steps, len(reference))
    if len(losses) < n:
        return math.inf
    worst = 0.0
    for a, b in zip(losses[:n], reference[:n]):
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.inf
        worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return worst


def median_losses(records: list[dict]) -> list[float]:
    """Per step, the median loss over the repeats that ran it (warm-up steps included: step 1 first)."""
    runs = [r["losses"] for r in records if r["losses"]]
    n = max((len(x) for x in runs), default=0)
    return [float(np.median([x[i] for x in runs if len(x) > i])) for i in range(n)]


def summarize(records: list[dict], labels: list[str], models: list[str], baseline: str,
              kinds: dict[str, str], loss_tolerance: dict[str, float] = LOSS_TOLERANCE,
              arm_models: dict[str, list[str]] | None = None) -> dict:
    """Rows per (model, arm) with ratios to ``baseline``; the loss check; the A/A noise floor.

    ``kinds`` maps each label to "bf16" or "nf4". An arm's losses are compared with the baseline's
    when both are the same kind (tolerance "same"); otherwise with the first arm of its own kind in
    ``labels`` (tolerance "same"), and the first of each kind with the baseline (tolerance "cross"); where
    the baseline has no losses for a model, with the first arm of its own kind. An arm restricted by
    ``arm_models`` has rows only for its models.
    """
    rows, loss_checks, noise = [], [], []
    for model in models:
        planned = [a for a in labels if runs_on(a, model, arm_models)]
        by_arm = {a: [r for r in records if r["model"] == model and r["arm"] == a] for a in planned}
        base_ok = _ok(by_arm.get(baseline, []))
        base_steps = [step_tokens_per_s(r) for r in base_ok]
        base_losses = median_losses(by_arm.get(baseline, []))
        for label in planned:
            row = {"model": model, "arm": label, "kind": kinds[label], "world_size": world_size(label),
                   **summarize_arm(by_arm[label])}
            ok = _ok(by_arm[label])
            if ok and base_steps:
                row["ratio"], row["ratio_lo"], row["ratio_hi"] = bootstrap_ratio(
                    [step_tokens_per_s(r) for r in ok], base_steps)
            rows.append(row)
            if label == baseline or not ok or world_size(label) > 1:
                continue  # nothing to compare (OOM or failed runs are reported as such; a job of N ranks trains N x the rows)
            same_kind = [a for a in planned if kinds[a] == kinds[label] and _ok(by_arm[a]) and world_size(a) == 1]
            if base_losses and (kinds[label] == kinds[baseline] or same_kind[0] == label):
                ref, tol = baseline, loss_tolerance["same" if kinds[label] == kinds[baseline] else "cross"]
                ref_losses = base_losses
            elif same_kind[0] != label:  # the first arm of its kind (also where the baseline did not run)
                ref, tol = same_kind[0], loss_tolerance["same"]
                ref_losses = median_losses(by_arm[ref])
            else:
                continue
            losses = median_losses(by_arm[label])
            diff = loss_rel_diff(losses, ref_losses)
            loss_checks.append({"model": model, "arm": label, "reference": ref, "tolerance": tol,
                                "losses": losses[:LOSS_STEPS], "reference_losses": ref_losses[:LOSS_STEPS],
                                "max_rel_diff": diff, "mismatch": not diff <= tol})
        for label in planned:  # A/A pairs: "x" and "x#2" measure the noise floor
            twin = label.split("#")[0]
            if "#" in label and twin in by_arm and _ok(by_arm[twin]) and _ok(by_arm[label]):
                ratio, lo, hi = bootstrap_ratio([step_tokens_per_s(r) for r in _ok(by_arm[label])],
                                                [step_tokens_per_s(r) for r in _ok(by_arm[twin])])
                mem = [_median(r["peak_reserved_gib"] for r in _ok(by_arm[a])) for a in (twin, label)]
                noise.append({"model": model, "arm": twin, "twin": label, "ratio": ratio, "ratio_lo": lo,
                              "ratio_hi": hi, "tokens_per_s_noise": abs(ratio - 1),
                              "memory_noise": _spread(mem) if None not in mem else 0.0})
    return {"rows": rows, "loss_checks": loss_checks, "noise_floor": noise, "scaling": scaling(rows)}


def single_rank_label(label: str) -> str:
    """The label of the same arm on one rank (``fused:nproc=2`` -> ``fused``)."""
    return label.replace(f":{NPROC_OPTION}={world_size(label)}", "")


def scaling(rows: list[dict]) -> list[dict]:
    """Per job of N > 1 ranks that finished: its real tokens/s (the whole job's), per GPU, and the factor
    against the same arm on one GPU of the same run (``efficiency`` = factor / N; 1 is linear scaling)."""
    by_key = {(r["model"], r["arm"]): r for r in rows if r.get("ok_runs")}
    out = []
    for (model, label), row in by_key.items():
        n = row.get("world_size", 1)
        one = by_key.get((model, single_rank_label(label)))
        if n > 1:
            entry = {"model": model, "arm": label, "single": single_rank_label(label), "world_size": n,
                     "tokens_per_s": row["tokens_per_s"], "tokens_per_s_per_gpu": row["tokens_per_s"] / n}
            if one is not None:
                factor = row["tokens_per_s"] / one["tokens_per_s"]
                entry.update(single_tokens_per_s=one["tokens_per_s"], factor=factor, efficiency=factor / n)
            out.append(entry)
    return out

