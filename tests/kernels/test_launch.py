"""The direct launch path (fastbench.kernels._launch) with a fake Triton kernel: which calls go through
Triton, and what the launcher receives. The real kernels take it on a GPU (tests/kernels/*_gpu tests)."""
import pytest
import torch

from fastbench.kernels import _launch


class FakeCompiled:
    def __init__(self, calls):
        self.function, self.packed_metadata, self.calls = "handle", "packed", calls

    def run(self, *args):
        self.calls.append(("direct", args))


class FakeKernel:
    """Stands for a JITFunction of ``kernel(x_ptr, y_ptr, n, eps, BLOCK: tl.constexpr, ACT: tl.constexpr = 2)``."""

    def __init__(self):
        import inspect

        def kernel(x_ptr, y_ptr, n, eps, BLOCK, ACT=2):
            pass

        self.signature = inspect.signature(kernel)
        self.calls, self.compiled = [], None

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("triton", grid, args, meta))
            self.compiled = FakeCompiled(self.calls)
            return self.compiled
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("FASTBENCH_FAST_LAUNCH", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_launch, "_device", lambda: 0)
    monkeypatch.setattr(_launch, "_stream", lambda device: 1234)
    monkeypatch.setattr(_launch, "_launchers", {})
    monkeypatch.setattr(_launch, "_layouts", {})


def test_second_call_goes_to_the_launcher_with_every_parameter_in_order(fast):
    k = FakeKernel()
    x, y = torch.randn(64), torch.randn(64)
    _launch.launch(k, (3,), x, y, 64, 1e-6, BLOCK=32, num_warps=4)
    assert [c[0] for c in k.calls] == ["triton"]
    x2, y2 = torch.randn(64), torch.randn(64)
    _launch.launch(k, (5, 2), x2, y2, 48, 1e-5, BLOCK=32, num_warps=4)
    kind, args = k.calls[-1]
    assert kind == "direct"
    grid, stream, rest = args[:3], args[3], args[4:]
    assert grid == (5, 2, 1) and stream == 1234
    assert rest[:5] == ("handle", "packed", None, None, None)  # no launch metadata, no hooks
    params = rest[5:]
    assert params[0] is x2 and params[1] is y2 and params[2:] == (48, 1e-5, 32, 2)  # ACT's default; no num_warps


@pytest.mark.parametrize("change", ["misaligned", "dtype", "n_is_1", "n_not_16", "n_wide", "constexpr", "option"])
def test_what_triton_would_compile_differently_goes_through_triton(fast, change):
    k = FakeKernel()
    base = torch.randn(80)
    call = dict(x=base[:64], y=torch.randn(64), n=64, BLOCK=32, num_warps=4)
    _launch.launch(k, (1,), call["x"], call["y"], call["n"], 1e-6, BLOCK=call["BLOCK"], num_warps=call["num_warps"])
    changed = {"misaligned": dict(x=base[1:65]), "dtype": dict(x=base[:64].double()), "n_is_1": dict(n=1),
               "n_not_16": dict(n=65), "n_wide": dict(n=1 << 33), "constexpr": dict(BLOCK=64),
               "option": dict(num_warps=8)}[change]
    call.update(changed)
    _launch.launch(k, (1,), call["x"], call["y"], call["n"], 1e-6, BLOCK=call["BLOCK"], num_warps=call["num_warps"])
    assert [c[0] for c in k.calls] == ["triton", "triton"]
    _launch.launch(k, (1,), call["x"], call["y"], call["n"], 1e-6, BLOCK=call["BLOCK"], num_warps=call["num_warps"])
    assert k.calls[-1][0] == "direct"  # the new key was remembered


def test_triton_path_when_disabled_interpreted_hooked_or_unkeyable(fast, monkeypatch):
    k = FakeKernel()
    x, y = torch.randn(64), torch.randn(64)
    for _ in range(2):
        _launch.launch(k, (1,), x, y, 64, 1e-6, BLOCK=32)
    assert k.calls[-1][0] == "direct"
    for env, value in (("FASTBENCH_FAST_LAUNCH", "0"), ("TRITON_INTERPRET", "1")):
        monkeypatch.setenv(env, value)
        _launch.launch(k, (1,), x, y, 64, 1e-6, BLOCK=32)
        assert k.calls[-1][0] == "triton"
        monkeypatch.setenv(env, {"FASTBENCH_FAST_LAUNCH": "1", "TRITON_INTERPRET": "0"}[env])
    monkeypatch.setattr(_launch, "_hooks_installed", lambda: True)
    _launch.launch(k, (1,), x, y, 64, 1e-6, BLOCK=32)
    assert k.calls[-1][0] == "triton"


def test_unkeyable_arguments_always_go_through_triton(fast):
    k = FakeKernel()
    x = torch.randn(64)
    for _ in range(2):
        _launch.launch(k, (1,), x, object(), 64, 1e-6, BLOCK=32)
        _launch.launch(k, (1,), x, x, 64, 1e-6, BLOCK=[32])  # unhashable keyword
    assert [c[0] for c in k.calls] == ["triton"] * 4


def test_enabled_reads_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _launch.enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTBENCH_FAST_LAUNCH", "0")
    assert not _launch.enabled()
    monkeypatch.setenv("FASTBENCH_FAST_LAUNCH", "1")
    assert _launch.enabled()
