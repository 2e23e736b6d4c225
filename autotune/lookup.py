"""Config lookup at launch time: ``config_for(spec, pass_name, problem)``, what every kernel calls.

Tiers, first that answers wins (each hit must still be one of today's candidates for that pass):

1. ``pinned``: :func:`pin` in this process, else ``$FASTBENCH_PIN`` (inline JSON or the path of a
   JSON file) ``{"rms_norm/fwd": {"BLOCK_N": 1024, "num_warps": 8, "num_stages": 1}}``;
2. ``exact``: the user cache file of this device x toolchain holds this op, pass, kernel hash and
   problem (tokens bucketed);
3. ``nearest``: the same, with the nearest token bucket (in log2; a tie goes to the larger bucket);
4. ``bundled``: ``autotune/bundled/`` files of this device and Triton version (the exact toolchain
   first), exact bucket then nearest;
5. ``other-toolchain``: a config tuned for this device under another toolchain (user cache files of
   another Triton or CUDA version, bundled files of another Triton version; the same Triton first,
   then the newest), exact bucket then nearest, once it has passed a check here: it is compiled and
   run once on fresh random inputs of the problem and must match the op's reference within the
   tuner's tolerance. The verdict is recorded in this toolchain's user cache file (``checks``), so
   each (problem bucket, config) is checked once; a failing config is recorded and the next one
   (else the heuristic) serves. ``fastbench tune`` tunes these problems for this toolchain;
6. ``heuristic``: ``spec.heuristic(pass_name, problem)``; always so without a GPU (no driver call)
   and with ``FASTBENCH_AUTOTUNE=off`` (for tuned-vs-heuristic comparisons; pins still apply).

Answers are memoised per ``(op, pass, problem)``; the first answer of each tier per op/pass is logged
(logger ``fastbench.autotune``); :func:`tiers_used` tells the harness which tiers served.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from . import key, store
from .spec import Config, OpSpec, Problem

log = logging.getLogger("fastbench.autotune")

TIERS = ("pinned", "exact", "nearest", "bundled", "other-toolchain", "heuristic")
OTHER = "other-toolchain"
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


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(v)))


def check_key(op: str, pass_name: str, khash: str, problem: Mapping[str, Any], config: Mapping) -> str:
    """``"<entry key>@BLOCK_N=1024,num_stages=1,num_warps=8"``: one check of one config on one problem."""
    return f"{key.entry_key(op, pass_name, khash, problem)}@{key.problem_string(config)}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _capturing() -> bool:
    """Inside a CUDA graph capture or a torch.compile trace, where no check may run."""
    import torch

    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    return compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def run_check(spec: OpSpec, pass_name: str, problem: Problem, config: Config,
              device: str) -> tuple[bool, str | None, bool]:
    """Compile and run ``config`` once on fresh random inputs of ``problem`` and compare with the op's
    reference (``spec.tune_case``, the tuner's tolerance): (passed, why not, whether the verdict holds
    for good). The caller's random state is left as it was; an out-of-memory or a case that cannot be
    built is not the config's fault (the verdict does not hold for good)."""
    import torch

    from .tuner import evaluate

    cuda = device.startswith("cuda")
    case = None
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []), torch.enable_grad():
            seed = int.from_bytes(os.urandom(8), "little") >> 1
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            try:
                case = spec.tune_case(pass_name, dict(problem), device)
            except Exception as e:
                return False, f"the check could not be built: {type(e).__name__}: {e}", False
            m = evaluate(case, config, None)
    finally:
        del case
        if cuda:
            torch.cuda.empty_cache()
    if m.usable:
        return True, None, True
    return False, m.status, "out of memory" not in m.status.lower() and "OutOfMemory" not in m.status


