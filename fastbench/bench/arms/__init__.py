"""Arms: named ways to build the model that one benchmark process trains.

An arm's ``build(cfg)`` returns the model on ``cfg.device``, in train mode, with LoRA applied, such that
``model(input_ids=..., attention_mask=..., labels=...).loss`` is the training loss; the harness owns
the optimizer (torch AdamW over the parameters that require grad), the data and the timing.

A label names an arm and, after colons, its options: ``fused-4bit:ckpt=offload`` is the arm
``fused-4bit`` with ``cfg.arm_options == {"ckpt": "offload"}`` (values stay strings; the arm parses
them). The full label is what results and reports show.

The arms, listed in :func:`table`: ``peft`` and ``qlora`` (``hf``: Hugging Face PEFT, the baselines),
``liger``, ``liger-qlora``, ``unsloth`` and ``unsloth-qlora`` (``peers``), ``fused`` and ``fused-4bit``
(``fused``: fastbench's fused path). Neither this package nor its modules import torch or transformers at
import time: the worker must be able to import Unsloth before them.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from fastbench.presets import DEFAULT_TARGETS, ModelSource, resolve_model

DTYPES = ("bfloat16", "float16", "float32")


class UnknownArm(ValueError):
    pass


class MissingPackage(ValueError):
    pass


class BadArmOption(UnknownArm):
    pass


@dataclass
class RunConfig:
    """Everything one training process needs; JSON round-trippable via to_dict/from_dict."""

    model: str = "llama-3.2-1b"
    seq_len: int = 2048
    batch: int = 2
    grad_accum: int = 1
    steps: int = 10
    warmup: int = 3
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 2e-4
    seed: int = 0
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    device: str = "cuda"
    pad_fraction: float = 0.0  # mean fraction of each sequence that is right padding (mask 0, label -100)
    profile: bool = False  # after the timed steps, one more step under torch.profiler (fastbench.bench.profile)
    # a data file instead of random tokens (fastbench.bench.file_data); None: random tokens
    data: str | None = None
    data_format: str | None = None  # one of fastbench.train.data.FORMATS; None: detected
    packing: bool = True  # packing arms pack the file's examples into rows (the others always pad)
    text_field: str = "text"
    chat_template: str | None = None  # a fastbench.chat_templates name replacing the tokenizer's
    tokenizer: str | None = None  # a tokenizer directory; None: the model's (a preset's: built from the data)
    arm_options: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown run config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)

    def validate(self) -> ModelSource:
        """Check sizes and the model; returns the resolved model. Raises ValueError saying what is wrong."""
        for name in ("seq_len", "batch", "grad_accum", "steps", "lora_r", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be zero or more, got {self.warmup}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.pad_fraction < 0.5:
            raise ValueError("lora-dropout must be in [0, 1) and pad-fraction in [0, 0.5)")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if not self.targets:
            raise ValueError("targets must name at least one module")
        if self.data is None and (self.data_format or self.chat_template or self.tokenizer):
            raise ValueError("format, chat-template and tokenizer apply to a data file: give --data")
        if self.data is not None and self.pad_fraction:
            raise ValueError("pad-fraction pads random tokens; a data file brings its own padding: drop one")
        source = resolve_model(self.model)
        if self.seq_len > source.max_seq_len:
            raise ValueError(f"seq-len {self.seq_len} is beyond {source.name}'s limit "
                             f"(max_position_embeddings = {source.max_seq_len})")
        return source

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class ArmOption:
    """One option an arm takes after its name (``fused:ckpt=offload``): ``values`` says what may be written
    (messages show it), ``parse`` turns the text into the value the arm uses and raises ValueError if it cannot."""

    name: str
    values: str
    parse: Callable[[str], Any]


def one_of(*words: str) -> Callable[[str], str]:
    """A parser accepting exactly these words (case-insensitive), returned in lower case."""
    def parse(text: str) -> str:
        if text.lower() not in words:
            raise ValueError(text)
        return text.lower()
    return parse


def whole_number(text: str) -> int:
    """0, 1, 2, ... written in decimal digits."""
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


@dataclass(frozen=True)
class ArmSpec:
    name: str
    description: str
    requires: tuple[str, ...]  # importable module names
    install_hint: str
    build: Callable[[RunConfig], Any]
    kind: str = ""  # "bf16" or "nf4": which arms its losses must match; inferred from the name if empty
    import_first: tuple[str, ...] = ()  # modules the worker imports before torch/transformers
    options: tuple[ArmOption, ...] = ()  # what may follow the name in a label
    check_options: Callable[[dict[str, Any]], None] | None = None  # rules across options; ValueError if broken
    packs: bool = False  # trains a data file's examples packed into rows (else padded, batch examples at a time)

    @property
    def loss_kind(self) -> str:
        return self.kind or ("nf4" if "4bit" in self.name or "qlora" in self.name else "bf16")

    def parse_options(self, options: dict[str, str]) -> dict[str, Any]:
        """Each option's value as the arm uses it; BadArmOption naming the option or value and the valid ones."""
        known = {o.name: o for o in self.options}
        valid = ", ".join(f"{o.name}={o.values}" for o in self.options)
        parsed = {}
        for key, text in options.items():
            if key not in known:
                raise BadArmOption(f"arm {self.name!r} has no option {key!r}; "
                                   + (f"valid: {valid}" if valid else "it takes none"))
            try:
                parsed[key] = known[key].parse(text)
            except ValueError:
                raise BadArmOption(f"arm {self.name!r}: {key}={text!r} is not valid; "
                                   f"write {key}={known[key].values}") from None
        if self.check_options is not None:
            try:
                self.check_options(parsed)
            except ValueError as e:
                raise BadArmOption(f"arm {self.name!r}: {e}") from None
        return parsed


