"""Faults of the autotune cache: corrupt or truncated files (user or bundled) are named in one line with
what to do and the lookup falls back; two `tune` processes and a training process sharing one cache
directory lose no entry and never read a half-written file."""
import json
import logging
import multiprocessing as mp
import time
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

import autotune_fake_op as fake
from fastbench.autotune import cli, key, lookup, store, tuner

DEVICE = {"name": "h200", "cc": "9.0", "sms": 132}
HERE = {"triton": "3.9.0", "cuda": "13.0"}
TUNED = {"triton": "3.6.0", "cuda": "13.0"}
REF = tuner.SpecRef("autotune_fake_op", fake.SPEC)
C16, C32, C64, C128, C256 = fake.SPEC.candidates["fwd"]
PROBLEM = {"dtype": "float32", "hidden": 64, "tokens": 4096}


def entry_for(hidden: int, config, tokens: int = 4096) -> tuple[str, dict]:
    problem = key.canonical_problem({**PROBLEM, "hidden": hidden, "tokens": tokens})
    khash = key.kernel_hash(fake.SPEC)
    return key.entry_key("fake", "fwd", khash, problem), {"op": "fake", "pass": "fwd", "kernel": khash,
                                                          "problem": problem, "config": dict(config)}


def valid_text(tools=HERE) -> str:
    k, e = entry_for(64, C16)
    return json.dumps({"schema": key.SCHEMA, "device": DEVICE, "toolchain": tools, "entries": {k: e}}, indent=1)


CORRUPT = {
    "truncated": lambda: valid_text()[: len(valid_text()) // 2],
    "empty": lambda: "",
    "binary": lambda: "\x00\xff\xfe garbage",
    "not a document": lambda: "[1, 2, 3]",
    "other schema": lambda: json.dumps({"schema": 99, "entries": {}}),
    "nested too deep": lambda: "[" * 100000 + "]" * 100000,
    "toolchain not an object": lambda: json.dumps({"schema": key.SCHEMA, "device": DEVICE, "toolchain": [1],
                                                   "entries": {}}),
}


def make(dirs):
    root, bundled = dirs
    return lookup.Lookup(device=DEVICE, tools=HERE, root=root, bundled=bundled, check_device="cpu")


def warnings_about(caplog, path) -> list[str]:
    return [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_a_corrupt_user_cache_is_named_once_and_the_bundled_file_serves(dirs, caplog, kind):
    root, bundled = dirs
    user = root / key.file_name(DEVICE, HERE)
    user.parent.mkdir(parents=True)
    user.write_bytes(CORRUPT[kind]().encode("latin-1"))
    k, e = entry_for(64, C128)
    store.update(bundled / "shipped.json", DEVICE, HERE, {k: e})
    with caplog.at_level(logging.WARNING, logger="fastbench.autotune"):
        lk = make(dirs)
        assert lk.config_for(fake.SPEC, "fwd", PROBLEM) is C128
        assert lk.config_for(fake.SPEC, "bwd", PROBLEM) == fake.SPEC.candidates["bwd"][1]  # the heuristic
        lookup.reset(device=DEVICE, tools=HERE, root=root, bundled=bundled)
        try:
            assert lookup.describe()["user_file_exists"]
        finally:
            lookup.reset()
    (line,) = warnings_about(caplog, user)
    assert line.startswith(f"autotune cache file {user} ignored (") and "\n" not in line
    assert line.endswith("): delete it or run `fastbench tune --force`; bundled or heuristic configs serve meanwhile")


def test_a_corrupt_bundled_file_is_named_once_and_the_heuristic_serves(dirs, caplog):
    root, bundled = dirs
    bundled.mkdir()
    shipped = bundled / "shipped.json"
    shipped.write_text(valid_text()[:40])
    with caplog.at_level(logging.WARNING, logger="fastbench.autotune"):
        assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C32, "heuristic")
        assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C32, "heuristic")
    (line,) = warnings_about(caplog, shipped)
    assert line.startswith(f"autotune cache file {shipped} ignored (not JSON: JSONDecodeError: ")
    assert line.endswith("reinstall fastbench (`pip install --force-reinstall fastbench`) or run `fastbench tune`, "
                         "whose cache comes first; heuristic configs serve meanwhile")


def test_malformed_entries_never_break_the_lookup(dirs):
    root, _ = dirs
    user = root / key.file_name(DEVICE, HERE)
    k, good = entry_for(64, C16)
    bad = {**good, "problem": {**good["problem"], "hidden": [64]}}  # unhashable: once a crash in index()
    root.mkdir()
    user.write_text(json.dumps({"schema": key.SCHEMA, "device": DEVICE, "toolchain": HERE,
                                "entries": {k: good, "x": bad, "y": {**good, "config": {"BLOCK": {}}}},
                                "checks": {"z": {"op": 1}}}))
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "exact")
    assert store.read(user)["checks"] == {}


def test_a_write_moves_a_corrupt_file_aside(dirs, caplog):
    root, _ = dirs
    user = root / key.file_name(DEVICE, HERE)
    root.mkdir()
    user.write_text(CORRUPT["truncated"]())
    k, e = entry_for(64, C16)
    with caplog.at_level(logging.WARNING, logger="fastbench.autotune"):
        store.update(user, DEVICE, HERE, {k: e})
    assert store.read(user)["entries"] == {k: e}
    assert (root / (user.name + ".corrupt")).read_text() == CORRUPT["truncated"]()  # kept for a look
    assert any("moved to" in m for m in warnings_about(caplog, user))


