"""The benchmarks' L2 flush: both modes run (on the CPU here) and a bad mode says what to give."""
import pytest
import torch

from fastbench.bench.gpu_timing import FLUSH_ENV, _flusher


@pytest.mark.parametrize("mode", ["write", "read"])
def test_flusher_runs_in_both_modes(monkeypatch, mode):
    monkeypatch.setenv(FLUSH_ENV, mode)
    flush = _flusher(torch, device="cpu")
    out = flush()
    if mode == "read":
        assert out.dtype == torch.int64 and int(out) == 256 << 18  # the sum of 256 MiB of int32 ones
    else:
        assert int(out.abs().max()) == 0


def test_flusher_rejects_unknown_mode(monkeypatch):
    monkeypatch.setenv(FLUSH_ENV, "both")
    with pytest.raises(ValueError, match="give write"):
        _flusher(torch, device="cpu")
