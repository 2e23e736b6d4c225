"""On the GPU machine: the real timer, the fingerprint, and one real op tuned in a worker process."""
import math

import pytest
import torch

from fastbench import presets
from fastbench.autotune import key, lookup, store, tuner

pytestmark = pytest.mark.gpu


def test_fingerprint_and_toolchain():
    fp = key.device_fingerprint()
    assert fp["name"] and not fp["name"].startswith("nvidia") and fp["sms"] > 0 and "." in fp["cc"]
    assert key.toolchain()["cuda"] == torch.version.cuda


def test_cuda_timer_gives_positive_samples():
    x = torch.randn(1 << 22, device="cuda")
    full = tuner.cuda_timer(lambda: x.mul_(1.0))
    quick = tuner.cuda_timer(lambda: x.mul_(1.0), True)
    assert len(full) >= 25 and 5 <= len(quick) <= 20
    assert all(math.isfinite(v) and v > 0 for v in full + quick)


def _rms_norm_refs(monkeypatch):
    """rms_norm's op with 4 candidates per pass (of 25 and 50): each compiles in its worker in ~1-2 s."""
    refs = [r for r in tuner.discover() if r.name == "rms_norm"]
    if not refs:
        pytest.skip("no rms_norm op yet")
    for pass_name, configs in list(refs[0].spec.candidates.items()):
        monkeypatch.setitem(refs[0].spec.candidates, pass_name, configs[:4])
    return refs


def test_rms_norm_tunes_in_a_worker_and_is_served(tmp_path, monkeypatch):
    refs = _rms_norm_refs(monkeypatch)
    jobs = tuner.plan(refs, [presets.build_config("llama-3-8b")], [4096], torch.bfloat16)
    device, tools = key.device_fingerprint(), key.toolchain()
    path = tmp_path / key.file_name(device, tools)
    worker = tuner.Worker(timeout=120)
    try:
        outcomes = tuner.tune(jobs[:2], worker, path, device, tools)
    finally:
        worker.close()
    assert [o.status for o in outcomes] == ["tuned", "tuned"], [o.failures for o in outcomes]
    assert all(o.ms > 0 and o.default_ms > 0 for o in outcomes)
    lk = lookup.Lookup(root=tmp_path, bundled=tmp_path / "none")
    for o in outcomes:
        config, tier = lk.resolve(refs[0].spec, o.job.pass_name, o.job.problem)
        assert tier == "exact" and dict(config) == dict(o.config)
    assert len(store.read(path)["entries"]) == 2


def test_phase_one_compiles_so_that_phase_two_only_hits_the_cache(tmp_path, monkeypatch):
    """--jobs 2 on a real op: 2 spawned checkers fill a fresh Triton cache; timing the survivors
    then adds nothing to it (same kernels, same specialisations) and tunes every problem."""
    refs = _rms_norm_refs(monkeypatch)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # read by the spawned workers
    jobs = tuner.plan(refs, [presets.build_config("llama-3-8b")], [4096], torch.bfloat16)[:2]
    checked = tuner.check(jobs, [tuner.Worker(timeout=120, timer=None) for _ in range(2)])
    assert all(any(m.usable for m in checked[j.key]) for j in jobs), checked
    compiled = sorted(p for p in (tmp_path / "triton").rglob("*") if p.is_file())
    assert compiled
    worker = tuner.Worker(timeout=120)
    try:
        outcomes = [tuner.tune_one(j, worker, checked=checked[j.key])[0] for j in jobs]
    finally:
        worker.close()
    assert [o.status for o in outcomes] == ["tuned", "tuned"] and all(o.ms > 0 for o in outcomes)
    assert sorted(p for p in (tmp_path / "triton").rglob("*") if p.is_file()) == compiled


def test_sigterm_stops_tune_and_its_worker_on_the_gpu(tmp_path):
    """`fastbench tune` in a process of its own, stopped by SIGTERM once its candidate worker holds the GPU:
    exit 143, one line saying where the results so far are, the worker ended with it, and the cache directory
    holds no half-written file."""
    import os
    import signal
    import subprocess
    import sys

    from child_processes import assert_ends, gpu_child, stopped_when

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[store.CACHE_ENV] = str(tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-m", "fastbench", "tune", "--models", "llama-3-8b-tiny", "--ops",
                             "rms_norm", "--tokens", "1024", "--jobs", "1"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, worker = stopped_when(proc, lambda: gpu_child(proc.pid, "spawn_main"),
                                  lambda _: proc.send_signal(signal.SIGTERM))
    assert proc.returncode == 143, output
    assert "terminated (SIGTERM): results so far are in" in output and "Traceback" not in output, output
    assert "incomplete: " in output and "run again to carry on" in output
    assert_ends(worker, "the tune worker")
    cache = tmp_path / "cache"
    files = sorted(cache.iterdir()) if cache.exists() else []
    assert all(p.suffix in (".json", ".lock") for p in files), files
    assert all(store.read(p) is not None for p in files if p.suffix == ".json")
