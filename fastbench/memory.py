"""GPU memory at fastbench's entry points: the CUDA caching allocator's settings (:func:`use_expandable_segments`)
and telling a failure for want of memory from other errors (:func:`is_out_of_memory`)."""
from __future__ import annotations

import os
from typing import MutableMapping

EXPANDABLE_SEGMENTS = "expandable_segments:True"
ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch reads either; the first is the current name


def use_expandable_segments(environ: MutableMapping[str, str] | None = None) -> bool:
    """Has the CUDA caching allocator map its memory in segments that grow in place (``expandable_segments:True``)
    instead of fixed-size ones: blocks of varying sizes then fragment the reserved memory less, so a step
    reserves closer to what it allocates. Applies only where the user chose nothing (neither
    ``PYTORCH_ALLOC_CONF`` nor ``PYTORCH_CUDA_ALLOC_CONF`` set), on a machine with CUDA that this process has
    not initialised yet (the setting takes effect before the first allocation); sets ``PYTORCH_ALLOC_CONF``
    in ``environ`` (default: this process's), so that it is recorded and child processes inherit it.
    Returns whether it applied.

    To opt out, set ``PYTORCH_ALLOC_CONF`` yourself before fastbench starts CUDA (e.g.
    ``PYTORCH_ALLOC_CONF=expandable_segments:False``, or any other allocator settings): fastbench never
    overrides it."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in ALLOCATOR_ENV):
        return False
    import torch

    if not torch.cuda.is_available() or torch.cuda.is_initialized():
        return False
    environ["PYTORCH_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    # torch may have read the variable already (at import): the settings are set again, as parsed from it
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(EXPANDABLE_SEGMENTS)
    return True


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the GPU running out of memory: torch's OutOfMemoryError (the caching allocator), or
    an error of another allocation that says so in its text (the CUDA driver's ``CUDA error: out of memory``,
    Triton loading a kernel, a library's workspace)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
