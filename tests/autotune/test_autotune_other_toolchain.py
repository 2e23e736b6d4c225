"""The other-toolchain tier: a config tuned for this GPU under another Triton/CUDA version serves after
a one-time check against the reference (recorded in the user cache); a failing one falls through;
`fastbench tune --list` shows the tier; `fastbench tune` tunes those problems for this toolchain."""
import dataclasses
import json
import logging

import pytest
import torch
from click.testing import CliRunner

import autotune_fake_op as fake
from autotune_fake_op import DEVICE, PROBLEM, put
from autotune_fake_op import TOOLS as TUNED  # where the bundled/user configs were tuned
from fastbench import presets
from fastbench.autotune import cli, key, lookup, store, tuner

HERE = {"triton": "3.9.0", "cuda": "13.0"}  # this process
C16, C32, C64, C128, C256 = fake.SPEC.candidates["fwd"]  # 16 ok, 32 default, 64 raises, 128 wrong, 256 NaN


def tuned_file(root, tools=TUNED):
    return root / key.file_name(DEVICE, tools)


def make(dirs, tools=HERE):
    return fake.make_lookup(dirs, tools=tools)


@pytest.fixture
def counted(monkeypatch):
    """fake.SPEC whose tune_case counts its calls (one per check)."""
    calls = []

    def tune_case(pass_name, problem, device):
        calls.append((pass_name, problem["tokens"]))
        return fake.tune_case(pass_name, problem, device)

    return dataclasses.replace(fake.SPEC, tune_case=tune_case), calls


def checks_of(root, tools=HERE):
    return (store.read(tuned_file(root, tools)) or {}).get("checks", {})


def test_a_bundled_config_of_another_triton_serves_after_one_check(dirs, counted, caplog):
    root, bundled = dirs
    spec, calls = counted
    put(bundled / key.file_name(DEVICE, TUNED), C16)
    rng = torch.get_rng_state()
    lk = make(dirs)
    with caplog.at_level(logging.INFO, logger="fastbench.autotune"):
        for _ in range(3):
            assert lk.config_for(spec, "fwd", PROBLEM) is C16
        assert lk.config_for(spec, "fwd", {**PROBLEM, "tokens": 4000}) is C16  # same bucket, same check
    assert calls == [("fwd", 3000)]  # checked once, on the problem being launched
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert lk.tiers_used() == {"fake/fwd": "other-toolchain"}
    served = [r.getMessage() for r in caplog.records if "other-toolchain tier" in r.getMessage()]
    assert served == ["fake/fwd: config from the other-toolchain tier (tuned under triton 3.6.0, cuda 13.0; "
                      "checked here): {'BLOCK': 16, 'num_warps': 4}"]
    (record,) = checks_of(root).values()
    assert record["ok"] and record["config"] == C16 and record["tuned_under"] == TUNED
    assert record["problem"]["tokens"] == 4096
    # another process: the recorded verdict serves, no check runs
    assert make(dirs).resolve(spec, "fwd", PROBLEM) == (C16, "other-toolchain")
    assert calls == [("fwd", 3000)]
    # the tuned problem's other buckets: nearest, checked once for that bucket
    assert make(dirs).resolve(spec, "fwd", {**PROBLEM, "tokens": 16384}) == (C16, "other-toolchain")
    assert calls == [("fwd", 3000), ("fwd", 16384)]


def test_a_user_file_of_another_cuda_or_triton_serves(dirs):
    root, _ = dirs
    other_cuda, old, newer = ({"triton": "3.9.0", "cuda": "12.8"}, {"triton": "3.6.0", "cuda": "13.0"},
                              {"triton": "3.10.0", "cuda": "13.0"})
    put(tuned_file(root, old), C16, tools=old)
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "other-toolchain")
    put(tuned_file(root, other_cuda), C16, tools=other_cuda)
    put(tuned_file(root, newer), C16, tools=newer)
    put(dirs[1] / "bundled.json", C16, tools=old)
    # the same Triton first, then the newest Triton (3.10 > 3.6), the user's file before the bundled one
    assert [p.name for p, _ in make(dirs).other_toolchain_files()] == [
        key.file_name(DEVICE, other_cuda), key.file_name(DEVICE, newer), key.file_name(DEVICE, old), "bundled.json"]


@pytest.mark.parametrize("bad, why", [(C64, "out of resources"), (C128, "wrong answer"), (C256, "wrong answer")])
def test_a_config_that_fails_its_check_is_recorded_and_falls_through(dirs, counted, caplog, bad, why):
    root, bundled = dirs
    spec, calls = counted
    put(bundled / "tuned.json", bad)
    with caplog.at_level(logging.WARNING, logger="fastbench.autotune"):
        assert make(dirs).resolve(spec, "fwd", PROBLEM) == (C32, "heuristic")
    (record,) = checks_of(root).values()
    assert record["ok"] is False and why in record["why"] and record["config"] == bad
    (line,) = [r.getMessage() for r in caplog.records if "failed its check" in r.getMessage()]
    assert why in line and "the next tier serves" in line and str(tuned_file(root, HERE)) in line
    assert make(dirs).resolve(spec, "fwd", PROBLEM) == (C32, "heuristic")
    assert len(calls) == 1  # the failure is not checked again


