"""Kernel launches with less host work than ``kernel[grid](...)``, for kernels Triton already compiled.

On every call, Triton's launch path (``JITFunction.run``) specialises each argument, builds a cache
key, checks the kernel's globals and assembles launch metadata before it calls the kernel's
launcher: ~80 us a launch under cProfile (its own overhead included) on the H200's host, where a
4-bit offloaded llama-3-8b step launches ~700 kernels and is bound by the host issuing it
(results/logs/2026-11-28-h200-diag-*.log). :func:`launch` keeps, per kernel and *argument key*, the
kernel Triton compiled on the first call, and later calls its launcher directly.

The argument key holds everything Triton specialises a compilation on, and more: each tensor's
dtype and whether its address is 16-byte aligned; each int's width class, whether it is 1 and
whether 16 divides it; bools and None by value; every constexpr and launch option by value; the
current device. A call whose arguments Triton would compile differently therefore has a new key and
goes through Triton (which compiles, or finds, the right kernel).

Triton's own path runs instead under the interpreter (``TRITON_INTERPRET=1``), with launch hooks
installed (profilers), for arguments of other kinds, and everywhere with ``FASTBENCH_FAST_LAUNCH=0``.
"""
from __future__ import annotations

import inspect
import os

import torch
from triton import knobs

_I32, _I64 = 1 << 31, 1 << 63


def enabled() -> bool:
    """Whether launches may bypass Triton's launch path (read from the environment at each call)."""
    return (os.environ.get("FASTBENCH_FAST_LAUNCH", "1") != "0"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


class _Unhandled(Exception):
    """An argument this module does not key: the call goes through Triton."""


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, -_I32 <= a < _I32, a < _I64)
    if isinstance(a, float):
        return float
    raise _Unhandled


class _Layout:
    """Where each of a kernel's parameters comes from, for one calling convention (how many
    positional arguments, which keywords): the launcher takes them all, in signature order."""

    def __init__(self, kernel, n_args: int, names: tuple[str, ...]):
        params = list(kernel.signature.parameters.values())
        self.sources = []  # per parameter: its positional index, or its keyword's name, or ("default", value)
        for i, p in enumerate(params):
            if i < n_args:
                self.sources.append(i)
            elif p.name in names:
                self.sources.append(p.name)
            elif p.default is not inspect.Parameter.empty:
                self.sources.append(("default", p.default))
            else:
                raise _Unhandled

    def bound(self, args, meta) -> list:
        return [args[s] if type(s) is int else meta[s] if type(s) is str else s[1] for s in self.sources]


_launchers: dict = {}  # argument key -> (launcher, function handle, packed metadata, layout)
_layouts: dict = {}


def _hooks_installed() -> bool:
    runtime = knobs.runtime
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _device() -> int:
    return torch.cuda.current_device()


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``: constexprs and launch options (num_warps, ...) as keywords."""
    if not enabled():
        kernel[grid](*args, **meta)
        return
    try:
        key = (kernel, _device(), *map(_arg_key, args), *meta.items())
        hit = _launchers.get(key)
    except (_Unhandled, TypeError):  # TypeError: an unhashable keyword value
        kernel[grid](*args, **meta)
        return
    if hit is not None and not _hooks_installed():
        run, function, packed, layout = hit
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _stream(key[1]),
            function, packed, None, None, None, *layout.bound(args, meta))
        return
    compiled = kernel[grid](*args, **meta)
    if hit is None and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        layout_key = (kernel, len(args), tuple(meta))
        layout = _layouts.get(layout_key)
        if layout is None:
            try:
                layout = _layouts[layout_key] = _Layout(kernel, len(args), tuple(meta))
            except _Unhandled:
                return
        _launchers[key] = (compiled.run, compiled.function, compiled.packed_metadata, layout)
