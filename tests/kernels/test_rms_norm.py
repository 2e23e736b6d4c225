"""rms_norm (Llama and Gemma forms) and its residual form against the fp64 reference: forward, dx and dw."""
import json

import pytest
import torch

from fastbench.kernels import rms_norm as op
from fastbench.presets import build_config

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite output"
    return ((got - want).norm() / want.norm()).item()


def expected(x, w, dy, eps, offset, need_dw=True):
    """Reference output and grads in fp64 from the same (rounded) inputs."""
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_(need_dw)
    y = op.reference(xr, wr, eps, offset)
    return (y, *torch.autograd.grad(y, [xr, wr] if need_dw else [xr], dy.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(1, 37), (2, 3, 130), (11, 64)])
def test_matches_reference(seed, poison, dtype, offset, shape):
    x = torch.randn(shape).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(shape[-1])).to(dtype).requires_grad_()
    y = op.rms_norm(x, w, 1e-5, offset)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    want_y, want_dx, want_dw = expected(x, w, dy, 1e-5, offset)
    assert y.dtype == dtype and y.shape == x.shape and dx.dtype == dtype and dw.dtype == dtype
    assert rel_err(y, want_y) < TOL[dtype]
    assert rel_err(dx, want_dx) < TOL[dtype]
    assert rel_err(dw, want_dw) < TOL[dtype]


def test_frozen_weight_and_strided_rows(seed, poison):
    """Rows with a stride larger than the width (a slice of a wider tensor); weight needs no grad."""
    wide = torch.randn(6, 5, 200, requires_grad=True)
    x = wide[..., 3:103]
    w = torch.randn(100)
    y = op.rms_norm(x, w)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [x], dy)
    want_y, want_dx = expected(x, w, dy, 1e-6, 0.0, need_dw=False)
    assert rel_err(y, want_y) < 1e-5 and rel_err(dx, want_dx) < 1e-5


def test_non_contiguous_grad(seed):
    x = torch.randn(4, 48, requires_grad=True)
    w = torch.randn(48, requires_grad=True)
    dy = torch.randn(48, 4).t()
    dx, dw = torch.autograd.grad(op.rms_norm(x, w), [x, w], dy)
    _, want_dx, want_dw = expected(x, w, dy, 1e-6, 0.0)
    assert rel_err(dx, want_dx) < 1e-5 and rel_err(dw, want_dw) < 1e-5


@pytest.mark.parametrize("config", [c for c in op.CANDIDATES["bwd"] if c["num_warps"] == 4])
def test_every_candidate_agrees(seed, poison, config):
    """The tuner may pick any candidate: each must compute the same thing (1 to 256 rows per program over 21 rows)."""
    x, w, dy = torch.randn(21, 40), torch.randn(40), torch.randn(21, 40)
    fwd = {k: config[k] for k in op.CANDIDATES["fwd"][0]}
    assert fwd in op.CANDIDATES["fwd"]
    y = op._forward(x, w, 1e-6, 1.0, fwd)
    dx, dw = op._backward(dy, x, w, 1e-6, 1.0, True, config)
    want_y, want_dx, want_dw = expected(x, w, dy, 1e-6, 1.0)
    assert max(rel_err(y, want_y), rel_err(dx, want_dx), rel_err(dw, want_dw)) < 1e-5


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_gradcheck_fp64(offset):
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: op.rms_norm(a, b, 1e-6, offset), (x, w))


def test_rejects_too_wide_rows():
    with pytest.raises(ValueError, match="hidden sizes up to"):
        op.rms_norm(torch.randn(1, op.MAX_HIDDEN + 1), torch.randn(op.MAX_HIDDEN + 1))


@pytest.mark.parametrize("preset", ["llama-3-8b", "gemma-7b", "qwen2.5-7b", "qwen3-8b"])
def test_problems_have_candidate_defaults(preset):
    problems = op.problems(build_config(preset), 4096, torch.bfloat16)
    assert {p for p, _ in problems} == {"fwd", "bwd"}
    assert len(problems) == (6 if preset == "qwen3-8b" else 2)
    for pass_name, problem in problems:
        assert json.loads(json.dumps(problem)) == problem and "tokens" in problem
        assert op.heuristic(pass_name, problem) in op.CANDIDATES[pass_name]


