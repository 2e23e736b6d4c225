"""``FastLanguageModel``: load a causal LM (bf16 or NF4) and give it LoRA adapters that train on the
fused path. Only the returned model objects change; nothing in transformers is patched."""
from __future__ import annotations

import os
import warnings

import torch

from fastbench.fused.attention_warmup import attention_warmup
from fastbench.fused.decoder import SUPPORTED_FAMILIES
from fastbench.memory import use_expandable_segments
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
                        device=None, seed: int = 0, trust_remote_code: bool = False, allow_pickle: bool = False,
                        warmup_attention: bool = True, **kwargs):
        """A local checkpoint directory, a hub id, or a fastbench preset name (random weights from
        ``seed``). ``load_in_4bit`` quantizes to NF4 on load; a bitsandbytes pre-quantized checkpoint
        loads as it is. Other keywords go to transformers' ``from_pretrained`` (``token``,
        ``device_map`` in place of ``device``, ...); Unsloth's ``load_in_8bit`` and ``full_finetuning``
        are taken when False and refused, saying why, when True. Returns (model, tokenizer); tokenizer
        is None when there is none.

        Loading never runs the checkpoint's code: ``trust_remote_code`` stays False unless passed True.
        Weights load from safetensors; pickle-based weights (``.bin``, ``.pt``, ``.pth``, ``.ckpt``)
        only with ``allow_pickle=True`` (with a warning, through ``torch.load(weights_only=True)``),
        else :class:`UnsafeCheckpoint` says so.

        Loading onto a GPU before this process started CUDA, with no allocator settings of the user's,
        switches the CUDA caching allocator to expandable segments (:func:`fastbench.memory.use_expandable_segments`:
        less memory reserved beyond what is allocated). To opt out, set ``PYTORCH_ALLOC_CONF`` yourself
        (e.g. ``PYTORCH_ALLOC_CONF=expandable_segments:False``).

        ``warmup_attention`` (on a GPU where torch's attention runs on cuDNN): cuDNN's attention kernels for the
        model's head layout are compiled in a background thread while the weights load
        (:mod:`fastbench.fused.attention_warmup`), instead of in the first training step (2 s or more).
        Loading returns once that is done too."""
        from fastbench.presets import PRESETS, build_model

        if kwargs.pop("load_in_8bit", False):
            raise ValueError("fastbench loads a base in bf16/fp16 or as NF4 (load_in_4bit=True), not in 8 bits")
        if kwargs.pop("full_finetuning", False):
            raise ValueError("fastbench trains LoRA adapters (FastLanguageModel.get_peft_model); full fine-tuning "
                             "is not supported: use transformers' Trainer on the plain model for that")

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cuda":
            use_expandable_segments()  # before CUDA starts (default_dtype asks the GPU), unless the user chose
        dtype = dtype or default_dtype(device)
        tokenizer = None
        on_gpu = torch.device(device).type == "cuda"
        config = _config_for_warmup(model_name, kwargs) if warmup_attention and on_gpu else None
        with attention_warmup(config, dtype, device):
            if model_name in PRESETS:
                model = build_model(model_name, dtype=dtype, device=device, seed=seed)
                if load_in_4bit:
                    quantize_nf4(model, dtype, device)
                warnings.warn(f"{model_name} is a preset with random weights and no tokenizer; tokenizer is None",
                              stacklevel=2)
            else:
                kwargs.update(_safe_load_options(model_name, trust_remote_code, allow_pickle, kwargs))
                model = _load_safely(model_name, allow_pickle, dtype, load_in_4bit, device, **kwargs)
                tokenizer = _load_tokenizer(model_name, trust_remote_code=trust_remote_code)
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


# from_pretrained's keywords that say where a checkpoint's config is read from
_CONFIG_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder")


def _config_for_warmup(name: str, kwargs: dict):
    """The config of a preset or checkpoint, for the attention warm-up; None where it cannot be read without
    running the checkpoint's code (the load then says what is wrong)."""
    from fastbench.presets import PRESETS, build_config

    if name in PRESETS:
        return build_config(name)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False,
                                          **{k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs})
    except Exception:
        return None


