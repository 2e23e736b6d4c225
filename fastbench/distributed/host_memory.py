"""The offload mode's pinned host memory per training process, and a check against the host's memory before
N processes start (each rank has its own offloader and buffers).

What one forward of ``t = batch x seq_len`` tokens puts in host buffers (fastbench.fused.checkpointing), in the
activation dtype's bytes ``b``, for a model of L layers, width h and MLP width i:

- a recomputed layer keeps both its parts' inputs: 2 t h b;
- every n-th layer (``OffloadConfig.save_every``, layers 0, n, 2n, ...) keeps its attention's input
  and its MLP's saved activations instead: the MLP input (its norm recomputed from it) and the gate and up
  projections, t (2h + 2i) b (in forwards of at most ``OffloadConfig.save_max_tokens`` tokens);
- an untied input embedding table (vocab x h x b) with ``OffloadConfig.embedding``.

Buffers are reused from step to step and rounded up by at most 1/8 (the offloader's rounding), so the
bound is 9/8 of the activations plus the table.
"""
from fastbench.fused.checkpointing.config import OffloadConfig

GiB = 1 << 30
ROUNDING = 9 / 8
# host memory a training process uses besides the pinned buffers (Python, torch, CUDA context, the loaded
# model's host copies while loading): kept free per rank by the check
PROCESS_RESERVE = 4 * GiB


def offload_host_bytes(config, tokens: int, dtype_bytes: int = 2, offload: OffloadConfig | None = None) -> int:
    """Upper bound of the pinned host bytes one rank's offload mode holds for micro-batches of ``tokens``
    tokens (batch x sequence length) of a model with transformers ``config``, under the offload settings
    ``offload`` (the defaults when None)."""
    layers, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    layout = offload or OffloadConfig()
    per_token = 0
    for index in range(layers):
        if layout.saves_mlp(index, tokens):
            per_token += 2 * h + 2 * i
        else:
            per_token += 2 * h
    table = 0
    if layout.embedding and not getattr(config, "tie_word_embeddings", False):
        table = config.vocab_size * h * dtype_bytes
    return int(ROUNDING * per_token * tokens * dtype_bytes) + table


def available_host_bytes() -> int:
    """The host memory available to new processes (``MemAvailable`` of /proc/meminfo; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class HostMemoryShort(ValueError):
    """The host lacks the memory the processes would pin (the message gives the numbers)."""


def check_host_memory(per_rank: int, nproc: int, available: int | None = None,
                      reserve: int = PROCESS_RESERVE) -> None:
    """Refuses up front when ``nproc`` processes, each pinning ``per_rank`` bytes and using ``reserve`` more,
    would need more host memory than is ``available``."""
    available = available_host_bytes() if available is None else available
    need = nproc * (per_rank + reserve)
    if need > available:
        raise HostMemoryShort(
            f"--checkpointing offload: each of {nproc} process{'es' * (nproc > 1)} pins about "
            f"{per_rank / GiB:.1f} GiB of host memory (+{reserve / GiB:.0f} GiB for the process), "
            f"{need / GiB:.1f} GiB in all, and this host has {available / GiB:.1f} GiB available: lower --batch "
            "or --max-seq-length, use fewer processes, or use --checkpointing true (nothing pinned)")
