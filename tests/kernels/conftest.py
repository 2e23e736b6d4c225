"""Shared kernel-test fixtures."""
import pytest
import torch


@pytest.fixture
def poison(monkeypatch):
    """Every floating tensor made by torch.empty / torch.empty_like during the test starts as NaN, so an
    output element a kernel forgets to write shows up as NaN instead of as stale memory."""
    def poisoned(make):
        def alloc(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return alloc

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
