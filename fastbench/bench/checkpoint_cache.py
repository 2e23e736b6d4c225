"""The harness's disk cache of preset checkpoints: loaders that need a path (bitsandbytes quantization on
load, Unsloth, a model given as a directory) read a preset's random weights from here.

A checkpoint is written once per (preset, dtype, seed) under ``$FASTBENCH_CHECKPOINT_CACHE`` (default: the
system temp dir), atomically, and marked; when the disk lacks room for a new one, the least recently used
marked checkpoints beside it are removed first (a later run rebuilds them: same seed, same weights).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from fastbench.presets import Preset, build_model, resolve_model

CACHE_ENV = "FASTBENCH_CHECKPOINT_CACHE"
_MARK = ".fastbench-checkpoint"  # marks directories save_checkpoint wrote (the only ones it may evict)

materialize_seconds = 0.0  # time this process spent writing checkpoints (a worker reports it apart from load time)


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "fastbench-checkpoints")


def checkpoint_dir(model: str, dtype: str, device: str, seed: int) -> str:
    """A directory holding ``model`` as a Hugging Face checkpoint: the path itself for a local checkpoint,
    else the preset's random weights in ``dtype`` (a torch dtype's name), built on ``device`` from ``seed``
    (so identical to ``build_model(preset, dtype, device, seed)``) and written once into the cache."""
    global materialize_seconds
    source = resolve_model(model)
    if source.path:
        return source.path
    directory = os.path.join(cache_root(), f"{source.name}-{dtype}-seed{seed}")
    if not os.path.isdir(directory):
        import torch

        t0 = time.perf_counter()
        save_checkpoint(source.preset, directory, dtype=getattr(torch, dtype), device=device, seed=seed)
        materialize_seconds += time.perf_counter() - t0

        if torch.cuda.is_available():  # writing the checkpoint is not the arm's memory
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return directory


def _make_room(parent: str, needed: int, keep: str) -> None:
    """Ensure ``needed`` bytes are free under ``parent``, removing the least recently used checkpoints
    that save_checkpoint wrote there (never ``keep``, nothing else); OSError saying what to do otherwise."""
    def free() -> int:
        return shutil.disk_usage(parent).free

    if free() >= needed:
        return
    ours = [os.path.join(parent, d) for d in os.listdir(parent)
            if os.path.isfile(os.path.join(parent, d, _MARK)) and os.path.join(parent, d) != keep]
    ours.sort(key=lambda d: os.path.getmtime(os.path.join(d, _MARK)))
    removed = []
    while ours and free() < needed:
        victim = ours.pop(0)
        shutil.rmtree(victim, ignore_errors=True)
        removed.append(os.path.basename(victim))
    if free() < needed:
        raise OSError(f"writing a {needed / 2 ** 30:.1f} GiB random-weight checkpoint needs that much free disk in "
                      f"{parent}, which has {free() / 2 ** 30:.1f} GiB"
                      + (f" after removing older checkpoints ({', '.join(removed)})" if removed else "")
                      + f"; set ${CACHE_ENV} to a directory on a larger disk")


def save_checkpoint(preset: Preset | str, directory: str, dtype=None, device="cpu", seed: int = 0) -> str:
    """Write the preset's random-weight model (``build_model(preset, dtype, device, seed)``) and a small
    word-level tokenizer (words t0..t251) to ``directory`` as a Hugging Face checkpoint, atomically (a
    temporary directory renamed into place), making room first (see the module docstring). An existing
    directory is returned as it is, marked recently used."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    mark = os.path.join(directory, _MARK)
    if os.path.isdir(directory):
        if os.path.isfile(mark):
            os.utime(mark)  # recently used: evicted last
        return directory
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    model = build_model(preset, dtype=dtype, device=device, seed=seed)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    _make_room(parent, int(weight_bytes * 1.02) + (64 << 20), keep=os.path.abspath(directory))
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        model.save_pretrained(tmp)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        specials = ["<pad>", "<s>", "</s>", "<unk>"]
        vocab = {t: i for i, t in enumerate(specials + [f"t{i}" for i in range(252)])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                eos_token="</s>", unk_token="<unk>").save_pretrained(tmp)
        open(os.path.join(tmp, _MARK), "w").close()
        try:
            os.rename(tmp, directory)
        except OSError:  # another process won the race; its copy holds the same weights
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
