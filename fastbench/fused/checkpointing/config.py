"""What ``use_gradient_checkpointing`` and ``offload`` mean: :class:`CheckpointConfig` and :class:`OffloadConfig`.

Both are frozen and check their values when made, so a bad setting raises before a model is touched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GiB = 1 << 30
MODES = ("keep", "recompute", "offload", "budget")


def _whole_number(name: str, value, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"offload option {name}={value!r}: give a whole number n >= 0 ({meaning})")
    return value


def _gib(name: str, value, meaning: str, zero: bool) -> None:
    """Refuses ``value`` unless it is a finite number of GiB, > 0 (or >= 0 where ``zero``)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value < float("inf")
            or not (value >= 0 if zero else value > 0)):
        raise ValueError(f"offload option {name}={value!r}: give a number of GiB {'>=' if zero else '>'} 0 "
                         f"({meaning})")


def _one_of(name: str, value, meanings: dict) -> object:
    """``value`` as the one of ``meanings``' keys it equals (a bool key also given as 0 or 1); else an error that
    says each (a bool as 0 or 1) and what it means."""
    for allowed in meanings:
        if type(value) in (bool, int) and value == allowed and (type(allowed) is bool or type(value) is not bool):
            return allowed
    raise ValueError(f"offload option {name}={value!r}: give "
                     + " or ".join(f"{int(v)} ({m})" for v, m in meanings.items()))


