"""The JSON store: atomic merged writes under a lock, corrupt and foreign files ignored, cache dir."""
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from fastbench.autotune import key, store

DEVICE = {"name": "h200", "cc": "9.0", "sms": 132}
TOOLS = {"triton": "3.6.0", "cuda": "13.0"}


def entry(i: int, block: int = 16) -> dict:
    return {"op": "fake", "pass": "fwd", "kernel": "0" * 16, "problem": {"hidden": i, "tokens": 1024},
            "config": {"BLOCK": block, "num_warps": 4}, "ms": 1.0}


def test_update_merges_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "c.json"
    store.update(path, DEVICE, TOOLS, {"a": entry(1)})
    store.update(path, DEVICE, TOOLS, {"b": entry(2)})
    store.update(path, DEVICE, TOOLS, {"a": entry(1, 32)}, drop={"b"})
    doc = store.read(path)
    assert doc["schema"] == key.SCHEMA and doc["device"] == DEVICE and doc["toolchain"] == TOOLS
    assert doc["entries"] == {"a": entry(1, 32)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.json", "c.json.lock"]  # no temp left


def _writer(path: str, worker: int, n: int) -> None:
    for i in range(n):
        store.update(Path(path), DEVICE, TOOLS, {f"w{worker}-{i}": entry(worker * 1000 + i)})


def test_concurrent_writers_keep_every_entry(tmp_path):
    path = tmp_path / "c.json"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    doc = json.loads(path.read_text())
    assert sorted(doc["entries"]) == sorted(f"w{w}-{i}" for w in range(4) for i in range(15))


@pytest.mark.parametrize("text", ['{"schema": 1, "entries": {"a": ', "not json at all", "[1, 2]", "\x00\xff"])
def test_corrupt_file_is_reported_once_and_ignored(tmp_path, caplog, text):
    path = tmp_path / "c.json"
    path.write_bytes(text.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="fastbench.autotune"):
        assert store.read(path) is None
        assert store.read(path) is None
    assert len([r for r in caplog.records if str(path) in r.getMessage()]) == 1
    store.update(path, DEVICE, TOOLS, {"a": entry(1)})  # a writer replaces it with a valid file
    assert list(store.read(path)["entries"]) == ["a"]


def test_other_schema_is_ignored(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"schema": key.SCHEMA + 1, "entries": {"a": entry(1)}}))
    assert store.read(path) is None


def test_malformed_entries_are_skipped(tmp_path):
    path = tmp_path / "c.json"
    bad = {**entry(2), "config": "BLOCK=16"}
    path.write_text(json.dumps({"schema": key.SCHEMA, "entries": {"a": entry(1), "b": bad, "c": 3}}))
    assert list(store.read(path)["entries"]) == ["a"]


def test_missing_file_reads_as_none(tmp_path):
    assert store.read(tmp_path / "absent.json") is None


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "mine"))
    assert store.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(store.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.cache_dir() == tmp_path / "xdg" / "fastbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert store.cache_dir() == Path.home() / ".cache" / "fastbench"


def test_bundled_dir_is_package_data():
    assert store.bundled_dir().name == "bundled" and store.bundled_dir().parent.name == "autotune"
    for path in store.list_files(store.bundled_dir()):  # every shipped file must be readable
        assert store.read(path) is not None, path
    assert os.path.isdir(store.bundled_dir())
