"""Compiled kernels shipped with fastbench: Triton cache entries of the fused training step, made once per GPU
x toolchain (``tools/collect_compile_cache.py``) and put into Triton's own cache before the fused path's first
launch, so that the first step on a fresh machine loads its kernels instead of compiling them.

An archive ``autotune/bundled/compiled/<gpu>-sm<cc>-<sms>sm__triton-<v>__cuda-<v>.tar.xz`` (named as the
bundled tune files, :func:`fastbench.autotune.key.file_name`) holds ``index.json`` then, per entry of Triton's
cache (a directory named by the base32 of its key), only the files a cache hit reads:

- a compiled kernel: its metadata ``<name>.json`` and binary (``<name>.cubin``); the group file
  ``__grp__<name>.json``, which lists them by absolute path, is written anew at installation;
- a compiled host module (the driver's utilities, a launcher per kernel signature): its ``.so``.

The intermediate forms (source, ttir, ttgir, llir, ptx) stay out: a hit does not read them.

:func:`ensure_installed` (once per process, from :func:`fastbench.fused.causal_lm.install`) installs the
archive of this device (name, compute capability, SM count, as the autotune lookup identifies it) and toolchain
(Triton and CUDA versions), if one is shipped and was built by this very Triton (the hash of its compiler, part
of every cache key, must match): each entry absent from Triton's cache is put through Triton's cache manager
(``get_cache_manager(key).put`` / ``put_group``), then a marker entry keyed by the archive's hash, at which later
processes stop after one file check. Skipped under ``FASTBENCH_AUTOTUNE=off`` (heuristic configs compile other
kernels) and ``FASTBENCH_COMPILED_CACHE=off``. Nothing here stops training: a corrupt archive or an unwritable
cache is one logged line, and the kernels compile as they would without it.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import lzma
import os
import re
import sysconfig
import tarfile
import time
from pathlib import Path
from typing import Any, Mapping

from fastbench.files import atomic_path

from . import key, store

log = logging.getLogger("fastbench.autotune")

SCHEMA = 1
INDEX = "index.json"
SUFFIX = ".tar.xz"
OFF_ENV = "FASTBENCH_COMPILED_CACHE"
MARKER = "fastbench-compiled-cache.json"
KEEP = (".json", ".cubin", ".hsaco")  # what a kernel's cache hit reads: metadata and binary
MODULE = ".so"  # a compiled host module (Triton's driver utilities, a kernel launcher)
_ENTRY = re.compile(r"[A-Z2-7]{52}")  # base32 of a sha256, as Triton names its cache directories
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class Unusable(ValueError):
    """An archive that cannot be installed here (the reason is the message)."""


def compiled_dir() -> Path:
    return store.bundled_dir() / "compiled"


def archive_name(device: Mapping[str, Any], tools: Mapping[str, Any]) -> str:
    """``h200-sm90-132sm__triton-3.6.0__cuda-13.0.tar.xz``."""
    return key.file_name(device, tools).removesuffix(".json") + SUFFIX


def triton_build() -> str:
    """16 hex digits of the hash of this Triton's compiler (its ``triton_key``, which every kernel's cache key
    starts with): two installs of one Triton version built apart differ here and share no cache entry."""
    from triton.runtime.cache import triton_key

    return hashlib.sha256(triton_key().encode()).hexdigest()[:16]


def _hex_key(entry: str) -> str:
    """A cache directory's name back to the hex key ``get_cache_manager`` takes."""
    if not _ENTRY.fullmatch(entry):
        raise Unusable(f"entry {entry[:80]!r} is not a Triton cache key")
    return base64.b32decode(entry + "=" * (-len(entry) % 8)).hex()


# --- packing (tools/collect_compile_cache.py) ---------------------------------------------------------------

