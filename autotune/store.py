"""The on-disk cache: one readable JSON file per device x toolchain (see :mod:`.key`).

::

    {"schema": 1, "device": {"name": "h200", "cc": "9.0", "sms": 132},
     "toolchain": {"triton": "3.6.0", "cuda": "13.0"},
     "entries": {"<entry key>": {"op": ..., "pass": ..., "kernel": ..., "problem": {...},
                                 "config": {...}, "ms": ..., "default_ms": ..., "speedup": ...}},
     "checks": {"<entry key>@<config>": {"op": ..., "pass": ..., "kernel": ..., "problem": {...},
                                         "config": {...}, "ok": true, "why": null,
                                         "tuned_under": {"triton": ..., "cuda": ...}, "checked": ...}}}

``checks`` (optional) records, for this device x toolchain, whether a config tuned under another
toolchain compiled and matched the op's reference here (the lookup's ``other-toolchain`` tier).

User files live in ``$FASTBENCH_CACHE_DIR`` (default ``~/.cache/fastbench``); files of the same format
shipped in ``autotune/bundled/`` serve when the user cache misses. Writers merge under an exclusive
``fcntl.flock`` on a sidecar ``.lock`` file and replace the file atomically (temp file + ``os.replace``),
so a reader sees the old file or the new one, never a part. A corrupt file (truncated, not JSON,
another schema) is reported once in one line saying what to do, and read as empty; the next write
moves it aside to ``<name>.corrupt`` before it writes a valid file in its place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from fastbench.files import atomic_path

from .key import SCHEMA

log = logging.getLogger("fastbench.autotune")

CACHE_ENV = "FASTBENCH_CACHE_DIR"
_reported: set[tuple[str, str]] = set()


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastbench"


def bundled_dir() -> Path:
    return Path(__file__).resolve().parent / "bundled"


USER_REMEDY = "delete it or run `fastbench tune --force`; bundled or heuristic configs serve meanwhile"
BUNDLED_REMEDY = ("reinstall fastbench (`pip install --force-reinstall fastbench`) or run `fastbench tune`, "
                  "whose cache comes first; heuristic configs serve meanwhile")


def _report_once(path: Path, why: str, remedy: str | None = None) -> None:
    if (str(path), why) not in _reported:
        _reported.add((str(path), why))
        if remedy:
            log.warning("autotune cache file %s ignored (%s): %s", path, why, remedy)
        else:
            log.warning("autotune cache file %s: %s", path, why)


def _scalars(d: Any) -> bool:
    return isinstance(d, dict) and all(v is None or isinstance(v, (bool, int, float, str)) for v in d.values())


def _valid_entry(e: Any) -> bool:
    return (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("op", "pass", "kernel"))
            and _scalars(e.get("problem")) and _scalars(e.get("config")))


def _valid_check(c: Any) -> bool:
    return _valid_entry(c) and isinstance(c.get("ok"), bool)


class Corrupt(ValueError):
    """A file that exists but is no readable autotune cache document (the reason is the message)."""


def _parse(path: Path) -> dict | None:
    """The document, None when the file is missing; raises :class:`Corrupt` otherwise."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        what = "unreadable" if isinstance(e, OSError) else "not JSON"
        raise Corrupt(f"{what}: {type(e).__name__}: {first}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        raise Corrupt("not an autotune cache document")
    if doc.get("schema") != SCHEMA:
        raise Corrupt(f"schema {doc.get('schema')!r}, this fastbench reads schema {SCHEMA}")
    if not all(isinstance(doc.get(k, {}), dict) for k in ("device", "toolchain", "checks")):
        raise Corrupt("its device, toolchain or checks is not an object")
    return doc


def read(path: Path, bundled: bool = False) -> dict | None:
    """The file's document with only well-formed entries and checks, or None (missing, corrupt,
    other schema: reported once, in one line that says what to do; ``bundled`` picks the advice)."""
    path = Path(path)
    try:
        doc = _parse(path)
    except Corrupt as e:
        _report_once(path, str(e), BUNDLED_REMEDY if bundled else USER_REMEDY)
        return None
    if doc is None:
        return None
    entries = {k: e for k, e in doc["entries"].items() if _valid_entry(e)}
    if len(entries) != len(doc["entries"]):
        _report_once(path, f"{len(doc['entries']) - len(entries)} malformed entries skipped")
    checks = {k: c for k, c in doc.get("checks", {}).items() if _valid_check(c)}
    return {**doc, "entries": entries, "checks": checks}


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock on ``<path>.lock`` for a read-merge-write of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: the atomic replace still keeps the file valid
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomic(path: Path, doc: Mapping) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def update(path: Path, device: Mapping, tools: Mapping, entries: Mapping[str, Mapping],
           drop: set[str] | frozenset = frozenset(), checks: Mapping[str, Mapping] | None = None) -> None:
    """Merge ``entries`` (and ``checks``) into the file and remove the entries in ``drop``, atomically
    under the lock. A corrupt file is first moved aside to ``<name>.corrupt`` (and said so)."""
    path = Path(path)
    with locked(path):
        doc = read(path)
        if doc is None and path.exists():
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            log.warning("autotune cache file %s was unusable: moved to %s; a new one is written", path, aside)
        doc = doc or {}
        merged = {k: e for k, e in doc.get("entries", {}).items() if k not in drop}
        merged.update(entries)
        out = {"schema": SCHEMA, "device": dict(device), "toolchain": dict(tools), "entries": merged}
        kept = {**doc.get("checks", {}), **(checks or {})}
        if kept:
            out["checks"] = kept
        write_atomic(path, out)


def list_files(root: Path) -> list[Path]:
    root = Path(root)
    return sorted(root.glob("*.json")) if root.is_dir() else []
