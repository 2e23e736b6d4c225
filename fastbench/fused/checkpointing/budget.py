"""The budget mode's plan (``use_gradient_checkpointing=<GiB>`` or ``"auto"``): which decoder layers keep their
activations, which recompute from inputs kept on the GPU, and which recompute from inputs offloaded to pinned
host memory, so that a step's peak reserved GPU memory stays within the budget.

A step's peak allocated memory is estimated, for k layers kept, m recomputed from inputs on the GPU and o from
inputs on the host (k + m + o = L), as

    resident + optimizer + workspace + factors + k keep + m inputs + [o > 0] queue(o) + max(loss, working(k))

- resident: what is allocated when the first forward starts (weights, buffers, LoRA parameters, the batch);
- optimizer: per trainable parameter its gradient, AdamW's two states, and one more of its size for the
  update's temporaries;
- workspace: the buffer NF4 weights are dequantized into (the largest single weight; see fastbench.kernels.lora);
- factors: the LoRA factors cast to the compute dtype, kept from one step to the next (the model's
  LoraFactorCache), of which the first forward has cast none when ``resident`` is measured;
- keep: the activations one layer's graph saves (measured at the first step); inputs: what a recomputed layer
  keeps, its two parts' inputs;
- queue(o): device memory held by copies to the host while they are on the bus (the plan's offloader holds
  at most two layers' inputs so, QUEUED_LAYERS, the host waiting where the bus falls behind) and a layer's
  inputs fetched ahead;
- loss: the fused cross-entropy's logits chunk and the hidden-state tensors it keeps for the backward;
- working(k): one layer's transient: its gradients (at most its activations' size) and, where a layer is
  recomputed, its activations again;

and the peak reserved memory as allocated * (1 + FRAGMENTATION) + SLACK (the caching allocator's rounding and
fragmentation). The plan keeps the first k layers (the most that fit with every other layer recomputed from
inputs on the GPU, the fastest), and where even recomputing every layer does not fit, offloads the inputs of
the fewest first layers that make it fit (theirs are needed last in the backward, so their copies back have
the most time).

``"auto"``: the budget is the memory this process can reserve on its GPU (free, plus what it reserved already,
within ``torch.cuda.set_per_process_memory_fraction``) less AUTO_MARGIN of it and AUTO_SLACK.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastbench.fused.checkpointing.config import GiB
MiB = 1 << 20
QUEUED_LAYERS = 2  # layers whose inputs the budget's copies to the host may hold on the bus at once
FRAGMENTATION, SLACK = 0.10, 256 * MiB  # reserved <= allocated * (1 + FRAGMENTATION) + SLACK
AUTO_MARGIN, AUTO_SLACK = 0.05, 512 * MiB  # "auto" leaves this much of the memory it could reserve


@dataclass(frozen=True)
class ModelBytes:
    """What a model adds to a step besides its layers' activations, known once it has its adapters:
    ``optimizer`` (gradients, AdamW states and update temporaries of its trainable parameters), ``workspace``
    (its NF4 dequantize buffer), ``vocab`` (the LM head's rows, for the loss's logits chunk; 0: no loss
    counted) and ``factors`` (its LoRA factors cast to the compute dtype, kept between steps)."""
    optimizer: int = 0
    workspace: int = 0
    vocab: int = 0
    factors: int = 0


def optimizer_bytes(params) -> int:
    """Per trainable parameter: its gradient, AdamW's two states and one temporary, each of its size."""
    return sum(4 * p.numel() * p.element_size() for p in params if p.requires_grad)


def loss_bytes(tokens: int, hidden: int, vocab: int, element_size: int) -> int:
    """The fused linear cross-entropy's memory beside the activations: its logits chunk, its loss rows (fp32)
    and three [tokens, hidden] tensors (the final norm's input, its output, the hidden-state gradient)."""
    from fastbench.kernels.linear_cross_entropy import rows_per_chunk

    if not vocab or not tokens:
        return 0
    chunk = min(rows_per_chunk(tokens, vocab, element_size), tokens) * vocab * element_size
    return chunk + tokens * (4 + 3 * hidden * element_size)


@dataclass(frozen=True)
class StepBytes:
    """The byte counts a plan is made from, for one step's batch (see the module's formula). ``fixed``:
    resident + optimizer + workspace + factors; ``keep``, ``inputs``: per layer; ``margins``: whether reserved memory
    exceeds allocated (on a GPU; False on a CPU, where the counts are the tensors' bytes)."""
    layers: int
    fixed: int
    keep: int
    inputs: int
    loss: int = 0
    margins: bool = True

    @property
    def queue_limit(self) -> int:
        """The device bytes the plan's copies to the host may hold on the bus (the offloader's bound)."""
        return QUEUED_LAYERS * self.inputs

    def allocated(self, keep: int, offload: int) -> int:
        recompute = self.layers - keep - offload
        queue = min(self.queue_limit, offload * self.inputs) + self.inputs if offload else 0
        working = self.keep * (1 if keep == self.layers else 2)
        return self.fixed + keep * self.keep + recompute * self.inputs + queue + max(self.loss, working)

    def reserved(self, keep: int, offload: int) -> int:
        allocated = self.allocated(keep, offload)
        return int(allocated * (1 + FRAGMENTATION) + SLACK) if self.margins else allocated


@dataclass(frozen=True)
class Plan:
    """The first ``keep`` layers keep their activations, the next ``offload`` recompute from inputs on the
    host, the rest (``recompute``) from inputs on the GPU; ``reserved``: the estimated peak reserved bytes;
    ``fits``: within the budget (else the plan that needs the least); ``reserved`` 0: not estimated (a budget
    without bound)."""
    keep: int
    offload: int
    recompute: int
    reserved: int
    fits: bool = True

    def kind(self, index: int) -> str:
        """What layer ``index`` does: "keep", "offload" or "recompute"."""
        return "keep" if index < self.keep else "offload" if index < self.keep + self.offload else "recompute"

    def describe(self) -> str:
        return (f"{self.keep} layers kept, {self.recompute} recomputed from inputs on the GPU, {self.offload} from "
                "inputs offloaded to pinned CPU memory"
                + (f"; about {self.reserved / GiB:.1f} GiB reserved at the peak" if self.reserved else "")
                + ("" if self.fits else " (over the budget: nothing fits it)"))


def plan(budget: float, step: StepBytes) -> Plan:
    """The fastest plan whose estimated peak reserved memory is within ``budget`` bytes: the most layers kept
    with the rest recomputed from inputs on the GPU; else none kept and the fewest layers' inputs offloaded;
    else (nothing fits) every layer's inputs offloaded, ``fits`` False."""
    L = step.layers
    for keep in range(L, -1, -1):
        if step.reserved(keep, 0) <= budget:
            return Plan(keep, 0, L - keep, step.reserved(keep, 0))
    for offload in range(1, L + 1):
        if step.reserved(0, offload) <= budget:
            return Plan(0, offload, L - offload, step.reserved(0, offload))
    return Plan(0, L, 0, step.reserved(0, L), fits=False)


def auto_budget(device) -> float:
    """The bytes ``"auto"`` plans within on ``device``: what this process can reserve there (the free memory
    plus what it reserved already, at most its share under ``torch.cuda.set_per_process_memory_fraction``),
    less AUTO_MARGIN of it and AUTO_SLACK."""
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)
    available = min(free + torch.cuda.memory_reserved(device), int(total * fraction))
    return available * (1 - AUTO_MARGIN) - AUTO_SLACK
