"""Cache keys: stable for equal inputs, sensitive to every part, tokens bucketed."""
import dataclasses

import pytest
import torch

import autotune_fake_op as fake
from fastbench.autotune import key
from fastbench.autotune.spec import OpSpec

DEVICE = {"name": "h200", "cc": "9.0", "sms": 132}
TOOLS = {"triton": "3.6.0", "cuda": "13.0"}
PROBLEM = {"dtype": "bfloat16", "hidden": 4096, "tokens": 3000}


def other_kernel(x, config):
    return 3 * x


def the_key(device=DEVICE, tools=TOOLS, spec=fake.SPEC, pass_name="fwd", problem=PROBLEM):
    return key.cache_key(device, tools, spec, pass_name, problem)


@pytest.mark.parametrize("tokens, expected", [(1, 1), (2, 2), (3, 4), (1000, 1024), (1024, 1024),
                                              (1025, 2048), (16383, 16384), (0, 1)])
def test_bucket_is_next_power_of_two(tokens, expected):
    assert key.bucket(tokens) == expected


def test_name_is_normalised():
    assert key.normalise_name("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert key.normalise_name("NVIDIA H200") == "h200"
    assert key.file_name(DEVICE, TOOLS) == "h200-sm90-132sm__triton-3.6.0__cuda-13.0.json"


def test_key_is_stable():
    assert the_key() == the_key()
    copy = dataclasses.replace(fake.SPEC)  # an equal spec object built again
    assert the_key(spec=copy) == the_key()
    assert the_key(problem=dict(reversed(list(PROBLEM.items())))) == the_key()
    assert the_key(problem={**PROBLEM, "dtype": torch.bfloat16}) == the_key()


def test_tokens_in_one_bucket_share_a_key():
    assert the_key(problem={**PROBLEM, "tokens": 2049}) == the_key(problem={**PROBLEM, "tokens": 4096})
    assert the_key(problem={**PROBLEM, "tokens": 2048}) != the_key()


@pytest.mark.parametrize("change", [
    dict(device={**DEVICE, "name": "h100"}), dict(device={**DEVICE, "cc": "9.1"}),
    dict(device={**DEVICE, "sms": 114}), dict(tools={**TOOLS, "triton": "3.7.0"}),
    dict(tools={**TOOLS, "cuda": "12.8"}),
])
def test_device_and_toolchain_change_the_file(change):
    assert the_key(**change)[0] != the_key()[0]
    assert the_key(**change)[1] == the_key()[1]


@pytest.mark.parametrize("change", [
    dict(spec=dataclasses.replace(fake.SPEC, name="fake2")),
    dict(spec=dataclasses.replace(fake.SPEC, kernels=(other_kernel,))),
    dict(spec=dataclasses.replace(fake.SPEC, candidates={**fake.SPEC.candidates, "fwd": fake.SPEC.candidates["fwd"][:-1]})),
    dict(spec=dataclasses.replace(fake.SPEC, candidates={**fake.SPEC.candidates, "fwd": [
        {**c, "num_stages": 2} for c in fake.SPEC.candidates["fwd"]]})),
    dict(pass_name="bwd"), dict(problem={**PROBLEM, "dtype": "float16"}),
    dict(problem={**PROBLEM, "hidden": 4097}), dict(problem={**PROBLEM, "tokens": 5000}),
    dict(problem={**PROBLEM, "dw": True}),
])
def test_op_kernel_and_problem_change_the_entry(change):
    assert the_key(**change)[1] != the_key()[1]
    assert the_key(**change)[0] == the_key()[0]


def test_schema_version_changes_the_kernel_hash(monkeypatch):
    before = key.kernel_hash(fake.SPEC)
    monkeypatch.setattr(key, "SCHEMA", key.SCHEMA + 1)
    assert key.kernel_hash(dataclasses.replace(fake.SPEC)) != before


def test_kernel_source_is_hashed_not_its_name(tmp_path, monkeypatch):
    """Two versions of the same function (same name, edited body) give different hashes."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    hashes = []
    for body in ("return 2 * x", "return x + x + 0 * x"):
        (tmp_path / "fake_kernel_src.py").write_text(f"def k(x):\n    {body}\n")
        sys.modules.pop("fake_kernel_src", None)
        importlib.invalidate_caches()
        mod = importlib.import_module("fake_kernel_src")
        hashes.append(key.kernel_hash(OpSpec("k", {"fwd": [{"B": 1}]}, fake.heuristic, kernels=(mod.k,))))
    sys.modules.pop("fake_kernel_src", None)
    assert hashes[0] != hashes[1]


def test_no_gpu_gives_no_fingerprint(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert key.device_fingerprint() is None
