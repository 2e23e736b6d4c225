"""Config lookup at launch time: ``config_for(spec, pass_name, problem)``, what every kernel calls.

Tiers, first that answers wins (each hit must still be one of today's candidates for that pass):

1. ``pinned``: :func:`pin` in this process, else ``$FASTBENCH_PIN`` (inline JSON or the path of a
   JSON file) ``{"rms_norm/fwd": {"BLOCK_N": 1024, "num_warps": 8, "num_stages": 1}}``;
2. ``exact``: the user cache file of this device x toolchain holds this op, pass, kernel hash and
   problem (tokens bucketed);
3. ``nearest``: the same, with the nearest token bucket (in log2; a tie goes to the larger bucket);
4. ``bundled``: ``autotune/bundled/`` files of this device and Triton version (the exact toolchain
   first), exact bucket then nearest;
5. ``heuristic``: ``spec.heuristic(pass_name, problem)``; always so without a GPU (no driver call)
   and with ``FASTBENCH_AUTOTUNE=off`` (for tuned-vs-heuristic comparisons; pins still apply).

Answers are memoised per ``(op, pass, problem)``; the first answer of each tier per op/pass is logged
(logger ``fastbench.autotune``); :func:`tiers_used` tells the harness which tiers served.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
import math
import os
from pathlib import Path
from typing import Any, Mapping

from . import key, store
from .spec import Config, OpSpec, Problem

log = logging.getLogger("fastbench.autotune")

TIERS = ("pinned", "exact", "nearest", "bundled", "heuristic")
PIN_ENV = "FASTBENCH_PIN"
OFF_ENV = "FASTBENCH_AUTOTUNE"
AUTO = object()

Group = tuple  # (op, pass, kernel hash, problem items without tokens)


def _group(op: str, pass_name: str, khash: str, problem: Mapping) -> Group:
    return (op, pass_name, khash, tuple(sorted((k, v) for k, v in problem.items() if k != key.TOKENS)))


def index(entries: Mapping[str, Mapping]) -> dict[Group, dict[int | None, Mapping]]:
    """Cache entries -> {group: {token bucket (None without tokens): config}}."""
    out: dict[Group, dict] = {}
    for e in entries.values():
        p = e["problem"]
        tokens = p.get(key.TOKENS)
        out.setdefault(_group(e["op"], e["pass"], e["kernel"], p), {})[tokens] = e["config"]
    return out


def _by_distance(buckets, want: int) -> list:
    """Token buckets other than ``want``, nearest first in log2, the larger first on ties."""
    others = [b for b in buckets if isinstance(b, int) and b > 0 and b != want]
    return sorted(others, key=lambda b: (abs(math.log2(b) - math.log2(want)), -b))


def _load_pins() -> dict[str, Mapping]:
    raw = os.environ.get(PIN_ENV, "").strip()
    if not raw:
        return {}
    try:
        pins = json.loads(raw if raw.startswith("{") else Path(raw).expanduser().read_text())
        if isinstance(pins, dict) and all(isinstance(v, dict) for v in pins.values()):
            return pins
        log.warning("%s ignored: expected {\"op/pass\": {config}}", PIN_ENV)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s ignored: %s", PIN_ENV, e)
    return {}


class Lookup:
    """One process's view of the cache: device, toolchain, user and bundled files, pins, memo."""

    def __init__(self, device: Any = AUTO, tools: Any = AUTO, root: Path | None = None,
                 bundled: Path | None = None):
        self._device, self._tools = device, tools
        self.root, self.bundled_root = root, bundled
        self.cache_off = os.environ.get(OFF_ENV, "").strip().lower() in ("0", "off", "false", "heuristic")
        self.pins: dict[str, Mapping] = {}
        self._env_pins: dict[str, Mapping] | None = None
        self._user: dict | None = None
        self._bundled: list[dict] | None = None
        self._memo: dict[tuple, tuple[Config, str]] = {}
        self._served: dict[str, list[str]] = {}
        self._warned: set[tuple] = set()

    # --- what this process runs on (resolved on first use) ---
    @property
    def device(self) -> dict | None:
        if self._device is AUTO:
            self._device = key.device_fingerprint()
        return self._device

    @property
    def tools(self) -> dict:
        if self._tools is AUTO:
            self._tools = key.toolchain()
        return self._tools

    def user_path(self) -> Path | None:
        if self.device is None:
            return None
        return Path(self.root or store.cache_dir()) / key.file_name(self.device, self.tools)

    def _user_index(self) -> dict:
        if self._user is None:
            doc = store.read(self.user_path()) if self.user_path() else None
            self._user = index(doc["entries"]) if doc else {}
        return self._user

    def bundled_files(self) -> list[tuple[Path, dict]]:
        """Bundled documents usable here: same device and Triton version, exact toolchain first."""
        if self.device is None:
            return []
        found = []
        for path in store.list_files(self.bundled_root or store.bundled_dir()):
            doc = store.read(path)
            if doc and doc.get("device") == self.device and (doc.get("toolchain") or {}).get("triton") == self.tools["triton"]:
                found.append((doc.get("toolchain") != self.tools, path.name, path, doc))
        return [(path, doc) for *_, path, doc in sorted(found, key=lambda f: f[:2])]

    def _bundled_indexes(self) -> list[dict]:
        if self._bundled is None:
            self._bundled = [index(doc["entries"]) for _, doc in self.bundled_files()]
        return self._bundled

    # --- the lookup ---
    def _candidate(self, spec: OpSpec, pass_name: str, config: Mapping | None, where: str) -> Config | None:
        """Today's candidate equal to ``config``, or None (a stale entry is reported once)."""
        if config is None:
            return None
        for c in spec.candidates.get(pass_name, ()):
            if dict(c) == dict(config):
                return c
        if (where, spec.name, pass_name) not in self._warned:
            self._warned.add((where, spec.name, pass_name))
            log.warning("%s/%s: %s config %s is not a candidate any more; ignored", spec.name, pass_name, where, dict(config))
        return None

    def _pinned(self, spec: OpSpec, pass_name: str) -> Config | None:
        name = f"{spec.name}/{pass_name}"
        if name in self.pins:
            return self._candidate(spec, pass_name, self.pins[name], "pinned")
        if self._env_pins is None:
            self._env_pins = _load_pins()
        return self._candidate(spec, pass_name, self._env_pins.get(name), "pinned")

    def _from_index(self, idx: dict, spec: OpSpec, pass_name: str, group: Group, tokens: int | None,
                    where: str, nearest: bool) -> Config | None:
        buckets = idx.get(group)
        if not buckets:
            return None
        if not nearest:
            return self._candidate(spec, pass_name, buckets.get(tokens), where)
        for b in _by_distance(buckets, tokens) if tokens is not None else ():
            hit = self._candidate(spec, pass_name, buckets[b], where)
            if hit is not None:
                return hit
        return None

    def resolve(self, spec: OpSpec, pass_name: str, problem: Problem) -> tuple[Config, str]:
        """(config, tier) without memo or logging."""
        hit = self._pinned(spec, pass_name)
        if hit is not None:
            return hit, "pinned"
        if self.device is not None and not self.cache_off:
            canon = key.canonical_problem(problem)
            group = _group(spec.name, pass_name, key.kernel_hash(spec), canon)
            tokens = canon.get(key.TOKENS)
            for tier, idxs, nearest in (("exact", [self._user_index()], False),
                                        ("nearest", [self._user_index()], True),
                                        ("bundled", self._bundled_indexes(), False),
                                        ("bundled", self._bundled_indexes(), True)):
                for idx in idxs:
                    hit = self._from_index(idx, spec, pass_name, group, tokens, tier, nearest)
                    if hit is not None:
                        return hit, tier
        return spec.heuristic(pass_name, problem), "heuristic"

    def config_for(self, spec: OpSpec, pass_name: str, problem: Problem) -> Config:
        memo_key = (spec.name, pass_name, tuple(sorted(problem.items())))
        hit = self._memo.get(memo_key)
        if hit is None:
            hit = self._memo[memo_key] = self.resolve(spec, pass_name, problem)
            served = self._served.setdefault(f"{spec.name}/{pass_name}", [])
            if hit[1] not in served:
                served.append(hit[1])
                log.info("%s/%s: config from the %s tier: %s", spec.name, pass_name, hit[1], dict(hit[0]))
        return hit[0]

    def pin(self, op: str, pass_name: str, config: Mapping | None) -> None:
        name = f"{op}/{pass_name}"
        if config is None:
            self.pins.pop(name, None)
        else:
            self.pins[name] = dict(config)
        self._memo = {k: v for k, v in self._memo.items() if k[:2] != (op, pass_name)}

    def tiers_used(self) -> dict[str, str]:
        """{"op/pass": tier}; several tiers for one op/pass are joined in lookup order ("exact+nearest")."""
        return {name: "+".join(t for t in TIERS if t in served) for name, served in sorted(self._served.items())}


