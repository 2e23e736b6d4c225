"""tools/first_step_breakdown.py: dropping files from the page cache, and its figures for a tiny preset cut to
one layer on the CPU."""
import json

from tool_scripts import load_tool


def test_evicting_counts_every_file_under_the_paths(tmp_path):
    tool = load_tool("first_step_breakdown")
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 28)
    assert tool.evict_page_cache([str(tmp_path)]) == (2, 128)
    assert (tmp_path / "a").read_bytes() == b"x" * 100  # dropped from the cache, not from the disk


def test_first_and_second_step_of_a_one_layer_preset(tmp_path, monkeypatch, seed):
    from fastbench import presets

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tool = load_tool("first_step_breakdown")
    out = tmp_path / "first.jsonl"
    assert tool.main(["bf16:offload", "--model", "llama-3-8b-tiny", "--layers", "1", "--device", "cpu",
                      "--seq", "16", "--batch", "1", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["layers"] == 1 and row["fastbench_kernels"].endswith("kernels")
    for phase in ("forward", "backward", "optimizer", "step"):
        assert row[f"first_{phase}_s"] >= 0 and row[f"second_{phase}_s"] >= 0
    assert "llama-3-8b-tiny-1-layers" not in presets.PRESETS  # the cut preset was only for this build