@functools.cache
def table() -> dict[str, ArmSpec]:
    """Every arm by name (built on first use: the arm modules import this package)."""
    from fastbench.bench.arms import fused, hf, peers

    specs = (hf.PEFT, hf.QLORA, peers.LIGER, peers.LIGER_QLORA, peers.UNSLOTH, peers.UNSLOTH_QLORA,
             fused.FUSED, fused.FUSED_4BIT)
    return {spec.name: spec for spec in specs}


def arm_names() -> list[str]:
    return sorted(table())


def parse_label(label: str) -> tuple[str, dict[str, str]]:
    """``"fused:ckpt=40"`` -> ``("fused", {"ckpt": "40"})``; a ``#n`` suffix (repeated arm) is dropped."""
    name, *opts = label.split("#")[0].split(":")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise UnknownArm(f"bad arm option {opt!r} in {label!r}: write name:key=value")
        options[key] = value
    return name, options


NPROC_OPTION = "nproc"  # the ranks a job runs as (``fused:nproc=2``); arms that take it train under DDP


def world_size(label: str) -> int:
    """How many ranks the job of ``label`` runs as (its ``nproc`` option; 1 without it)."""
    return int(parse_label(label)[1].get(NPROC_OPTION, 1))


def get_arm(label: str, check_installed: bool = True) -> ArmSpec:
    """The ArmSpec of a label; unknown names list the valid ones, missing packages say how to install."""
    name, _ = parse_label(label)
    if name not in table():
        raise UnknownArm(f"unknown arm {name!r}; valid arms: {', '.join(arm_names())}")
    spec = table()[name]
    if check_installed:
        for module in spec.requires:
            if importlib.util.find_spec(module) is None:
                raise MissingPackage(f"arm {name!r} needs the Python package {module!r}, which is not "
                                     f"installed; install it with: {spec.install_hint}")
    return spec


def check_label(label: str) -> dict[str, Any]:
    """The options of a label parsed and checked against its arm's (before any process runs)."""
    _, options = parse_label(label)
    try:
        return get_arm(label, check_installed=False).parse_options(options)
    except BadArmOption as e:
        raise BadArmOption(f"{e} (in --arms {label.split('#')[0]!r})") from None


def unique_labels(labels: list[str]) -> list[str]:
    """Repeated labels get ``#2``, ``#3``: ``peft,peft`` is an A/A run of ``peft`` and ``peft#2``."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out
