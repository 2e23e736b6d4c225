"""Activation checkpointing per decoder layer, for the fused path.

``use_gradient_checkpointing`` picks one policy for all layers of a model:

- ``False``: keep every layer's activations (fastest, most memory).
- ``True``: keep only each layer's input, recompute the layer in the backward.
- ``"offload"``: as True, but the input goes to pinned CPU memory on a side stream (overlapped with
  the next layers' compute) and comes back, one layer ahead, during the backward.
- a number (GiB) or ``"auto"``: a budget. The first layer of the first step runs un-checkpointed
  while the bytes its autograd graph saves are counted; from then on the first
  ``budget // bytes_per_layer`` layers keep their activations and the rest recompute. ``"auto"``
  budgets 70% of the GPU memory free at the first step (on a CPU: keeps everything).

A recomputed layer must be deterministic (no dropout): the fused path refuses lora_dropout > 0.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

GiB = 1 << 30
OFFLOAD_WARNING = (
    "use_gradient_checkpointing='offload' is experimental: on an H200 at llama-3-8b NF4, two runs under "
    "`fastbench compare` diverged from the reference loss after the first steps (results/"
    "2026-11-28-h200-ba739f.json, results/2026-11-28-h200-e55049-aa.log) while standalone runs matched; "
    "until the cause is found prefer True (recompute) or a memory budget in GiB, and check the loss")


class HostOffloader:
    """Copies layer inputs to pinned host buffers on a side stream and back, prefetching one layer ahead."""

    def __init__(self):
        self._saved: dict[int, tuple[torch.Tensor, torch.device, object]] = {}  # index -> (host, device, event)
        self._prefetched: dict[int, tuple[torch.Tensor, object]] = {}
        self._free: list[torch.Tensor] = []  # host buffers to reuse
        self._stream = None

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        for i, buf in enumerate(self._free):
            if buf.dtype == like.dtype and buf.numel() >= like.numel():
                return self._free.pop(i).view(-1)[: like.numel()].view(like.shape)
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)

    def save(self, index: int, x: torch.Tensor) -> None:
        host = self._host_buffer(x)
        event = None
        if x.is_cuda:
            stream = self._side_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            x.record_stream(stream)
        else:
            host.copy_(x)
        self._saved[index] = (host, x.device, event)

    def _fetch(self, index: int):
        host, device, event = self._saved.pop(index)
        if device.type != "cuda":
            self._free.append(host)
            return host.clone(), None
        stream = self._side_stream()
        x = torch.empty(host.shape, dtype=host.dtype, device=device)
        with torch.cuda.stream(stream):
            # x's memory may have been freed by kernels still queued on the compute stream: write it
            # only after them (found on the H200: a prefetch raced a pending kernel, step-3 loss 73)
            stream.wait_stream(torch.cuda.current_stream())
            stream.wait_event(event)
            x.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._free.append(host)  # later writes to it are ordered after this copy on the same stream
        return x, done

    def load(self, index: int) -> torch.Tensor:
        """The input saved under ``index`` on its device; starts fetching ``index - 1``."""
        x, done = self._prefetched.pop(index, None) or self._fetch(index)
        if index - 1 in self._saved:
            self._prefetched[index - 1] = self._fetch(index - 1)
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        return x


class _RecomputedLayer(torch.autograd.Function):
    """Runs ``layer_fn(x)`` without a graph; the backward recomputes it from the kept (or offloaded) x
    and returns the gradients of x and of ``params`` (the layer's trainable parameters)."""

    @staticmethod
    def forward(ctx, layer_fn, offloader, index, x, *params):
        with torch.no_grad():
            y = layer_fn(x)
        ctx.layer_fn, ctx.offloader, ctx.index = layer_fn, offloader, index
        if offloader is not None:
            offloader.save(index, x)
            ctx.save_for_backward(*params)
        else:
            ctx.save_for_backward(x, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        if ctx.offloader is not None:
            x, params = ctx.offloader.load(ctx.index), saved
        else:
            x, params = saved[0], saved[1:]
        needs = ctx.needs_input_grad[3:]
        x = x.detach().requires_grad_(needs[0])
        with torch.enable_grad():
            y = ctx.layer_fn(x)
        inputs = [t for t, need in zip((x, *params), needs) if need]
        grads = iter(torch.autograd.grad(y, inputs, dy, allow_unused=True))
        return (None, None, None, *[next(grads) if need else None for need in needs])


def parse_setting(setting) -> tuple[str, float | None]:
    """``use_gradient_checkpointing`` -> (mode, budget in bytes); mode in keep/recompute/offload/budget."""
    if setting is False or setting is None:
        return "keep", None
    if setting is True:
        return "recompute", None
    if setting == "offload":
        return "offload", None
    if setting == "auto":
        return "budget", None
    if isinstance(setting, str):
        try:
            setting = float(setting)
        except ValueError:
            setting = None
    if isinstance(setting, (int, float)) and setting >= 0:
        return "budget", float(setting) * GiB
    raise ValueError(f"use_gradient_checkpointing must be True, False, 'offload', 'auto' or a budget in GiB; "
                     f"got {setting!r}")


class LayerCheckpointing:
    """Runs each decoder layer of a forward under the model's checkpointing policy."""

    def __init__(self, setting):
        self.setting = setting
        self.mode, self.budget = parse_setting(setting)
        self.offloader = HostOffloader() if self.mode == "offload" else None
        if self.mode == "offload":
            warnings.warn(OFFLOAD_WARNING, stacklevel=3)
        self.bytes_per_token: float | None = None  # measured by the budget mode
        self._kept = 0

    def __call__(self, index: int, layer_fn: Callable, x: torch.Tensor, params) -> torch.Tensor:
        if self.mode == "keep" or not torch.is_grad_enabled():
            return layer_fn(x)
        if self.mode == "budget":
            if index == 0:
                self._kept = 0
            if self.bytes_per_token is None:
                return self._measure(layer_fn, x)
            if (self._kept + 1) * self.bytes_per_token * x.shape[:-1].numel() <= self._budget(x):
                self._kept += 1
                return layer_fn(x)
        return _RecomputedLayer.apply(layer_fn, self.offloader, index, x, *params)

    def _budget(self, x) -> float:
        if self.budget is None:  # "auto", decided once at the first step
            if x.is_cuda:
                free, _ = torch.cuda.mem_get_info(x.device)
                self.budget = 0.7 * (free + torch.cuda.memory_reserved(x.device)
                                     - torch.cuda.memory_allocated(x.device))
            else:
                self.budget = float("inf")
        return self.budget

    def _measure(self, layer_fn, x) -> torch.Tensor:
        storages = {}

        def pack(t):
            if isinstance(t, torch.nn.Parameter):
                return t
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer_fn(x)
        self.bytes_per_token = sum(storages.values()) / x.shape[:-1].numel()
        self._kept = 1
        return y

    def describe(self) -> str:
        return {"keep": "no activation checkpointing", "recompute": "recompute every layer",
                "offload": "recompute every layer, inputs offloaded to pinned CPU memory",
                "budget": f"keep layers within a budget of {self.setting} GiB, recompute the rest"}[self.mode]
