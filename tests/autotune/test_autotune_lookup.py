"""Lookup order (pinned > exact > nearest > bundled > other-toolchain > heuristic), validation, memo,
tiers, pins, the one-time check of other-toolchain configs, corrupt files."""
import dataclasses
import json
import logging

import pytest

import autotune_fake_op as fake
from autotune_fake_op import DEVICE, PROBLEM, TOOLS, put
from autotune_fake_op import make_lookup as make
from fastbench.autotune import key, lookup

C16, C32, C64, C128, C256 = fake.SPEC.candidates["fwd"]


def user_file(root, tools=TOOLS):
    return root / key.file_name(DEVICE, tools)


def test_heuristic_when_nothing_is_cached(dirs):
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C32, "heuristic")


def test_lookup_order(dirs):
    root, bundled = dirs
    put(bundled / "h200.json", C256, 4096)
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C256, "bundled")
    put(user_file(root), C128, 16384)
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C128, "nearest")
    put(user_file(root), C64, 4096)
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C64, "exact")
    lk = make(dirs)
    lk.pin("fake", "fwd", C16)
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "pinned")
    assert lk.resolve(fake.SPEC, "bwd", PROBLEM)[1] == "heuristic"  # pins are per pass
    hit = make(dirs).config_for(fake.SPEC, "fwd", PROBLEM)
    assert hit is C64  # today's candidate object, not the JSON copy


def test_nearest_bucket_in_log2_larger_on_ties(dirs):
    root, _ = dirs
    put(user_file(root), C16, 1024)
    put(user_file(root), C64, 16384)
    lk = make(dirs)
    assert lk.resolve(fake.SPEC, "fwd", {**PROBLEM, "tokens": 2048}) == (C16, "nearest")
    assert lk.resolve(fake.SPEC, "fwd", {**PROBLEM, "tokens": 4096}) == (C64, "nearest")  # tie: 2 octaves each
    assert lk.resolve(fake.SPEC, "fwd", {**PROBLEM, "tokens": 900}) == (C16, "exact")
    # other feature dims are never "near"
    assert lk.resolve(fake.SPEC, "fwd", {**PROBLEM, "hidden": 65})[1] == "heuristic"


def test_bundled_needs_same_device_and_triton_and_prefers_exact_toolchain(dirs):
    _, bundled = dirs
    put(bundled / "other-gpu.json", C16, 4096, device={**DEVICE, "sms": 114})
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM)[1] == "heuristic"
    put(bundled / "old-triton.json", C16, 4096, tools={**TOOLS, "triton": "3.5.0"})
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "other-toolchain")  # not the bundled tier
    put(bundled / "a-other-cuda.json", C128, 4096, tools={**TOOLS, "cuda": "12.8"})
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C128, "bundled")
    put(bundled / "z-exact.json", C256, 4096)
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C256, "bundled")


def test_stale_config_is_ignored_with_one_warning(dirs, caplog):
    root, _ = dirs
    put(user_file(root), {"BLOCK": 48, "num_warps": 4}, 4096)  # no longer a candidate
    put(user_file(root), C64, 8192)
    lk = make(dirs)
    with caplog.at_level(logging.WARNING, logger="fastbench.autotune"):
        assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C64, "nearest")
        assert lk.resolve(fake.SPEC, "fwd", {**PROBLEM, "tokens": 4000}) == (C64, "nearest")
    assert len([r for r in caplog.records if "not a candidate" in r.getMessage()]) == 1


def test_changed_kernel_or_toolchain_misses(dirs):
    root, _ = dirs
    put(user_file(root), C64, 4096)
    edited = dataclasses.replace(fake.SPEC, candidates={**fake.SPEC.candidates, "bwd": fake.SPEC.candidates["bwd"][:1]})
    assert make(dirs).resolve(edited, "fwd", PROBLEM)[1] == "heuristic"
    root2, bundled = dirs
    lk = lookup.Lookup(device=DEVICE, tools={**TOOLS, "triton": "3.7.0"}, root=root2, bundled=bundled,
                       check_device="cpu")
    # never exact: another toolchain's config is checked first, and C64 fails the check
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM)[1] == "heuristic"


def test_no_gpu_serves_the_heuristic_but_honours_pins(dirs):
    root, _ = dirs
    put(user_file(root), C64, 4096)
    lk = make(dirs, device=None)
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C32, "heuristic")
    assert lk.user_path() is None
    lk.pin("fake", "fwd", C16)
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "pinned")


