"""Arms: named ways to build the model that one benchmark process trains.

An arm's ``build(cfg)`` returns the model on ``cfg.device``, in train mode, with LoRA applied, such that
``model(input_ids=..., attention_mask=..., labels=...).loss`` is the training loss; the harness owns
the optimizer (torch AdamW over the parameters that require grad), the data and the timing.

A label names an arm and, after colons, its options: ``fused-4bit:ckpt=offload`` is the arm
``fused-4bit`` with ``cfg.arm_options == {"ckpt": "offload"}`` (values stay strings; the arm parses
them). The full label is what results and reports show. Arms registered outside this module (the
fused ones) live in ``fastbench.fused_arms``, imported on the first lookup that needs it.

This module imports no torch or transformers at import time: the worker must be able to import
Unsloth before them.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastbench.presets import DEFAULT_TARGETS, ModelSource, resolve_model, save_checkpoint

DTYPES = ("bfloat16", "float16", "float32")


class UnknownArm(ValueError):
    pass


class MissingPackage(ValueError):
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
class ArmSpec:
    name: str
    description: str
    requires: tuple[str, ...]  # importable module names
    install_hint: str
    build: Callable[[RunConfig], Any]
    kind: str = ""  # "bf16" or "nf4": which arms its losses must match; inferred from the name if empty
    import_first: tuple[str, ...] = ()  # modules the worker imports before torch/transformers

    @property
    def loss_kind(self) -> str:
        return self.kind or ("nf4" if "4bit" in self.name or "qlora" in self.name else "bf16")


_REGISTRY: dict[str, ArmSpec] = {}
_PLUGINS = ("fastbench.fused_arms",)
_plugins_loaded = False


def register_arm(spec: ArmSpec) -> ArmSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGINS:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def arm_names() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


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


def get_arm(label: str, check_installed: bool = True) -> ArmSpec:
    """The ArmSpec of a label; unknown names list the valid ones, missing packages say how to install."""
    name, _ = parse_label(label)
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise UnknownArm(f"unknown arm {name!r}; valid arms: {', '.join(arm_names())}")
    spec = _REGISTRY[name]
    if check_installed:
        for module in spec.requires:
            if importlib.util.find_spec(module) is None:
                raise MissingPackage(f"arm {name!r} needs the Python package {module!r}, which is not "
                                     f"installed; install it with: {spec.install_hint}")
    return spec


def unique_labels(labels: list[str]) -> list[str]:
    """Repeated labels get ``#2``, ``#3``: ``peft,peft`` is an A/A run of ``peft`` and ``peft#2``."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


# ---- helpers for builders (public: the fused arms use them too) ----

materialize_seconds = 0.0  # time spent writing preset checkpoints in this process (not load time)


def checkpoint_path(cfg: RunConfig) -> str:
    """A directory holding cfg.model as a Hugging Face checkpoint: the path itself, or the preset's
    random weights (built on cfg.device from cfg.seed, so identical to :func:`base_model`) written
    once under $FASTBENCH_CHECKPOINT_CACHE (default: the system temp dir)."""
    global materialize_seconds
    source = resolve_model(cfg.model)
    if source.path:
        return source.path
    root = os.environ.get("FASTBENCH_CHECKPOINT_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                       "fastbench-checkpoints")
    directory = os.path.join(root, f"{source.name}-{cfg.dtype}-seed{cfg.seed}")
    if not os.path.isdir(directory):
        t0 = time.perf_counter()
        save_checkpoint(source.preset, directory, dtype=cfg.torch_dtype, device=cfg.device, seed=cfg.seed)
        materialize_seconds += time.perf_counter() - t0
        import torch

        if torch.cuda.is_available():  # writing the checkpoint is not the arm's memory
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return directory


def _concrete_device(cfg: RunConfig):
    """cfg.device with its index ("cuda" -> "cuda:<current>"), as loaders with a device_map want it."""
    import torch

    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def base_model(cfg: RunConfig):
    """The bf16 (cfg.dtype) base model with SDPA attention on cfg.device, in train mode."""
    from transformers import AutoModelForCausalLM

    from fastbench.presets import build_model

    source = resolve_model(cfg.model)
    if source.preset:
        model = build_model(source.preset, dtype=cfg.torch_dtype, device=cfg.device, seed=cfg.seed)
    elif source.prequantized_4bit:
        raise ValueError(f"{cfg.model} is a 4-bit checkpoint; use a 4-bit arm (qlora, ...) with it")
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=cfg.torch_dtype,
                                                     device_map={"": _concrete_device(cfg)},
                                                     attn_implementation="sdpa")
    model.config.use_cache = False
    return model.train()


