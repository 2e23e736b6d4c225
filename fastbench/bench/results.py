"""Results files: ``<results-dir>/<date>-<gpu>-<short id>.json`` plus a long-format CSV beside it.

The JSON holds the schema version, the resolved comparison config (``compare``: models, arm labels,
repeats, baseline, tolerances and the RunConfig every process got), the environment, every worker
record (``runs``) and the statistics (``summary``). It is rewritten after every process, with
``status`` "partial" until the last one finishes ("interrupted" after Ctrl-C), so a killed run keeps
what it measured and ``--resume`` can finish it. A record's ``profile`` (``compare --profile``: ms per
region of one extra step, fastbench.bench.profile) is optional: files without it read the same.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import tempfile

from fastbench.bench import busy
from fastbench.files import atomic_path

SCHEMA = "fastbench.compare/1"
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a plain file name: the stem of the results and report files


class BadResults(ValueError):
    pass


def gpu_slug(environment: dict) -> str:
    name = environment.get("gpu") or "cpu"
    name = re.sub(r"^(nvidia|amd)\s+", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:24] or "gpu"


def new_run_id(environment: dict) -> str:
    return f"{datetime.date.today().isoformat()}-{gpu_slug(environment)}-{secrets.token_hex(3)}"


def new_results(run_id: str, compare: dict, environment: dict) -> dict:
    return {"schema": SCHEMA, "id": run_id, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "status": "partial", "compare": compare, "environment": environment, "runs": [], "summary": None}


def json_path(results_dir: str, run_id: str) -> str:
    return os.path.join(results_dir, run_id + ".json")


def check_writable(directory: str, option: str) -> None:
    """Make ``directory`` if needed and write a file in it, or raise BadResults naming ``option`` and why."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fastbench-check-"):
            pass
    except OSError as e:
        raise BadResults(f"{option} {directory}: cannot write there ({e.strerror or e}); choose another "
                         "directory") from None


def write(results: dict, results_dir: str) -> str:
    """Write the JSON and the long-format CSV, each atomically; returns the JSON path."""
    os.makedirs(results_dir, exist_ok=True)
    path = json_path(results_dir, results["id"])
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    with atomic_path(os.path.splitext(path)[0] + ".csv") as tmp:
        long_frame(results).to_csv(tmp, index=False)
    return path


def read(path: str) -> dict:
    """Load a results file; a missing, unreadable or foreign file raises BadResults saying which."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise BadResults(f"cannot read results file {path}: {e.strerror}") from None
    except ValueError as e:
        raise BadResults(f"{path} is not a fastbench results file (not JSON: {e})") from None
    if not isinstance(results, dict) or not str(results.get("schema", "")).startswith("fastbench.compare/"):
        raise BadResults(f"{path} is not a fastbench results file (no 'schema': {SCHEMA!r})")
    if results["schema"] != SCHEMA:
        raise BadResults(f"{path} has schema {results['schema']!r}; this fastbench reads {SCHEMA!r}")
    for key in ("id", "compare", "environment", "runs"):
        if key not in results:
            raise BadResults(f"{path} is not a complete fastbench results file (no {key!r})")
    if not isinstance(results["id"], str) or not RUN_ID.fullmatch(results["id"]):
        raise BadResults(f"{path} is not a usable fastbench results file: its id {results['id']!r} is no plain file "
                         "name (letters, digits, '.', '_', '-'), and names the files written from it")
    return results


_RUN_METRICS = ("load_s", "materialize_s", "first_step_s", "first_step_compiles", "peak_allocated_gib",
                "peak_reserved_gib", "nvml_process_gib", "nvml_device_gib", *busy.FIELDS, "offload_queue_waits")


def long_frame(results: dict):
    """One row per measured value: run id, arm, model, repeat, status, metric, step, value
    (step is empty for per-process metrics; warm-up steps are metric ``warmup_step_s``; a profiled
step gives ``profile_<region>_ms``, ``profile_total_ms`` and, on a GPU, ``profile_gpu_busy_ms``)."""
    import pandas as pd

    rows = []
    for r in results["runs"]:
        key = {"run_id": results["id"], "arm": r["arm"], "model": r["model"], "repeat": r["repeat"],
               "status": r["status"]}
        rows += [{**key, "metric": m, "step": None, "value": r.get(m)} for m in _RUN_METRICS]
        profile = r.get("profile") or {}
        if "ms" in profile:
            rows += [{**key, "metric": f"profile_{region}_ms", "step": None, "value": ms}
                     for region, ms in profile["ms"].items()]
            rows.append({**key, "metric": "profile_total_ms", "step": None, "value": profile["total_ms"]})
            if profile.get("gpu_busy_ms") is not None:
                rows.append({**key, "metric": "profile_gpu_busy_ms", "step": None, "value": profile["gpu_busy_ms"]})
        rows += [{**key, "metric": "warmup_step_s", "step": i, "value": v} for i, v in enumerate(r["warmup_step_s"])]
        rows += [{**key, "metric": "loss", "step": i, "value": v} for i, v in enumerate(r["losses"])]
        warm = len(r["warmup_step_s"])
        for i, (s, t) in enumerate(zip(r["step_s"], r["tokens_per_step"])):
            rows += [{**key, "metric": "step_s", "step": warm + i, "value": s},
                     {**key, "metric": "tokens", "step": warm + i, "value": t},
                     {**key, "metric": "tokens_per_s", "step": warm + i, "value": t / s}]
    columns = ["run_id", "arm", "model", "repeat", "status", "metric", "step", "value"]
    return pd.DataFrame(rows, columns=columns)