class Lookup:
    """One process's view of the cache: device, toolchain, user and bundled files, pins, memo.
    ``check_device``: where the other-toolchain tier runs its checks (tests with a fake device: "cpu")."""

    def __init__(self, device: Any = AUTO, tools: Any = AUTO, root: Path | None = None,
                 bundled: Path | None = None, check_device: str = "cuda"):
        self._device, self._tools = device, tools
        self.root, self.bundled_root, self.check_device = root, bundled, check_device
        self.cache_off = os.environ.get(OFF_ENV, "").strip().lower() in ("0", "off", "false", "heuristic")
        self.pins: dict[str, Mapping] = {}
        self._env_pins: dict[str, Mapping] | None = None
        self._user_doc: dict | None = None
        self._user: dict | None = None
        self._bundled: list[dict] | None = None
        self._other: list[tuple[dict, dict]] | None = None
        self._memo: dict[tuple, tuple[Config, str]] = {}
        self._served: dict[str, list[str]] = {}
        self._sources: dict[str, dict] = {}
        self._warned: set[tuple] = set()
        self.unchecked: set[str] = set()  # other-toolchain configs resolve(check=False) counted as serving

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

    def _user_file(self) -> dict:
        """This device x toolchain's user cache document (no entries or checks when absent or
        unreadable); its ``checks`` are kept up to date by this process."""
        if self._user_doc is None:
            doc = store.read(self.user_path()) if self.user_path() else None
            self._user_doc = doc or {"entries": {}, "checks": {}}
        return self._user_doc

    def _user_index(self) -> dict:
        if self._user is None:
            self._user = index(self._user_file()["entries"])
        return self._user

    def bundled_files(self) -> list[tuple[Path, dict]]:
        """Bundled documents usable here: same device and Triton version, exact toolchain first."""
        if self.device is None:
            return []
        found = []
        for path in store.list_files(self.bundled_root or store.bundled_dir()):
            doc = store.read(path, bundled=True)
            if doc and doc.get("device") == self.device and (doc.get("toolchain") or {}).get("triton") == self.tools["triton"]:
                found.append((doc.get("toolchain") != self.tools, path.name, path, doc))
        return [(path, doc) for *_, path, doc in sorted(found, key=lambda f: f[:2])]

    def _bundled_indexes(self) -> list[dict]:
        if self._bundled is None:
            self._bundled = [index(doc["entries"]) for _, doc in self.bundled_files()]
        return self._bundled

    def other_toolchain_files(self) -> list[tuple[Path, dict]]:
        """Files tuned for this device under another toolchain: user cache files of another Triton or
        CUDA version, bundled files of another Triton version (those of this Triton are the bundled
        tier's). The same Triton version first, then the newest Triton; user files before bundled."""
        if self.device is None:
            return []
        mine = self.tools
        found = []
        for rank, root, bundled in ((0, Path(self.root or store.cache_dir()), False),
                                    (1, self.bundled_root or store.bundled_dir(), True)):
            for path in store.list_files(root):
                doc = store.read(path, bundled=bundled)
                tools = (doc or {}).get("toolchain") or {}
                if not doc or doc.get("device") != self.device or tools == mine:
                    continue
                if bundled and tools.get("triton") == mine["triton"]:
                    continue
                triton = str(tools.get("triton"))
                found.append(((triton != mine["triton"], tuple(-x for x in _version(triton)),
                               tools.get("cuda") != mine["cuda"], rank, path.name), path, doc))
        return [(path, doc) for _, path, doc in sorted(found, key=lambda f: f[0])]

    def _other_indexes(self) -> list[tuple[dict, dict]]:
        """(toolchain, index) of :meth:`other_toolchain_files`."""
        if self._other is None:
            self._other = [(dict(doc.get("toolchain") or {}), index(doc["entries"]))
                           for _, doc in self.other_toolchain_files()]
        return self._other

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

    def _hits(self, idx: dict, spec: OpSpec, pass_name: str, group: Group, tokens: int | None,
              where: str, nearest: bool) -> Iterator[Config]:
        """Today's candidates among ``idx``'s configs for ``group``: the exact bucket, or (``nearest``)
        the other buckets, nearest first."""
        buckets = idx.get(group) or {}
        picks = [tokens] if not nearest else (_by_distance(buckets, tokens) if tokens is not None else [])
        for b in picks:
            hit = self._candidate(spec, pass_name, buckets.get(b), where)
            if hit is not None:
                yield hit

    def _from_index(self, idx: dict, spec: OpSpec, pass_name: str, group: Group, tokens: int | None,
                    where: str, nearest: bool) -> Config | None:
        return next(self._hits(idx, spec, pass_name, group, tokens, where, nearest), None)

    def _record_check(self, ck: str, record: dict) -> None:
        """Keep a check's verdict in this process and in the user cache file (a cache that cannot be
        written is said once; the check then runs again in the next process)."""
        self._user_file().setdefault("checks", {})[ck] = record
        try:
            store.update(self.user_path(), self.device, self.tools, {}, checks={ck: record})
        except OSError as e:
            if ("write", None, None) not in self._warned:
                self._warned.add(("write", None, None))
                log.warning("autotune: cannot record checks in %s (%s: %s); they run again in the next process",
                            self.user_path(), type(e).__name__, e)

    def _passes_check(self, spec: OpSpec, pass_name: str, problem: Problem, canon: Mapping, config: Config,
                      tuned_under: Mapping, check: bool) -> bool:
        """Whether the other-toolchain ``config`` may serve here: the recorded verdict, else (``check``)
        the check run now and recorded. Without ``check`` an unchecked config counts as serving."""
        khash = key.kernel_hash(spec)
        ck = check_key(spec.name, pass_name, khash, canon, config)
        done = self._user_file().get("checks", {}).get(ck)
        if done is not None:
            return done["ok"]
        if not check:
            self.unchecked.add(ck)
            return True
        if spec.tune_case is None or _capturing():
            return False
        ok, why, lasting = run_check(spec, pass_name, problem, config, self.check_device)
        record = {"op": spec.name, "pass": pass_name, "kernel": khash, "problem": dict(canon), "config": dict(config),
                  "ok": ok, "why": why, "tuned_under": dict(tuned_under), "checked": _now()}
        if lasting:
            self._record_check(ck, record)
        if not ok:
            log.warning("%s/%s: config %s tuned under triton %s, cuda %s failed its check here (%s)%s; the next "
                        "tier serves", spec.name, pass_name, dict(config), tuned_under.get("triton"),
                        tuned_under.get("cuda"), why, f"; recorded in {self.user_path()}" if lasting else "")
        return ok

    def _other_toolchain(self, spec: OpSpec, pass_name: str, problem: Problem, canon: Mapping, group: Group,
                         tokens: int | None, check: bool) -> tuple[Config, dict] | None:
        """The first config tuned under another toolchain that passes its check here, with that toolchain."""
        for tools, idx in self._other_indexes():
            for nearest in (False, True):
                for hit in self._hits(idx, spec, pass_name, group, tokens, OTHER, nearest):
                    if self._passes_check(spec, pass_name, problem, canon, hit, tools, check):
                        return hit, tools
        return None

    def resolve(self, spec: OpSpec, pass_name: str, problem: Problem, check: bool = True) -> tuple[Config, str]:
        """(config, tier) without memo or logging. ``check=False`` runs no other-toolchain check (an
        unchecked config counts as serving and is added to ``self.unchecked``): for ``tune --list``."""
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
            other = self._other_toolchain(spec, pass_name, problem, canon, group, tokens, check)
            if other is not None:
                self._sources[f"{spec.name}/{pass_name}"] = other[1]
                return other[0], OTHER
        return spec.heuristic(pass_name, problem), "heuristic"

    def config_for(self, spec: OpSpec, pass_name: str, problem: Problem) -> Config:
        memo_key = (spec.name, pass_name, tuple(problem.items()))  # each caller builds its problems in one order
        hit = self._memo.get(memo_key)
        if hit is None:
            hit = self._memo[memo_key] = self.resolve(spec, pass_name, problem)
            served = self._served.setdefault(f"{spec.name}/{pass_name}", [])
            if hit[1] not in served:
                served.append(hit[1])
                tools = self._sources.get(f"{spec.name}/{pass_name}") if hit[1] == OTHER else None
                how = (f" (tuned under triton {tools.get('triton')}, cuda {tools.get('cuda')}; checked here)"
                       if tools else "")
                log.info("%s/%s: config from the %s tier%s: %s", spec.name, pass_name, hit[1], how, dict(hit[0]))
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


