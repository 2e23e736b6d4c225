"""``FastLanguageModel``: load a causal LM (bf16 or NF4) and give it LoRA adapters that train on the
fused path. Only the returned model objects change; nothing in transformers is patched."""
from __future__ import annotations

import os
import warnings

import torch

from fastbench.fused.decoder import SUPPORTED_FAMILIES
from fastbench.presets import DEFAULT_TARGETS


def default_dtype(device) -> torch.dtype:
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if is_bfloat16_supported() else torch.float16
    return torch.float32


def is_bfloat16_supported() -> bool:
    """Whether this machine's GPU computes in bf16 (what ``dtype=None`` picks then); False without a GPU.
    Unsloth's notebooks call it for TrainingArguments(bf16=..., fp16=not ...)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def nf4_config(compute_dtype: torch.dtype):
    """transformers' quantization config for the standard QLoRA base: NF4 with double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def quantize_nf4(model, compute_dtype: torch.dtype, device=None):
    """Replaces every nn.Linear of the decoder layers (not lm_head) by a bitsandbytes NF4 Linear4bit
    with double quantization, as transformers' BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) does; quantizes on the move to ``device``."""
    import bitsandbytes as bnb

    device = device or next(model.parameters()).device
    layers = model.get_decoder().layers
    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q.to(device))
    model.is_loaded_in_4bit = True
    return model


class FastLanguageModel:
    """``from_pretrained`` then ``get_peft_model``; the result trains under HF Trainer / TRL unchanged."""

    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
                        device=None, seed: int = 0, **kwargs):
        """A local checkpoint directory, a hub id, or a fastbench preset name (random weights from
        ``seed``). ``load_in_4bit`` quantizes to NF4 on load; a bitsandbytes pre-quantized checkpoint
        loads as it is. Other keywords go to transformers' ``from_pretrained`` (``token``,
        ``device_map`` in place of ``device``, ...); Unsloth's ``load_in_8bit`` and ``full_finetuning``
        are taken when False and refused, saying why, when True. Returns (model, tokenizer); tokenizer
        is None when there is none."""
        from fastbench.presets import PRESETS, build_model

        if kwargs.pop("load_in_8bit", False):
            raise ValueError("fastbench loads a base in bf16/fp16 or as NF4 (load_in_4bit=True), not in 8 bits")
        if kwargs.pop("full_finetuning", False):
            raise ValueError("fastbench trains LoRA adapters (FastLanguageModel.get_peft_model); full fine-tuning "
                             "is not supported: use transformers' Trainer on the plain model for that")

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or default_dtype(device)
        tokenizer = None
        if model_name in PRESETS:
            model = build_model(model_name, dtype=dtype, device=device, seed=seed)
            if load_in_4bit:
                quantize_nf4(model, dtype, device)
            warnings.warn(f"{model_name} is a preset with random weights and no tokenizer; tokenizer is None",
                          stacklevel=2)
        else:
            model = _load_checkpoint(model_name, dtype, load_in_4bit, device, **kwargs)
            tokenizer = _load_tokenizer(model_name)
        if model.config.model_type not in SUPPORTED_FAMILIES:
            warnings.warn(f"fastbench: {model.config.model_type!r} has no fused path (supported: "
                          f"{', '.join(SUPPORTED_FAMILIES)}); get_peft_model will give plain PEFT", stacklevel=2)
        model.max_seq_length = max_seq_length
        return model, tokenizer

    @staticmethod
    def for_inference(model):
        """Evaluation mode before generating (as Unsloth's ``for_inference``); ``generate`` runs the
        transformers forward with its KV cache, the fused one serves the training steps. Returns ``model``."""
        model.eval()
        return model

    @staticmethod
    def for_training(model):
        """Back to training mode after :meth:`for_inference`. Returns ``model``."""
        model.train()
        return model

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=DEFAULT_TARGETS, lora_alpha: int = 16,
                       lora_dropout: float = 0.0, bias: str = "none", use_gradient_checkpointing=True,
                       random_state: int | None = 3407, use_rslora: bool = False, fallback: bool = True,
                       max_seq_length: int | None = None, *, offload=None, **lora_kwargs):
        """A PEFT model whose decoder layers run fused. ``use_gradient_checkpointing``: True
        (recompute every layer), False, "offload" (or "unsloth", the same), a budget in GiB, "auto", or a
        :class:`~fastbench.CheckpointConfig` (see fastbench.fused.checkpointing); ``offload``: the offload
        mode's settings, an :class:`~fastbench.OffloadConfig` or a dict of its fields (default: its defaults).
        The resulting CheckpointConfig is checked before the model is touched and kept on the fused model's
        state. ``random_state`` seeds the LoRA init (None: leave the RNG as it is).
        ``max_seq_length`` (as Unsloth takes it here too) replaces the one from_pretrained recorded.
        What the fused path cannot run exactly falls back to plain PEFT with a warning
        (``fallback=False``: raises instead)."""
        from peft import LoraConfig, get_peft_model

        from fastbench.export import attach
        from fastbench.fused.causal_lm import install, unsupported_reason
        from fastbench.fused.checkpointing import CheckpointConfig

        checkpointing = CheckpointConfig.of(use_gradient_checkpointing, offload)  # raises before the model is touched
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        if random_state is not None:
            torch.manual_seed(random_state)
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                            target_modules=list(target_modules), use_rslora=use_rslora, task_type="CAUSAL_LM",
                            **lora_kwargs)
        peft_model = attach(get_peft_model(model, config))  # + save_pretrained_merged / save_pretrained_gguf
        base = peft_model.get_base_model()
        reason = unsupported_reason(base) or (f'bias="{bias}"' if bias != "none" else None)
        if reason:
            if not fallback:
                raise ValueError(f"fastbench's fused path cannot run this model: {reason}")
            dropped = f"; use_gradient_checkpointing={use_gradient_checkpointing!r} becomes recompute" \
                if checkpointing.mode in ("offload", "budget") else ""
            warnings.warn(f"fastbench: fused path unavailable ({reason}); training with plain PEFT{dropped}",
                          stacklevel=2)
            if checkpointing.mode != "keep":
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return peft_model
        base.fastbench_patches = install(base, checkpointing)
        return peft_model


def _load_checkpoint(name, dtype, load_in_4bit, device, **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name)
    if load_in_4bit and getattr(config, "quantization_config", None) is None:
        kwargs.setdefault("quantization_config", nf4_config(dtype))
    kwargs.setdefault("attn_implementation", "sdpa")
    kwargs.setdefault("device_map", device)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)


def _load_tokenizer(name):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        if os.path.isdir(name):
            warnings.warn(f"no tokenizer in {name} ({type(e).__name__}); tokenizer is None")
            return None
        raise
