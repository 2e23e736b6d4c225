"""Which decoder layers keep their activations, recompute, or offload: :class:`LayerCheckpointing`, the policy
a :class:`CheckpointConfig` sets, applied layer by layer at each forward (and, in the budget mode, the bytes a
layer saves, measured at the first step)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fastbench.fused.checkpointing.config import GiB, CheckpointConfig
from fastbench.fused.checkpointing.context import chain
from fastbench.fused.checkpointing.offload import HostOffloader, offloading_saved
from fastbench.fused.checkpointing.recompute import RecomputedUnit

# (fn, its trainable parameters or a callable returning them); fn(x, context) -> y, context a PartContext
Part = tuple[Callable, "Sequence[torch.Tensor] | Callable"]


class LayerCheckpointing:
    """Runs each decoder layer of a forward under a :class:`CheckpointConfig`; in the offload mode, owns the
    model's :class:`HostOffloader` (``offloader``, None in the other modes)."""

    def __init__(self, config: CheckpointConfig, layers: int | None = None):
        self.config = config
        self.mode = config.mode
        self.budget = config.budget  # bytes; "auto" (None) is decided at the first step
        offload = config.offload
        self.offloader = HostOffloader() if offload is not None else None
        self.bytes_per_token: float | None = None  # measured by the budget mode
        self._kept = 0
        self._slot = 0  # the next offload slot of this forward
        # offload mode: every n-th layer (0: none) keeps its last part's graph, with the activations that part
        # saves offloaded, instead of recomputing it
        self.save_last_every = offload.save_every if offload is not None else 0
        self.layers = layers

    def __call__(self, index: int, x: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        """Layer ``index`` of a forward, given as consecutive parts ``[(fn, params), ...]`` (x -> fn_1(x, context)
        -> fn_2(..., context) ...), under the policy; ``params``: the part's trainable parameters, or a callable
        returning them (asked for only when the part is recomputed)."""
        if self.mode == "keep" or not torch.is_grad_enabled():
            return chain((fn for fn, _ in parts), x)
        if self.mode == "budget":
            if index == 0:
                self._kept = 0
            if self.bytes_per_token is None:
                return self._measure(parts, x)
            if (self._kept + 1) * self.bytes_per_token * x.shape[:-1].numel() <= self._budget(x):
                self._kept += 1
                return chain((fn for fn, _ in parts), x)
        if index == 0:
            self._slot = 0
        saved_last = self.offloader is not None and self.save_last_every and index % self.save_last_every == 0
        units = [parts] if self.mode == "recompute" else [[part] for part in parts]
        for unit in units[:-1] if saved_last else units:
            params = [t for _, p in unit for t in (p() if callable(p) else p)]
            x = RecomputedUnit.apply(tuple(fn for fn, _ in unit), self.offloader, self._next_slot(), x, *params)
        if saved_last:
            x = offloading_saved(units[-1][0][0], x, self.offloader, self._next_slot)
        return x

    def _next_slot(self) -> int:
        self._slot += 1
        return self._slot - 1

    def _budget(self, x) -> float:
        if self.budget is None:  # "auto", decided once at the first step
            if x.is_cuda:
                free, _ = torch.cuda.mem_get_info(x.device)
                self.budget = 0.7 * (free + torch.cuda.memory_reserved(x.device)
                                     - torch.cuda.memory_allocated(x.device))
            else:
                self.budget = float("inf")
        return self.budget

    def _measure(self, parts, x) -> torch.Tensor:
        storages = {}

        def pack(t):
            if isinstance(t, torch.nn.Parameter):
                return t
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = chain((fn for fn, _ in parts), x)
        self.bytes_per_token = sum(storages.values()) / x.shape[:-1].numel()
        self._kept = 1
        return y

    def describe(self) -> str:
        """The policy in words, for ``fastbench_patches``."""
        n = self.save_last_every
        budget = "auto" if self.config.budget is None else f"{self.config.budget / GiB:g}"
        offload = ("recompute every layer, inputs" if not n else
                   "recompute every layer's attention, inputs and every MLP's activations" if n == 1 else
                   f"recompute every layer but every {_ordinal(n)} layer's MLP, inputs and those MLPs' activations")
        return {"keep": "no activation checkpointing", "recompute": "recompute every layer",
                "offload": f"{offload} offloaded to pinned CPU memory",
                "budget": f"keep layers within a budget of {budget} GiB, recompute the rest"}[self.mode]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
