"""The harness's checkpoint cache on disk: a full disk makes room by evicting older preset checkpoints (least
recently used first, never anything else) or says what to do."""
import os
import shutil
from collections import namedtuple

import pytest

from fastbench.bench import checkpoint_cache

Usage = namedtuple("Usage", "total used free")


def fake_checkpoint(root, name, age):
    d = root / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 10)
    (d / checkpoint_cache._MARK).touch()
    os.utime(d / checkpoint_cache._MARK, (age, age))
    return d


def test_full_disk_evicts_least_recently_used_checkpoints(tmp_path, monkeypatch):
    old, newer = fake_checkpoint(tmp_path, "old", 1_000), fake_checkpoint(tmp_path, "newer", 2_000)
    user = tmp_path / "users-own"
    user.mkdir()
    frees = iter([0, 0, 1 << 40, 1 << 40])  # no room until one checkpoint is gone
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(0, 0, next(frees)))
    path = checkpoint_cache.save_checkpoint("llama-3-8b-tiny", str(tmp_path / "new"), seed=3)
    assert not old.exists() and newer.exists() and user.exists()
    assert os.path.isfile(os.path.join(path, checkpoint_cache._MARK))


def test_no_room_even_after_eviction_says_what_to_do(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path, "old", 1_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(0, 0, 1 << 20))
    with pytest.raises(OSError, match=r"FASTBENCH_CHECKPOINT_CACHE.*") as e:
        checkpoint_cache.save_checkpoint("llama-3-8b-tiny", str(tmp_path / "new"), seed=3)
    assert "old" in str(e.value) and not (tmp_path / "new").exists()
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".partial-")]


def test_reusing_a_checkpoint_marks_it_recently_used(tmp_path):
    path = checkpoint_cache.save_checkpoint("llama-3-8b-tiny", str(tmp_path / "c"), seed=3)
    mark = os.path.join(path, checkpoint_cache._MARK)
    os.utime(mark, (1, 1))
    assert checkpoint_cache.save_checkpoint("llama-3-8b-tiny", path, seed=3) == path
    assert os.path.getmtime(mark) > 1
