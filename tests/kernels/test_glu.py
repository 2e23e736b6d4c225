"""swiglu and geglu (erf and tanh) against their fp64 references: forward, dgate and dup."""
import json

import pytest
import torch

from fastbench.kernels import _glu, geglu, swiglu
from fastbench.presets import build_config

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
OPS = {  # name -> (function of (gate, up), its reference, its explicit backward)
    "swiglu": (swiglu.swiglu, swiglu.reference, swiglu.swiglu_backward),
    "geglu-tanh": (geglu.geglu, geglu.reference, geglu.geglu_backward),
    "geglu-erf": (lambda g, u: geglu.geglu(g, u, "none"), lambda g, u: geglu.reference(g, u, "none"),
                  lambda *a, **kw: geglu.geglu_backward(*a, approximate="none", **kw)),
}


def rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite output"
    return ((got - want).norm() / want.norm()).item()


def expected(name, gate, up, grad):
    """Reference h and (dgate, dup) in fp64 from the same (rounded) inputs."""
    g, u = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    h = OPS[name][1](g, u)
    return (h, *torch.autograd.grad(h, [g, u], grad.double()))


def fused_gate_up(shape, dtype):
    """gate and up as the two halves of one [..., 2 * width] projection (rows strided by 2 * width)."""
    proj = (3 * torch.randn(*shape[:-1], 2 * shape[-1])).to(dtype).requires_grad_()
    gate, up = proj.chunk(2, dim=-1)
    return proj, gate, up


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 37), (2, 3, 300), (9, 176)])
def test_matches_reference(seed, poison, name, dtype, shape):
    proj, gate, up = fused_gate_up(shape, dtype)
    h = OPS[name][0](gate, up)
    grad = torch.randn_like(h)
    dgate, dup = torch.autograd.grad(h, [gate, up], grad)
    want_h, want_dgate, want_dup = expected(name, gate, up, grad)
    assert h.shape == gate.shape and h.dtype == dtype and dgate.dtype == dtype
    assert rel_err(h, want_h) < TOL[dtype]
    assert rel_err(dgate, want_dgate) < TOL[dtype]
    assert rel_err(dup, want_dup) < TOL[dtype]


@pytest.mark.parametrize("name", OPS)
def test_explicit_backward_in_place(seed, name):
    """The fused MLP's path: dgate and dup written over the saved gate and up."""
    gate, up, grad = (torch.randn(3, 5, 70) for _ in range(3))
    _, want_dgate, want_dup = expected(name, gate, up, grad)
    dgate, dup = OPS[name][2](grad, gate, up, dgate=gate, dup=up)
    assert dgate.data_ptr() == gate.data_ptr() and dup.data_ptr() == up.data_ptr()
    assert rel_err(dgate, want_dgate) < 1e-5 and rel_err(dup, want_dup) < 1e-5


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_backward_writes_h_over_the_gradient(seed, name, dtype):
    """The fused MLP's path: dgate/dup over gate/up and h over the gradient it read, h bit for bit the forward's."""
    gate, up, grad = ((2 * torch.randn(3, 5, 70)).to(dtype) for _ in range(3))
    want_h, want_dgate, want_dup = expected(name, gate, up, grad)
    forward_h = OPS[name][0](gate, up)
    buffer = grad.clone()
    dgate, dup = OPS[name][2](buffer, gate, up, dgate=gate, dup=up, h=buffer)
    assert dgate.data_ptr() == gate.data_ptr() and dup.data_ptr() == up.data_ptr()
    assert torch.equal(buffer, forward_h)
    assert rel_err(buffer, want_h) < TOL[dtype]
    assert rel_err(dgate, want_dgate) < TOL[dtype] and rel_err(dup, want_dup) < TOL[dtype]


def test_explicit_backward_into_poisoned_halves(seed):
    """dgate/dup as the halves of one NaN-filled [rows, 2 * width] buffer: every element written."""
    gate, up, grad = (torch.randn(4, 45) for _ in range(3))
    buffer = torch.full((4, 90), float("nan"))
    dgate, dup = swiglu.swiglu_backward(grad, gate, up, *buffer.chunk(2, dim=-1))
    _, want_dgate, want_dup = expected("swiglu", gate, up, grad)
    assert rel_err(buffer[:, :45], want_dgate) < 1e-5 and rel_err(buffer[:, 45:], want_dup) < 1e-5


@pytest.mark.parametrize("config", [c for c in _glu.CANDIDATES["fwd"] if c["num_warps"] == 4])
def test_every_candidate_agrees(seed, poison, config):
    gate, up, grad = (torch.randn(19, 300) for _ in range(3))
    assert config in _glu.CANDIDATES["bwd"]
    for activation, name in (("silu", "swiglu"), ("gelu_tanh", "geglu-tanh")):
        want_h, want_dgate, want_dup = expected(name, gate, up, grad)
        h = _glu.forward(gate, up, activation, config)
        dgate, dup = _glu.backward(grad, gate, up, activation, config)
        assert max(rel_err(h, want_h), rel_err(dgate, want_dgate), rel_err(dup, want_dup)) < 1e-5


@pytest.mark.parametrize("name", OPS)
def test_gradcheck_fp64(name):
    gate = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OPS[name][0], (gate, up))


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape|share shape"):
        swiglu.swiglu(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="approximate"):
        geglu.geglu(torch.randn(2, 8), torch.randn(2, 8), approximate="sigmoid")


@pytest.mark.parametrize("preset,op,activation", [("llama-3-8b", swiglu, "silu"), ("qwen2.5-7b", swiglu, "silu"),
                                                  ("gemma-7b", geglu, "gelu_tanh")])
def test_problems_follow_the_model_activation(preset, op, activation):
    config = build_config(preset)
    other = geglu if op is swiglu else swiglu
    assert other.problems(config, 4096, torch.bfloat16) == []
    problems = op.problems(config, 4096, torch.bfloat16)
    assert [p for p, _ in problems] == ["fwd", "bwd"]
    for pass_name, problem in problems:
        assert json.loads(json.dumps(problem)) == problem
        assert problem["activation"] == activation and problem["width"] == config.intermediate_size
        assert op.SPEC.heuristic(pass_name, problem) in op.SPEC.candidates[pass_name]


@pytest.mark.parametrize("activation", _glu.ACTIVATIONS)
@pytest.mark.parametrize("pass_name", ["fwd", "bwd"])
def test_tune_case_checks_out(seed, activation, pass_name):
    problem = _glu.key(torch.float32, 300, 7, activation)
    case = _glu.tune_case(pass_name, problem, "cpu")
    got = case.run(_glu.heuristic(pass_name, problem))
    got, want = (got, case.expected) if pass_name == "bwd" else ((got,), (case.expected,))
    assert all(rel_err(g, e) < case.tolerance for g, e in zip(got, want))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama-3-8b", "gemma-7b", "qwen2.5-7b"])
def test_real_sizes_on_gpu(seed, poison, preset):
    cfg = build_config(preset)
    name = "geglu-tanh" if cfg.model_type == "gemma" else "swiglu"
    gate, up = (torch.randn(4099, cfg.intermediate_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
    h = OPS[name][0](gate, up)
    grad = torch.randn_like(h)
    got = (h, *torch.autograd.grad(h, [gate, up], grad))
    assert all(rel_err(g, e) < 1e-2 for g, e in zip(got, expected(name, gate, up, grad)))
