"""The tuner with a fake op and a fake timer: noise rule, ties, failure scoring, persistence,
the killable worker, the parallel compile-and-check phase, and the `fastbench tune` command."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

import autotune_fake_op as fake
from fastbench.autotune import cli, key, lookup, store, tuner

DEVICE = {"name": "h200", "cc": "9.0", "sms": 132}
TOOLS = {"triton": "3.6.0", "cuda": "13.0"}
REF = tuner.SpecRef("autotune_fake_op", fake.SPEC)
C16, C32, C64, C128, C256 = fake.SPEC.candidates["fwd"]


class Model:  # the one attribute the fake op's problems() reads
    def __init__(self, hidden):
        self.hidden_size = hidden


def M(*samples):
    return tuner.Measurement.of(samples)


def noisy(center, spread, n=21):
    return [center + spread * (i / (n - 1) - 0.5) for i in range(n)]


@pytest.fixture
def runner():
    return tuner.InProcess(timer=fake.fake_timer, device="cpu")


def job(tokens=1000, hidden=64, pass_name="fwd"):
    return tuner.make_job(REF, pass_name, {"dtype": "float32", "hidden": hidden, "tokens": tokens})


def test_measurement_quantiles():
    m = M(*range(1, 12))  # 1..11
    assert (m.median, m.p10, m.p90) == (6, 2, 10) and m.usable
    assert not M(1.0, math.nan).usable and not M().usable


@pytest.mark.parametrize("candidate, wins", [
    ([0.9] * 9, True),                # 10% faster, no overlap
    ([0.98] * 9, False),              # no overlap but within the 3% margin
    (noisy(0.8, 0.6), False),         # 20% faster median, but its p90 overlaps the default's p10
    (noisy(0.8, 0.1), True),
    ([1.0] * 9, False),               # a tie keeps the default
    ([math.inf] * 9, False),
])
def test_noise_rule(candidate, wins):
    default = M(*noisy(1.0, 0.05))
    assert tuner.beats(M(*candidate), default) is wins
    assert tuner.choose([default, M(*candidate)], 0) == (1 if wins else 0)


def test_ties_go_to_the_earliest_and_failures_never_win():
    fail = tuner.Measurement.failed("boom")
    assert tuner.choose([M(1.0), M(0.5), M(0.5), M(0.6)], 0) == 1
    assert tuner.choose([M(1.0), M(0.6), M(0.5), M(0.5)], 3) == 3  # equal to the default: no change
    assert tuner.choose([fail, M(0.7), M(0.6), M(0.6)], 0) == 2  # default unusable: fastest usable
    assert tuner.choose([fail, fail], 1) is None


def test_finalists_are_the_default_and_the_fastest_screened():
    fail = tuner.Measurement.failed("boom")
    screen = [M(0.9), M(0.5), fail, M(0.4), M(0.5), M(2.0)]
    assert tuner.finalists(screen, 5, k=3) == [5, 3, 1, 4]
    assert tuner.finalists(screen, 2, k=2) == [3, 1]  # an unusable default is no finalist
    assert tuner.finalists([fail, fail], 0) == []


def test_a_screened_out_candidate_cannot_win(monkeypatch):
    """Screening uses the first repeats only; the full timing decides."""
    runner = tuner.InProcess(timer=fake.fake_timer, device="cpu")
    monkeypatch.setitem(fake.TIMES, 16, [0.5] * 3 + [2.0] * 6)  # fast when screened, slow in full
    outcome, entry = tuner.tune_one(job(), runner)
    assert outcome.config == C32 and outcome.is_default and entry["config"] == C32
    outcome, _ = tuner.tune_one(job(), runner, k=0)  # no finalist but the default
    assert outcome.config == C32


def test_rel_error():
    x = torch.randn(4, 5) + 0.5
    assert tuner.rel_error(x.clone(), x) == 0
    assert 0 < tuner.rel_error(x * (1 + 1e-3), x) < 2e-3
    y = x.clone()
    y[1, 2] = math.nan
    assert tuner.rel_error(y, x) == math.inf
    assert tuner.rel_error(x[:3], x) == math.inf
    assert tuner.rel_error((x, None), (x, None)) == 0
    assert tuner.rel_error((x,), (x, x)) == math.inf


def test_failures_score_inf_and_the_sweep_goes_on(runner, monkeypatch):
    monkeypatch.setitem(fake.TIMES, 16, [0.5] * 9)
    outcome, entry = tuner.tune_one(job(), runner)
    assert outcome.status == "tuned" and outcome.config == C16 and not outcome.is_default
    assert outcome.ms == 0.5 and outcome.default_ms == 1.0 and outcome.speedup == 2.0
    failures = {json.dumps(eval(k)["BLOCK"]): v for k, v in outcome.failures.items()}
    assert failures.keys() == {"64", "128", "256"}  # the raising, wrong and NaN ones (timed at 0.1 ms)
    assert failures["64"].startswith("RuntimeError: out of resources")
    assert failures["128"].startswith("wrong answer") and failures["256"].startswith("wrong answer")
    assert entry["config"] == C16 and entry["op"] == "fake" and entry["problem"]["tokens"] == 1024


def test_tune_persists_each_problem_skips_cached_and_forces(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(fake.TIMES, 16, [0.5] * 9)
    path = tmp_path / key.file_name(DEVICE, TOOLS)
    jobs = tuner.plan([REF], [Model(64), Model(64), Model(96)], [1000, 1024, 4096], torch.float32)
    assert len(jobs) == 8  # 2 hidden sizes x 2 buckets x 2 passes; duplicates planned once
    seen = []

    def progress(j, outcome):
        seen.append(len(store.read(path)["entries"]))
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tuner.tune(jobs, runner, path, DEVICE, TOOLS, progress=progress)
    assert seen == [1, 2, 3]  # each problem is on disk before the next starts

    calls = []
    counting = tuner.InProcess(timer=lambda run, quick: calls.append(quick) or fake.fake_timer(run, quick), device="cpu")
    outcomes = tuner.tune(jobs, counting, path, DEVICE, TOOLS)
    assert [o.status for o in outcomes] == ["cached"] * 3 + ["tuned"] * 5
    assert len(store.read(path)["entries"]) == 8
    fwd = [o for o in outcomes if o.job.pass_name == "fwd"]
    assert all(o.config == C16 for o in fwd)

    calls.clear()
    monkeypatch.setitem(fake.TIMES, 16, [1.0] * 9)  # now a tie: --force brings the default back
    outcomes = tuner.tune(jobs, counting, path, DEVICE, TOOLS, force=True)
    assert all(o.status == "tuned" and o.is_default for o in outcomes)
    assert calls.count(True) == calls.count(False) == 8 * 2  # 2 usable candidates per job, screened then timed
    assert all(e["config"] in (C32, fake.SPEC.candidates["bwd"][1]) for e in store.read(path)["entries"].values())

    # and the lookup serves the stored winners
    lk = lookup.Lookup(device=DEVICE, tools=TOOLS, root=tmp_path, bundled=tmp_path / "none")
    assert lk.resolve(fake.SPEC, "fwd", {"dtype": "float32", "hidden": 96, "tokens": 3000})[1] == "exact"


def test_token_buckets():
    assert tuner.token_buckets(1024, 16384) == [1024, 2048, 4096, 8192, 16384]
    assert tuner.token_buckets(1000, 5000) == [1024, 2048, 4096, 8192]
    assert tuner.token_buckets(4096, 4096) == [4096]


def test_verify_flags_winners_within_noise_or_slower(runner, monkeypatch):
    j = job()
    entries = {j.key: {"config": dict(C16)}, job(hidden=7).key: {"config": dict(C32)}}  # the 2nd is the default
    for t16, verdict in (([0.5] * 9, "faster"), ([0.99] * 9, "within noise"), ([1.2] * 9, "slower")):
        monkeypatch.setitem(fake.TIMES, 16, t16)
        rows = tuner.verify([j, job(hidden=7)], entries, runner)
        assert [r["verdict"] for r in rows] == [verdict]


def test_worker_kills_hung_and_crashing_candidates():
    """A spawned worker: the hanging candidate is killed after the timeout, the crashing one takes
    the worker down; both score inf, the worker restarts and the last candidate is still measured."""
    ref = tuner.SpecRef("autotune_fake_op", fake.UNRULY)
    j = tuner.make_job(ref, "fwd", {"dtype": "float32", "hidden": 8, "tokens": 16})
    worker = tuner.Worker(timeout=2.0, timer=fake.fake_timer, device="cpu", setup_timeout=120)
    try:
        measured = worker.measure(j, fake.UNRULY.candidates["fwd"])
    finally:
        worker.close()
    assert [m.usable for m in measured] == [True, False, False, True]
    assert measured[1].status == "hung: killed after 2 s"
    assert measured[2].status == "crashed the worker (exit code 7)"
    assert measured[3].median == 1.0


class Recording(tuner.InProcess):
    """An in-process phase-2 runner that records which BLOCKs it ran (a hang would hang the test)."""

    def __init__(self):
        super().__init__(timer=fake.fake_timer, device="cpu")
        self.blocks = []

    def measure(self, job, configs, quick=False):
        self.blocks += [c["BLOCK"] for c in configs]
        return super().measure(job, configs, quick)


def test_two_phases_match_the_serial_path(tmp_path):
    """--jobs 2: phase 1 (2 spawned checkers) finds the same unusable candidates as the serial path,
    the hang killed; phase 2 never runs them again and picks the same winners."""
    ref = tuner.SpecRef("autotune_fake_op", fake.MIXED)
    jobs = tuner.plan([ref], [Model(8)], [16], torch.float32)
    serial = tuner.Worker(timeout=1.0, timer=fake.fake_timer, device="cpu", setup_timeout=120)
    try:
        expected = tuner.tune(jobs, serial, tmp_path / "serial.json", DEVICE, TOOLS)
    finally:
        serial.close()

    checkers = [tuner.Worker(timeout=1.0, timer=None, device="cpu", setup_timeout=120) for _ in range(2)]
    checked = tuner.check(jobs, checkers)
    assert all(w.proc is None for w in checkers)  # closed before any timing
    fwd = {c["BLOCK"]: m for c, m in zip(fake.MIXED.candidates["fwd"], checked[jobs[0].key])}
    assert {b for b, m in fwd.items() if m.usable} == {8, 16, 32} and fwd[8].status == tuner.CHECKED
    assert fwd[512].status == "hung: killed after 1 s" and fwd[128].status.startswith("wrong answer")
    assert fwd[64].status.startswith("RuntimeError: out of resources")

    timing = Recording()
    seen = []
    outcomes = tuner.tune(jobs, timing, tmp_path / "two.json", DEVICE, TOOLS,
                          progress=lambda j, o: seen.append(o is None),
                          checkers=[tuner.Worker(timeout=1.0, timer=None, device="cpu", setup_timeout=120) for _ in range(2)])
    assert seen == [True, True, False, False]  # phase 1 reports each job, then phase 2
    assert set(timing.blocks) == {8, 16, 32}
    summary = lambda os_: [(o.status, o.config, {c: why.split(":")[0] for c, why in o.failures.items()}) for o in os_]  # noqa: E731
    assert summary(outcomes) == summary(expected)  # the error sizes differ: fresh inputs every case
    assert [o.config["BLOCK"] for o in outcomes] == [8, 8]
    strip = lambda p: {k: {f: v for f, v in e.items() if f != "tuned"} for k, e in store.read(p)["entries"].items()}  # noqa: E731
    assert strip(tmp_path / "two.json") == strip(tmp_path / "serial.json")


def test_phase_one_skips_cached_jobs_and_stops_on_ctrl_c_or_the_deadline(tmp_path):
    ref = tuner.SpecRef("autotune_fake_op", fake.MIXED)
    jobs = [j for j in tuner.plan([ref], [Model(8), Model(9)], [16], torch.float32) if j.pass_name == "bwd"]
    path = tmp_path / "cache.json"
    tuner.tune(jobs[:1], Recording(), path, DEVICE, TOOLS)

    class Checker(tuner.InProcess):
        def __init__(self):
            super().__init__(timer=None, device="cpu")
            self.jobs, self.aborted = [], False

        def measure(self, job, configs, quick=False):
            self.jobs.append(job.key)
            return super().measure(job, configs, quick)

        def abort(self):
            self.aborted = True

    def interrupt(job, outcome):
        if outcome is None and job is jobs[1]:
            raise KeyboardInterrupt

    checkers = [Checker(), Checker()]
    with pytest.raises(KeyboardInterrupt):
        tuner.tune(jobs, Recording(), path, DEVICE, TOOLS, progress=interrupt, checkers=checkers)
    assert [k for c in checkers for k in c.jobs] == [jobs[1].key]
    assert all(c.aborted for c in checkers) and len(store.read(path)["entries"]) == 1  # the cached job only

    checkers = [Checker(), Checker()]
    timing = Recording()
    assert tuner.tune(jobs, timing, path, DEVICE, TOOLS, checkers=checkers, deadline=0) == []
    assert not any(c.jobs for c in checkers) and not timing.blocks


def test_cli_without_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tuner, "discover", lambda modules=None: [REF])
    monkeypatch.setattr(key, "device_fingerprint", lambda index=None: None)
    r = CliRunner().invoke(cli.tune, ["--models", "llama-3-8b-tiny", "--tokens", "1024"])
    assert r.exit_code == 2 and "needs a CUDA GPU" in r.output
    r = CliRunner().invoke(cli.tune, ["--list", "--models", "llama-3-8b-tiny", "--tokens", "1024"])
    assert r.exit_code == 0, r.output
    assert "heuristic tier" in r.output and "fake/fwd" in r.output
    r = CliRunner().invoke(cli.tune, ["--ops", "nope", "--list"])
    assert r.exit_code != 0 and "unknown ops nope" in r.output
    lookup.reset()


def test_cli_tune_list_verify_export_with_a_fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(tuner, "discover", lambda modules=None: [REF])
    monkeypatch.setattr(key, "device_fingerprint", lambda index=None: DEVICE)
    made = []

    def worker(timeout, timer=tuner.cuda_timer):  # checkers are made with timer=None
        made.append(timer)
        return tuner.InProcess(timer=timer and fake.fake_timer, device="cpu")

    monkeypatch.setattr(tuner, "Worker", worker)
    monkeypatch.setitem(fake.TIMES, 16, [0.5] * 9)
    args = ["--models", "llama-3-8b-tiny,gemma-7b-tiny", "--tokens", "1000-2048"]
    try:
        check = tuner.check
        monkeypatch.setattr(tuner, "check", lambda *a, **k: pytest.fail("--jobs 1 runs no phase 1"))
        r = CliRunner().invoke(cli.tune, [*args, "--jobs", "1", "--json-out", str(tmp_path / "tune.json")])
        assert r.exit_code == 0, r.output
        assert made == [tuner.cuda_timer]  # one worker: compile, check and time in one process, as before
        monkeypatch.setattr(tuner, "check", check)
        assert "fake/fwd" in r.output and "2.000x" in r.output and "4 problems (0 already cached)" in r.output
        doc = json.loads((tmp_path / "tune.json").read_text())
        assert len(doc["rows"]) == 4 and {s["op"] for s in doc["summary"]} == {"fake/fwd", "fake/bwd"}

        r = CliRunner().invoke(cli.tune, [*args, "--list"])
        assert r.exit_code == 0 and "fake/fwd" in r.output, r.output
        assert [line.split()[:4] for line in r.output.splitlines() if line.startswith("fake/fwd")] == [["fake/fwd", "2", "2"]]

        r = CliRunner().invoke(cli.tune, [*args, "--verify", "--json-out", str(tmp_path / "verify.json")])
        assert r.exit_code == 0 and "faster: 4" in r.output, r.output
        verified = json.loads((tmp_path / "verify.json").read_text())
        assert len(verified["rows"]) == 4 and verified["summary"][0]["geomean_speedup"] == pytest.approx(2.0)

        r = CliRunner().invoke(cli.tune, [*args, "--force", "--max-time", "0"])
        assert r.exit_code == 3 and "incomplete: 0 of 4" in r.output, r.output

        made.clear()
        r = CliRunner().invoke(cli.tune, [*args, "--force", "--jobs", "3", "--json-out", str(tmp_path / "tune3.json")])
        assert r.exit_code == 0 and "4 problems (0 already cached)" in r.output, r.output
        assert made == [tuner.cuda_timer] + [None] * 3
        rows = lambda p: [{**r, "failures": sorted(r["failures"])} for r in json.loads(p.read_text())["rows"]]  # noqa: E731
        assert rows(tmp_path / "tune3.json") == rows(tmp_path / "tune.json")
        r = CliRunner().invoke(cli.tune, [*args, "--jobs", "0"])
        assert r.exit_code != 0 and "--jobs" in r.output

        r = CliRunner().invoke(cli.tune, [*args, "--export", str(tmp_path)])
        assert r.exit_code == 0, r.output
        exported = tmp_path / key.file_name(DEVICE, key.toolchain())
        assert len(store.read(exported)["entries"]) == 4

        # a fresh user cache: --verify re-times the bundled winners that serve instead
        monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "fresh"))
        monkeypatch.setattr(store, "bundled_dir", lambda: tmp_path)
        r = CliRunner().invoke(cli.tune, [*args, "--verify", "--json-out", str(tmp_path / "verify-bundled.json")])
        assert r.exit_code == 0 and "faster: 4" in r.output and "bundled" in r.output, r.output
        assert {row["source"] for row in json.loads((tmp_path / "verify-bundled.json").read_text())["rows"]} == {"bundled"}
    finally:
        lookup.reset()
