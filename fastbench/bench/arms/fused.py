"""The harness arms ``fused`` (bf16 base) and ``fused-4bit`` (NF4 base), built like ``peft``/``qlora``
(same base weights from the seed, same LoRA init), then run on the fused path.

Option ``ckpt`` (``fused-4bit:ckpt=offload``): ``true`` (recompute every layer), ``false``,
``offload``, ``auto``, or a budget in GiB (``ckpt=40``); without it, the run's gradient_checkpointing
decides (recompute every layer or none). Option ``autotune=off`` serves every kernel its heuristic
default instead of the tuned cache (``fused:autotune=off,fused`` compares the two in one run). With
``ckpt=offload``, the options ``save_every=n``, ``keep_last=n``, ``streams=1|2``, ``whole_layers=0|1`` and
``embedding=0|1`` are the fields of the :class:`~fastbench.OffloadConfig` the arm's model is made with
(``fused-4bit:ckpt=offload:save_every=3`` beside ``fused-4bit:ckpt=offload`` compares it with the default
in one run).
"""
from __future__ import annotations

import os

from fastbench.bench.arms import ArmOption, ArmSpec, RunConfig, one_of, whole_number
from fastbench.bench.arms.hf import base_model, load_4bit

_CKPT = {"true": True, "false": False, "offload": "offload", "auto": "auto"}
# offload-mode options: OffloadConfig's fields
_OFFLOAD_OPTIONS = ("save_every", "keep_last", "streams", "whole_layers", "embedding")


def checkpointing(cfg: RunConfig):
    unknown = set(cfg.arm_options) - {"ckpt", "autotune", *_OFFLOAD_OPTIONS}
    if unknown:
        raise ValueError(f"unknown fused arm option(s) {', '.join(sorted(unknown))}; valid: ckpt, autotune, "
                         + ", ".join(_OFFLOAD_OPTIONS))
    value = cfg.arm_options.get("ckpt")
    for option in set(cfg.arm_options) & set(_OFFLOAD_OPTIONS):
        if (value or "").lower() not in ("offload", "unsloth"):
            raise ValueError(f"fused arm option {option} applies to ckpt=offload only, e.g. "
                             f"fused-4bit:ckpt=offload:{option}=3")
    if value is None:
        return bool(cfg.gradient_checkpointing)
    return _CKPT.get(value.lower(), value)  # else a budget in GiB, checked by CheckpointConfig


def offload_config(cfg: RunConfig):
    """The arm's offload options as an OffloadConfig (whole numbers as ints; what is not one is left for
    OffloadConfig to refuse, saying what to give), or None where none is given."""
    from fastbench.fused.checkpointing import OffloadConfig

    given = {o: cfg.arm_options[o] for o in _OFFLOAD_OPTIONS if o in cfg.arm_options}
    if not given:
        return None
    return OffloadConfig(**{o: int(v) if v.strip().isdigit() else v for o, v in given.items()})


def _fused(load):
    def build(cfg: RunConfig):
        from fastbench.autotune import lookup
        from fastbench.model import FastLanguageModel

        autotune = cfg.arm_options.get("autotune", "on").lower()
        if autotune not in ("on", "off"):
            raise ValueError(f"fused arm option autotune must be on or off, got {autotune!r}")
        if autotune == "off":  # this process runs this arm alone: the switch stays within it
            os.environ[lookup.OFF_ENV] = "off"
            lookup.reset()
        ckpt, offload = checkpointing(cfg), offload_config(cfg)  # offload options checked before the model loads
        model = FastLanguageModel.get_peft_model(
            load(cfg), r=cfg.lora_r, target_modules=list(cfg.targets), lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, use_gradient_checkpointing=ckpt, offload=offload, random_state=cfg.seed,
            fallback=False)  # a fused arm that trained through plain PEFT would measure the wrong thing
        return model.train()

    return build


_OPTIONS = ("option ckpt=true|false|offload|auto|GiB; with offload save_every, keep_last, streams, whole_layers, "
            "embedding")


# The options of both fused arms, checked before any process runs (the build parses them again)
def _ckpt_option(text: str):
    """true, false, offload (or unsloth), auto, or a budget in GiB (a positive number)."""
    words = {"true": True, "false": False, "offload": "offload", "unsloth": "offload", "auto": "auto"}
    if text.lower() in words:
        return words[text.lower()]
    gib = float(text)
    if not 0 < gib < float("inf"):
        raise ValueError(text)
    return gib


_OFFLOAD_SETTINGS = (ArmOption("save_every", "<whole number>", whole_number),
                     ArmOption("keep_last", "<whole number>", whole_number),
                     ArmOption("streams", "1|2", one_of("1", "2")),
                     ArmOption("whole_layers", "0|1", one_of("0", "1")),
                     ArmOption("embedding", "0|1", one_of("0", "1")))
ARM_OPTIONS = (ArmOption("ckpt", "true|false|offload|auto|<GiB>", _ckpt_option),
               ArmOption("autotune", "on|off", one_of("on", "off")), *_OFFLOAD_SETTINGS)


def _offload_only(options: dict) -> None:
    """The offload settings apply with ckpt=offload only."""
    for setting in _OFFLOAD_SETTINGS:
        if setting.name in options and options.get("ckpt") != "offload":
            raise ValueError(f"option {setting.name} applies to ckpt=offload only: write "
                             f"ckpt=offload:{setting.name}={options[setting.name]}")


FUSED = ArmSpec("fused", f"fastbench fused LoRA on the bf16 model ({_OPTIONS})",
                ("peft",), "pip install peft", _fused(base_model), kind="bf16",
                options=ARM_OPTIONS, check_options=_offload_only, packs=True)
FUSED_4BIT = ArmSpec("fused-4bit", f"fastbench fused QLoRA on the NF4 model ({_OPTIONS})",
                     ("peft", "bitsandbytes"), "pip install bitsandbytes", _fused(load_4bit), kind="nf4",
                     options=ARM_OPTIONS, check_options=_offload_only, packs=True)
