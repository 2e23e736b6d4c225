"""The peers fastbench is compared with, each on the same weights, LoRA and data as the baselines:
``liger`` and ``liger-qlora`` (Liger's kernels patched into the transformers classes, then PEFT as in
``peft``/``qlora``), ``unsloth`` and ``unsloth-qlora`` (Unsloth's FastLanguageModel; option
``ckpt`` is passed as its ``use_gradient_checkpointing``, default ``"unsloth"``)."""
from __future__ import annotations

from typing import Any, Callable

from fastbench.bench.arms import ArmOption, ArmSpec, RunConfig, one_of
from fastbench.bench.arms.hf import build_peft, build_qlora, checkpoint_path
from fastbench.presets import resolve_model


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
        ckpt = _UNSLOTH_CKPT[cfg.arm_options.get("ckpt", "unsloth").lower()] if cfg.gradient_checkpointing else False
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.targets), bias="none", use_gradient_checkpointing=ckpt,
            random_state=cfg.seed)
        return model.train()

    return build_unsloth


_UNSLOTH_CKPT = {"true": True, "false": False, "unsloth": "unsloth"}  # its use_gradient_checkpointing
_UNSLOTH_OPTIONS = (ArmOption("ckpt", "true|false|unsloth", lambda text: _UNSLOTH_CKPT[one_of(*_UNSLOTH_CKPT)(text)]),)
_LIGER_HINT = "pip install liger-kernel"
_UNSLOTH_HINT = "pip install unsloth (needs a CUDA GPU)"

LIGER = ArmSpec("liger", "Liger kernels + PEFT LoRA bf16", ("peft", "liger_kernel"), _LIGER_HINT,
                _with_liger(build_peft))
LIGER_QLORA = ArmSpec("liger-qlora", "Liger kernels + PEFT + bitsandbytes QLoRA",
                      ("peft", "bitsandbytes", "liger_kernel"), _LIGER_HINT, _with_liger(build_qlora))
UNSLOTH = ArmSpec("unsloth", "Unsloth LoRA on the bf16 model", ("unsloth",), _UNSLOTH_HINT, _unsloth(False),
                  import_first=("unsloth",), options=_UNSLOTH_OPTIONS)
UNSLOTH_QLORA = ArmSpec("unsloth-qlora", "Unsloth QLoRA (NF4)", ("unsloth", "bitsandbytes"), _UNSLOTH_HINT,
                        _unsloth(True), import_first=("unsloth",), options=_UNSLOTH_OPTIONS)