def cache_entries(cache_dir: Path) -> dict[str, dict]:
    """The entries of a Triton cache directory that a hit needs: ``{entry: {"files": [...], "groups": {group
    file: [its files]}}}`` (a kernel lacking its binary, temporary files and locks are left out)."""
    out = {}
    for d in sorted(p for p in Path(cache_dir).iterdir() if p.is_dir() and _ENTRY.fullmatch(p.name)):
        groups = {}
        for g in sorted(d.glob("__grp__*.json")):
            children = json.loads(g.read_text()).get("child_paths") or {}
            files = sorted(c for c in children if c.endswith(KEEP) and (d / c).is_file())
            if any(not f.endswith(".json") for f in files):  # metadata and a binary
                groups[g.name.removeprefix("__grp__")] = files
        modules = sorted(f.name for f in d.iterdir() if f.is_file() and f.name.endswith(MODULE))
        files = sorted({f for fs in groups.values() for f in fs} | set(modules))
        if files:
            out[d.name] = {"files": files, "groups": groups}
    return out


def kernel_names(entries: Mapping[str, Mapping]) -> list[str]:
    """The kernels (group names) among ``entries``, sorted, each once."""
    return sorted({g.removesuffix(".json") for e in entries.values() for g in e["groups"]})


def pack(cache_dir: Path, out: Path, device: Mapping, tools: Mapping, about: Mapping | None = None) -> dict:
    """Write the entries of ``cache_dir`` that a hit needs to the archive ``out`` (atomically; reproducible:
    sorted, no times or owners) and return its index: schema, device, toolchain, Triton build, this Python's
    extension suffix (a launcher module's name carries it), ``about`` (what was collected) and the entries."""
    cache_dir, out = Path(cache_dir), Path(out)
    entries = cache_entries(cache_dir)
    index = {"schema": SCHEMA, "device": dict(device), "toolchain": dict(tools), "triton_build": triton_build(),
             "python": sysconfig.get_config_var("EXT_SUFFIX"), **dict(about or {}), "entries": entries}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w:xz", preset=9) as tar:
            _add(tar, INDEX, json.dumps(index, indent=1, sort_keys=True).encode())
            for entry, e in entries.items():
                for f in e["files"]:
                    _add(tar, f"{entry}/{f}", (cache_dir / entry / f).read_bytes())
        os.chmod(tmp, 0o644)  # package data, readable by all
    return index


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


# --- installation ------------------------------------------------------------------------------------------

def _record(archive: str | None = None, **fields) -> dict:
    """What the results record: the archive that applies here (None: none), its entry count, how many entries
    this process put into Triton's cache and found there already (None: no installation tried), whether the
    archive is wholly in Triton's cache (its marker), why it was skipped (None: it was not)."""
    return {"archive": archive, "entries": None, "installed": None, "already_present": None,
            "in_triton_cache": False, "skipped_reason": None, "triton_cache_dir": _triton_cache_dir(), **fields}


def _triton_cache_dir() -> str | None:
    try:
        from triton import knobs

        return str(knobs.cache.dir)
    except (ImportError, AttributeError):
        return None


def _marker(digest: str):
    """The cache manager of the marker entry of the archive whose sha256 is ``digest``."""
    from triton.runtime.cache import get_cache_manager

    return get_cache_manager(hashlib.sha256(f"fastbench-compiled-cache:{digest}".encode()).hexdigest())


def read_index(archive: Path) -> dict:
    """The index of an archive file (only its first member is decompressed); Unusable if it has none."""
    return _read(Path(archive).read_bytes(), index_only=True)[0]


