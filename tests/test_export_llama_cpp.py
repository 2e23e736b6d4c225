"""llama.cpp as the judge of the GGUF files (runs where llama-cpp-python is installed, skipped elsewhere):
it tokenizes as the HF tokenizer does, per family; our k-quant files have llama-quantize's per-tensor
types, per-tensor errors no higher than llama.cpp's own quantizer's, and logits no further from the fp32
model than llama.cpp's own q4_k_m of the same f16 file."""
from __future__ import annotations

import ctypes
import os
import warnings

import numpy as np
import pytest
import torch

from export_families import small_model, tokenizer
from fastbench.export import save_pretrained_gguf

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.llama_cpp

FAMILIES = ["llama2", "mistral", "gemma", "llama3", "qwen2", "qwen3"]
TEXTS = [
    "hello world", " hello world", "  two leading spaces", "\thello", "\nnew line first", "line one\nline two",
    "a\n\n\nb", "trailing space ", "trailing newline\n", "café naïve über", "東京 数学", "emoji 🙂 and 🚀",
    "numbers 12345 and 2026-12-01", "don't it's we'll", "MiXeD CaSe WoRdS", "punctuation!? (yes) [no] {maybe}",
    "tabs\tand\tspaces  mixed", "the quick brown fox jumps over the lazy dog", "x", "",
    "unicode ß ü ё ж ☃ ∑", "a" * 40, "fastbench writes gguf files for llama.cpp",
]
REFERENCE_FTYPES = {"q4_k_m": 15, "q4_k_s": 14, "q5_k_m": 17, "q5_k_s": 16, "q6_k": 18, "q3_k_m": 12, "q4_0": 2,
                    "q5_0": 8, "q8_0": 7}


def llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)


