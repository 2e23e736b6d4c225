"""Merged and GGUF export of the fused PEFT model (fastbench.export), on tiny presets with random weights."""
import copy
import json
import os
import warnings

import pytest
import torch

from fastbench.export import merged_tensors, save_pretrained_gguf, save_pretrained_merged
from fastbench.model import FastLanguageModel

gguf = pytest.importorskip("gguf")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def lora_model(preset, load_in_4bit=False, checkpointing=True):
    """The fused PEFT model of a tiny preset (fp32, CPU) with random, non-zero LoRA B and norm weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = FastLanguageModel.from_pretrained(preset, dtype=torch.float32, device="cpu",
                                                     load_in_4bit=load_in_4bit, seed=int(torch.randint(1 << 30, ())))
        peft_model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=None,
                                                      use_gradient_checkpointing=checkpointing)
    assert peft_model.get_base_model().fastbench_patches  # runs fused
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "norm" in name:
                p.normal_(0, 0.1)
    return peft_model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def tokenizer():
    """A byte-level BPE tokenizer trained on a few strings (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "fastbench writes gguf files"] * 3,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# --- merged checkpoint -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset,load_in_4bit,checkpointing", [
    ("llama-3-8b-tiny", False, True), ("gemma-7b-tiny", False, True), ("qwen2.5-7b-tiny", True, True),
    ("llama-3-8b-tiny", True, "offload")])  # offload: the input embedding's table is a host buffer
def test_merged_checkpoint_gives_the_fused_models_logits(seed, tmp_path, preset, load_in_4bit, checkpointing):
    from transformers import AutoModelForCausalLM

    model = lora_model(preset, load_in_4bit, checkpointing)
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = snapshot(model)
    model.save_pretrained_merged(str(tmp_path / "merged"), save_method="merged_32bit")
    assert_unchanged(model, before)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "merged"))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no partial directory left beside it

    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert plain.dtype == torch.float32
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
    assert logits.isfinite().all()
    assert rel(logits, expected) < 1e-5


def test_nf4_base_merges_onto_its_dequantized_weight(seed):
    import bitsandbytes.functional as bnbf

    model = lora_model("llama-3-8b-tiny", load_in_4bit=True)
    merged = dict(merged_tensors(model))
    q = model.get_base_model().model.layers[1].self_attn.q_proj
    weight = q.base_layer.weight
    dequantized = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    delta = q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
    assert rel(merged["model.layers.1.self_attn.q_proj.weight"], dequantized + delta) < 1e-6
    assert delta.norm() > 0.01 * dequantized.norm()