@pytest.mark.parametrize("pass_name,dw", [("fwd", False), ("bwd", False), ("bwd", True)])
def test_tune_case_checks_out(seed, pass_name, dw):
    problem = op._problem(pass_name, torch.float32, 96, 9, dw)
    case = op.SPEC.tune_case(pass_name, problem, "cpu")
    got = case.run(op.heuristic(pass_name, problem))
    got, want = (got, case.expected) if pass_name == "bwd" else ((got,), (case.expected,))
    assert len(got) == len(want) == (2 if dw else 1)
    assert all(rel_err(g, e) < case.tolerance for g, e in zip(got, want))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama-3-8b", "gemma-7b", "qwen2.5-7b"])
def test_real_sizes_on_gpu(seed, poison, preset):
    cfg = build_config(preset)
    offset = 1.0 if cfg.model_type == "gemma" else 0.0
    x = torch.randn(4099, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.5 * torch.randn(cfg.hidden_size, device="cuda")).to(torch.bfloat16).requires_grad_()
    y = op.rms_norm(x, w, cfg.rms_norm_eps, offset)
    dy = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, [x, w], dy))
    want = expected(x, w, dy, cfg.rms_norm_eps, offset)
    assert all(rel_err(g, e) < 1e-2 for g, e in zip(got, want))


def test_without_grad_mode_the_same_output_and_no_graph(seed):
    """Outside grad mode (a checkpointed layer's forward) the kernel runs without the autograd Function: the same
    output, bit for bit, and nothing recorded."""
    x = torch.randn(3, 5, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    with torch.no_grad():
        fast = op.rms_norm(x, w, 1e-5, 1.0)
    assert fast.grad_fn is None and not fast.requires_grad
    assert torch.equal(fast, op.rms_norm(x, w, 1e-5, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("frozen", [False, True])
def test_residual_form_adds_the_residual_gradient_in_the_kernel(seed, poison, dtype, offset, frozen):
    """x + f(rms_norm(x)) through rms_norm_residual: y, x passed on unchanged, and dx summing both paths (as
    autograd sums them around the plain norm), dw as the plain norm's."""
    x = torch.randn(2, 7, 130).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(130)).to(dtype).requires_grad_(not frozen)
    y, passed = op.rms_norm_residual(x, w, 1e-5, offset)
    assert torch.equal(passed, x) and passed.data_ptr() == x.data_ptr()
    dy, dres = torch.randn_like(y), torch.randn_like(x)
    got = torch.autograd.grad((y * dy).sum() + (passed * dres).sum(), [x, w] if not frozen else [x])
    want_y, want_dx, *want_dw = expected(x, w, dy, 1e-5, offset, need_dw=not frozen)
    assert torch.equal(y, op.rms_norm(x, w, 1e-5, offset))
    assert rel_err(y, want_y) < TOL[dtype]
    assert rel_err(got[0], want_dx + dres.double()) < TOL[dtype]
    if not frozen:
        assert rel_err(got[1], want_dw[0]) < TOL[dtype]


def test_residual_form_with_only_one_path_used(seed):
    """A residual output left out of the loss (a zero gradient) gives the plain norm's dx."""
    x = torch.randn(5, 64, requires_grad=True)
    w = torch.randn(64)
    y, _ = op.rms_norm_residual(x, w, 1e-6, 0.0)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, [x], dy)
    _, want_dx = expected(x, w, dy, 1e-6, 0.0, need_dw=False)
    assert rel_err(dx, want_dx) < 1e-5


def test_residual_form_gradcheck_fp64():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: op.rms_norm_residual(a, b, 1e-6, 1.0), (x, w))


def test_residual_form_without_grad_mode(seed):
    x, w = torch.randn(3, 64), torch.randn(64)
    with torch.no_grad():
        y, passed = op.rms_norm_residual(x, w, 1e-5, 0.0)
    assert passed is x and torch.equal(y, op.rms_norm(x, w, 1e-5, 0.0))
