"""Synthetic worker records and results for the harness tests (no processes, no models)."""
import numpy as np
import pytest

from fastbench.bench.results import new_results
from fastbench.bench.worker import new_record


def fake_record(arm, model="m", repeat=0, tokens_per_s=1000.0, memory=10.0, loss=5.0, steps=8, rng=None,
                jitter=0.02, status="ok"):
    """A worker record whose steps run at ``tokens_per_s`` with relative ``jitter``."""
    rng = rng or np.random.default_rng()
    r = new_record(arm, model, repeat, {}, status)
    if status != "ok":
        return r
    tokens = 4096
    rates = tokens_per_s * (1 + jitter * rng.standard_normal(steps))
    r.update(phase="done", load_s=1.0, first_step_s=2.0, warmup_step_s=[2.0], step_s=list(tokens / rates),
             tokens_per_step=[tokens] * steps, losses=[loss * (1 - 0.001 * i) for i in range(steps + 1)],
             peak_allocated_gib=memory, peak_reserved_gib=memory * 1.1)
    return r


def fake_results(records, arms, models=("m",), repeats=1, baseline="peft", kinds=None):
    from fastbench.bench.arms import RunConfig
    from fastbench.bench.stats import LOSS_TOLERANCE

    run = {k: v for k, v in RunConfig(device="cpu").to_dict().items() if k != "model"}
    compare = {"models": list(models), "arms": list(arms), "repeats": repeats, "baseline_arm": baseline,
               "loss_tolerance": dict(LOSS_TOLERANCE), "run": run,
               "kinds": kinds or {a: ("nf4" if "qlora" in a else "bf16") for a in arms}}
    env = {"gpu": None, "driver": None, "cuda": None, "versions": {"torch": "x"}, "git_sha": None}
    results = new_results("2026-01-01-cpu-abcdef", compare, env)
    results["runs"] = list(records)
    return results


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


@pytest.fixture
def make_record():
    return fake_record


@pytest.fixture
def make_results():
    return fake_results
