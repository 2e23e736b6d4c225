"""On the GPU, at full size and through the harness (the setting where offload diverged on 2026-11-28):
fused-4bit with offloaded checkpointing must train the same model as with recomputation. One warm-up
step only: the loss check reads the first three losses, and the race showed in steps the worker does
not synchronise (the CPU runs ahead of the GPU)."""
import pytest
from click.testing import CliRunner

from fastbench.cli import main


@pytest.mark.gpu
@pytest.mark.slow
def test_offload_matches_recompute_at_llama_3_8b(tmp_path):
    args = ["compare", "--models", "llama-3-8b", "--arms", "fused-4bit:ckpt=true,fused-4bit:ckpt=offload",
            "--baseline-arm", "fused-4bit:ckpt=true", "--seq-len", "2048", "--batch", "2", "--steps", "4",
            "--warmup", "1", "--repeats", "1", "--loss-tolerance", "0.005",
            "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