def _read(data: bytes, index_only: bool = False) -> tuple[dict, dict[str, bytes]]:
    """(index, {member name: bytes}) of an archive (``index_only``: no members, only the first one is
    decompressed); Unusable when it is no readable archive of this schema."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
            first = tar.next()
            if first is None or first.name != INDEX:
                raise ValueError(f"its first member is not {INDEX}")
            index = json.loads(tar.extractfile(first).read())
            blobs = {} if index_only else {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError, ValueError) as e:
        raise Unusable(f"corrupt: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(index, dict) or index.get("schema") != SCHEMA or not isinstance(index.get("entries"), dict):
        raise Unusable(f"not a compiled-cache archive of schema {SCHEMA}")
    return index, blobs


def _check(index: Mapping, device: Mapping, tools: Mapping) -> None:
    """Unusable unless the archive was built for this device and toolchain, by this Triton build."""
    if index.get("device") != dict(device) or index.get("toolchain") != dict(tools):
        raise Unusable(f"built for {index.get('device')} with {index.get('toolchain')}, this is {dict(device)} "
                       f"with {dict(tools)}")
    if index.get("triton_build") != triton_build():
        raise Unusable(f"built by another build of Triton {tools['triton']} (compiler hash "
                       f"{index.get('triton_build')}, this one {triton_build()}): no kernel of it would be found")


def _listed(entry: str, e: Any, blobs: Mapping[str, bytes]) -> tuple[list[str], dict[str, list[str]]]:
    """An index entry's (files, groups), each file held by the archive; Unusable otherwise."""
    files, groups = (e.get("files"), e.get("groups")) if isinstance(e, dict) else (None, None)
    ok = (isinstance(files, list) and isinstance(groups, dict)
          and all(isinstance(f, str) and _FILE.fullmatch(f) and f"{entry}/{f}" in blobs for f in files)
          and all(_FILE.fullmatch(g) and isinstance(fs, list) and set(fs) <= set(files) for g, fs in groups.items()))
    if not ok:
        raise Unusable(f"corrupt: entry {entry[:80]!r} lists files it does not hold")
    return files, groups


def install(archive: Path, device: Mapping, tools: Mapping) -> dict:
    """Put the entries of ``archive`` that Triton's cache lacks into it, then the archive's marker; with the
    marker already there, only that is checked. Raises Unusable (mismatch, corrupt archive) or OSError."""
    archive = Path(archive)
    data = archive.read_bytes()
    marker = _marker(hashlib.sha256(data).hexdigest())
    done = marker.get_file(MARKER)
    if done is not None:
        entries = json.loads(Path(done).read_text()).get("entries")
        return _record(archive.name, entries=entries, installed=0, already_present=entries, in_triton_cache=True)
    index, blobs = _read(data)
    _check(index, device, tools)
    todo = [(_hex_key(entry), entry, *_listed(entry, e, blobs)) for entry, e in index["entries"].items()]
    from triton.runtime.cache import get_cache_manager

    installed = present = 0
    for hex_key, entry, files, groups in todo:  # every entry checked first: a corrupt archive installs nothing
        cache = get_cache_manager(hex_key)
        missing = [f for f in files if cache.get_file(f) is None]
        ungrouped = [g for g in groups if missing or cache.get_group(g) is None]
        for f in missing:
            cache.put(blobs[f"{entry}/{f}"], f, binary=True)
        for g in ungrouped:  # after its files: a group is what a lookup finds first
            cache.put_group(g, {f: cache.get_file(f) for f in groups[g]})
        if missing or ungrouped:
            installed += 1
        else:
            present += 1
    count = len(index["entries"])
    marker.put(json.dumps({"archive": archive.name, "entries": count}), MARKER, binary=False)
    return _record(archive.name, entries=count, installed=installed, already_present=present, in_triton_cache=True)


