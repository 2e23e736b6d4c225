"""tools/ab_trees.py on a CPU: two trees (here the same one twice) on a tiny preset, each round written out as it
finishes, and a time budget that stops the rounds early with what they measured summarised."""
import json
import math
import os
import subprocess
import sys

import pytest

from tool_scripts import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(tmp_path, *extra):
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ab_trees.py"), ROOT, ROOT,
                           "--model", "llama-3-8b-tiny", "--arm", "bf16:true", "--seq", "16", "--batch", "2",
                           "--warmup", "1", "--steps", "1", "--work", str(tmp_path / "work"), "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_rounds_are_summarised_and_a_budget_stops_them(tmp_path):
    stdout, doc = run(tmp_path, "--rounds", "2")
    assert doc["rounds"] == doc["rounds_asked"] == 2 and len(doc["ms_per_step"]["A"]) == 2
    assert all(t > 0 for t in doc["ms_per_step"]["A"] + doc["ms_per_step"]["B"])
    assert math.isfinite(doc["ratio_a_over_b"]) and doc["ratio_95"][0] <= doc["ratio_95"][1]
    assert "A/B ratio of medians" in stdout
    assert doc["j_per_step"] == {"A": [None, None], "B": [None, None]} and doc["median_j"] is None  # no GPU here

    stdout, doc = run(tmp_path, "--rounds", "50", "--seconds", "0")
    assert doc["rounds"] == 1 and doc["rounds_asked"] == 50  # the first round always runs
    assert "stopped after 1 rounds" in stdout


def test_a_tree_inside_another_checkout_has_no_revision_of_its_own(tmp_path):
    """A ``git archive`` copy placed inside a checkout is not that checkout's revision."""
    _revision = load_tool("ab_trees")._revision
    inner = os.path.join(ROOT, "tests", "bench")
    assert _revision(inner) == "unknown" and _revision(str(tmp_path)) == "unknown"
    if os.path.isdir(os.path.join(ROOT, ".git")):
        assert _revision(ROOT) != "unknown"


def test_energy_is_summarised_where_every_turn_measured_it():
    summarize = load_tool("ab_trees").summarize
    args = type("Args", (), dict(arm="4bit:offload", model="m", seq=16, batch=2, steps=4, rounds=3))
    ms = {"A": [10.0, 11.0, 12.0], "B": [9.0, 10.0, 11.0]}
    doc = summarize(args, {}, ms, {"A": [7.0, 7.2, 6.9], "B": [6.0, 6.3, 6.1]})
    assert doc["median_j"] == {"A": 7.0, "B": 6.1}
    assert doc["energy_ratio_a_over_b"] == pytest.approx(7.0 / 6.1)
    assert doc["energy_ratio_95"][0] <= doc["energy_ratio_a_over_b"] <= doc["energy_ratio_95"][1]
    assert doc["ratio_a_over_b"] == pytest.approx(11.0 / 10.0)
    doc = summarize(args, {}, ms, {"A": [7.0, None, 6.9], "B": [6.0, 6.3, 6.1]})  # a turn without the counter
    assert doc["median_j"] is None and doc["energy_ratio_a_over_b"] is None and doc["energy_ratio_95"] is None


def test_the_child_measures_energy_with_this_checkout_s_code():
    """An older tree under test may lack the energy counters' reader: the tool loads its own."""
    busy = load_tool("ab_trees")._own_busy_module()
    assert busy.__file__ == os.path.join(ROOT, "fastbench", "bench", "busy.py") and callable(busy.gpu_counters)