def test_autotune_off_serves_the_heuristic_but_honours_pins(dirs, monkeypatch):
    root, _ = dirs
    put(user_file(root), C64, 4096)
    monkeypatch.setenv(lookup.OFF_ENV, "off")
    lk = make(dirs)
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C32, "heuristic")
    lk.pin("fake", "fwd", C16)
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "pinned")
    monkeypatch.setenv(lookup.OFF_ENV, "1")
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C64, "exact")


def test_memo_tiers_and_log_once(dirs, caplog):
    root, _ = dirs
    put(user_file(root), C64, 4096)
    calls = []

    def counting(pass_name, problem):
        calls.append(problem["tokens"])
        return fake.heuristic(pass_name, problem)

    spec = dataclasses.replace(fake.SPEC, heuristic=counting)
    lk = make(dirs)
    with caplog.at_level(logging.INFO, logger="fastbench.autotune"):
        first = lk.config_for(spec, "fwd", {**PROBLEM, "hidden": 7})
        assert first == C32
        for _ in range(3):
            assert lk.config_for(spec, "fwd", PROBLEM) is C64
            assert lk.config_for(spec, "fwd", {**PROBLEM, "hidden": 7}) is first
            assert lk.config_for(spec, "bwd", PROBLEM) == fake.SPEC.candidates["bwd"][1]
    assert calls == [3000, 3000]  # one heuristic call per distinct (pass, problem)
    assert lk.tiers_used() == {"fake/bwd": "heuristic", "fake/fwd": "exact+heuristic"}
    assert len([r for r in caplog.records if r.getMessage().startswith("fake/fwd")]) == 2
    lk.pin("fake", "fwd", C16)  # pinning drops the memo of that op/pass
    assert lk.config_for(spec, "fwd", PROBLEM) is C16
    assert lk.tiers_used()["fake/fwd"] == "pinned+exact+heuristic"


def test_env_pin_inline_and_file(dirs, monkeypatch, tmp_path):
    monkeypatch.setenv(lookup.PIN_ENV, json.dumps({"fake/fwd": C128}))
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C128, "pinned")
    pin_file = tmp_path / "pins.json"
    pin_file.write_text(json.dumps({"fake/fwd": C256}))
    monkeypatch.setenv(lookup.PIN_ENV, str(pin_file))
    lk = make(dirs)
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C256, "pinned")
    lk.pin("fake", "fwd", C16)  # the API wins over the environment
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C16, "pinned")
    lk.pin("fake", "fwd", None)
    assert lk.resolve(fake.SPEC, "fwd", PROBLEM) == (C256, "pinned")


@pytest.mark.parametrize("value", ['{"fake/fwd": {"BLOCK": 3}}', "{broken", "/nonexistent/pins.json"])
def test_bad_pins_fall_through(dirs, monkeypatch, value):
    monkeypatch.setenv(lookup.PIN_ENV, value)
    assert make(dirs).resolve(fake.SPEC, "fwd", PROBLEM) == (C32, "heuristic")


def test_module_api_and_describe(dirs, monkeypatch):
    root, bundled = dirs
    put(user_file(root), C64, 4096)
    put(bundled / "h200.json", C64, 4096)
    (root / "junk.json").write_text("{")
    lookup.reset(device=DEVICE, tools=TOOLS, root=root, bundled=bundled)
    try:
        assert lookup.config_for(fake.SPEC, "fwd", PROBLEM) is C64
        lookup.pin("fake", "bwd", fake.SPEC.candidates["bwd"][0])
        assert lookup.config_for(fake.SPEC, "bwd", PROBLEM) is fake.SPEC.candidates["bwd"][0]
        assert lookup.tiers_used() == {"fake/bwd": "pinned", "fake/fwd": "exact"}
        info = lookup.describe()
    finally:
        lookup.reset()
    assert info["user_file"] == str(user_file(root)) and info["user_file_exists"]
    files = {f["file"].rsplit("/", 1)[1]: f for f in info["files"]}
    assert files[user_file(root).name]["entries"] == {"fake/fwd": 1}
    assert files["junk.json"]["valid"] is False
    assert info["bundled_in_use"] == ["h200.json"]
    assert info["tiers_used"] == {"fake/bwd": "pinned", "fake/fwd": "exact"}
    json.dumps(info)  # serialisable for results