@dataclass(frozen=True)
class OffloadConfig:
    """The offload mode's settings (``use_gradient_checkpointing="offload"``).

    - ``save_every``: every n-th layer (0: none) keeps its MLP's graph, the activations it saves offloaded to
      pinned host memory too, instead of recomputing that MLP, in forwards of at most ``save_max_tokens``
      tokens (batch x sequence). Longer forwards recompute every MLP, a chunk of tokens at a time: the
      activations an MLP saves grow with the tokens and would come back whole in the backward.
    - ``embedding``: keep an untied, frozen input embedding table in pinned host memory
      (fastbench.fused.host_embedding).
    - ``copy_queue_gib``: the GPU memory that activations on their way to the host may hold while the bus is
      behind the compute; past it the compute stream waits for the oldest copy (the host does not). Less holds
      less memory and may wait more.
    - ``prefetch_groups``: in the backward, how many offloaded groups (a part's inputs) are fetched back ahead of
      their use; 0: as many as together hold the forward's largest group's bytes.
    - ``host_reserve_gib``: the host memory the offload mode leaves available. A forward whose inputs, two a
      layer (the attention's and the MLP's), would leave less offloads each layer's input alone and recomputes
      the whole layer from it (half the host memory; warned once). A new host buffer that would still leave
      less first takes the place of inputs earlier forwards left (a failed step's), else raises
      ``PinnedMemoryShort`` (a ``MemoryError``) that says what to change, rather than the operating system
      killing the process.
    - ``host_limit_gib``: the most host memory this process's offloaded activations may hold (None: no limit but
      the host's, above). A forward whose two inputs a layer would exceed it keeps one a layer, as above, and a
      buffer past it raises ``PinnedMemoryShort``. Processes that share a host each take a share of it
      (``fastbench train --nproc N`` gives each its share), so that each decides alone, and alike, what fits.
    """
    save_every: int = 4
    embedding: bool = True
    copy_queue_gib: float = 0.25
    save_max_tokens: int = 4096
    host_reserve_gib: float = 2.0
    prefetch_groups: int = 0
    host_limit_gib: float | None = None

    def __post_init__(self):
        _whole_number("save_every", self.save_every, "every n-th layer's MLP activations offloaded instead of "
                                                     "recomputed; 0: recompute every layer")
        _whole_number("save_max_tokens", self.save_max_tokens, "the most tokens (batch x sequence) of a forward in "
                                                               "which save_every applies")
        _whole_number("prefetch_groups", self.prefetch_groups, "groups fetched back ahead in the backward; 0: as "
                                                               "many as the forward's largest group's bytes")
        embedding = _one_of("embedding", self.embedding, {
            True: "the input embedding's table in pinned host memory, the default", False: "on the GPU"})
        object.__setattr__(self, "embedding", embedding)
        _gib("copy_queue_gib", self.copy_queue_gib, "the GPU memory activations on their way to the host may hold",
             zero=False)
        _gib("host_reserve_gib", self.host_reserve_gib, "the host memory the offload mode leaves available", zero=True)
        if self.host_limit_gib is not None:
            _gib("host_limit_gib", self.host_limit_gib, "the most host memory this process's offloaded activations "
                                                        "may hold; None: no limit but the host's", zero=False)

    def saves_mlp(self, index: int, tokens: int) -> bool:
        """Whether layer ``index`` of a forward of ``tokens`` tokens keeps its MLP's graph (its activations
        offloaded) instead of recomputing it: every ``save_every``-th layer, in forwards of at most
        ``save_max_tokens`` tokens."""
        return bool(self.save_every) and index % self.save_every == 0 and tokens <= self.save_max_tokens

    @property
    def copy_queue_bytes(self) -> int:
        return int(self.copy_queue_gib * GiB)

    @property
    def host_reserve_bytes(self) -> int:
        return int(self.host_reserve_gib * GiB)

    @property
    def host_limit_bytes(self) -> int | None:
        return None if self.host_limit_gib is None else int(self.host_limit_gib * GiB)

    @classmethod
    def of(cls, value) -> OffloadConfig:
        """``value`` as an OffloadConfig: one already, a dict of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            fields = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(fields), key=str)
            if unknown:
                raise ValueError(f"offload: unknown option(s) {', '.join(map(str, unknown))}; valid: "
                                 + ", ".join(fields))
            return cls(**value)
        raise ValueError(f"offload must be an OffloadConfig or a dict of its fields; got {value!r}")


def parse_setting(setting) -> tuple[str, float | None]:
    """``use_gradient_checkpointing`` -> (mode, budget in bytes or None for "auto"); mode one of :data:`MODES`."""
    if setting is False or setting is None:
        return "keep", None
    if setting is True:
        return "recompute", None
    if setting in ("offload", "unsloth"):  # "unsloth": what Unsloth's users pass for its offloaded checkpointing
        return "offload", None
    if setting == "auto":
        return "budget", None
    if isinstance(setting, str):
        try:
            setting = float(setting)
        except ValueError:
            setting = None
    if isinstance(setting, (int, float)) and setting >= 0:
        return "budget", float(setting) * GiB
    raise ValueError(f"use_gradient_checkpointing must be True, False, 'offload' (or 'unsloth', the same), 'auto' "
                     f"or a budget in GiB; got {setting!r}")


def setting_from_text(text: str | bool):
    """A ``use_gradient_checkpointing`` setting as a command line writes it: "true"/"false" (any case) as the
    booleans, anything else as written ("offload", "auto", a budget in GiB such as "20"); ValueError, naming the
    choices, for what :func:`parse_setting` refuses."""
    setting = text if isinstance(text, bool) else {"true": True, "false": False}.get(str(text).lower(), text)
    try:
        parse_setting(setting)
    except ValueError:
        raise ValueError(f"{text!r}: use true, false, offload, auto or a budget in GiB (e.g. 20)") from None
    return setting


@dataclass(frozen=True)
class CheckpointConfig:
    """Activation checkpointing of the fused decoder layers, one policy for all layers of a model.

    ``mode``: ``"keep"`` (every layer's activations), ``"recompute"`` (each layer's input, the layer recomputed
    in the backward), ``"offload"`` (inputs in pinned host memory, see :class:`OffloadConfig`) or ``"budget"``
    (each step planned so that its peak reserved GPU memory stays within ``budget`` bytes; ``budget`` None:
    what this process can reserve on its GPU, less a margin). ``offload``: the offload mode's settings (the defaults
    when not given); None in the other modes.
    """
    mode: str = "recompute"
    budget: float | None = None
    offload: OffloadConfig | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"checkpointing mode {self.mode!r}: give one of {', '.join(MODES)}")
        if self.budget is not None and (self.mode != "budget" or isinstance(self.budget, bool)
                                        or not isinstance(self.budget, (int, float)) or self.budget < 0):
            raise ValueError(f"checkpointing budget {self.budget!r}: give a number of bytes >= 0, with mode "
                             "'budget' only (None: this GPU's free memory less a margin)")
        if self.mode == "offload":
            object.__setattr__(self, "offload", OffloadConfig.of(self.offload))
        elif self.offload is not None:
            raise ValueError(f"offload settings apply to use_gradient_checkpointing='offload' only; the mode here is "
                             f"{self.mode!r}")

    @classmethod
    def of(cls, use_gradient_checkpointing=True, offload=None) -> CheckpointConfig:
        """The config that ``get_peft_model(use_gradient_checkpointing=..., offload=...)`` means: True, False,
        "offload" (or "unsloth", the same), "auto", a budget in GiB, or a CheckpointConfig already; ``offload``
        an :class:`OffloadConfig` or a dict of its fields, for the offload mode."""
        if isinstance(use_gradient_checkpointing, cls):
            if offload is None:
                return use_gradient_checkpointing
            return dataclasses.replace(use_gradient_checkpointing, offload=OffloadConfig.of(offload))
        mode, budget = parse_setting(use_gradient_checkpointing)
        return cls(mode, budget, None if offload is None else OffloadConfig.of(offload))
