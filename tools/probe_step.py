"""What the step probes in tools/ share: an arm given as ``bits:ckpt`` (``4bit:offload``, ``bf16:40``,
``4bit:auto``, ``bf16:true``) built on a preset as they train it (random weights, LoRA r=16 on the seven
projections, AdamW), a batch of random tokens with an all-ones attention mask as the harness passes, one
training step, and the compute stream's kernels in a profiler trace."""
from __future__ import annotations

import collections
import contextlib
import json


def parse_arm(arm: str) -> tuple[bool, object]:
    """``bits:ckpt`` -> (load_in_4bit, use_gradient_checkpointing); ckpt as ``fastbench train --checkpointing``
    takes it (true, false, offload, auto or a budget in GiB)."""
    from fastbench.fused.checkpointing import setting_from_text

    bits, sep, ckpt = arm.partition(":")
    if not sep or bits not in ("4bit", "bf16"):
        raise ValueError(f"arm {arm!r}: write bits:ckpt, bits 4bit or bf16, e.g. 4bit:offload or bf16:40")
    try:
        return bits == "4bit", setting_from_text(ckpt)
    except ValueError as e:
        raise ValueError(f"arm {arm!r}: ckpt {e}") from None


@contextlib.contextmanager
def preset_with_layers(model: str, layers: int | None):
    """The name of preset ``model`` cut to ``layers`` decoder layers (the same kernels, a faster build), registered
    as a preset for the block's builds and removed after it; ``model`` itself where ``layers`` is None."""
    import dataclasses

    from fastbench import presets

    if not layers:
        yield model
        return
    preset = presets.get_preset(model)
    name = f"{model}-{layers}-layers"
    presets.PRESETS[name] = dataclasses.replace(preset, name=name,
                                                config={**preset.config, "num_hidden_layers": layers})
    try:
        yield name
    finally:
        presets.PRESETS.pop(name, None)


def build(arm: str, model: str = "llama-3-8b", device: str = "cuda", warmup_attention: bool = True):
    """The arm's PEFT model on the fused path and its AdamW (fused on a GPU): (model, optimizer).
    ``warmup_attention``: FastLanguageModel.from_pretrained's."""
    import torch

    from fastbench import FastLanguageModel

    load_in_4bit, ckpt = parse_arm(arm)
    base, _ = FastLanguageModel.from_pretrained(model, dtype=torch.bfloat16, device=device,
                                                load_in_4bit=load_in_4bit, seed=1, warmup_attention=warmup_attention)
    peft_model = FastLanguageModel.get_peft_model(base, r=16, random_state=2, use_gradient_checkpointing=ckpt,
                                                  fallback=False)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-4,
                                  fused=device.startswith("cuda"))
    return peft_model, optimizer


def random_batch(model, seq: int = 2048, batch: int = 2) -> dict:
    """``batch`` rows of ``seq`` random tokens of ``model``'s vocabulary, on its device, labels = inputs."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=model.device)
    return dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))


def train_step(model, optimizer, batch: dict):
    """Forward with labels, backward, optimizer step; returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def load_trace(path: str) -> list[dict]:
    """The events of a chrome trace that torch.profiler exported."""
    with open(path) as f:
        return json.load(f)["traceEvents"]


def kernel_time_by_stream(events: list[dict]) -> collections.Counter:
    """Microseconds of kernels per CUDA stream; the first of ``most_common()`` is the compute stream."""
    busy = collections.Counter()
    for e in events:
        if e.get("cat") == "kernel":
            busy[e["args"]["stream"]] += e["dur"]
    return busy


def compute_stream_kernels(events: list[dict]) -> list[dict]:
    """The kernels of the stream with the most kernel time (the compute stream), in time order."""
    compute = kernel_time_by_stream(events).most_common(1)[0][0]
    return sorted((e for e in events if e.get("cat") == "kernel" and e["args"]["stream"] == compute),
                  key=lambda k: k["ts"])
