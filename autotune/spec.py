"""What a kernel op declares so that its launches can be looked up and tuned (DESIGN.md, kernel contract).

Each op module under ``fastbench.kernels`` builds one :class:`OpSpec` at import time and, at every
launch, asks :func:`fastbench.autotune.lookup.config_for` for the config of its problem.

- A *config* is a flat dict of the kernel's meta-parameters plus ``num_warps`` / ``num_stages``,
  e.g. ``{"BLOCK_N": 1024, "num_warps": 8, "num_stages": 1}``.
- A *problem* is a flat dict of JSON scalars that decides which config is best: dtypes, exact feature
  dims, and the token dimension under the key ``"tokens"`` (the cache buckets it to a power of two).
- ``passes`` names the launches of the op (``"fwd"``, ``"bwd"``, ...); each has its own candidates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

Config = Mapping[str, Any]
Problem = Mapping[str, Any]


@dataclass(frozen=True)
class TuneCase:
    """One problem made concrete on a device, for the tuner.

    ``run(config)`` launches the op with that config on inputs made once (random, never zeros) and
    returns its output tensor(s); ``expected`` is the reference's output on the same inputs and
    ``tolerance`` the largest relative norm error that passes.
    """

    run: Callable[[Config], Any]
    expected: Any
    tolerance: float


@dataclass(frozen=True)
class OpSpec:
    name: str
    candidates: Mapping[str, Sequence[Config]]
    heuristic: Callable[[str, Problem], Config]
    # (pass, problem, device) -> TuneCase; used by `fastbench tune` only
    tune_case: Callable[[str, Problem, Any], TuneCase] | None = None
    # (model config, tokens, dtype) -> [(pass, problem), ...]: the problems a model's step launches
    problems: Callable[[Any, int, Any], Sequence[tuple[str, Problem]]] | None = None
    # kernel functions whose source is hashed into the cache key
    kernels: Sequence[Any] = field(default_factory=tuple)
