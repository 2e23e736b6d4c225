import pytest

from fastbench.autotune import lookup, store


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """(user cache, bundled) folders of a lookup, empty, with no pinned or switched-off configs in the environment
    and the store's corrupt-file reports forgotten."""
    monkeypatch.delenv(lookup.PIN_ENV, raising=False)
    monkeypatch.delenv(lookup.OFF_ENV, raising=False)
    store._reported.clear()
    return tmp_path / "cache", tmp_path / "bundled"
