"""What a fused model carries: :class:`FusedState`, on its decoder stack (``model.get_decoder()._fastbench``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastbench.fused.checkpointing import CheckpointConfig, HostOffloader, LayerCheckpointing
    from fastbench.fused.decoder import Family
    from fastbench.kernels.lora import LoraFactorCache


@dataclass
class FusedState:
    """A fused model's architecture family, its checkpointing (the :class:`CheckpointConfig` it was made with
    and the policy that applies it) and its LoRA factor cache."""
    family: Family
    checkpointing: LayerCheckpointing
    lora_cache: LoraFactorCache = field(repr=False)

    @property
    def config(self) -> CheckpointConfig:
        return self.checkpointing.config

    @property
    def offloader(self) -> HostOffloader | None:
        """The offload mode's copier (its counter ``queue_waits`` and ``timed_waits()``), else None."""
        return self.checkpointing.offloader


def fused_state(model) -> FusedState | None:
    """The :class:`FusedState` of a model from ``FastLanguageModel.get_peft_model`` (the PeftModel or the causal
    LM inside it), or None where it does not run fused."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return getattr(decoder, "_fastbench", None)


def checkpointing_plan(model) -> str | None:
    """In words, the plan of the last step of a fused model in the budget mode (``use_gradient_checkpointing``
    "auto" or a budget in GiB): how many layers kept their activations, were recomputed, or recomputed from
    inputs in host memory, which depends on the batch and, with "auto", on the card's free memory; else None."""
    state = fused_state(model)
    plan = state.checkpointing.plan if state is not None else None
    return plan.describe() if plan is not None else None
