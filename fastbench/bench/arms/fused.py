"""The harness arms ``fused`` (bf16 base) and ``fused-4bit`` (NF4 base), built like ``peft``/``qlora``
(same base weights from the seed, same LoRA init), then run on the fused path. On a data file they train
packed rows (fastbench.bench.file_data).

Options, after the name:

- ``ckpt``: ``true`` (recompute every layer), ``false``, ``offload`` (or ``unsloth``, the same), ``auto``, or a
  budget in GiB (``ckpt=40``); without it, the run's gradient_checkpointing decides (every layer or none).
- ``autotune=off``: every kernel gets its heuristic default instead of the tuned cache
  (``fused:autotune=off,fused`` compares the two in one run).
- ``nproc=N``: the job runs as N ranks, one process and GPU each, under torch.distributed (DDP over the LoRA
  gradients, fastbench.distributed), each rank ``batch`` rows per micro-batch (``compare --nproc N`` adds it).
- with ``ckpt=offload``: ``save_every=n``, ``embedding=0|1``, ``copy_queue_gib=GiB``, ``save_max_tokens=n``,
  ``prefetch_groups=n`` and ``host_limit_gib=GiB`` (each rank's, with ``nproc``),
  the fields of the :class:`~fastbench.OffloadConfig` the arm's model is made with
  (``fused-4bit:ckpt=offload:save_every=3`` beside ``fused-4bit:ckpt=offload`` compares it with the default in
  one run).

The options are parsed by the arms' ArmSpec alone: checked so before any process runs, and the build
uses what that parse gives.
"""
from __future__ import annotations

import os

from fastbench.bench.arms import NPROC_OPTION, ArmOption, ArmSpec, RunConfig, one_of, whole_number
from fastbench.bench.arms.hf import base_model, load_4bit
from fastbench.presets import resolve_model


def _gib(text: str) -> float:
    """A positive, finite number of GiB."""
    gib = float(text)
    if not 0 < gib < float("inf"):
        raise ValueError(text)
    return gib


def _ckpt_option(text: str):
    """true, false, offload (or unsloth), auto, or a budget in GiB (a positive number)."""
    words = {"true": True, "false": False, "offload": "offload", "unsloth": "offload", "auto": "auto"}
    if text.lower() in words:
        return words[text.lower()]
    return _gib(text)


_OFFLOAD_SETTINGS = (ArmOption("save_every", "<whole number>", whole_number),
                     ArmOption("embedding", "0|1", lambda text: one_of("0", "1")(text) == "1"),
                     ArmOption("copy_queue_gib", "<GiB>", _gib),
                     ArmOption("save_max_tokens", "<whole number>", whole_number),
                     ArmOption("prefetch_groups", "<whole number>", whole_number),
                     ArmOption("host_limit_gib", "<GiB>", _gib))
ARM_OPTIONS = (ArmOption("ckpt", "true|false|offload|auto|<GiB>", _ckpt_option),
               ArmOption("autotune", "on|off", one_of("on", "off")), *_OFFLOAD_SETTINGS,
               ArmOption(NPROC_OPTION, "<whole number>", whole_number))


def _check_options(options: dict) -> None:
    """The offload settings apply with ckpt=offload only; a job has one rank or more."""
    if options.get(NPROC_OPTION) == 0:
        raise ValueError(f"{NPROC_OPTION}=0: a job has 1 rank or more")
    for setting in _OFFLOAD_SETTINGS:
        if setting.name in options and options.get("ckpt") != "offload":
            raise ValueError(f"option {setting.name} applies to ckpt=offload only: write "
                             f"ckpt=offload:{setting.name}=...")


def _fused(load):
    def build(cfg: RunConfig):
        from fastbench.autotune import lookup
        from fastbench.fused.attention_warmup import attention_warmup
        from fastbench.model import FastLanguageModel

        options = FUSED.parse_options(cfg.arm_options)  # both fused arms take the same options
        if options.get("autotune") == "off":  # this process runs this arm alone: the switch stays within it
            os.environ[lookup.OFF_ENV] = "off"
            lookup.reset()
        offload = {s.name: options[s.name] for s in _OFFLOAD_SETTINGS if s.name in options}
        with attention_warmup(resolve_model(cfg.model).config(), cfg.torch_dtype, cfg.device):  # as from_pretrained
            base = load(cfg)
        model = FastLanguageModel.get_peft_model(
            base, r=cfg.lora_r, target_modules=list(cfg.targets), lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, use_gradient_checkpointing=options.get("ckpt", cfg.gradient_checkpointing),
            offload=offload or None, random_state=cfg.seed,
            fallback=False)  # a fused arm that trained through plain PEFT would measure the wrong thing
        return model.train()

    return build


_OPTIONS = ("option ckpt=true|false|offload|auto|GiB, autotune=on|off, nproc=N; with offload save_every, "
            "embedding, copy_queue_gib, save_max_tokens, prefetch_groups, host_limit_gib")

FUSED = ArmSpec("fused", f"fastbench fused LoRA on the bf16 model ({_OPTIONS})",
                ("peft",), "pip install peft", _fused(base_model), kind="bf16",
                options=ARM_OPTIONS, check_options=_check_options, packs=True)
FUSED_4BIT = ArmSpec("fused-4bit", f"fastbench fused QLoRA on the NF4 model ({_OPTIONS})",
                     ("peft", "bitsandbytes"), "pip install bitsandbytes", _fused(load_4bit), kind="nf4",
                     options=ARM_OPTIONS, check_options=_check_options, packs=True)
