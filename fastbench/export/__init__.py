"""Export a LoRA model (the PEFT model ``FastLanguageModel.get_peft_model`` returns) with its adapters
merged: as a plain transformers checkpoint (:mod:`.merge`), or as a GGUF file for llama.cpp
(:mod:`.gguf_file`), k-quants included, with no llama.cpp tool."""
from __future__ import annotations

import types

from fastbench.export.gguf_file import save_pretrained_gguf
from fastbench.export.merge import merged_tensors, save_pretrained_merged
from fastbench.export.schemes import SCHEMES

GGUF_METHODS = tuple(SCHEMES)

__all__ = ["GGUF_METHODS", "attach", "merged_tensors", "save_pretrained_gguf", "save_pretrained_merged"]


def attach(peft_model):
    """Binds ``save_pretrained_merged`` and ``save_pretrained_gguf`` onto this one model object."""
    peft_model.save_pretrained_merged = types.MethodType(save_pretrained_merged, peft_model)
    peft_model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, peft_model)
    return peft_model