def special_texts(tok) -> list[str]:
    """Texts with the tokenizer's special tokens inside, and its chat prompt (as rendered, with BOS text
    where the template writes it, and without)."""
    specials = [t for t in tok.all_special_tokens if t not in (tok.unk_token, tok.pad_token)]
    texts = [f"{s}hello" for s in specials] + [f"hello {s} world" for s in specials]
    chat = [{"role": "user", "content": "What is 2+2?\nAnswer briefly."}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": " thanks 🙂"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    texts.append(rendered)
    if tok.bos_token and rendered.startswith(tok.bos_token):
        texts.append(rendered[len(tok.bos_token):])
    return texts


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """family -> (tokenizer, directory): each family's tokenizer, exported with a narrow model as f16."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        tok = tokenizer(family, root / "tok")
        model = small_model(family, vocab_size=512, hidden=64, layers=1)
        save_pretrained_gguf(model, str(root / "gguf"), tok, "f16")
        out[family] = (tok, root / "gguf" / "model.F16.gguf")
    return out


def llama_cpp_text(tok, text: str) -> str:
    """The text whose HF tokenization llama.cpp's sentencepiece-style tokenizer gives for ``text`` when it
    prefixes a space. llama.cpp tokenizes as sentencepiece itself does: a space goes before the text
    even when it starts with one, and before every piece of text that follows a special token. The HF
    tokenizer (transformers' Metaspace, prepend_scheme "first") adds it only at the start of the text,
    and only when the text does not start with a space."""
    import re

    specials = sorted((t for t in tok.all_special_tokens), key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    if parts[0].startswith(" "):
        parts[0] = " " + parts[0]
    return "".join(" " + p if i > 0 and p and p not in specials and parts[i - 1] in specials else p
                   for i, p in enumerate(parts))


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_as_the_tokenizer(family_files, family):
    tok, path = family_files[family]
    vocab = llama(path, vocab_only=True)
    texts = TEXTS + special_texts(tok)
    assert len(texts) >= 25
    space_prefix = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_space_prefix")
    mismatches = []
    for text in texts:
        for add_special in (True, False):
            hf_text = llama_cpp_text(tok, text) if space_prefix and space_prefix.contents() else text
            want = tok(hf_text, add_special_tokens=add_special)["input_ids"]
            got = vocab.tokenize(text.encode(), add_bos=add_special, special=True)
            if got != want:
                mismatches.append((text, add_special, want, got))
    assert not mismatches, f"{len(mismatches)} of {2 * len(texts)} differ, first: {mismatches[:3]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_per_family(family_files, family):
    tok, path = family_files[family]
    fields = gguf.GGUFReader(str(path)).fields
    value = lambda key: fields[key].contents() if key in fields else None  # noqa: E731
    spm = family in ("llama2", "mistral", "gemma")
    assert value("tokenizer.ggml.model") == ("llama" if spm else "gpt2")
    assert value("tokenizer.ggml.pre") == {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}.get(family, "default")
    assert value("tokenizer.ggml.add_bos_token") is (family not in ("qwen2", "qwen3"))
    assert value("tokenizer.ggml.add_eos_token") is False
    assert value("tokenizer.ggml.add_space_prefix") == ({"gemma": False}.get(family, True) if spm else None)
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    eot = {"gemma": "<end_of_turn>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>"}.get(family)
    assert value("tokenizer.ggml.eot_token_id") == (tok.convert_tokens_to_ids(eot) if eot else None)
    assert value("tokenizer.chat_template") == tok.chat_template
    assert value("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16


# --- quantization against llama.cpp's quantizer -------------------------------------------------------

def ggml_quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """llama.cpp's own quantizer (ggml_quantize_chunk, no importance matrix) on fp32 rows."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    return out


def error(data: np.ndarray, kind: str, x: np.ndarray) -> float:
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    return float(np.linalg.norm(back - x) / np.linalg.norm(x))


@pytest.mark.parametrize("cols", [4096, 14336])
@pytest.mark.parametrize("kind", ["Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_kquant_error_at_most_llama_cpps(seed, kind, cols):
    """Rows of the real models' widths (Llama-3-8B's hidden and FFN sizes), weights of their spread,
    with heavy tails in some rows; a row subset keeps the CPU time short (rows are independent)."""
    from fastbench.export.kquants import quantize_k

    x = torch.randn(48, cols) * 0.02
    x[::5] = torch.distributions.StudentT(3.0).sample((x[::5].shape)) * 0.01
    ours = error(quantize_k(x, kind).numpy(), kind, x.numpy())
    theirs = error(ggml_quantize(x.numpy(), kind), kind, x.numpy())
    print(f"{kind} rows of {cols}: relative error ours {ours:.5f}, llama.cpp {theirs:.5f}, ratio {ours / theirs:.4f}")
    assert ours <= 1.02 * theirs, (ours, theirs)


def file_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def reference_quantize(source, target, method: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = REFERENCE_FTYPES[method]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) == 0


@pytest.fixture(scope="module")
def wide_files(tmp_path_factory):
    """family -> dict: a 4-layer model of width 256 (k-quants apply) exported by us as f32, f16 and
    q4_k_m, llama.cpp's q4_k_m of our f16 file, and the HF model and tokenizer."""
    out = {}
    for family in ("llama3", "qwen2", "gemma"):
        root = tmp_path_factory.mktemp("wide-" + family)
        tok = tokenizer(family, root / "tok")
        model = small_model(family, vocab_size=512, hidden=256, layers=4, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paths = save_pretrained_gguf(model, str(root / "ours"), tok, ["f32", "f16", "q4_k_m"])
        reference = root / "llama.Q4_K_M.gguf"
        reference_quantize(paths[1], reference, "q4_k_m")
        out[family] = dict(model=model, tok=tok, f32=paths[0], f16=paths[1], ours=paths[2], theirs=reference)
    return out


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma"])
def test_q4_k_m_types_and_tensor_errors_match_llama_quantize(wide_files, family):
    files = wide_files[family]
    ours, theirs, exact = (file_tensors(files[k]) for k in ("ours", "theirs", "f32"))
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    assert {t.tensor_type.name for t in ours.values()} >= {"Q4_K", "Q6_K", "F32"}
    for name, t in ours.items():
        kind = t.tensor_type.name
        if kind not in ("Q4_K", "Q5_K", "Q6_K"):
            continue
        x = gguf.quants.dequantize(exact[name].data, exact[name].tensor_type)
        ours, theirs = error(np.asarray(t.data), kind, x), error(ggml_quantize(x, kind), kind, x)
        print(f"{family} {name} {kind}: ours {ours:.5f}, llama.cpp {theirs:.5f}, ratio {ours / theirs:.4f}")
        assert ours <= 1.02 * theirs, name


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma"])
def test_q4_k_m_logits_no_further_from_fp32_than_llama_cpps(wide_files, family):
    files = wide_files[family]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, len(files["tok"]), (48,), generator=g).tolist() for _ in range(4)]

    def logits(path):
        model = llama(path, n_ctx=64, logits_all=True)
        out = []
        for ids in prompts:
            model.reset()
            model.eval(ids)
            out.append(np.array(model.scores[: len(ids)]))
        return np.stack(out)

    exact = logits(files["f32"])
    with torch.no_grad():
        hf = files["model"](input_ids=torch.tensor(prompts)).logits.numpy()
    assert np.linalg.norm(exact - hf) / np.linalg.norm(hf) < 2e-3  # the f32 file is the HF model
    ours = np.linalg.norm(logits(files["ours"]) - exact)
    theirs = np.linalg.norm(logits(files["theirs"]) - exact)
    print(f"{family} q4_k_m logits, distance from the f32 file's: ours {ours:.4f}, llama.cpp's {theirs:.4f}, "
          f"ratio {ours / theirs:.4f} (f32 file vs HF: {np.linalg.norm(exact - hf) / np.linalg.norm(hf):.2e})")
    assert ours <= 1.05 * theirs, (ours, theirs)


@pytest.mark.parametrize("method", ["q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q4_0", "q5_0", "q8_0"])
def test_every_scheme_has_llama_quantizes_types(tmp_path, method):
    """A model with layer widths of 256 and 320 (a width that does not split into super-blocks): every
    tensor's type as llama-quantize gives it, and llama.cpp loads and runs the file."""
    tok = tokenizer("qwen2", tmp_path / "tok")
    model = small_model("qwen2", vocab_size=512, hidden=256, layers=8, seed=2)
    with torch.no_grad():
        for layer in model.model.layers[::3]:  # narrower FFNs here: 320 columns in ffn_down
            layer.mlp.down_proj.weight = torch.nn.Parameter(torch.randn(256, 320) * 0.02)
            layer.mlp.gate_proj.weight = torch.nn.Parameter(torch.randn(320, 256) * 0.02)
            layer.mlp.up_proj.weight = torch.nn.Parameter(torch.randn(320, 256) * 0.02)
    f16, ours = save_pretrained_gguf(model, str(tmp_path / "ours"), tok, ["f16", method])
    reference = tmp_path / "reference.gguf"
    reference_quantize(f16, reference, method)
    assert {n: t.tensor_type.name for n, t in file_tensors(ours).items()} == \
        {n: t.tensor_type.name for n, t in file_tensors(reference).items()}
