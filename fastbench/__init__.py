"""fastbench: fast LoRA/QLoRA fine-tuning with autotuned Triton kernels.

Importing fastbench changes nothing in transformers or anywhere else; ``FastLanguageModel`` is
imported on first use.
"""
__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "__version__"]


def __getattr__(name):
    if name == "FastLanguageModel":
        from fastbench.model import FastLanguageModel

        return FastLanguageModel
    raise AttributeError(f"module 'fastbench' has no attribute {name!r}")
