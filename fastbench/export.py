"""Export a LoRA model (the PEFT model ``FastLanguageModel.get_peft_model`` returns) with its adapters
merged: as a plain transformers checkpoint, or as a GGUF file for llama.cpp, with no llama.cpp tool.

Merge, per LoRA-wrapped linear layer, in fp32 on a copy (the live weights are never touched):

    W' = W + sum over active adapters of scaling * B @ A

where an NF4 base ``W`` is first dequantized to its own dtype, the weight the fused forward multiplies
by, so the merged model computes what adapter + base computed. W' is then cast once to the save dtype.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import types

import torch

SAVE_METHODS = {"merged_16bit", "merged_32bit", "lora"}


# --- merging -------------------------------------------------------------------------------------

def _dense(param: torch.Tensor) -> torch.Tensor:
    """A parameter as a dense fp32 tensor; NF4 (bitsandbytes Params4bit) dequantized to its dtype first."""
    state = getattr(param, "quant_state", None)
    if state is None:
        if param.dtype == torch.int8:
            raise ValueError("8-bit (LLM.int8) base weights cannot be merged; load the base in 16 bit or NF4")
        return param.detach().float()
    if param.is_cuda:
        from fastbench.kernels.nf4 import dequantize_nf4_weight

        return dequantize_nf4_weight(param).float()
    from fastbench.kernels.nf4 import reference  # the same math in PyTorch, for CPU (no Triton driver)

    nested = {}
    if state.nested:
        nested = dict(absmax_code=state.state2.code, absmax_scale=state.state2.absmax, absmax_offset=state.offset,
                      absmax_blocksize=state.state2.blocksize)
    return reference(param.data, state.absmax, state.code, shape=state.shape, blocksize=state.blocksize,
                     dtype=state.dtype, **nested).float()


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


def _publish(tmp: str, target: str) -> None:
    """Moves the finished ``tmp`` into place; an existing ``target`` is replaced only once ``tmp`` is complete."""
    if os.path.exists(target):
        old = tmp + "-replaced"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    else:
        os.rename(tmp, target)


def save_pretrained_merged(model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                           dtype: torch.dtype = torch.bfloat16) -> str:
    """Writes the merged model as a plain transformers checkpoint (safetensors, config without
    quantization_config, the tokenizer if given) that ``AutoModelForCausalLM.from_pretrained`` loads.

    ``save_method``: "merged_16bit" (``dtype`` torch.bfloat16, or torch.float16), "merged_32bit"
    (fp32), or "lora": the adapter alone, as ``model.save_pretrained`` writes it (what Unsloth's users
    pass for that). The directory appears whole or not at all (written beside it, then renamed; an
    existing one is replaced). Returns ``save_directory``."""
    from transformers import AutoModelForCausalLM

    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {sorted(SAVE_METHODS)}, got {save_method!r}")
    if save_method == "lora":
        _write_directory(save_directory, model.save_pretrained, tokenizer)
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
    state = {name: tensor.to(dtype).cpu() for name, tensor in merged_tensors(model)}
    unexpected = plain.load_state_dict(state, strict=False, assign=True).unexpected_keys
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if unexpected or missing:
        raise ValueError(f"cannot map the model's weights onto a plain {type(plain).__name__}: "
                         f"unexpected {unexpected[:5]}, missing {missing[:5]}")
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(base.generation_config)

    _write_directory(save_directory, plain.save_pretrained, tokenizer)
    return save_directory


def _write_directory(save_directory: str, write, tokenizer=None) -> None:
    """``write(dir)`` (and the tokenizer's files) into a directory beside ``save_directory``, renamed into
    place once complete."""
    target = os.path.abspath(save_directory)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=os.path.dirname(target))
    try:
        write(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- GGUF ----------------------------------------------------------------------------------------

# transformers model_type -> llama.cpp architecture (Mistral runs as llama)
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}
# quantization_method -> (tensor type of the 2-D weights, file type); the gguf package writes these itself
GGUF_METHODS = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q5_0": ("Q5_0", "MOSTLY_Q5_0")}
# llama.cpp's pre-tokenizer (its split regex) of each family's byte-level BPE tokenizer
_BPE_PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}


def _gguf_method(method: str):
    import gguf

    key = method.lower()
    if key not in GGUF_METHODS:
        hint = ""
        if re.fullmatch(r"(q\d_k.*|iq\d.*)", key):
            hint = (f"; {method!r} is a k-quant or i-quant, which only llama.cpp computes: save with "
                    f"quantization_method=\"f16\", then run `llama-quantize DIR/model.F16.gguf "
                    f"DIR/model.{method.upper()}.gguf {method.upper()}`")
        raise ValueError(f"quantization_method must be one of {', '.join(GGUF_METHODS)}, got {method!r}{hint}")
    tensor_type, file_type = GGUF_METHODS[key]
    return gguf.GGMLQuantizationType[tensor_type], gguf.LlamaFileType[file_type]


def _rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K projection rows (or bias) from rotate-half RoPE order to interleaved order, per head.

    HF Llama rotates the pairs (i, i + d/2) of each head by angle pos * theta_i; llama.cpp's llama
    architecture rotates the pairs (2i, 2i + 1) by the same theta_i. Moving row i to 2i and row
    i + d/2 to 2i + 1 in both Q and K makes interleaved RoPE of the permuted vectors the same rotation
    as rotate-half RoPE of the originals, and q . k is unchanged by a permutation applied to both."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_tensors(model, config, arch: str):
    """(GGUF name, fp32 tensor) of the merged model as llama.cpp's ``arch`` reads it."""
    import gguf

    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if arch == "gemma" and base.get_output_embeddings().weight is not base.get_input_embeddings().weight:
        raise ValueError("llama.cpp's gemma architecture ties the output to the embeddings; this model does not")
    for hf_name, tensor in merged_tensors(model):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF tensor name for {hf_name!r} in llama.cpp's {arch} architecture")
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            tensor = _interleave_rope_rows(tensor, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            tensor = _interleave_rope_rows(tensor, config.num_key_value_heads)
        elif arch == "gemma" and hf_name.endswith("norm.weight"):
            tensor = tensor + 1.0  # HF Gemma scales by (1 + w), llama.cpp by its stored weight
        yield name, tensor
    rope = _rope_parameters(config)
    if rope["rope_type"] == "llama3":
        # llama.cpp divides each frequency theta_i by rope_freqs[i]: the ratio of the plain frequencies
        # to the llama3-scaled ones the model itself computed
        inv_freq = base.get_decoder().rotary_emb.inv_freq.float().cpu()
        dim = inv_freq.numel() * 2
        plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", plain / inv_freq
    elif rope["rope_type"] != "default":
        raise ValueError(f"GGUF export supports plain and llama3 RoPE, not {rope['rope_type']!r}")


def _gguf_array(tensor: torch.Tensor, qtype):
    """(numpy data, raw type for the writer) of one tensor: 1-D tensors stay F32 (as llama.cpp keeps
    them); a 2-D weight whose rows do not split into the type's blocks falls back to F16."""
    import gguf
    import numpy as np

    data = tensor.detach().float().cpu().numpy()
    Q = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == Q.F32:
        return data, None
    if qtype == Q.F16 or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def _add_gguf_config(writer, config, name: str, file_type) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _add_gguf_tokenizer(writer, tokenizer, vocab_size: int, model_type: str) -> None:
    """Vocabulary, token types, merges or scores and special ids, for llama.cpp's two BPE tokenizers:
    byte-level BPE ("gpt2": merges) and sentencepiece-style BPE with byte fallback ("llama": scores)."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if spec["type"] != "BPE":
        raise ValueError(f"llama.cpp reads BPE tokenizers (byte-level or with byte fallback); this one is "
                         f"{spec['type']}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())}; the model's vocab_size is {vocab_size}")
    T = gguf.TokenType
    tokens = [f"<unused_{i}>" for i in range(vocab_size)]  # rows of the embedding no token reaches
    kinds = [T.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], kinds[i] = text, T.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        kinds[i] = T.CONTROL if added.special else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    if spec.get("byte_fallback"):
        # llama.cpp's sentencepiece tokenizer merges first the adjacent pair whose joined piece scores
        # highest; HF BPE applies its merges by rank: score = -rank of the merge that makes the piece
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(rank.get(t, 0)) for t in tokens])
        for i, text in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", text):
                kinds[i] = T.BYTE
        if tokenizer.unk_token_id is not None:
            kinds[tokenizer.unk_token_id] = T.UNKNOWN
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_BPE_PRE.get(model_type, "default"))
        writer.add_token_merges(merges)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    if isinstance(getattr(tokenizer, "add_bos_token", None), bool):
        writer.add_add_bos_token(tokenizer.add_bos_token)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def save_pretrained_gguf(model, save_directory: str, tokenizer=None, quantization_method: str = "f16") -> str:
    """Writes the merged model as one GGUF file for llama.cpp, ``save_directory/model.<TYPE>.gguf``,
    and returns its path. Architectures: llama and mistral (as llama), qwen2, qwen3, gemma.

    ``quantization_method``: f32, f16, bf16, q8_0, q4_0, q5_0 (quantized by the gguf package; norms and
    biases stay F32). The k-quants (q4_k_m, ...) need llama.cpp's ``llama-quantize`` on the f16 file.
    The tokenizer is required: a GGUF without its vocabulary cannot be run. The file is written
    beside its final name and renamed into place."""
    import gguf

    qtype, file_type = _gguf_method(quantization_method)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    arch = GGUF_ARCHS.get(config.model_type)
    if arch is None:
        raise ValueError(f"GGUF export supports the model types {', '.join(GGUF_ARCHS)}; this model is "
                         f"{config.model_type!r}")
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer: llama.cpp cannot run a GGUF without its "
                         "vocabulary (pass tokenizer=..., e.g. the one FastLanguageModel.from_pretrained returned)")
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, f"model.{qtype.name}.gguf")
    writer = gguf.GGUFWriter(path + ".partial", arch)
    _add_gguf_config(writer, config, os.path.basename(getattr(config, "_name_or_path", "") or "model"), file_type)
    _add_gguf_tokenizer(writer, tokenizer, config.vocab_size, config.model_type)
    for name, tensor in _gguf_tensors(model, config, arch):
        data, raw_type = _gguf_array(tensor, qtype)
        writer.add_tensor(name, data, raw_dtype=raw_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(path + ".partial", path)
    except BaseException:
        writer.close()
        if os.path.exists(path + ".partial"):
            os.remove(path + ".partial")
        raise
    return path


def attach(peft_model):
    """Binds ``save_pretrained_merged`` and ``save_pretrained_gguf`` onto this one model object."""
    peft_model.save_pretrained_merged = types.MethodType(save_pretrained_merged, peft_model)
    peft_model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, peft_model)
    return peft_model
