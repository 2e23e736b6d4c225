"""Embedding lookup's forward: out[i, :] = table[ids[i], :].

The table may lie in page-locked (pinned) host memory: with unified addressing the GPU reads such memory
directly, each program fetching its rows over the bus, so a frozen embedding table need not occupy GPU
memory (the offloaded checkpointing mode keeps it on the host; fastbench.fused.host_embedding). Reading the
rows of 4,096 tokens of a 4,096-wide bf16 table moves 32 MiB, about 0.6 ms over PCIe 5.

No backward: the tables it serves are frozen, and ids have no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbench.autotune.lookup import config_for
from fastbench.autotune.spec import OpSpec, TuneCase
from fastbench.kernels._tensors import cdiv, dtype_name, next_power_of_2


@triton.jit
def _embedding_gather_kernel(ids_ptr, table_ptr, out_ptr, n_rows, n_cols, stride_table,
                             BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    src = table_ptr + ids[:, None] * stride_table
    dst = out_ptr + rows.to(tl.int64)[:, None] * n_cols
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        tl.store(dst + cols[None, :], tl.load(src + cols[None, :], mask=mask), mask=mask)


def _gather(ids: torch.Tensor, table: torch.Tensor, device: torch.device, config) -> torch.Tensor:
    """ids: contiguous 1-D integer ids on ``device``; table: [V, n] with unit last stride, on ``device`` or
    pinned on the host; returns [len(ids), n] on ``device``."""
    out = torch.empty((ids.numel(), table.shape[1]), dtype=table.dtype, device=device)
    meta = dict(config)
    _embedding_gather_kernel[(cdiv(ids.numel(), meta["BLOCK_ROWS"]),)](
        ids, table, out, ids.numel(), table.shape[1], table.stride(0), **meta)
    return out


def embedding_gather(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` (shape ids.shape + [n]) on ids' device, where ``table`` [V, n] lies on that device or in
    pinned host memory. An id outside [0, V) fails a device-side assert (as torch's lookup does; a
    RuntimeError on the CPU) instead of reading memory beyond the table."""
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"embedding_gather needs a 2-D table with unit last stride, got shape "
                         f"{tuple(table.shape)} strides {table.stride()}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"embedding_gather needs integer ids (int32 or int64), got {ids.dtype}")
    if table.device != ids.device and not (table.device.type == "cpu" and table.is_pinned()):
        raise ValueError(f"embedding_gather: the table is on {table.device} and the ids on {ids.device}; a table "
                         "off the ids' device must be in pinned host memory")
    flat = ids.reshape(-1).contiguous()
    torch._assert_async(((flat >= 0) & (flat < table.shape[0])).all(),
                        f"embedding_gather: ids must lie in [0, {table.shape[0]})")
    config = config_for(SPEC, "fwd", _problem(table.dtype, table.shape[1], flat.numel()))
    return _gather(flat, table, ids.device, config).view(*ids.shape, table.shape[1])


def reference(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The oracle: torch's embedding lookup."""
    return torch.nn.functional.embedding(ids, table)


# --- launch configs -------------------------------------------------------------------------------

def _problem(dtype: torch.dtype, hidden: int, rows: int) -> dict:
    return {"dtype": dtype_name(dtype), "hidden": hidden, "tokens": rows}


CANDIDATES = {"fwd": [{"BLOCK_ROWS": r, "BLOCK_N": n, "num_warps": w, "num_stages": 1}
                      for r in (1, 2, 4, 8) for n in (512, 1024, 2048, 4096) for w in (2, 4, 8)]}


def heuristic(pass_name: str, problem) -> dict:
    """A few rows per program, the row in blocks of up to 2,048 elements, ~16 elements per thread."""
    block_n = min(2048, next_power_of_2(problem["hidden"]))
    rows = max(1, min(8, 4096 // block_n))
    return {"BLOCK_ROWS": rows, "BLOCK_N": block_n, "num_warps": max(2, min(8, rows * block_n // 512)),
            "num_stages": 1}


def problems(model_config, tokens: int, dtype) -> list[tuple[str, dict]]:
    """The input embedding's lookup of a step."""
    return [("fwd", _problem(dtype, model_config.hidden_size, tokens))]


def tune_case(pass_name: str, problem, device) -> TuneCase:
    """Random ids into a random table on the device (the host table's reads are bound by the bus)."""
    dtype = getattr(torch, problem["dtype"])
    table = torch.randn(4096, problem["hidden"], device=device, dtype=dtype)
    ids = torch.randint(0, table.shape[0], (problem["tokens"],), device=device)
    return TuneCase(lambda config: _gather(ids, table, torch.device(device), config), reference(ids, table), 0.0)


SPEC = OpSpec("embedding_gather", CANDIDATES, heuristic, tune_case=tune_case, problems=problems,
              kernels=(_embedding_gather_kernel,))
