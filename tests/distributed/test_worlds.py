"""The test worlds themselves: a rank that fails ends the world at once, with its traceback, though its peer
waits for it in a collective."""
import pytest

from _worlds import run_world


def _one_rank_fails(rank):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank 1 gave up")
    dist.init_process_group("gloo")  # waits for rank 1, which never comes
    dist.barrier()


def test_a_failed_rank_ends_the_world_and_says_why():
    with pytest.raises(AssertionError, match="(?s)rank 1:.*ValueError: rank 1 gave up"):
        run_world(_one_rank_fails, 2)
