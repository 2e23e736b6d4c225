"""Running a function in each rank of a small gloo world on the CPU: rank 0 in this process, the others in
spawned processes, each with torchrun's variables set, so the code under test joins the world as it does
under torchrun. Collectives in the tests time out after TIMEOUT_S, so a failed rank fails the test instead
of hanging it."""
import os
import socket
import traceback

import torch.multiprocessing as mp

TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _variables(rank, world_size, port):
    return dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _child(rank, world_size, port, fn, args, errors):
    os.environ.update(_variables(rank, world_size, port))
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_world(fn, world_size: int, *args) -> None:
    """Runs ``fn(rank, *args)`` on ranks 0..world_size-1; raises if any failed."""
    import torch

    port = _free_port()
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    children = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, errors)) for r in range(1, world_size)]
    for c in children:
        c.start()
    saved = {k: os.environ.get(k) for k in _variables(0, 0, 0)}
    threads = torch.get_num_threads()
    os.environ.update(_variables(0, world_size, port))
    torch.set_num_threads(1)
    try:
        fn(0, *args)
    except BaseException:
        for c in children:
            c.join(TIMEOUT_S)
        if not errors.empty():
            raise AssertionError(errors.get())
        raise
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for c in children:
        c.join(TIMEOUT_S)
    failed = [c.exitcode for c in children if c.exitcode != 0]
    if failed:
        raise AssertionError(errors.get() if not errors.empty() else f"a rank exited with {failed}")
