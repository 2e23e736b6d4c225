"""The offload mode's pinned host memory per training process, and a check against the host's memory before
N processes start (each rank has its own offloader and buffers).

What one forward of ``t = batch x seq_len`` tokens puts in host buffers (fastbench.fused.checkpointing), in the
activation dtype's bytes ``b``, for a model of L layers, width h and MLP width i:

- a recomputed layer keeps both its parts' inputs: 2 t h b;
- every n-th layer (``OffloadConfig.save_every``, layers 0, n, 2n, ...) keeps its attention's input
  and its MLP's saved activations instead: the MLP input (its norm recomputed from it) and the gate and up
  projections, t (2h + 2i) b (in forwards of at most ``OffloadConfig.save_max_tokens`` tokens);
- an untied input embedding table (vocab x h x b) with ``OffloadConfig.embedding``.

Where the host is short of that (or of a process's ``OffloadConfig.host_limit_gib``), every layer keeps its first
part's input alone and is recomputed whole from it: t h b a layer, the least the offload mode can hold.

Buffers are reused from step to step and rounded up by at most 1/8 (the offloader's rounding), so the
bound is 9/8 of the activations plus the table.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastbench.fused.checkpointing.config import OffloadConfig

GiB = 1 << 30
ROUNDING = 9 / 8
# host memory a training process uses besides the pinned buffers (Python, torch, CUDA context, the loaded
# model's host copies while loading): kept free per rank by the check
PROCESS_RESERVE = 4 * GiB


def offload_host_bytes(config, tokens: int, dtype_bytes: int = 2, offload: OffloadConfig | None = None,
                       whole_layers: bool = False) -> int:
    """Upper bound of the pinned host bytes one rank's offload mode holds for micro-batches of ``tokens``
    tokens (batch x sequence length) of a model with transformers ``config``, under the offload settings
    ``offload`` (the defaults when None); with ``whole_layers``, where every layer keeps one input (the host
    short of more)."""
    from fastbench.fused.checkpointing.config import OffloadConfig  # here: that package imports this module

    layers, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    layout = offload or OffloadConfig()
    per_token = 0
    for index in range(layers):
        if whole_layers:
            per_token += h
        elif layout.saves_mlp(index, tokens):
            per_token += 2 * h + 2 * i
        else:
            per_token += 2 * h
    return int(ROUNDING * per_token * tokens * dtype_bytes) + embedding_table_bytes(config, dtype_bytes, layout)


def embedding_table_bytes(config, dtype_bytes: int = 2, offload: OffloadConfig | None = None) -> int:
    """The bytes of the input embedding table the offload mode keeps in pinned host memory (0 where tied or kept
    on the GPU)."""
    from fastbench.fused.checkpointing.config import OffloadConfig

    if not (offload or OffloadConfig()).embedding or getattr(config, "tie_word_embeddings", False):
        return 0
    return config.vocab_size * config.hidden_size * dtype_bytes


def available_host_bytes() -> int:
    """The host memory available to new allocations of this process: ``MemAvailable`` of /proc/meminfo (elsewhere
    the free pages), or less where this process's control group limits its memory (a container's limit, which
    /proc/meminfo does not show and past which the kernel kills the process)."""
    try:
        with open("/proc/meminfo") as f:
            available = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        available = None
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = cgroup_memory_room()
    return available if room is None else min(available, room)


# a memory limit at or above this means none (cgroup v1 writes the largest page-aligned long; v2 writes "max")
_UNLIMITED = 1 << 62
# per cgroup version, the memory controller's files: (limit, usage, the memory.stat key of the page cache the
# kernel can drop, not counted as used)
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
_V2_FILES = ("memory.max", "memory.current", "inactive_file")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit


def _stat(path: Path, name: str) -> int:
    """``name``'s value in a cgroup's memory.stat (0 where absent)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name and value.strip().isdigit():
                return int(value)
    except (OSError, UnicodeDecodeError):
        pass
    return 0


def _cgroup_dirs(root: Path, path: str) -> list[Path]:
    """The directories of the cgroup at ``path`` under ``root`` and of each one above it, deepest first (from the
    deepest that exists: in a container, /proc/self/cgroup may name the host's path of a cgroup mounted as root)."""
    parts = [p for p in path.strip("/").split("/") if p]
    while parts and not root.joinpath(*parts).is_dir():
        parts.pop(0)
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_memory_room(root: Path = Path("/sys/fs/cgroup"),
                       self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The memory that this process's control group, and each group above it, still lets it use: the smallest
    limit less usage, page cache that the kernel can drop (inactive files) not counted as used; None where no
    group has a limit or the groups cannot be read. cgroup v2 (memory.max) and v1 (memory.limit_in_bytes)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    fields = [line.split(":", 2) for line in lines if line.count(":") >= 2]  # id:controllers:path
    v1 = next((path for _, controllers, path in fields if "memory" in controllers.split(",")), None)
    v2 = next((path for hid, controllers, path in fields if hid == "0" and not controllers), None)
    if v1 is not None and (root / "memory").is_dir():
        dirs, (limit_file, usage_file, cache_key) = _cgroup_dirs(root / "memory", v1), _V1_FILES
    elif v2 is not None:
        dirs, (limit_file, usage_file, cache_key) = _cgroup_dirs(root, v2), _V2_FILES
    else:
        return None
    rooms = []
    for d in dirs:
        limit = _read_int(d / limit_file)
        if limit is not None and limit < _UNLIMITED:
            used = (_read_int(d / usage_file) or 0) - _stat(d / "memory.stat", cache_key)
            rooms.append(limit - max(0, used))
    return max(0, min(rooms)) if rooms else None


class HostMemoryShort(ValueError):
    """The host lacks the memory the processes would pin (the message gives the numbers)."""


def check_host_memory(per_rank: int, nproc: int, available: int | None = None,
                      reserve: int = PROCESS_RESERVE, least: bool = False) -> None:
    """Refuses up front when ``nproc`` processes, each pinning ``per_rank`` bytes (``least``: at least that,
    one layer input a layer) and using ``reserve`` more, would need more host memory than is ``available``."""
    available = available_host_bytes() if available is None else available
    need = nproc * (per_rank + reserve)
    if need > available:
        pins = "at least" if least else "about"
        layout = " (one layer input a layer, each layer recomputed whole)" if least else ""
        raise HostMemoryShort(
            f"--checkpointing offload: each of {nproc} process{'es' * (nproc > 1)} pins {pins} "
            f"{per_rank / GiB:.1f} GiB of host memory{layout} (+{reserve / GiB:.0f} GiB for the process), "
            f"{need / GiB:.1f} GiB in all, and this host has {available / GiB:.1f} GiB available: lower --batch "
            "or --max-seq-length, use fewer processes, or use --checkpointing true (nothing pinned)")


def host_share_bytes(config, tokens: int, nproc: int, dtype_bytes: int = 2, available: int | None = None,
                     reserve: int = PROCESS_RESERVE) -> int:
    """Each of ``nproc`` processes' share of the host for its offloaded activations (its
    ``OffloadConfig.host_limit_gib``): the available memory split evenly, less each process's ``reserve`` and
    its embedding table. Refuses (HostMemoryShort, with the numbers) where a share could not hold one layer
    input a layer for micro-batches of ``tokens`` tokens."""
    available = available_host_bytes() if available is None else available
    check_host_memory(offload_host_bytes(config, tokens, dtype_bytes, whole_layers=True), nproc, available,
                      reserve, least=True)
    return available // nproc - reserve - embedding_table_bytes(config, dtype_bytes)
