"""The merged model as a GGUF file for llama.cpp, quantized by fastbench itself (no llama.cpp tool).

Architectures: llama and mistral (as llama), qwen2, qwen3, gemma. The tensors are the merged ones
(:func:`fastbench.export.merge.merged_tensors`) renamed as llama.cpp names them, with the two changes of
representation llama.cpp's architectures need: Q/K rows in interleaved RoPE order for llama, and Gemma's
norm weights stored as 1 + w. Each tensor's type follows the scheme (:mod:`fastbench.export.schemes`).
"""
from __future__ import annotations

import os

import torch

from fastbench.export.files import NotEnoughSpace, check_free_space, check_target_directory
from fastbench.files import atomic_path, out_of_disk_space
from fastbench.export.merge import merged_tensors
from fastbench.export.quants import quantize
from fastbench.export.schemes import BLOCK_BYTES, BLOCK_SIZE, ModelFacts, Scheme, get_scheme, tensor_type
from fastbench.export.tokenizer_metadata import tokenizer_metadata

# transformers model_type -> llama.cpp architecture (Mistral runs as llama)
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma"}
_METADATA_ALLOWANCE = 1 << 20  # bytes beyond the tensors' and the vocabulary's, for the header


def save_pretrained_gguf(model, save_directory: str, tokenizer=None, quantization_method="q4_k_m",
                         overwrite: bool = False):
    """Writes the merged model as GGUF, ``save_directory/model.<METHOD>.gguf`` (e.g. model.Q4_K_M.gguf),
    and returns its path; ``quantization_method`` may be a list, which writes one file per method and
    returns the list of paths.

    Methods: q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q3_k_m (k-quants, with llama.cpp's per-tensor types),
    q8_0, q4_0, q5_0, f16, bf16, f32. The tokenizer is required (a GGUF without its vocabulary cannot be
    run). A directory that exists and is not empty is refused unless ``overwrite``. Each file is
    written under a temporary name and renamed once complete, after the disk is seen to have room."""
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise ValueError("quantization_method: give at least one method")
    schemes = [get_scheme(m) for m in methods]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    arch = GGUF_ARCHS.get(config.model_type)
    if arch is None:
        raise ValueError(f"GGUF export supports the model types {', '.join(GGUF_ARCHS)}; this model is "
                         f"{config.model_type!r}")
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer: llama.cpp cannot run a GGUF without its "
                         "vocabulary (pass tokenizer=..., e.g. the one FastLanguageModel.from_pretrained returned)")
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    if arch == "gemma" and not tied:
        raise ValueError("llama.cpp's gemma architecture ties the output to the embeddings; this model does not")
    _check_rope(config)
    vocab = tokenizer_metadata(tokenizer, config.vocab_size, getattr(config, "bos_token_id", None))
    check_target_directory(save_directory, overwrite)
    facts = ModelFacts(n_layer=config.num_hidden_layers, has_output=not tied, is_70b=_is_70b(config, arch))
    numel = sum(p.numel() for p in base.parameters())
    metadata_bytes = sum(len(t) + 16 for t in vocab.tokens) + sum(len(m) + 8 for m in vocab.merges or ()) \
        + _METADATA_ALLOWANCE
    paths = []
    for scheme in schemes:
        # a first check from the parameter count at the scheme's main type, before any work
        check_free_space(save_directory, numel * BLOCK_BYTES[scheme.base] // BLOCK_SIZE[scheme.base])
        path = os.path.join(save_directory, f"model.{scheme.name.upper()}.gguf")
        _write_gguf(path, model, config, arch, scheme, facts, vocab, metadata_bytes)
        paths.append(path)
    return paths[0] if isinstance(quantization_method, str) else paths


def _write_gguf(path, model, config, arch, scheme: Scheme, facts, vocab, metadata_bytes) -> None:
    import gguf

    writer = gguf.GGUFWriter(None, arch)
    _add_config(writer, config, os.path.basename(getattr(config, "_name_or_path", "") or "model"),
                int(gguf.LlamaFileType[scheme.file_type]))
    vocab.write(writer)
    total = metadata_bytes
    for name, tensor in _gguf_tensors(model, config, arch):
        kind = tensor_type(scheme, name, tuple(tensor.shape), facts)
        data, raw_type = quantize(tensor, kind)
        del tensor
        writer.add_tensor(name, data, raw_dtype=raw_type)
        total += data.nbytes + writer.data_alignment
    check_free_space(os.path.dirname(os.path.abspath(path)), total)
    try:
        with atomic_path(path) as tmp:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.flush()
            for f in writer.fout:
                os.fsync(f.fileno())
            writer.close()
    except OSError as e:
        writer.close()
        if out_of_disk_space(e):
            raise NotEnoughSpace(f"the disk filled up while writing {path}; nothing was left there: free some "
                                 f"space or choose another directory") from e
        raise


def _is_70b(config, arch: str) -> bool:
    """llama.cpp's 70B model class (which gives attn_v more bits): 80 layers with grouped K/V heads."""
    return (arch in ("llama", "qwen2") and config.num_hidden_layers == 80
            and config.num_key_value_heads < config.num_attention_heads)


def _rope_parameters(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _check_rope(config) -> None:
    rope_type = _rope_parameters(config)["rope_type"]
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"GGUF export supports plain and llama3 RoPE, not {rope_type!r}")


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
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
    for hf_name, tensor in merged_tensors(model):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF tensor name for {hf_name!r} in llama.cpp's {arch} architecture")
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            tensor = interleave_rope_rows(tensor, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            tensor = interleave_rope_rows(tensor, config.num_key_value_heads)
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


def _add_config(writer, config, name: str, file_type: int) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
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