def _skip_reason(lk) -> str | None:
    if os.environ.get(OFF_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return f"{OFF_ENV}=off"
    if lk.cache_off:
        return "FASTBENCH_AUTOTUNE=off: heuristic configs, other kernels than the archive's"
    if lk.device is None:
        return "no CUDA GPU (or TRITON_INTERPRET=1): nothing compiles"
    return None


def find_archive(lk, root: Path | None = None) -> tuple[Path | None, str | None]:
    """(the archive of ``lk``'s device x toolchain, None) or (None, why there is none); ``root``: where archives
    are (default: the bundled ones)."""
    root = Path(root or compiled_dir())
    path = root / archive_name(lk.device, lk.tools)
    if path.is_file():
        return path, None
    shipped = sorted(p.name for p in root.glob(f"*{SUFFIX}")) if root.is_dir() else []
    return None, f"none shipped for {path.name} (shipped: {', '.join(shipped) or 'none'})"


_state: dict | None = None


def ensure_installed(lk=None, root: Path | None = None) -> dict:
    """Install this machine's archive into Triton's cache, once per process (later calls return the first
    call's record). ``lk``: the autotune Lookup that identifies device and toolchain (default: the process's);
    ``root``: where archives are (default: the bundled ones). Never raises."""
    global _state
    if _state is None:
        _state = _attempt(lk, root)
    return dict(_state)


def _attempt(lk, root: Path | None) -> dict:
    from . import lookup

    started = time.perf_counter()
    archive = None
    try:
        lk = lk or lookup.default()
        reason = _skip_reason(lk)
        if reason is not None:
            log.debug("compiled kernel cache: skipped (%s)", reason)
            return _record(skipped_reason=reason)
        archive, reason = find_archive(lk, root)
        if archive is None:
            log.info("compiled kernel cache: %s; kernels compile on first use", reason)
            return _record(skipped_reason=reason)
        record = install(archive, lk.device, lk.tools)
    except Exception as e:  # any failure here costs the compiles it would have saved, never the run
        why = f"{type(e).__name__}: {e}" if not isinstance(e, Unusable) else str(e)
        log.warning("compiled kernel cache%s not installed (%s); kernels compile on first use as usual",
                    f" {archive.name}" if archive else "", why)
        return _record(archive.name if archive else None, skipped_reason=why)
    if record["installed"]:
        log.info("compiled kernel cache: %d of %d entries of %s put into Triton's cache %s in %.2f s",
                 record["installed"], record["entries"], archive.name, record["triton_cache_dir"],
                 time.perf_counter() - started)
    return record


def describe(lk=None, root: Path | None = None) -> dict:
    """This process's installation record; where it tried none, what applies here, read without writing
    anything but the marker's empty directory (for ``fastbench env``, results and ``tune --list``)."""
    if _state is not None:
        return dict(_state)
    from . import lookup

    archive = None
    try:
        lk = lk or lookup.default()
        reason = _skip_reason(lk)
        if reason is None:
            archive, reason = find_archive(lk, root)
        if archive is None:
            return _record(skipped_reason=reason)
        data = archive.read_bytes()
        index, _ = _read(data, index_only=True)
        _check(index, lk.device, lk.tools)
        marked = _marker(hashlib.sha256(data).hexdigest()).get_file(MARKER) is not None
        return _record(archive.name, entries=len(index["entries"]), in_triton_cache=marked)
    except Exception as e:
        return _record(archive.name if archive else None, skipped_reason=str(e) if isinstance(e, Unusable)
                       else f"{type(e).__name__}: {e}")


def summary(record: Mapping) -> str:
    """One line of a :func:`describe` record, for ``fastbench env`` and ``tune --list``."""
    if record.get("archive") is None or record.get("skipped_reason"):
        where = f" {record['archive']}" if record.get("archive") else ""
        return f"compiled kernels{where}: not used ({record.get('skipped_reason')})"
    head = f"compiled kernels: {record['archive']} ({record['entries']} entries)"
    if record.get("installed"):
        return (f"{head}: {record['installed']} put into Triton's cache {record['triton_cache_dir']} by this "
                f"process, {record['already_present']} there already")
    if record.get("in_triton_cache"):
        return f"{head}: in Triton's cache {record['triton_cache_dir']}"
    return f"{head}: go into Triton's cache {record['triton_cache_dir']} when the first fused model is made"