def test_the_next_other_toolchain_config_serves_when_the_first_fails(dirs, counted):
    root, bundled = dirs
    spec, calls = counted
    put(bundled / "newer.json", C128, tools={"triton": "3.8.0", "cuda": "13.0"})  # wrong answer here
    put(bundled / "older.json", C16)
    assert make(dirs).resolve(spec, "fwd", PROBLEM) == (C16, "other-toolchain")
    assert sorted(c["ok"] for c in checks_of(root).values()) == [False, True] and len(calls) == 2


def test_tiers_of_this_toolchain_come_first(dirs, counted):
    root, bundled = dirs
    spec, calls = counted
    put(bundled / "tuned.json", C16)
    put(bundled / "here.json", C128, tools={"triton": "3.9.0", "cuda": "12.8"})  # same Triton: bundled tier
    assert make(dirs).resolve(spec, "fwd", PROBLEM) == (C128, "bundled")
    put(tuned_file(root, HERE), C256, tokens=16384)
    assert make(dirs).resolve(spec, "fwd", PROBLEM) == (C256, "nearest")
    assert calls == []


def test_out_of_memory_in_the_check_is_not_recorded(dirs, monkeypatch):
    root, bundled = dirs
    put(bundled / "tuned.json", C16)

    def oom(pass_name, problem, device):
        case = fake.tune_case(pass_name, problem, device)

        def run(config):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return dataclasses.replace(case, run=run)

    spec = dataclasses.replace(fake.SPEC, tune_case=oom)
    assert make(dirs).resolve(spec, "fwd", PROBLEM) == (C32, "heuristic")
    assert checks_of(root) == {}  # not the config's fault: checked again next time
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "other-toolchain")


def test_no_check_without_a_tune_case_or_inside_a_capture(dirs, monkeypatch):
    root, bundled = dirs
    put(bundled / "tuned.json", C16)
    assert make(dirs).resolve(dataclasses.replace(fake.SPEC, tune_case=None), "fwd", PROBLEM)[1] == "heuristic"
    monkeypatch.setattr(lookup, "_capturing", lambda: True)
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM)[1] == "heuristic"
    assert checks_of(root) == {}


def test_an_unwritable_cache_still_serves(dirs, monkeypatch, caplog):
    root, bundled = dirs
    put(bundled / "tuned.json", C16)

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store, "update", refuse)
    with caplog.at_level(logging.WARNING, logger="fastbench.autotune"):
        assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "other-toolchain")
    assert any("cannot record checks" in r.getMessage() for r in caplog.records)


def test_describe_names_the_files_and_results_record_the_tier(dirs):
    root, bundled = dirs
    put(bundled / "tuned.json", C16)
    lookup.reset(device=DEVICE, tools=HERE, root=root, bundled=bundled, check_device="cpu")
    try:
        assert lookup.config_for(fake.SPEC, "fwd", PROBLEM) is C16
        info = lookup.describe()
    finally:
        lookup.reset()
    assert info["other_toolchain_in_use"] == ["tuned.json"] and info["bundled_in_use"] == []
    assert info["tiers_used"] == {"fake/fwd": "other-toolchain"}
    assert info["other_toolchain_served"] == {"fake/fwd": TUNED}
    (mine,) = [f for f in info["files"] if f["file"].endswith(key.file_name(DEVICE, HERE))]
    assert mine["checks"] == {"passed": 1}
    json.dumps(info)


