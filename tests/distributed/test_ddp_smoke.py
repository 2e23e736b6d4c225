"""tools/ddp_smoke.py's rank loop on a CPU, in a world of one: it trains through the trainer's own steps
(RandomPlan, accumulate), so a change to them that the tool missed fails here, not first on a GPU machine."""
import math

from tool_scripts import load_tool


def test_a_world_of_one_trains_and_reports(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    smoke = load_tool("ddp_smoke")
    args = smoke.parse(["--preset", "llama-3-8b-tiny", "--bf16", "--seq", "32", "--batch", "2", "--grad-accum", "2",
                        "--steps", "2", "--warmup", "1", "--checkpointing", "true", "--rank", "4"])
    doc = smoke.train_rank(args)
    assert doc["world_size"] == 1 and doc["gpu"] == "cpu" and doc["peak_reserved_gib_max_rank"] is None
    assert len(doc["step_s"]) == 2 and len(doc["losses"]) == 3
    assert all(math.isfinite(l) and l > 0 for l in doc["losses"])
    assert doc["tokens_per_s"] == doc["tokens_per_s_per_gpu"] > 0
