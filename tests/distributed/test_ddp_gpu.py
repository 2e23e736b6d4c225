"""GPU: the data-parallel smoke run (NCCL) on a tiny preset, over every GPU of the machine."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", ["true", "offload"])
def test_smoke_world_of_all_gpus_trains_and_records_the_world(tmp_path, checkpointing):
    import torch

    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ddp_smoke.py"), "--preset", "llama-3-8b-tiny",
                    "--seq", "256", "--batch", "2", "--steps", "3", "--warmup", "1", "--checkpointing", checkpointing,
                    "--out", str(out)], check=True, timeout=600)
    doc = json.loads(out.read_text())
    assert doc["world_size"] == torch.cuda.device_count()
    assert doc["tokens_per_s"] > 0 and doc["tokens_per_s_per_gpu"] * doc["world_size"] == pytest.approx(doc["tokens_per_s"], rel=1e-3)
    assert all(l == l and l > 0 for l in doc["losses"])  # finite, positive