def _summary(path: Path, bundled: bool = False) -> dict:
    doc = store.read(path, bundled=bundled)
    if doc is None:
        return {"file": str(path), "valid": False}
    counts = Counter(f"{e['op']}/{e['pass']}" for e in doc["entries"].values())
    checks = Counter("passed" if c["ok"] else "failed" for c in doc["checks"].values())
    return {"file": str(path), "valid": True, "device": doc.get("device"), "toolchain": doc.get("toolchain"),
            "entries": dict(sorted(counts.items())), "checks": dict(sorted(checks.items()))}


def describe() -> dict:
    """The cache state for ``fastbench env`` and results: directories, files, entries per op/pass,
    the file this process reads, the bundled files that apply here, pins, the tiers served so far and the
    shipped compiled kernels (:func:`fastbench.autotune.compiled_cache.describe`)."""
    from . import compiled_cache

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
        "bundled": [_summary(p, bundled=True) for p in store.list_files(lk.bundled_root or store.bundled_dir())],
        "bundled_in_use": [p.name for p, _ in lk.bundled_files()],
        "other_toolchain_in_use": [p.name for p, _ in lk.other_toolchain_files()],
        "other_toolchain_served": {k: v for k, v in sorted(lk._sources.items())},
        "pins": {**(lk._env_pins if lk._env_pins is not None else _load_pins()), **lk.pins},
        "tiers_used": lk.tiers_used(),
        "compiled_cache": compiled_cache.describe(lk),
    }
