"""Export a LoRA model (the PEFT model ``FastLanguageModel.get_peft_model`` returns) with its adapters
merged: as a plain transformers checkpoint (:mod:`.merge`), or as a GGUF file for llama.cpp
(:mod:`.gguf_file`), k-quants included, with no llama.cpp tool. The heavy modules load on first use
(the command line lists ``fastbench export`` without importing torch)."""
from __future__ import annotations

import importlib
import types

from fastbench.export.schemes import SCHEMES

GGUF_METHODS = tuple(SCHEMES)
_LAZY = {"save_pretrained_gguf": "gguf_file", "save_pretrained_merged": "merge", "merged_tensors": "merge"}

__all__ = ["GGUF_METHODS", "attach", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"fastbench.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attach(peft_model):
    """Binds ``save_pretrained_merged`` and ``save_pretrained_gguf`` onto this one model object."""
    from fastbench.export.gguf_file import save_pretrained_gguf
    from fastbench.export.merge import save_pretrained_merged

    peft_model.save_pretrained_merged = types.MethodType(save_pretrained_merged, peft_model)
    peft_model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, peft_model)
    return peft_model
