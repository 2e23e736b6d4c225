"""Starting N training processes on this machine through ``torch.distributed.run`` (torchrun).

``fastbench train ... --nproc N`` runs torch.distributed.run's agent for ``--standalone --nproc_per_node N
-m fastbench train ...`` (its own arguments); each process then finds torchrun's ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` in its environment (:func:`torchrun_env`), trains instead of launching again, and joins the
world (fastbench.distributed.world). ``torchrun --nproc_per_node N -m fastbench train ...`` gives the
same processes directly.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence


class DistributedSetupError(ValueError):
    """A world that cannot be started as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each process it starts."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun variables of this process, or None when it was not started by torchrun (or an
    equivalent launcher: accelerate, a SLURM script that sets them)."""
    env = os.environ if environ is None else environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    try:
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise DistributedSetupError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, "
                                    f"LOCAL_RANK={env['LOCAL_RANK']!r}: expected whole numbers") from None
    if not (0 <= rank < world_size and 0 <= local_rank):
        raise DistributedSetupError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}: "
                                    "expected 0 <= RANK < WORLD_SIZE")
    return TorchrunEnv(rank, world_size, local_rank)


def backend_for(gpus: int) -> str:
    """NCCL where the processes have GPUs, gloo on CPUs."""
    return "nccl" if gpus > 0 else "gloo"


def check_nproc(nproc: int, gpus: int | None = None) -> str:
    """Checks that ``nproc`` processes can run here (one GPU each where there are GPUs); returns the backend.
    ``gpus``: the GPUs this process sees (default: ``torch.cuda.device_count()``)."""
    if nproc < 1:
        raise DistributedSetupError(f"--nproc {nproc}: give 1 or more processes")
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if 0 < gpus < nproc:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise DistributedSetupError(f"--nproc {nproc}: this machine shows {gpus} GPU{'s' * (gpus > 1)}{seen}, "
                                    f"one per process is needed: use --nproc {gpus} or less")
    return backend_for(gpus)


def launch_command(argv: Sequence[str], nproc: int, module: str = "fastbench") -> list[str]:
    """The command that runs ``python -m module *argv`` as ``nproc`` processes of one world on this machine
    (``--standalone``: a free local rendezvous port, so several jobs can run side by side)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *argv]


class ProcessFailed(RuntimeError):
    """A process of the job failed (its own message is in its output); the launcher stopped the others."""

    def __init__(self, rank: int, exitcode: int, nproc: int):
        self.rank, self.exitcode, self.nproc = rank, exitcode, nproc
        how = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with {exitcode}"
        super().__init__(f"process {rank} of {nproc} {how}; the others were stopped")


def launch(argv: Sequence[str], nproc: int, module: str = "fastbench", gpus: int | None = None) -> int:
    """Runs ``python -m module *argv`` as ``nproc`` processes (checked by :func:`check_nproc` first) through
    torch.distributed.run, whose agent runs in this process. Returns 0 when every process succeeded, or
    128 + the signal's number when this process got SIGINT or SIGTERM (the agent passes the signal to every
    process and waits for them to end); raises :class:`ProcessFailed` naming the first process that failed
    (the agent then stops the others with SIGTERM). The processes must not launch again: they find
    torchrun's variables (:func:`torchrun_env`)."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    check_nproc(nproc, gpus)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # the agent's own lines (closing signals, its view of a failure) repeat what the processes and the
    # caller say
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        # the processes' arguments are set after parsing: torchrun's parser would take abbreviations of its
        # own options among them (``--r`` for ``--rdzv-*``/``--role``, ``--nproc`` for ``--nproc-per-node``)
        args = torchrun.parse_args(launch_command([], nproc, module)[3:])
        args.training_script_args = list(argv)
        torchrun.run(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise ProcessFailed(rank, failure.exitcode, nproc) from None
    return 0
