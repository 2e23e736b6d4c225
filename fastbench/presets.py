"""Model presets: the real architectures with random (seeded) weights, so speed and memory can be
measured with no download. Each full-size preset has a ``-tiny`` sibling (2 layers, small widths) that
runs on a CPU in seconds and keeps the architecture's features (GQA, head_dim, biases, norms, tying,
activation)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# the 7 projections of every supported family: LoRA's default targets everywhere in fastbench
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str  # transformers' model_type: llama, mistral, gemma, qwen2, qwen3
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def max_seq_len(self) -> int:
        return int(self.config["max_position_embeddings"])


_FULL = {
    "llama-3-8b": Preset("llama-3-8b", "llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False), "Meta Llama-3-8B shape"),
    "llama-3.2-1b": Preset("llama-3.2-1b", "llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)), "Meta Llama-3.2-1B shape"),
    "mistral-7b": Preset("mistral-7b", "mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False),
        "Mistral-7B v0.3 shape"),
    "gemma-7b": Preset("gemma-7b", "gemma", dict(
        hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
        rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True), "Google Gemma-7B shape"),
    "qwen2.5-7b": Preset("qwen2.5-7b", "qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False), "Qwen2.5-7B shape"),
    "qwen3-8b": Preset("qwen3-8b", "qwen3", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False), "Qwen3-8B shape"),
}


def _tiny(p: Preset) -> Preset:
    c = dict(p.config)
    heads, kv = 4, (4 if c["num_key_value_heads"] == c["num_attention_heads"] else 2)
    head_dim = 32 if c.get("head_dim", 0) == 256 else 16
    c.update(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=heads,
             num_key_value_heads=kv, head_dim=head_dim, vocab_size=512,
             max_position_embeddings=min(c["max_position_embeddings"], 8192))
    return Preset(p.name + "-tiny", p.model_type, c, f"tiny sibling of {p.name} (2 layers, width 64)")


PRESETS: dict[str, Preset] = {**_FULL, **{p.name + "-tiny": _tiny(p) for p in _FULL.values()}}


class UnknownPreset(ValueError):
    pass


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPreset(
            f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)} "
            "(or a local checkpoint directory)") from None


def build_config(preset: Preset | str):
    """The transformers config of a preset."""
    from transformers import AutoConfig

    p = get_preset(preset) if isinstance(preset, str) else preset
    return AutoConfig.for_model(p.model_type, **p.config)


def build_model(preset: Preset | str, dtype=None, device="cpu", seed: int = 0):
    """A causal LM with the preset's architecture and random weights drawn from ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(preset)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


class NotAModel(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` named: a preset (random weights) or a local checkpoint directory."""

    name: str
    preset: Preset | None = None
    path: str | None = None
    max_seq_len: int = 0
    vocab_size: int = 0
    model_type: str = ""
    prequantized_4bit: bool = False  # a bitsandbytes 4-bit checkpoint, loaded as it is

    def config(self):
        """The transformers config of its text model: the preset's, or the checkpoint directory's."""
        if self.preset is not None:
            return build_config(self.preset)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path).get_text_config()


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def resolve_model(name_or_path: str) -> ModelSource:
    """A preset name, or a local Hugging Face checkpoint directory (config.json plus weights).

    Reads only config.json (no torch import); raises UnknownPreset or NotAModel with the reason."""
    import json
    import os

    if name_or_path in PRESETS:
        p = PRESETS[name_or_path]
        return ModelSource(p.name, preset=p, max_seq_len=p.max_seq_len,
                           vocab_size=int(p.config["vocab_size"]), model_type=p.model_type)
    looks_like_path = os.sep in name_or_path or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if not looks_like_path:
        get_preset(name_or_path)  # raises UnknownPreset listing the valid names
    path = os.path.abspath(os.path.expanduser(name_or_path))
    if not os.path.isdir(path):
        raise NotAModel(f"{name_or_path!r} is not a model: no such directory (and not a preset: "
                        f"{', '.join(PRESETS)})")
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise NotAModel(f"{name_or_path!r} is not a model: cannot read config.json ({e})") from None
    if "vocab_size" not in config:  # multimodal configs nest the language model's
        config = config.get("text_config", config)
    if not any(os.path.exists(os.path.join(path, w)) for w in _WEIGHT_FILES) and not any(
            f.endswith(".safetensors") for f in os.listdir(path)):
        raise NotAModel(f"{name_or_path!r} is not a model: no weights (*.safetensors or "
                        "pytorch_model.bin) beside config.json")
    if "vocab_size" not in config or "max_position_embeddings" not in config:
        raise NotAModel(f"{name_or_path!r} is not a causal LM checkpoint: config.json has no "
                        "vocab_size/max_position_embeddings")
    quant = config.get("quantization_config") or {}
    return ModelSource(name_or_path, path=path, max_seq_len=int(config["max_position_embeddings"]),
                       vocab_size=int(config["vocab_size"]), model_type=config.get("model_type", ""),
                       prequantized_4bit=bool(quant.get("load_in_4bit")) or quant.get("quant_type") == "nf4")
