"""On the GPU: what the caching allocator reserves in a training step of the fused path, against what the
step allocates (the offload mode's copies must not make it hold memory back from reuse)."""
import os
import pathlib
import pickle
import subprocess
import sys

import pytest

MiB = 1 << 20
TOOL = pathlib.Path(__file__).parent.parent.parent / "tools" / "memory_timeline.py"


@pytest.mark.gpu
@pytest.mark.slow
def test_offload_reserves_little_more_than_it_allocates(tmp_path):
    """8 layers of llama-3-8b's width, NF4, offloaded checkpointing, seq 4096: a step (after two) reserves at
    most a tenth more than its peak allocated, plus 256 MiB. Run in a fresh process (tools/memory_timeline.py),
    under fastbench's default allocator settings, which the summary it writes records."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    args = [sys.executable, str(TOOL), "--layers", "8", "--seq", "4096", "--batch", "1", "--warmup", "2",
            "--checkpointing", "offload", "--out", str(tmp_path)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "allocator settings: expandable_segments:True" in summary
    peaks = pickle.loads((tmp_path / "snapshot.pickle").read_bytes())["fastbench_peaks"]
    assert peaks["reserved"] <= 1.10 * peaks["allocated"] + 256 * MiB, summary
