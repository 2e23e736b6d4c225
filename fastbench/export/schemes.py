"""Quantization schemes of a GGUF file: the type of each tensor, as llama.cpp's ``llama-quantize`` assigns
it for that scheme (so our files are interchangeable with its files).

The rules, for a model of ``n`` layers (layer ``i``):
- only 2-D ``*.weight`` tensors other than norms are quantized; the rest stay F32;
- the output projection (``output.weight``, or ``token_embd.weight`` when the embeddings are tied) gets
  Q6_K, or Q8_0 in a q8_0 file or when its rows do not split into the scheme's blocks;
- ``attn_v``: q4_k_m and q5_k_m give "more bits" layers Q6_K; q4_k_s gives layers 0-3 Q5_K; q3_k_m
  gives layers 0-1 Q5_K and the rest Q4_K; a 70B-class model lifts Q3_K/Q4_K there to Q5_K;
- ``ffn_down``: q4_k_m and q5_k_m give "more bits" layers Q6_K; q4_k_s gives the first n/8 Q5_K;
  q3_k_m gives the first n/16 Q5_K and the rest Q4_K;
- ``attn_output``: q3_k_m gives Q4_K;
- "more bits" layers: the first n/8, the last n/8, and every third layer between them;
- a tensor whose rows do not split into its type's blocks falls back: Q3_K to IQ4_NL, Q4_K to Q5_0,
  Q5_K to Q5_1, Q6_K to Q8_0, and to F16 where even that does not split.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# type -> values per block
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "IQ4_NL": 32,
              "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# type -> bytes per block
BLOCK_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q5_1": 24, "IQ4_NL": 18,
               "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_FALLBACK = {"Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class Scheme:
    name: str  # what users pass: "q4_k_m"
    base: str  # the type of the tensors no rule changes
    file_type: str  # gguf.LlamaFileType member written as general.file_type


SCHEMES = {s.name: s for s in [
    Scheme("q4_k_m", "Q4_K", "MOSTLY_Q4_K_M"), Scheme("q4_k_s", "Q4_K", "MOSTLY_Q4_K_S"),
    Scheme("q5_k_m", "Q5_K", "MOSTLY_Q5_K_M"), Scheme("q5_k_s", "Q5_K", "MOSTLY_Q5_K_S"),
    Scheme("q6_k", "Q6_K", "MOSTLY_Q6_K"), Scheme("q3_k_m", "Q3_K", "MOSTLY_Q3_K_M"),
    Scheme("q8_0", "Q8_0", "MOSTLY_Q8_0"), Scheme("q4_0", "Q4_0", "MOSTLY_Q4_0"),
    Scheme("q5_0", "Q5_0", "MOSTLY_Q5_0"), Scheme("f16", "F16", "MOSTLY_F16"),
    Scheme("bf16", "BF16", "MOSTLY_BF16"), Scheme("f32", "F32", "ALL_F32"),
]}


def get_scheme(method: str) -> Scheme:
    key = str(method).lower()
    if key not in SCHEMES:
        raise ValueError(f"unknown quantization_method {method!r}; valid: {', '.join(SCHEMES)}")
    return SCHEMES[key]


@dataclass(frozen=True)
class ModelFacts:
    """What the rules look at besides a tensor's name and shape."""
    n_layer: int
    has_output: bool  # an output.weight of its own (not tied to token_embd)
    is_70b: bool = False  # llama.cpp's 70B class (8 query heads per K/V head in attn_v)


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(scheme: Scheme, name: str, shape: tuple[int, ...], model: ModelFacts) -> str:
    """The GGUF type of tensor ``name`` (``shape`` in torch order: [rows, cols]) under ``scheme``."""
    if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
        return "F32"
    if scheme.base in ("F32", "F16", "BF16"):
        return scheme.base
    kind = _rule_type(scheme, name, shape[-1], model)
    return _fit_rows(kind, shape[-1])


def _rule_type(scheme: Scheme, name: str, cols: int, model: ModelFacts) -> str:
    s, t = scheme.name, scheme.base
    layer = re.match(r"blk\.(\d+)\.", name)
    i, n = (int(layer.group(1)) if layer else 0), model.n_layer
    if name == "output.weight" or (not model.has_output and name == "token_embd.weight"):
        if cols % BLOCK_SIZE[t]:
            return "Q8_0"
        return t if t == "Q8_0" else "Q6_K"
    if name.endswith("attn_v.weight"):
        if s == "q3_k_m":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif s in ("q4_k_m", "q5_k_m") and more_bits(i, n):
            t = "Q6_K"
        elif s == "q4_k_s" and i < 4:
            t = "Q5_K"
        if model.is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
    elif name.endswith("ffn_down.weight"):
        if s == "q3_k_m":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif s in ("q4_k_m", "q5_k_m") and more_bits(i, n):
            t = "Q6_K"
        elif s == "q4_k_s" and i < n // 8:
            t = "Q5_K"
    elif name.endswith("attn_output.weight") and s == "q3_k_m":
        t = "Q4_K"
    return t


def _fit_rows(kind: str, cols: int) -> str:
    if cols % BLOCK_SIZE[kind]:
        kind = _FALLBACK.get(kind, "F16")
        if cols % BLOCK_SIZE[kind]:
            kind = "F16"
    return kind


def tensor_bytes(kind: str, shape: tuple[int, ...]) -> int:
    numel = 1
    for s in shape:
        numel *= s
    return numel // BLOCK_SIZE[kind] * BLOCK_BYTES[kind]
