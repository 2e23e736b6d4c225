"""Launching N processes through torchrun, and reading torchrun's variables."""
import json
import os
import subprocess
import sys

import pytest

from fastbench.distributed.launch import DistributedSetupError, check_nproc, launch, launch_command, torchrun_env

PROBE = os.path.join(os.path.dirname(__file__), "probe")


def test_launch_starts_a_gloo_world_of_n(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", PROBE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert launch([str(tmp_path)], 2, module="world_probe", gpus=0) == 0
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert found == [{"rank": r, "world_size": 2, "local_rank": r, "backend": "gloo", "device": "cpu",
                      "main": r == 0} for r in range(2)]


def test_launch_command_reruns_the_cli_under_torchrun():
    argv = ["train", "m", "--data", "random", "--steps", "3"]
    assert launch_command(argv, 4) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=4", "-m", "fastbench", *argv]


def test_more_processes_than_gpus_is_refused():
    assert check_nproc(3, gpus=0) == "gloo"
    assert check_nproc(2, gpus=2) == "nccl"
    with pytest.raises(DistributedSetupError, match="--nproc 4: this machine shows 2 GPUs, one per process is "
                                                    "needed: use --nproc 2 or less"):
        check_nproc(4, gpus=2)
    with pytest.raises(DistributedSetupError, match="--nproc 0: give 1 or more"):
        check_nproc(0, gpus=0)


def test_torchrun_env():
    assert torchrun_env({}) is None
    env = torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    with pytest.raises(DistributedSetupError, match="expected 0 <= RANK < WORLD_SIZE"):
        torchrun_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})


def test_python_m_fastbench_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "fastbench", "--help"], capture_output=True, text=True, check=True)
    assert "Usage: fastbench" in out.stdout and "train" in out.stdout