def _load_checkpoint(name, dtype, load_in_4bit, device, **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name, trust_remote_code=kwargs.get("trust_remote_code", False))
    if load_in_4bit and getattr(config, "quantization_config", None) is None:
        kwargs.setdefault("quantization_config", nf4_config(dtype))
    kwargs.setdefault("attn_implementation", "sdpa")
    kwargs.setdefault("device_map", device)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)


def _load_tokenizer(name, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if os.path.isdir(name):
            warnings.warn(f"no tokenizer in {name} ({type(e).__name__}); tokenizer is None")
            return None
        raise


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ALLOW_PICKLE = ("pass allow_pickle=True (`--allow-pickle` on the CLI) to load them anyway, only for a checkpoint "
                "you trust")


class UnsafeCheckpoint(OSError, ValueError):
    """A checkpoint fastbench does not load as asked: pickle-based weights without ``allow_pickle=True``
    (an OSError, as an unreadable checkpoint is, and a ValueError, as a bad argument is)."""


def _weight_files(path: str) -> tuple[list[str], list[str]]:
    """(safetensors files, pickle-based weight files) in a checkpoint directory."""
    names = sorted(os.listdir(path))
    return ([n for n in names if n.endswith(".safetensors")],
            [n for n in names if n.endswith(PICKLE_SUFFIXES) and not n.startswith("training_args")])


def _safe_load_options(name: str, trust_remote_code: bool, allow_pickle: bool, kwargs: dict) -> dict:
    """transformers' loading options under fastbench's rule: no checkpoint code unless trusted,
    safetensors unless ``allow_pickle`` (then pickle-based weights go through ``weights_only=True``)."""
    if kwargs.get("weights_only") is False:
        raise UnsafeCheckpoint("weights_only=False would let a pickle-based checkpoint run code; fastbench loads "
                               "pickle-based weights only through weights_only=True (with allow_pickle=True)")
    if kwargs.get("use_safetensors") is False and not allow_pickle:
        raise UnsafeCheckpoint(f"use_safetensors=False asks for pickle-based weights, which can run code when "
                               f"loaded; {ALLOW_PICKLE}")
    if trust_remote_code:
        warnings.warn(f"fastbench: trust_remote_code=True: the code that {name} ships runs in this process",
                      stacklevel=3)
    options = {"trust_remote_code": bool(trust_remote_code), "use_safetensors": True}
    if os.path.isdir(name):
        safe, pickled = _weight_files(name)
        if safe or not pickled:
            return options  # no weights at all: transformers says so
        if not allow_pickle:
            raise UnsafeCheckpoint(f"{name} holds pickle-based weights only ({', '.join(pickled)}), which can run "
                                   f"code when loaded; fastbench loads safetensors: convert them, or {ALLOW_PICKLE}")
        warnings.warn(f"fastbench: loading pickle-based weights of {name} ({', '.join(pickled)}) because "
                      "allow_pickle=True (torch.load with weights_only=True); prefer safetensors", stacklevel=3)
        return {**options, "use_safetensors": False, "weights_only": True}
    if allow_pickle:  # a hub id: safetensors when it has them, else its pickle-based weights
        return {**options, "use_safetensors": None, "weights_only": True}
    return options


def _load_safely(name: str, allow_pickle: bool, *args, **kwargs):
    """:func:`_load_checkpoint`; a hub checkpoint without safetensors is refused in fastbench's words."""
    try:
        return _load_checkpoint(name, *args, **kwargs)
    except OSError as e:
        if allow_pickle or os.path.isdir(name) or "cannot be loaded with `safetensors`" not in str(e):
            raise
        raise UnsafeCheckpoint(f"{name} has no safetensors weights; its pickle-based weights (.bin, .pt) can run "
                               f"code when loaded: {ALLOW_PICKLE}") from None
