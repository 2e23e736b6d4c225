"""Running a function in each rank of a small gloo world on the CPU (spawned processes with torchrun's
variables set, so the code under test joins the world as it does under torchrun)."""
import os
import socket

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    fn(rank, *args)


def run_world(fn, world_size: int, *args) -> None:
    """Runs ``fn(rank, *args)`` in ``world_size`` spawned processes; raises if any failed."""
    mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