def _fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(tuner, "discover", lambda modules=None: [REF])
    monkeypatch.setattr(key, "device_fingerprint", lambda index=None: DEVICE)
    monkeypatch.setattr(store, "bundled_dir", lambda: tmp_path / "bundled")
    monkeypatch.setattr(tuner, "Worker", lambda timeout, timer=None: tuner.InProcess(fake.fake_timer, "cpu"))


def test_tune_list_and_tune_over_a_corrupt_cache(monkeypatch, tmp_path, caplog):
    _fake_gpu(monkeypatch, tmp_path)
    store._reported.clear()
    user = tmp_path / "cache" / key.file_name(DEVICE, key.toolchain())
    user.parent.mkdir()
    user.write_text("{\"schema\": 1, \"entr")
    args = ["--models", "llama-3-8b-tiny", "--tokens", "1024"]
    try:
        with caplog.at_level(logging.WARNING, logger="fastbench.autotune"):
            r = CliRunner().invoke(cli.tune, [*args, "--list"])
            assert r.exit_code == 0 and r.exception is None, r.output
            assert f"{user.name}: unreadable (ignored)" in r.output
            r = CliRunner().invoke(cli.tune, [*args, "--force"])
            assert r.exit_code == 0 and r.exception is None, r.output
        assert len(store.read(user)["entries"]) == 2 and (user.parent / (user.name + ".corrupt")).exists()
        assert any("delete it or run `fastbench tune --force`" in m for m in warnings_about(caplog, user))
    finally:
        lookup.reset()


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_sigterm_while_tune_writes_the_cache_keeps_what_was_done(monkeypatch, tmp_path, stop):
    """The signal comes while the second problem's result is being written: exit 143 (130 on Ctrl-C), the cache
    holds the first problem's result, whole, and no temporary file is left."""
    import os
    import signal

    _fake_gpu(monkeypatch, tmp_path)
    fsync, calls = os.fsync, []

    def stop_in_the_second_write(fd):
        calls.append(fd)
        if len(calls) == 2:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return fsync(fd)

    monkeypatch.setattr(store.os, "fsync", stop_in_the_second_write)
    before = signal.getsignal(signal.SIGTERM)
    try:
        r = CliRunner().invoke(cli.tune, ["--models", "llama-3-8b-tiny", "--tokens", "1024", "--jobs", "1"])
    finally:
        lookup.reset()
    assert signal.getsignal(signal.SIGTERM) is before
    assert r.exit_code == {"sigterm": 143, "ctrl-c": 130}[stop], r.output
    said = "terminated (SIGTERM)" if stop == "sigterm" else "interrupted"
    assert f"{said}: results so far are in" in r.output and "incomplete: 1 of 2 problems done" in r.output
    user = tmp_path / "cache" / key.file_name(DEVICE, key.toolchain())
    assert len(store.read(user)["entries"]) == 1
    assert sorted(p.name for p in user.parent.iterdir() if not p.name.endswith(".lock")) == [user.name]


# --- two `tune` processes and a training process sharing one cache directory ---

def _child(target, args, errors):
    try:
        target(*args)
    except BaseException:
        errors.put(traceback.format_exc())


def _tune(path: str, hiddens: list[int]) -> None:
    jobs = [tuner.make_job(REF, "fwd", {**PROBLEM, "hidden": h, "tokens": 1024}) for h in hiddens]
    tuner.tune(jobs, tuner.InProcess(fake.fake_timer, "cpu"), Path(path), DEVICE, HERE)


def _train(root: str, bundled: str, hiddens: list[int]) -> None:
    """A training process: resolves each problem once; the other-toolchain configs are checked and the
    verdicts written into the same user file."""
    lk = lookup.Lookup(device=DEVICE, tools=HERE, root=Path(root), bundled=Path(bundled), check_device="cpu")
    for h in hiddens:
        assert lk.config_for(fake.SPEC, "fwd", {**PROBLEM, "hidden": h}) is C16
    assert set(lk.tiers_used().values()) == {"other-toolchain"}


def _read(path: str, stop, reads) -> None:
    """A reader: every read of the file, at any time, is a whole valid document."""
    n = 0
    while not stop.is_set():
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            continue
        doc = json.loads(text)
        assert doc["schema"] == key.SCHEMA and isinstance(doc["entries"], dict), text[:200]
        n += 1
    reads.put(n)


def test_two_tunes_and_a_training_share_one_cache_dir(tmp_path):
    root, bundled = tmp_path / "cache", tmp_path / "bundled"
    user = root / key.file_name(DEVICE, HERE)
    trained = list(range(200, 216))
    store.update(bundled / "tuned.json", DEVICE, TUNED, dict(entry_for(h, C16) for h in trained))
    tune_a, tune_b = list(range(100, 124)), list(range(112, 136))  # overlapping
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    errors, reads, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    reader = ctx.Process(target=_child, args=(_read, (str(user), stop, reads), errors))
    reader.start()
    procs = [ctx.Process(target=_child, args=(t, a, errors)) for t, a in (
        (_tune, (str(user), tune_a)), (_tune, (str(user), tune_b)), (_train, (str(root), str(bundled), trained)))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    time.sleep(0.05)
    stop.set()
    reader.join(30)
    assert errors.empty(), errors.get()
    assert reads.get(timeout=5) > 0
    doc = store.read(user)
    want = {tuner.make_job(REF, "fwd", {**PROBLEM, "hidden": h, "tokens": 1024}).key for h in tune_a + tune_b}
    assert set(doc["entries"]) == want  # no entry lost
    assert len(doc["checks"]) == len(trained) and all(c["ok"] for c in doc["checks"].values())
    assert sorted(p.name for p in root.iterdir()) == sorted([user.name, user.name + ".lock"])  # no temp file left