_default: Lookup | None = None


def default() -> Lookup:
    global _default
    if _default is None:
        _default = Lookup()
    return _default


def reset(**kwargs) -> Lookup:
    """Forget the memo, pins and loaded files; ``kwargs`` as :class:`Lookup` (tests pass a fake device)."""
    global _default
    _default = Lookup(**kwargs)
    return _default


def config_for(spec: OpSpec, pass_name: str, problem: Problem) -> Config:
    """The launch config of ``spec``'s ``pass_name`` for ``problem``; never times anything."""
    return default().config_for(spec, pass_name, problem)


def pin(op: str, pass_name: str, config: Mapping | None) -> None:
    """Serve ``config`` (one of the op's candidates) for every problem of op/pass; None unpins."""
    default().pin(op, pass_name, config)


def tiers_used() -> dict[str, str]:
    return default().tiers_used()


def _summary(path: Path) -> dict:
    doc = store.read(path)
    if doc is None:
        return {"file": str(path), "valid": False}
    counts = Counter(f"{e['op']}/{e['pass']}" for e in doc["entries"].values())
    return {"file": str(path), "valid": True, "device": doc.get("device"), "toolchain": doc.get("toolchain"),
            "entries": dict(sorted(counts.items()))}


def describe() -> dict:
    """The cache state for ``fastbench env`` and results: directories, files, entries per op/pass,
    the file this process reads, the bundled files that apply here, pins and the tiers served so far."""
    lk = default()
    root = Path(lk.root or store.cache_dir())
    user = lk.user_path()
    return {
        "cache_dir": str(root),
        "cache_dir_env": store.CACHE_ENV if os.environ.get(store.CACHE_ENV) else None,
        "cache_off": lk.cache_off,
        "device": lk.device,
        "toolchain": lk.tools,
        "user_file": str(user) if user else None,
        "user_file_exists": bool(user and user.exists()),
        "files": [_summary(p) for p in store.list_files(root)],
        "bundled": [_summary(p) for p in store.list_files(lk.bundled_root or store.bundled_dir())],
        "bundled_in_use": [p.name for p, _ in lk.bundled_files()],
        "pins": {**(lk._env_pins if lk._env_pins is not None else _load_pins()), **lk.pins},
        "tiers_used": lk.tiers_used(),
    }
