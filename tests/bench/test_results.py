import json
import os

import pandas as pd
import pytest

from fastbench.bench import busy, results as results_io
from fastbench.bench.cli import summarize_results


def test_round_trip_json_and_long_csv(tmp_path, rng, make_record, make_results):
    recs = [make_record(a, repeat=i, rng=rng) for i in range(2) for a in ("peft", "qlora")]
    recs.append(make_record("qlora", repeat=2, status="oom"))
    res = make_results(recs, ["peft", "qlora"], repeats=3)
    res["summary"] = summarize_results(res)
    path = results_io.write(res, str(tmp_path))
    assert os.path.basename(path) == res["id"] + ".json"
    back = results_io.read(path)
    assert back == json.loads(json.dumps(res))
    frame = pd.read_csv(os.path.splitext(path)[0] + ".csv")
    assert list(frame.columns) == ["run_id", "arm", "model", "repeat", "status", "metric", "step", "value"]
    tps = frame[(frame.metric == "tokens_per_s") & (frame.arm == "peft")]
    expect = [t / s for r in recs if r["arm"] == "peft" for t, s in zip(r["tokens_per_step"], r["step_s"])]
    assert sorted(tps.value) == pytest.approx(sorted(expect))
    assert set(frame[frame.status == "oom"].metric) <= {"load_s", "materialize_s", "first_step_s",
                                                       "first_step_compiles", "peak_allocated_gib", "peak_reserved_gib",
                                                       "nvml_process_gib", "nvml_device_gib",
                                                       *busy.FIELDS, "offload_queue_waits"}


def test_run_id_names_date_and_gpu():
    rid = results_io.new_run_id({"gpu": "NVIDIA H200"})
    date, gpu, short = rid[:10], rid[11:15], rid[16:]
    assert gpu == "h200" and len(short) == 6 and date.count("-") == 2
    assert results_io.gpu_slug({"gpu": None}) == "cpu"


@pytest.mark.parametrize("content, message", [
    ("not json at all", "not JSON"),
    ('{"something": "else"}', "not a fastbench results file"),
    ('[1, 2]', "not a fastbench results file"),
    ('{"schema": "fastbench.compare/999", "id": "x"}', "schema"),
    ('{"schema": "fastbench.compare/1", "id": "x"}', "not a complete"),
    ('{"schema": "fastbench.compare/1", "id": "../../x", "compare": {}, "environment": {}, "runs": []}',
     "its id '../../x' is no plain file name"),
    ('{"schema": "fastbench.compare/1", "id": 7, "compare": {}, "environment": {}, "runs": []}', "its id 7 is no"),
])
def test_foreign_or_broken_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(results_io.BadResults, match=message):
        results_io.read(str(path))


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(results_io.BadResults, match="cannot read"):
        results_io.read(str(tmp_path / "nope.json"))