def load_4bit(cfg: RunConfig):
    """The base model quantized to NF4 with double quantization on load (bitsandbytes through
    transformers), or a pre-quantized bitsandbytes checkpoint as it is."""
    from transformers import AutoModelForCausalLM

    from fastbench.model import nf4_config

    path = checkpoint_path(cfg)
    quant = {} if resolve_model(cfg.model).prequantized_4bit else {"quantization_config": nf4_config(cfg.torch_dtype)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.torch_dtype, attn_implementation="sdpa",
                                                 device_map={"": _concrete_device(cfg)}, **quant)
    model.config.use_cache = False
    return model


def apply_lora(model, cfg: RunConfig):
    """PEFT LoRA on cfg.targets, initialised from cfg.seed (so every PEFT arm starts identical)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora).train()


_CKPT_KWARGS = {"use_reentrant": True}  # transformers' default, stated (torch asks for it explicitly)


def build_peft(cfg: RunConfig):
    model = base_model(cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CKPT_KWARGS)
        model.enable_input_require_grads()
    return apply_lora(model, cfg)


def build_qlora(cfg: RunConfig):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(load_4bit(cfg), use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs=_CKPT_KWARGS)
    return apply_lora(model, cfg)


def _with_liger(build: Callable[[RunConfig], Any]) -> Callable[[RunConfig], Any]:
    def build_liger(cfg: RunConfig):
        import liger_kernel.transformers as liger

        model_type = resolve_model(cfg.model).model_type
        apply = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
        if apply is None:
            raise ValueError(f"liger_kernel has no patch for model type {model_type!r}")
        apply()  # class-level patch (RMSNorm, RoPE, SwiGLU/GeGLU, fused linear cross-entropy); own process
        return build(cfg)

    return build_liger


def _unsloth(load_in_4bit: bool) -> Callable[[RunConfig], Any]:
    def build_unsloth(cfg: RunConfig):
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=checkpoint_path(cfg), max_seq_length=cfg.seq_len,
                                                     dtype=cfg.torch_dtype, load_in_4bit=load_in_4bit)
        ckpt = cfg.arm_options.get("ckpt", "unsloth") if cfg.gradient_checkpointing else False
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.targets), bias="none", use_gradient_checkpointing=ckpt,
            random_state=cfg.seed)
        return model.train()

    return build_unsloth


_BNB_HINT = "pip install bitsandbytes"
_LIGER_HINT = "pip install liger-kernel"
_UNSLOTH_HINT = "pip install unsloth (needs a CUDA GPU)"

for _spec in (
    ArmSpec("peft", "PEFT LoRA on the bf16 model (HF, SDPA, activation checkpointing)", ("peft",),
            "pip install peft", build_peft),
    ArmSpec("qlora", "PEFT + bitsandbytes NF4 (double quant) QLoRA, prepare_model_for_kbit_training",
            ("peft", "bitsandbytes"), _BNB_HINT, build_qlora),
    ArmSpec("liger", "Liger kernels + PEFT LoRA bf16", ("peft", "liger_kernel"), _LIGER_HINT,
            _with_liger(build_peft)),
    ArmSpec("liger-qlora", "Liger kernels + PEFT + bitsandbytes QLoRA", ("peft", "bitsandbytes", "liger_kernel"),
            _LIGER_HINT, _with_liger(build_qlora)),
    ArmSpec("unsloth", "Unsloth LoRA on the bf16 model", ("unsloth",), _UNSLOTH_HINT, _unsloth(False),
            import_first=("unsloth",)),
    ArmSpec("unsloth-qlora", "Unsloth QLoRA (NF4)", ("unsloth", "bitsandbytes"), _UNSLOTH_HINT, _unsloth(True),
            import_first=("unsloth",)),
):
    register_arm(_spec)
