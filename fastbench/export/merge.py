"""A LoRA model (the PEFT model ``FastLanguageModel.get_peft_model`` returns) with its adapters merged:
the tensors, and a plain transformers checkpoint of them.

Merge, per LoRA-wrapped linear layer, in fp32 on a copy (the live weights are never touched):

    W' = W + sum over active adapters of scaling * B @ A

where an NF4 base ``W`` is first dequantized to its own dtype, the weight the fused forward multiplies
by, so the merged model computes what adapter + base computed. W' is then cast once to the save dtype.
"""
from __future__ import annotations

import copy

import torch

from fastbench.export.files import check_free_space, check_target_directory, write_directory

SAVE_METHODS = {"merged_16bit", "merged_32bit", "lora"}


# --- merging -------------------------------------------------------------------------------------

def _dense(param: torch.Tensor) -> torch.Tensor:
    """A parameter as a dense fp32 tensor; NF4 (bitsandbytes Params4bit) dequantized to its dtype first."""
    from fastbench.kernels.nf4 import dequantize_nf4_weight, reference, weight_arguments

    state = getattr(param, "quant_state", None)
    if state is None:
        if param.dtype == torch.int8:
            raise ValueError("8-bit (LLM.int8) base weights cannot be merged; load the base in 16 bit or NF4")
        return param.detach().float()
    if param.is_cuda:
        return dequantize_nf4_weight(param).float()
    return reference(**weight_arguments(param.data, state)).float()  # the same math in PyTorch, for CPU


def _merged_weight(layer) -> torch.Tensor:
    """The fp32 weight of a PEFT LoRA layer with its active adapters added (none while disabled or
    already merged into the base)."""
    weight = _dense(layer.get_base_layer().weight)
    if layer.merged or layer.disable_adapters:
        return weight
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
            raise ValueError("merging LoRA variants (DoRA, ...) is not supported")
        if layer.lora_B[name].bias is not None:
            raise ValueError("merging lora_bias is not supported")
        delta = layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()
        weight = weight + layer.scaling[name] * (delta.T if layer.fan_in_fan_out else delta)
    return weight


def merged_tensors(model):
    """Yields (name, fp32 tensor) for every distinct parameter and persistent buffer of the causal LM
    inside ``model`` (a PeftModel or a plain model), named as transformers names them, LoRA merged.
    A tied parameter comes once, under its first name."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen, handled = set(), ()
    for name, module in base.named_modules():
        if name.startswith(handled):
            continue
        prefix = name + "." if name else ""
        if isinstance(module, LoraLayer):
            handled += (prefix,)
            inner = module.get_base_layer()
            if id(inner.weight) not in seen:
                seen.add(id(inner.weight))
                yield prefix + "weight", _merged_weight(module)
            if inner.bias is not None and id(inner.bias) not in seen:
                seen.add(id(inner.bias))
                yield prefix + "bias", inner.bias.detach().float()
            continue
        if isinstance(module, ModulesToSaveWrapper):  # a fully trained copy (embed_tokens, lm_head, ...)
            handled += (prefix,)
            module = module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
            tensors = list(module.named_parameters()) + [
                (n, b) for n, b in module.named_buffers() if _persistent(module, n)]
        else:
            tensors = list(module.named_parameters(recurse=False)) + [
                (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for local, tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield prefix + local, _dense(tensor)


def _persistent(module, buffer_name: str) -> bool:
    owner, _, local = buffer_name.rpartition(".")
    return local not in module.get_submodule(owner)._non_persistent_buffers_set


def save_pretrained_merged(model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                           dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> str:
    """Writes the merged model as a plain transformers checkpoint (safetensors, config without
    quantization_config, the tokenizer if given) that ``AutoModelForCausalLM.from_pretrained`` loads.

    ``save_method``: "merged_16bit" (``dtype`` torch.bfloat16, or torch.float16), "merged_32bit"
    (fp32), or "lora": the adapter alone, as ``model.save_pretrained`` writes it (what Unsloth's users
    pass for that). A directory that exists and is not empty is refused unless ``overwrite``; the new
    one appears whole or not at all (written beside it, then renamed), and only once the disk is seen
    to have room for it. Returns ``save_directory``."""
    from transformers import AutoModelForCausalLM

    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {sorted(SAVE_METHODS)}, got {save_method!r}")
    check_target_directory(save_directory, overwrite)
    if save_method == "lora":
        _write(save_directory, model.save_pretrained, tokenizer)
        return save_directory
    if save_method == "merged_32bit":
        dtype = torch.float32
    elif dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"merged_16bit saves torch.bfloat16 or torch.float16, got {dtype}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_free_space(save_directory, sum(p.numel() for p in plain.parameters()) * plain.dtype.itemsize + (1 << 24))
    state = {name: tensor.to(dtype).cpu() for name, tensor in merged_tensors(model)}
    unexpected = plain.load_state_dict(state, strict=False, assign=True).unexpected_keys
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if unexpected or missing:
        raise ValueError(f"cannot map the model's weights onto a plain {type(plain).__name__}: "
                         f"unexpected {unexpected[:5]}, missing {missing[:5]}")
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(base.generation_config)

    _write(save_directory, plain.save_pretrained, tokenizer)
    return save_directory


def _write(save_directory: str, write, tokenizer=None) -> None:
    def fill(tmp):
        write(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_directory(save_directory, fill)
