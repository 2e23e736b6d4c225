"""Training checkpoints: ``OUTPUT/checkpoint-N/`` holds what resuming after step N needs, the adapter
(``save_pretrained``), the optimizer, the learning-rate schedule, the random number generators and the
data position. A checkpoint is written under a temporary name and renamed into place, so one that exists
is whole; a damaged one (a file truncated or edited since) is named on resume with what to do. A write that
fails on a full disk leaves the files that were there as they were and nothing half-written.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and says what to do."""


def checkpoints(output: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints under ``output``, oldest first."""
    if not os.path.isdir(output):
        return []
    found = [(int(m.group(1)), os.path.join(output, name)) for name in os.listdir(output)
             if (m := _NAME.match(name)) and os.path.isdir(os.path.join(output, name))]
    return sorted(found)


def save_adapter(model, tokenizer, output: str) -> None:
    """Writes the adapter (and tokenizer) into ``output``: first to a scratch folder inside it, then each
    file moved into place, so an interruption never leaves a half-written adapter file."""
    os.makedirs(output, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".saving-", dir=output)
    try:
        model.save_pretrained(scratch)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
        for name in os.listdir(scratch):
            os.replace(os.path.join(scratch, name), os.path.join(output, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _rng_state() -> dict:
    import random

    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _save_torch(obj, path: str) -> None:
    """torch.save through memory, so that a failed write (a full disk) raises the OSError that says so
    (torch.save's own file writer reports only a position mismatch)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def save_checkpoint(output: str, step: int, model, optimizer, scheduler, position: dict, world_size: int = 1) -> str:
    """Writes ``OUTPUT/checkpoint-{step}/`` whole or not at all (``world_size``: the processes that trained
    it, which a resumed run must have too); returns its path."""
    from fastbench.distributed.world import WORLD_SIZE_KEY

    target = os.path.join(output, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output)
    try:
        model.save_pretrained(tmp)
        _save_torch(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        _save_torch(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        _save_torch(_rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": step, "position": position, WORLD_SIZE_KEY: world_size}, f)
        if os.path.exists(target):  # written by an earlier run that was resumed from before this step
            old = tempfile.mkdtemp(prefix=f".old-checkpoint-{step}-", dir=output)
            os.replace(target, os.path.join(old, "c"))
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_checkpoint(path: str) -> dict:
    """Every file of a checkpoint read into memory (CPU) and checked, before any model is loaded:
    {"step", "position", "world_size", "adapter", "optimizer", "scheduler", "rng", "path"} (a checkpoint
    without a world size was written by one process). CheckpointError names what is damaged."""
    import torch
    from safetensors.torch import load_file

    from fastbench.distributed.world import WORLD_SIZE_KEY

    def damaged(name, error):
        return CheckpointError(f"{path} is damaged ({name}: {error}); delete that directory to resume from the "
                               "checkpoint before it, or start over with --overwrite")

    state = {"path": path}
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            meta = json.load(f)
        state["step"], state["position"] = int(meta["step"]), dict(meta["position"])
        state[WORLD_SIZE_KEY] = int(meta.get(WORLD_SIZE_KEY, 1))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise damaged(STATE_FILE, e) from None
    try:
        state["adapter"] = load_file(os.path.join(path, ADAPTER_FILE))
    except Exception as e:  # safetensors raises its own error for a truncated header or data
        raise damaged(ADAPTER_FILE, e) from None
    for name in ("optimizer", "scheduler", "rng"):
        try:
            state[name] = torch.load(os.path.join(path, f"{name}.pt"), map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load: RuntimeError / EOFError / pickle errors on a damaged file
            raise damaged(f"{name}.pt", e) from None
    return state


def restore(state: dict, model, optimizer, scheduler) -> None:
    """Puts a loaded checkpoint's adapter, optimizer, schedule and RNG states back."""
    import random

    import torch
    from peft import set_peft_model_state_dict

    def other_adapter(what):
        return CheckpointError(f"{state['path']} holds an adapter of another shape or model ({what}); resume with the "
                               "options it was trained with (--r, --targets), or start over with --overwrite")

    try:
        result = set_peft_model_state_dict(model, state["adapter"])
    except RuntimeError as e:  # load_state_dict: "size mismatch for ...", another --r
        if "size mismatch" not in str(e):
            raise
        raise other_adapter(next(line.strip() for line in str(e).splitlines() if "size mismatch" in line)) from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise other_adapter(f"{unexpected[0]}, ...")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:
        raise CheckpointError(f"{state['path']}: its optimizer state does not fit this adapter ({e}); resume "
                              "with the options it was trained with, or start over with --overwrite") from None
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
