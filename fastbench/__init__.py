"""fastbench: fast LoRA/QLoRA fine-tuning with autotuned Triton kernels.

Importing fastbench changes nothing in transformers or anywhere else; ``FastLanguageModel`` is
imported on first use.
"""
__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "is_bfloat16_supported", "CheckpointConfig", "OffloadConfig", "__version__"]


def __getattr__(name):
    if name in ("FastLanguageModel", "is_bfloat16_supported"):
        from fastbench import model

        return getattr(model, name)
    if name in ("CheckpointConfig", "OffloadConfig"):
        from fastbench.fused.checkpointing import config

        return getattr(config, name)
    raise AttributeError(f"module 'fastbench' has no attribute {name!r}")