def test_merged_16bit_casts_the_fp32_merge_once(seed, tmp_path):
    from safetensors.torch import load_file

    model = lora_model("qwen3-8b-tiny")
    reference = dict(merged_tensors(model))
    tok = tokenizer()
    for dtype in (torch.bfloat16, torch.float16):
        out = tmp_path / str(dtype)
        save_pretrained_merged(model, str(out), tok, dtype=dtype)
        saved = load_file(str(out / "model.safetensors"))
        assert saved.keys() == reference.keys()
        assert all(saved[k].dtype == dtype and torch.equal(saved[k], reference[k].to(dtype)) for k in saved)
        assert (out / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        model.save_pretrained_merged(str(tmp_path / str(torch.float16)))
    model.save_pretrained_merged(str(tmp_path / str(torch.float16)), overwrite=True)  # replaced: now bf16
    saved = load_file(str(tmp_path / str(torch.float16) / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(torch.bfloat16), str(torch.float16)])


def test_bad_save_method_is_refused(tmp_path):
    model = lora_model("llama-3-8b-tiny")
    with pytest.raises(ValueError, match="merged_16bit"):
        model.save_pretrained_merged(str(tmp_path / "x"), save_method="merged_4bit")
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        model.save_pretrained_merged(str(tmp_path / "x"), dtype=torch.float32)
    assert not (tmp_path / "x").exists()


def test_lora_save_method_writes_the_adapter_that_plain_peft_loads(tmp_path):
    """save_method="lora" (Unsloth's name for the adapter alone): the adapter and the tokenizer, no merge."""
    from peft import PeftModel

    seed = int(torch.randint(1 << 30, ()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cpu", seed=seed)
        model = FastLanguageModel.get_peft_model(base, r=4, lora_alpha=8, random_state=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    out = tmp_path / "adapter"
    assert model.save_pretrained_merged(str(out), tokenizer(), save_method="lora") == str(out)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    plain_base = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cpu", seed=seed)[0]
    plain = PeftModel.from_pretrained(plain_base, str(out))
    ids = torch.randint(0, plain_base.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert rel(model(input_ids=ids).logits, plain(input_ids=ids).logits) < 1e-5


def test_methods_are_bound_to_the_instance_only():
    from peft import PeftModel

    model = lora_model("llama-3-8b-tiny")
    assert model.save_pretrained_merged.__self__ is model and model.save_pretrained_gguf.__self__ is model
    assert not hasattr(PeftModel, "save_pretrained_merged") and not hasattr(PeftModel, "save_pretrained_gguf")


# --- GGUF --------------------------------------------------------------------------------------------

def field(reader, key):
    return reader.fields[key].contents()


def gguf_tensors(reader) -> dict:
    """name -> (type name, shape in torch order, fp32 data)."""
    out = {}
    for t in reader.tensors:
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32"))
        out[t.name] = (t.tensor_type.name, tuple(int(s) for s in reversed(t.shape)), data)
    return out


def interleaved_rows(weight, heads):
    """Row order of llama.cpp's interleaved RoPE, written as an index list: per head, i then i + d/2."""
    d = weight.shape[0] // heads
    order = [h * d + i + half for h in range(heads) for i in range(d // 2) for half in (0, d // 2)]
    return weight[order]


@pytest.mark.parametrize("preset,arch", [("llama-3-8b-tiny", "llama"), ("mistral-7b-tiny", "llama"),
                                         ("qwen3-8b-tiny", "qwen3"), ("gemma-7b-tiny", "gemma")])
def test_gguf_f16_holds_the_merged_model(seed, tmp_path, preset, arch):
    model = lora_model(preset)
    before = snapshot(model)
    tok = tokenizer()
    path = model.save_pretrained_gguf(str(tmp_path), tok, "f16")
    assert_unchanged(model, before)
    assert path.endswith("model.F16.gguf") and os.listdir(tmp_path) == ["model.F16.gguf"]
    reader = gguf.GGUFReader(path)
    c = model.get_base_model().config
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == c.num_hidden_layers
    assert field(reader, f"{arch}.context_length") == c.max_position_embeddings
    assert field(reader, f"{arch}.embedding_length") == c.hidden_size
    assert field(reader, f"{arch}.feed_forward_length") == c.intermediate_size
    assert field(reader, f"{arch}.attention.head_count") == c.num_attention_heads
    assert field(reader, f"{arch}.attention.head_count_kv") == c.num_key_value_heads
    assert field(reader, f"{arch}.attention.key_length") == c.head_dim
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(c.rope_parameters["rope_theta"])
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size and tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.ggml.token_type")[tok.pad_token_id] == gguf.TokenType.CONTROL

    merged = dict(merged_tensors(model))
    tensors = gguf_tensors(reader)
    norm = 1.0 if arch == "gemma" else 0.0  # HF Gemma scales by 1 + w
    expected = {"token_embd.weight": merged["model.embed_tokens.weight"],
                "output_norm.weight": merged["model.norm.weight"] + norm}
    if not c.tie_word_embeddings:
        expected["output.weight"] = merged["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        hf = {k[len(f"model.layers.{i}."):]: v for k, v in merged.items() if k.startswith(f"model.layers.{i}.")}
        q, k = hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = interleaved_rows(q, c.num_attention_heads), interleaved_rows(k, c.num_key_value_heads)
        expected.update({f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k,
                         f"blk.{i}.attn_v.weight": hf["self_attn.v_proj.weight"],
                         f"blk.{i}.attn_output.weight": hf["self_attn.o_proj.weight"],
                         f"blk.{i}.ffn_gate.weight": hf["mlp.gate_proj.weight"],
                         f"blk.{i}.ffn_up.weight": hf["mlp.up_proj.weight"],
                         f"blk.{i}.ffn_down.weight": hf["mlp.down_proj.weight"],
                         f"blk.{i}.attn_norm.weight": hf["input_layernorm.weight"] + norm,
                         f"blk.{i}.ffn_norm.weight": hf["post_attention_layernorm.weight"] + norm})
        if arch == "qwen3":
            expected[f"blk.{i}.attn_q_norm.weight"] = hf["self_attn.q_norm.weight"]
            expected[f"blk.{i}.attn_k_norm.weight"] = hf["self_attn.k_norm.weight"]
    assert tensors.keys() == expected.keys()
    for name, want in expected.items():
        kind, shape, data = tensors[name]
        assert shape == tuple(want.shape), name
        assert kind == ("F32" if want.ndim == 1 else "F16"), name
        assert data.isfinite().all()
        if want.ndim == 1:
            assert torch.equal(data, want), name
        else:
            assert torch.equal(data, want.half().float()), name


def test_interleaving_turns_rotate_half_rope_into_interleaved_rope(seed):
    """q . k under HF's rotate-half RoPE equals q' . k' under interleaved RoPE on the permuted rows."""
    from fastbench.export.gguf_file import interleave_rope_rows as _interleave_rope_rows

    heads, d, hidden, pos_q, pos_k = 3, 8, 5, 7, 2
    wq, wk = (torch.randn(heads * d, hidden, dtype=torch.float64) for _ in range(2))
    x = torch.randn(hidden, dtype=torch.float64)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)

    def rotate_half(v, pos):
        a, b = v[..., : d // 2], v[..., d // 2:]
        cos, sin = torch.cos(pos * theta), torch.sin(pos * theta)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def interleaved(v, pos):
        a, b = v[..., 0::2], v[..., 1::2]
        cos, sin = torch.cos(pos * theta), torch.sin(pos * theta)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)

    hf = (rotate_half((wq @ x).view(heads, d), pos_q) * rotate_half((wk @ x).view(heads, d), pos_k)).sum(-1)
    q2, k2 = _interleave_rope_rows(wq, heads) @ x, _interleave_rope_rows(wk, heads) @ x
    cpp = (interleaved(q2.view(heads, d), pos_q) * interleaved(k2.view(heads, d), pos_k)).sum(-1)
    assert rel(cpp, hf) < 1e-12


@pytest.mark.parametrize("method,bound", [("q8_0", 1e-2), ("q4_0", 0.15), ("q5_0", 0.08), ("bf16", 4e-3),
                                          ("f32", 0.0)])
def test_gguf_quantized_weights_dequantize_to_the_merged_ones(seed, tmp_path, method, bound):
    model = lora_model("qwen2.5-7b-tiny")
    path = save_pretrained_gguf(model, str(tmp_path), tokenizer(), quantization_method=method)
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType[
        {"f32": "ALL_F32"}.get(method, f"MOSTLY_{method.upper()}")])
    merged = dict(merged_tensors(model))
    tensors = gguf_tensors(reader)
    kind, _, data = tensors["blk.0.ffn_down.weight"]
    assert kind == method.upper()
    want = merged["model.layers.0.mlp.down_proj.weight"]
    assert data.isfinite().all() and rel(data, want) <= bound
    if method == "bf16":
        assert torch.equal(data, want.bfloat16().float())
    assert tensors["blk.0.attn_q.bias"][0] == "F32"
    assert torch.equal(tensors["blk.0.attn_q.bias"][2], merged["model.layers.0.self_attn.q_proj.bias"])


def test_gguf_llama3_rope_writes_frequency_factors(tmp_path):
    model = lora_model("llama-3.2-1b-tiny")
    reader = gguf.GGUFReader(model.save_pretrained_gguf(str(tmp_path), tokenizer(), "f16"))
    tensors = gguf_tensors(reader)
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    factors = tensors["rope_freqs.weight"][2]
    factor = model.get_base_model().config.rope_parameters["factor"]
    assert factors.shape == (8,) and factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(factor)
    assert bool(((factors >= 1 - 1e-6) & (factors <= factor + 1e-4)).all())


def test_gguf_refusals_are_clear(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    model = lora_model("llama-3-8b-tiny")
    with pytest.raises(ValueError, match="unknown quantization_method 'q3'; valid: q4_k_m, q4_k_s, .*f16, bf16, f32"):
        model.save_pretrained_gguf(str(tmp_path), tokenizer(), quantization_method="q3")
    with pytest.raises(ValueError, match="'iq2_xs'; valid"):
        model.save_pretrained_gguf(str(tmp_path), tokenizer(), quantization_method=["q8_0", "iq2_xs"])
    with pytest.raises(ValueError, match="needs the tokenizer"):
        model.save_pretrained_gguf(str(tmp_path))
    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="BPE.*WordLevel"):
        model.save_pretrained_gguf(str(tmp_path), PreTrainedTokenizerFast(tokenizer_object=words))
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2,
                                                                 vocab_size=512))
    with pytest.raises(ValueError, match="supports the model types llama.*'gpt2'"):
        save_pretrained_gguf(gpt2, str(tmp_path), tokenizer())
    assert os.listdir(tmp_path) == []
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        model.save_pretrained_gguf(str(tmp_path), tokenizer(), "f16")
    assert os.listdir(tmp_path) == ["notes.txt"]
    model.save_pretrained_gguf(str(tmp_path), tokenizer(), "f16", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model.F16.gguf", "notes.txt"]


def test_gguf_sentencepiece_style_tokenizer_gets_scores_and_byte_tokens(tmp_path):
    """A BPE with byte fallback (how HF stores Mistral's and Gemma's sentencepiece vocabularies) becomes
    llama.cpp's "llama" tokenizer: pieces score by -rank of the merge that makes them."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "b", "ab", "\u2581ab"]
    merges = [("a", "b"), ("\u2581", "ab")]
    spm = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True))
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = lora_model("mistral-7b-tiny")
    reader = gguf.GGUFReader(model.save_pretrained_gguf(str(tmp_path), tok, "f16"))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False  # this tokenizer prepends no "\u2581"
    assert "tokenizer.ggml.merges" not in reader.fields
    types, scores = field(reader, "tokenizer.ggml.token_type"), field(reader, "tokenizer.ggml.scores")
    T = gguf.TokenType
    assert types[0] == T.UNKNOWN and types[1] == types[2] == T.CONTROL
    assert set(types[3:259]) == {T.BYTE} and set(types[259:len(pieces)]) == {T.NORMAL}
    assert set(types[len(pieces):]) == {T.UNUSED}
    assert scores[pieces.index("ab")] == 0.0 and scores[pieces.index("\u2581ab")] == -1.0
    assert scores[pieces.index("a")] == scores[0] == -3.0  # no merge makes them: below every merge


@pytest.mark.gpu
def test_nf4_merge_on_gpu_uses_the_fused_dequantization(seed, tmp_path):
    """On CUDA the NF4 base is dequantized by fastbench's kernel: the merged checkpoint reloads to the
    fused model's logits, and the merged weight is bitsandbytes' dequantized weight plus the delta."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cuda",
                                                    load_in_4bit=True, seed=seed)
        model = FastLanguageModel.get_peft_model(base, r=4, lora_alpha=8, random_state=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    merged = dict(merged_tensors(model))["model.layers.0.self_attn.q_proj.weight"]
    delta = q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
    dequantized = bnbf.dequantize_4bit(q.base_layer.weight.data, q.base_layer.weight.quant_state).float()
    assert rel(merged, dequantized + delta) < 1e-6

    ids = torch.randint(0, 512, (2, 11), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained_merged(str(tmp_path / "merged"), save_method="merged_32bit")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), device_map="cuda")
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
    assert logits.isfinite().all() and rel(logits, expected) < 1e-4


def test_nf4_weights_in_bitsandbytes_cpu_packing_merge_and_train_as_before(seed):
    """bitsandbytes rewrites an NF4 weight into its CPU kernel's layout after an eval-mode forward on a CPU
    with AVX512-BF16 (generate under for_inference). Merging and the fused training forward read that
    layout: the same weights as before, up to the bf16 rounding of absmax the rewrite makes."""
    import bitsandbytes.functional as bnbf

    from fastbench.kernels.nf4 import dequantize_nf4_weight

    model = lora_model("llama-3-8b-tiny", load_in_4bit=True)
    ids = torch.randint(0, 512, (2, 9))
    before_merge = dict(merged_tensors(model))
    with torch.no_grad():
        before_logits = model(input_ids=ids).logits
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        model.generate(input_ids=ids[:1, :4], max_new_tokens=2, do_sample=False)
    weights = [m.weight for m in model.get_base_model().modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    for w in weights:  # where the CPU lacks AVX512-BF16 the rewrite did not happen: make it
        if not getattr(w.quant_state, "packing_format_for_cpu", False):
            w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu(w.data, w.quant_state)
    assert all(w.quant_state.packing_format_for_cpu for w in weights)
    FastLanguageModel.for_training(model)

    after_merge = dict(merged_tensors(model))
    assert after_merge.keys() == before_merge.keys()
    for name in before_merge:
        assert rel(after_merge[name], before_merge[name]) < 1e-2, name
    w, state = weights[0], weights[0].quant_state
    standard, _ = bnbf._convert_weight_packed_for_cpu_inverse(w.data.clone(), copy.deepcopy(state))
    codes = torch.stack([standard.view(torch.uint8) >> 4, standard.view(torch.uint8) & 15], -1).reshape(-1).long()
    held = state.code[codes] * state.absmax.t().reshape(-1).float().repeat_interleave(state.blocksize)
    assert torch.equal(dequantize_nf4_weight(w).float().reshape(-1), held)  # the weight bitsandbytes computes with
    with torch.no_grad():
        assert rel(model(input_ids=ids).logits, before_logits) < 2e-2


def fake_disk(monkeypatch, free: int):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(free * 2, free, free))


def test_no_room_on_disk_is_refused_before_writing(tmp_path, monkeypatch):
    model = lora_model("llama-3-8b-tiny")
    model.save_pretrained_gguf(str(tmp_path / "gguf"), tokenizer(), "q8_0")
    model.save_pretrained_merged(str(tmp_path / "merged"))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    fake_disk(monkeypatch, 50_000)
    with pytest.raises(ValueError, match=r"not enough disk space for .*gguf: the export needs .* MiB, 0.0 MiB is free"):
        model.save_pretrained_gguf(str(tmp_path / "gguf"), tokenizer(), ["q8_0", "f32"], overwrite=True)
    with pytest.raises(ValueError, match="not enough disk space for .*merged"):
        model.save_pretrained_merged(str(tmp_path / "merged"), overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched or left


def test_disk_filling_up_mid_write_leaves_the_previous_file(tmp_path, monkeypatch):
    import errno

    model = lora_model("llama-3-8b-tiny")
    path = model.save_pretrained_gguf(str(tmp_path), tokenizer(), "q8_0")
    before = open(path, "rb").read()

    def full_disk(writer, **kw):
        writer.fout[0].write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(ValueError, match="the disk filled up while writing .*model.Q8_0.gguf; nothing was left"):
        model.save_pretrained_gguf(str(tmp_path), tokenizer(), "q8_0", overwrite=True)
    assert os.listdir(tmp_path) == ["model.Q8_0.gguf"] and open(path, "rb").read() == before


def test_tokenizer_with_a_split_llama_cpp_lacks_is_refused(tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|\s+"), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.train_from_iterator(["a b c"], trainers.BpeTrainer(vocab_size=300,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = lora_model("qwen3-8b-tiny")
    with pytest.raises(ValueError, match=r"llama.cpp splits text with a fixed set of regexes; this tokenizer's split "
                                         r"pattern '\\\\w\+\|\\\\s\+' is not one"):
        model.save_pretrained_gguf(str(tmp_path), PreTrainedTokenizerFast(tokenizer_object=tok), "f16")
    assert os.listdir(tmp_path) == []
