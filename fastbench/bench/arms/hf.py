"""The Hugging Face arms, the baselines every other arm is measured against: ``peft`` (PEFT LoRA on the
bf16 model) and ``qlora`` (PEFT on bitsandbytes NF4 with double quantization), and the base-model loading
that every arm shares (same weights from the seed, same LoRA init)."""
from __future__ import annotations

from fastbench.bench.arms import ArmSpec, RunConfig
from fastbench.bench.checkpoint_cache import checkpoint_dir
from fastbench.presets import resolve_model


def checkpoint_path(cfg: RunConfig) -> str:
    """cfg.model as a checkpoint directory (a preset's random weights written once to the harness's cache)."""
    return checkpoint_dir(cfg.model, cfg.dtype, cfg.device, cfg.seed)


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
                                                     attn_implementation="sdpa", use_safetensors=True,
                                                     trust_remote_code=False)
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
                                                 device_map={"": _concrete_device(cfg)}, use_safetensors=True,
                                                 trust_remote_code=False, **quant)
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


BNB_HINT = "pip install bitsandbytes"

PEFT = ArmSpec("peft", "PEFT LoRA on the bf16 model (HF, SDPA, activation checkpointing)", ("peft",),
               "pip install peft", build_peft)
QLORA = ArmSpec("qlora", "PEFT + bitsandbytes NF4 (double quant) QLoRA, prepare_model_for_kbit_training",
                ("peft", "bitsandbytes"), BNB_HINT, build_qlora)
