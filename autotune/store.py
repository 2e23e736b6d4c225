"""The on-disk cache: one readable JSON file per device x toolchain (see :mod:`.key`).

::

    {"schema": 1, "device": {"name": "h200", "cc": "9.0", "sms": 132},
     "toolchain": {"triton": "3.6.0", "cuda": "13.0"},
     "entries": {"<entry key>": {"op": ..., "pass": ..., "kernel": ..., "problem": {...},
                                 "config": {...}, "ms": ..., "default_ms": ..., "speedup": ...}}}

User files live in ``$FASTBENCH_CACHE_DIR`` (default ``~/.cache/fastbench``); files of the same format
shipped in ``autotune/bundled/`` serve when the user cache misses. Writers merge under an exclusive
``fcntl.flock`` on a sidecar ``.lock`` file and replace the file atomically (temp file + ``os.replace``).
A corrupt file is reported once and read as empty; a file of another schema is ignored.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

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


def _report_once(path: Path, why: str) -> None:
    if (str(path), why) not in _reported:
        _reported.add((str(path), why))
        log.warning("autotune cache %s ignored: %s", path, why)


def _valid_entry(e: Any) -> bool:
    return (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("op", "pass", "kernel"))
            and isinstance(e.get("problem"), dict) and isinstance(e.get("config"), dict))


def read(path: Path) -> dict | None:
    """The file's document with only well-formed entries, or None (missing, corrupt, other schema)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _report_once(path, f"unreadable ({type(e).__name__}: {e})")
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        _report_once(path, "not an autotune cache document")
        return None
    if doc.get("schema") != SCHEMA:
        _report_once(path, f"schema {doc.get('schema')!r}, this fastbench reads schema {SCHEMA}")
        return None
    entries = {k: e for k, e in doc["entries"].items() if _valid_entry(e)}
    if len(entries) != len(doc["entries"]):
        _report_once(path, f"{len(doc['entries']) - len(entries)} malformed entries skipped")
    return {**doc, "entries": entries}


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def update(path: Path, device: Mapping, tools: Mapping, entries: Mapping[str, Mapping],
           drop: set[str] | frozenset = frozenset()) -> None:
    """Merge ``entries`` into the file (and remove the keys in ``drop``), atomically under the lock."""
    path = Path(path)
    with locked(path):
        doc = read(path) or {}
        merged = {k: e for k, e in doc.get("entries", {}).items() if k not in drop}
        merged.update(entries)
        write_atomic(path, {"schema": SCHEMA, "device": dict(device), "toolchain": dict(tools),
                            "entries": merged})


def list_files(root: Path) -> list[Path]:
    root = Path(root)
    return sorted(root.glob("*.json")) if root.is_dir() else []
