"""Which decoder layers keep their activations, recompute, or offload: :class:`LayerCheckpointing`, the policy
a :class:`CheckpointConfig` sets, applied layer by layer at each forward (in the budget mode, as planned for
each forward's batch by fastbench.fused.checkpointing.budget from what the first step measured)."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from fastbench.fused.checkpointing import budget as budgeting
from fastbench.fused.checkpointing.config import GiB, CheckpointConfig
from fastbench.fused.checkpointing.context import chain
from fastbench.fused.checkpointing.offload import HostOffloader, offloading_saved
from fastbench.fused.checkpointing.recompute import RecomputedUnit

# (fn, its trainable parameters or a callable returning them); fn(x, context) -> y, context a PartContext
Part = tuple[Callable, "Sequence[torch.Tensor] | Callable"]


class LayerCheckpointing:
    """Runs each decoder layer of a forward under a :class:`CheckpointConfig`. ``layers``: the model's decoder
    layer count, and ``model``: its :class:`~fastbench.fused.checkpointing.budget.ModelBytes` (both for the
    budget mode's plan). ``offloader``: the model's :class:`HostOffloader` in the offload mode (in the budget
    mode, made once a plan offloads), else None. ``plan``: the budget mode's plan for the last forward."""

    def __init__(self, config: CheckpointConfig, layers: int | None = None,
                 model: budgeting.ModelBytes | None = None):
        self.config = config
        self.mode = config.mode
        self.budget = config.budget  # bytes; "auto" (None) is decided at the first step
        offload = config.offload
        self.offloader = (HostOffloader(offload.copy_queue_bytes, offload.host_reserve_bytes,
                                        offload.prefetch_groups, offload.host_limit_bytes) if offload is not None
                          else None)
        self._slot = 0  # the next offload slot of this forward
        # offload mode: every n-th layer (0: none) keeps its last part's graph, with the activations that part
        # saves offloaded, instead of recomputing it
        self.save_last_every = offload.save_every if offload is not None else 0
        self.layers = layers
        self.model = model or budgeting.ModelBytes()
        self.plan: budgeting.Plan | None = None
        self._resident: int | None = None  # budget mode: bytes allocated when the first forward started
        self._keep_per_token: float | None = None  # budget mode: bytes a kept layer saves per token
        self._warned = False
        self._whole_layers = False  # offload mode: this forward recomputes each layer whole (host memory short)
        self._warned_host = False

    def __call__(self, index: int, x: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        """Layer ``index`` of a forward, given as consecutive parts ``[(fn, params), ...]`` (x -> fn_1(x, context)
        -> fn_2(..., context) ...), under the policy; ``params``: the part's trainable parameters, or a callable
        returning them (asked for only when the part is recomputed)."""
        if self.mode == "keep" or not torch.is_grad_enabled():
            return chain((fn for fn, _ in parts), x)
        if index == 0:
            self._slot = 0
        offloader = self.offloader
        if self.mode == "budget":
            if index == 0:
                self.plan = self._plan(x, parts)
            kind = self.plan.kind(index)
            if kind == "keep":
                return chain((fn for fn, _ in parts), x)
            offloader = self.offloader if kind == "offload" else None
        if index == 0 and self.mode == "offload":
            self._whole_layers = self._host_short(x, len(parts))
        whole = self.mode == "recompute" or self._whole_layers
        saved_last = (self.mode == "offload" and not whole
                      and self.config.offload.saves_mlp(index, x.shape[:-1].numel()))
        units = [parts] if whole else [[part] for part in parts]
        for unit in units[:-1] if saved_last else units:
            params = [t for _, p in unit for t in (p() if callable(p) else p)]
            slot = self._next_slot() if offloader is not None else None
            x = RecomputedUnit.apply(tuple(fn for fn, _ in unit), offloader, slot, x, *params)
        if saved_last:
            x = offloading_saved(units[-1][0][0], x, offloader, self._next_slot)
        return x

    def _host_short(self, x: torch.Tensor, parts: int) -> bool:
        """Offload mode, at a forward's first layer: whether the inputs of every layer's ``parts`` parts (each
        the size of ``x``) would not fit the host memory the offloader may use. Each layer is then recomputed
        whole from its input alone: 1/parts of the host memory, at the cost of recomputing its first parts too
        (warned once)."""
        if self.layers is None or parts < 2:
            return False
        need, room = self.layers * parts * x.nbytes, self.offloader.host_room_bytes()
        if need <= room:
            return False
        if not self._warned_host:
            self._warned_host = True
            limit = self.offloader.host_limit_bytes
            bound = ("this process's limit, OffloadConfig.host_limit_gib" if limit is not None and room == limit
                     else "less OffloadConfig.host_reserve_gib")
            warnings.warn(f"fastbench: offloaded checkpointing: a forward of {x.shape[:-1].numel()} tokens would "
                          f"keep {_size(need)} of layer inputs in host memory ({parts} a layer) and "
                          f"{_size(max(room, 0))} is free for them ({bound}): each "
                          f"layer's input alone goes to the host ({_size(need // parts)}) and the whole layer is "
                          "recomputed from it, while the host is this short", stacklevel=4)
        return True

    def _next_slot(self) -> int:
        self._slot += 1
        return self._slot - 1

    def _plan(self, x: torch.Tensor, parts) -> budgeting.Plan:
        """The budget mode's plan for a forward whose first layer's input is ``x``; at the first forward,
        measures what is resident and what a kept layer saves (the first layer run once, its graph then
        dropped), and decides "auto"'s budget."""
        if self.budget is None:  # "auto"
            self.budget = budgeting.auto_budget(x.device) if x.is_cuda else float("inf")
        if self.layers is None:
            raise ValueError("the budget mode plans over the model's decoder layers: give LayerCheckpointing "
                             "their number (layers=...)")
        if self.budget == float("inf"):
            return budgeting.Plan(self.layers, 0, 0, 0)
        if self._keep_per_token is None:
            self._resident = torch.cuda.memory_allocated(x.device) if x.is_cuda else 0
            self._keep_per_token = _saved_bytes(parts, x) / x.shape[:-1].numel()
        tokens = x.shape[:-1].numel()
        model = self.model
        step = budgeting.StepBytes(
            layers=self.layers, fixed=self._resident + model.optimizer + model.workspace + model.factors,
            keep=int(self._keep_per_token * tokens), inputs=2 * x.nbytes,
            loss=budgeting.loss_bytes(tokens, x.shape[-1], model.vocab, x.element_size()), margins=x.is_cuda)
        plan = budgeting.plan(self.budget, step)
        if plan.offload:
            self.offloader = self.offloader or HostOffloader()
            self.offloader.max_copying_bytes = step.queue_limit
        if not plan.fits and not self._warned:
            self._warned = True
            warnings.warn(f"fastbench: use_gradient_checkpointing={self._budget_words()}: a step of {tokens} tokens "
                          f"needs about {_size(plan.reserved)} of GPU memory even with every layer's inputs "
                          "offloaded to pinned CPU memory; training on so (it may run out of memory)", stacklevel=4)
        return plan

    def _budget_words(self) -> str:
        if self.config.budget is None:
            return f"'auto' (a budget of {_size(self.budget)}, this GPU's free memory less a margin)"
        return f"{self.config.budget / GiB:g} (GiB)"

    def describe(self) -> str:
        """The policy in words, for ``fastbench_patches``."""
        n = self.save_last_every
        budget = "this GPU's free memory (less a margin)" if self.config.budget is None else \
            f"{self.config.budget / GiB:g} GiB"
        offload = ("recompute every layer, inputs" if not n else
                   "recompute every layer's attention, inputs and every MLP's activations" if n == 1 else
                   f"recompute every layer but every {_ordinal(n)} layer's MLP, inputs and those MLPs' activations")
        if n:
            offload = (f"in forwards of at most {self.config.offload.save_max_tokens} tokens {offload}; in longer "
                       "ones recompute every layer, inputs")
        return {"keep": "no activation checkpointing", "recompute": "recompute every layer",
                "offload": f"{offload} offloaded to pinned CPU memory (where the host is short of memory for "
                           "them, each layer's input alone, the layer recomputed whole)",
                "budget": f"plan each step within a budget of {budget} of reserved GPU memory (weights, optimizer "
                          "state, activations, loss, workspace, cast LoRA factors): keep the first layers' "
                          "activations, recompute the rest, from inputs offloaded to pinned CPU memory where even "
                          "that does not fit"}[self.mode]


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def _saved_bytes(parts, x: torch.Tensor) -> int:
    """The bytes a layer's graph saves for its backward (parameters aside, each storage once), measured by
    running the layer's parts on a copy of ``x`` that requires a gradient (as a layer's input inside the
    model does); the graph is dropped at once."""
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chain((fn for fn, _ in parts), x.detach().requires_grad_())
    return sum(storages.values())


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
