"""The world a training process belongs to: its rank, the device it trains on, and the few collectives a
training loop needs (a sum over ranks, a barrier). A process not started by torchrun is a world of one
with no process group, where every collective is the identity, so one loop serves both."""
from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from fastbench.distributed.launch import DistributedSetupError, backend_for, torchrun_env


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``backend`` is None for a world of one without a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints and the adapter."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """Whether a process group joins this process to others (a DDP world of one included)."""
        return self.backend is not None


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def current_world() -> World:
    """The world of an initialised default process group (however it was started: :func:`process_group`,
    accelerate, HF Trainer), else a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World(device=_default_device())
    env = torchrun_env()
    backend = dist.get_backend()
    device = _default_device() if backend == "nccl" else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), env.local_rank if env else 0, device, backend)


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout_s: float = 1800.0) -> Iterator[World]:
    """Joins this process to the world torchrun started (NCCL on ``cuda:LOCAL_RANK`` where there are GPUs,
    else gloo on the CPU) for the duration of the block, and leaves it after (a block that ends normally waits
    for every rank first); without torchrun's variables, a world of one. A process group someone else
    initialised (accelerate) is used and left in place."""
    env = torchrun_env()
    if env is None:
        yield World(device=_default_device())
        return
    if dist.is_initialized():
        yield current_world()
        return
    gpus = torch.cuda.device_count()
    backend = backend or backend_for(gpus)
    device = torch.device("cpu")
    if backend == "nccl":
        if env.local_rank >= gpus:
            raise DistributedSetupError(f"process {env.rank} (LOCAL_RANK {env.local_rank}) has no GPU of its own: "
                                        f"this machine shows {gpus}; start at most {gpus} processes per machine")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    world = World(env.rank, env.world_size, env.local_rank, device, backend)
    try:
        yield world
    except BaseException:
        dist.destroy_process_group()
        raise
    # a barrier first: it waits for every collective this rank queued (gloo's async work, FSDP's reduce-scatters)
    # and for every peer, so no rank tears its group down while another still talks to it (a gloo rank then
    # aborted: "terminate called without an active exception")
    try:
        barrier(world)
    finally:
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 (and in a process that is no part of a world)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier(world: World | None = None) -> None:
    """Waits for every rank (no-op in a world of one): e.g. after rank 0 wrote a checkpoint the others read."""
    world = world or current_world()
    if world.grouped:
        if world.backend == "nccl":
            dist.barrier(device_ids=[world.device.index])
        else:
            dist.barrier()


def all_reduce_sum(value: torch.Tensor | float | int, world: World) -> torch.Tensor:
    """The sum over ranks of ``value`` (a tensor or a number), as a tensor on ``world.device``."""
    t = torch.as_tensor(value).detach().to(world.device, copy=True)
    if world.grouped:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective's failure because another process of the world ended (its own error
    is the cause to report): torch's distributed errors, and gloo's closed connections."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(
        s in str(error) for s in ("Connection closed by peer", "Connection reset by peer")))


WORLD_SIZE_KEY = "world_size"


def world_record(world: World) -> dict:
    """What a checkpoint records of the world that wrote it."""
    return {WORLD_SIZE_KEY: world.world_size}


class WorldSizeMismatch(DistributedSetupError):
    pass


def check_resume(saved: Mapping, world: World, where: str = "the checkpoint") -> None:
    """Refuses to resume a checkpoint written by a world of another size (its data order, RNG states and
    batch per step belong to that size); a checkpoint without the record was written by one process."""
    saved_size = int(saved.get(WORLD_SIZE_KEY, 1))
    if saved_size != world.world_size:
        raise WorldSizeMismatch(f"{where} was written by a run of {saved_size} process{'es' * (saved_size != 1)} "
                                f"and this run has {world.world_size}: resume it with --nproc {saved_size}")
