"""Cache keys (DESIGN.md, Autotune).

A tuned config is filed under two keys:

- the *file*: device fingerprint (normalised name, compute capability, SM count) x toolchain (Triton
  and CUDA versions): one JSON file per pair, see :func:`file_name`;
- the *entry*, inside that file: op, pass, kernel hash (source of ``spec.kernels`` + candidate list +
  schema version) and the problem, with ``tokens`` bucketed up to a power of two, see :func:`entry_key`.

Any change to any part misses cleanly: a new Triton, an edited kernel, a new candidate.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from typing import Any, Mapping

from .spec import OpSpec, Problem

SCHEMA = 1
TOKENS = "tokens"


def normalise_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    name = re.sub(r"^nvidia\s+", "", name.strip().lower())
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-")


def device_fingerprint(index: int | None = None) -> dict | None:
    """``{"name", "cc", "sms"}`` of a CUDA device (the current one by default); None without a GPU
    or under ``TRITON_INTERPRET=1`` (no driver call is made then)."""
    import os

    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return {"name": normalise_name(p.name), "cc": f"{p.major}.{p.minor}", "sms": int(p.multi_processor_count)}


def toolchain() -> dict:
    """``{"triton", "cuda"}`` versions of this process ("none" for a CPU build of torch)."""
    import torch
    import triton

    return {"triton": str(triton.__version__), "cuda": str(torch.version.cuda or "none")}


def file_name(device: Mapping[str, Any], tools: Mapping[str, Any]) -> str:
    """``h200-sm90-132sm__triton-3.6.0__cuda-13.0.json``."""
    cc = str(device["cc"]).replace(".", "")
    return f"{device['name']}-sm{cc}-{device['sms']}sm__triton-{tools['triton']}__cuda-{tools['cuda']}.json"


def bucket(tokens: int) -> int:
    """The smallest power of two >= tokens (at least 1)."""
    return 1 << max(int(tokens) - 1, 0).bit_length()


def canonical_problem(problem: Problem) -> dict:
    """JSON scalars only, ``tokens`` bucketed; torch dtypes become ``"bfloat16"`` etc."""
    out = {}
    for k, v in problem.items():
        if v is not None and not isinstance(v, (bool, int, float, str)):
            v = str(v).removeprefix("torch.")
        out[str(k)] = bucket(v) if k == TOKENS else v
    return out


def problem_string(problem: Mapping[str, Any]) -> str:
    """Canonical problem (already bucketed) -> ``"dtype=bfloat16,hidden=4096,tokens=4096"``."""
    return ",".join(f"{k}={json.dumps(problem[k])}".replace('"', "") for k in sorted(problem))


def _source(fn: Any) -> str:
    fn = getattr(fn, "fn", fn)  # triton JITFunction / InterpretedFunction wrap the Python function
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def candidates_json(spec: OpSpec) -> str:
    return json.dumps({p: [dict(c) for c in cs] for p, cs in spec.candidates.items()}, sort_keys=True)


_hashes: dict[int, tuple[OpSpec, str]] = {}


def kernel_hash(spec: OpSpec) -> str:
    """16 hex digits of sha256(schema, kernel sources, candidate list); memoised per spec object."""
    hit = _hashes.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    h = hashlib.sha256(f"schema={SCHEMA}\n".encode())
    for k in spec.kernels:
        h.update(_source(k).encode())
    h.update(candidates_json(spec).encode())
    digest = h.hexdigest()[:16]
    _hashes[id(spec)] = (spec, digest)
    return digest


def entry_key(op: str, pass_name: str, khash: str, problem: Mapping[str, Any]) -> str:
    """``"rms_norm/fwd/<hash>/dtype=bfloat16,hidden=4096,tokens=4096"`` for a canonical problem."""
    return f"{op}/{pass_name}/{khash}/{problem_string(problem)}"


def cache_key(device: Mapping, tools: Mapping, spec: OpSpec, pass_name: str, problem: Problem) -> tuple[str, str]:
    """(file name, entry key) of one lookup: the whole key, for tests and tools."""
    return file_name(device, tools), entry_key(spec.name, pass_name, kernel_hash(spec), canonical_problem(problem))