def test_tune_list_shows_the_tier_and_tune_replaces_it(monkeypatch, tmp_path):
    ref = tuner.SpecRef("autotune_fake_op", fake.SPEC)
    here = key.toolchain()
    tuned = {"triton": "0.0.1", "cuda": here["cuda"]}
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(tuner, "discover", lambda modules=None: [ref])
    monkeypatch.setattr(key, "device_fingerprint", lambda index=None: DEVICE)
    monkeypatch.setattr(store, "bundled_dir", lambda: tmp_path / "bundled")
    monkeypatch.setattr(tuner, "Worker", lambda timeout, timer=None: tuner.InProcess(fake.fake_timer, "cpu"))
    args = ["--models", "llama-3-8b-tiny", "--tokens", "1024,4096"]
    # the bundled file of another Triton
    for job in tuner.plan([ref], [presets.build_config("llama-3-8b-tiny")], [1024, 4096], torch.bfloat16):
        problem = key.canonical_problem(job.problem)
        store.update(tmp_path / "bundled" / "tuned.json", DEVICE, tuned,
                     {job.key: {"op": "fake", "pass": job.pass_name, "kernel": key.kernel_hash(fake.SPEC),
                                "problem": problem, "config": dict(C16 if job.pass_name == "fwd" else
                                                                   fake.SPEC.candidates["bwd"][0])}})
    try:
        r = CliRunner().invoke(cli.tune, [*args, "--list"])
        assert r.exit_code == 0, r.output
        assert "files of this device under another toolchain: tuned.json" in r.output
        assert tier_counts(r.output) == {"fake/bwd": {"other-toolchain": 2}, "fake/fwd": {"other-toolchain": 2}}
        assert ("4 problems are served by configs tuned for this GPU under another Triton/CUDA version (4 not yet "
                "checked here") in r.output
        r = CliRunner().invoke(cli.tune, args)  # tunes them for this toolchain: the exact tier then serves
        assert r.exit_code == 0 and "4 problems (0 already cached)" in r.output, r.output
        r = CliRunner().invoke(cli.tune, [*args, "--list"])
        assert tier_counts(r.output) == {"fake/bwd": {"exact": 2}, "fake/fwd": {"exact": 2}}, r.output
    finally:
        lookup.reset()


def tier_counts(output: str) -> dict:
    """The `tune --list` table as {op/pass: {tier: count}}."""
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("op/pass"))
    starts = [lines[header].index(t) for t in lookup.TIERS]
    out = {}
    for line in lines[header + 2:]:
        if not line.startswith("fake/"):
            break
        cells = {t: line[s:s + len(t) + 1].strip() for t, s in zip(lookup.TIERS, starts)}
        out[line.split()[0]] = {t: int(v) for t, v in cells.items() if v}
    return out


def _other_toolchain_file(path, spec, problems, pick, device, tools):
    """A bundled-format file of ``device`` x ``tools`` holding, for each (pass, problem), ``pick(candidates,
    default)`` of the real op ``spec``."""
    entries = {}
    for pass_name, problem in problems:
        canon = key.canonical_problem(problem)
        config = pick(spec.candidates[pass_name], spec.heuristic(pass_name, problem))
        entries[key.entry_key(spec.name, pass_name, key.kernel_hash(spec), canon)] = {
            "op": spec.name, "pass": pass_name, "kernel": key.kernel_hash(spec), "problem": canon,
            "config": dict(config)}
    store.update(path, device, tools, entries)


def _not_the_default(candidates, default):
    return next(c for c in candidates if dict(c) != dict(default))


def test_a_real_op_is_checked_under_the_interpreter(dirs):
    """rms_norm's kernel, run by the Triton interpreter: the check compiles nothing but runs the real code."""
    from fastbench.kernels import rms_norm

    root, bundled = dirs
    problems = [(p, rms_norm._problem(p, torch.float32, 64, 8, True)) for p in ("fwd", "bwd")]
    _other_toolchain_file(bundled / "tuned.json", rms_norm.SPEC, problems, _not_the_default, DEVICE, TUNED)
    lk = make(dirs)
    for pass_name, problem in problems:
        config, tier = lk.resolve(rms_norm.SPEC, pass_name, problem)
        assert tier == "other-toolchain" and dict(config) != dict(rms_norm.heuristic(pass_name, problem))
    assert sorted((c["pass"], c["ok"]) for c in checks_of(root).values()) == [("bwd", True), ("fwd", True)]


@pytest.mark.gpu
def test_other_toolchain_configs_are_checked_on_the_gpu(tmp_path, monkeypatch):
    """On the GPU: configs of the real bundled-format file of another Triton version serve after a check
    that runs once (a second lookup does not run it again)."""
    from fastbench.kernels import rms_norm

    device, tools = key.device_fingerprint(), key.toolchain()
    other = {**tools, "triton": "0.0.1"}
    problems = rms_norm.problems(presets.build_config("llama-3-8b"), 4096, torch.bfloat16)
    _other_toolchain_file(tmp_path / "bundled" / "other.json", rms_norm.SPEC, problems, _not_the_default, device, other)
    lk = lookup.Lookup(root=tmp_path / "cache", bundled=tmp_path / "bundled")
    served = {p: lk.config_for(rms_norm.SPEC, p, problem) for p, problem in problems}
    assert lk.tiers_used() == {"rms_norm/bwd": "other-toolchain", "rms_norm/fwd": "other-toolchain"}
    checks = store.read(lk.user_path())["checks"]
    assert len(checks) == 2 and all(c["ok"] and c["tuned_under"] == other for c in checks.values())
    monkeypatch.setattr(tuner, "evaluate", lambda *a, **k: pytest.fail("checked twice"))
    lk2 = lookup.Lookup(root=tmp_path / "cache", bundled=tmp_path / "bundled")
    assert {p: lk2.config_for(rms_norm.SPEC, p, problem) for p, problem in problems} == served
