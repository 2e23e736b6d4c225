"""apply_rope (Q and K in one in-place launch) against its fp64 reference and Hugging Face's convention."""
import json

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fastbench.kernels import rope as op
from fastbench.presets import build_config

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite output"
    return ((got - want).norm() / want.norm()).item()


def hf_cos_sin(position_ids, head_dim, dtype, base=10000.0):
    """cos/sin [B, T, D] as Hugging Face's rotary embedding builds them from position ids."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim)
    freqs = position_ids[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def fused_qkv(B, T, n_q, n_k, D, dtype):
    """q [B, Hq, T, D] and k [B, Hk, T, D] as transposed slices of one [B, T, (Hq + 2Hk) * D] projection,
    the layout a fused QKV path hands over; also the v slice and the projection itself."""
    proj = torch.randn(B, T, (n_q + 2 * n_k) * D).to(dtype).requires_grad_()
    heads = (proj * 1.0).view(B, T, n_q + 2 * n_k, D)  # a projection's output: not a leaf
    q, k, v = heads[:, :, :n_q], heads[:, :, n_q:n_q + n_k], heads[:, :, n_q + n_k:]
    return proj, q.transpose(1, 2), k.transpose(1, 2), v


def packed_positions(B, T):
    """Each row holds two packed sequences: positions restart at 0 mid-row."""
    cut = T // 2 + 1
    return torch.cat((torch.arange(cut), torch.arange(T - cut))).repeat(B, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_k,D", [(3, 1, 16), (4, 2, 32), (2, 2, 24), (5, 5, 64)])
def test_fused_qkv_views_match_reference(seed, dtype, n_q, n_k, D):
    B, T = 2, 5
    proj, q, k, v = fused_qkv(B, T, n_q, n_k, D, dtype)
    cos, sin = hf_cos_sin(packed_positions(B, T), D, dtype)
    v_before = v.detach().clone()
    xr = proj.detach().double().requires_grad_()
    heads_r = xr.view(B, T, n_q + 2 * n_k, D)
    qr, kr = heads_r[:, :, :n_q].transpose(1, 2), heads_r[:, :, n_q:n_q + n_k].transpose(1, 2)
    want_q, want_k = op.reference(qr, kr, cos.double(), sin.double())

    out_q, out_k = op.apply_rope(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert rel_err(out_q, want_q) < TOL[dtype] and rel_err(out_k, want_k) < TOL[dtype]
    assert torch.equal(v.detach(), v_before), "wrote outside q and k"

    gq, gk = torch.randn_like(out_q), torch.randn_like(out_k)
    (dproj,) = torch.autograd.grad((out_q * gq).sum() + (out_k * gk).sum(), [proj])
    (want_dproj,) = torch.autograd.grad((want_q * gq.double()).sum() + (want_k * gk.double()).sum(), [xr])
    assert rel_err(dproj, want_dproj) < TOL[dtype]


@pytest.mark.parametrize("cos_shape", ["BTD", "1TD", "TD"])
def test_matches_hugging_face(seed, cos_shape):
    B, T, D = 2, 7, 32
    q, k = torch.randn(B, 4, T, D), torch.randn(B, 2, T, D)
    positions = {"BTD": packed_positions(B, T), "1TD": torch.arange(T)[None], "TD": torch.arange(T)}[cos_shape]
    cos, sin = hf_cos_sin(positions, D, torch.float32)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos.expand(B, T, D), sin.expand(B, T, D))
    out_q, out_k = op.apply_rope(q.clone(), k.clone(), cos, sin)
    assert rel_err(out_q, want_q) < 1e-6 and rel_err(out_k, want_k) < 1e-6


def test_strided_head_dim_and_non_contiguous_grads(seed):
    """q with a non-unit last stride, and incoming grads that are transposed or expanded (stride 0)."""
    B, T, D = 1, 6, 16
    q_base = torch.randn(B, 3, T, 2 * D, requires_grad=True)
    k_base = torch.randn(B, 1, T, D, requires_grad=True)
    cos, sin = hf_cos_sin(torch.arange(T), D, torch.float32)
    q, k = q_base * 1.0, k_base * 1.0
    out_q, out_k = op.apply_rope(q[..., ::2], k, cos, sin)
    want_q, want_k = op.reference((q_base * 1.0)[..., ::2], k_base * 1.0, cos, sin)
    assert rel_err(out_q, want_q) < 1e-5 and rel_err(out_k, want_k) < 1e-5
    gq = torch.randn(B, 3, D, T).transpose(-1, -2)
    gk = torch.ones(()).expand(out_k.shape)
    got = torch.autograd.grad((out_q, out_k), [q_base, k_base], (gq, gk))
    want = torch.autograd.grad((want_q, want_k), [q_base, k_base], (gq, gk))
    assert all(rel_err(g, w) < 1e-5 for g, w in zip(got, want))


def test_backward_leaves_shared_grads_alone(seed, poison):
    """An add's backward hands the same gradient tensor to both operands: rotating it in place would
    corrupt the other operand's gradient."""
    T, D = 4, 16
    cos, sin = hf_cos_sin(torch.arange(T), D, torch.float32)
    x = torch.randn(1, 2, T, D, requires_grad=True)
    y = torch.randn(1, 2, T, D, requires_grad=True)
    q, k = op.apply_rope(x * 1.0, y * 1.0, cos, sin)
    g = torch.randn_like(q)
    g_before = g.clone()
    dx, dy = torch.autograd.grad((q + y, k), [x, y], (g, torch.randn_like(k)))
    assert torch.equal(g, g_before)
    qr, _ = op.reference(x, y, cos, sin)
    (want_dx,) = torch.autograd.grad(qr, [x], g)
    assert rel_err(dx, want_dx) < 1e-5


def test_backward_is_inverse_rotation(seed):
    B, T, D = 2, 3, 32
    cos, sin = hf_cos_sin(packed_positions(B, T), D, torch.float32)
    q, k = torch.randn(B, 2, T, D), torch.randn(B, 1, T, D)
    q2, k2 = op.apply_rope(q.clone(), k.clone(), cos, sin)
    q3, k3 = op.apply_rope(q2, k2, cos, -sin)
    assert rel_err(q3, q) < 1e-5 and rel_err(k3, k) < 1e-5


def test_backward_keeps_the_gradient_layout(seed):
    """Gradients arriving in [B, T, H, D] memory (as SDPA returns them) leave in that layout, so the
    projection's backward views them as [B*T, H*D] instead of copying."""
    B, T, n_q, n_k, D = 2, 5, 4, 2, 16
    _, q, k, _ = fused_qkv(B, T, n_q, n_k, D, torch.float32)
    cos, sin = hf_cos_sin(torch.arange(T).repeat(B, 1), D, torch.float32)
    q2, k2 = op.apply_rope(q, k, cos, sin)
    dq, dk = (torch.randn(B, T, x.shape[1], D).transpose(1, 2) for x in (q2, k2))
    gq, gk = q2.grad_fn.apply(dq, dk)[:2]  # the rope node's backward alone
    assert gq.stride() == dq.stride() and gk.stride() == dk.stride()
    assert gq.transpose(1, 2).reshape(B * T, -1)._base is not None  # a view, no copy
    want_q, want_k = op.reference(dq, dk, cos, -sin)
    assert rel_err(gq, want_q) < 1e-5 and rel_err(gk, want_k) < 1e-5


@pytest.mark.parametrize("block_h", sorted({c["BLOCK_H"] for c in op.CANDIDATES["fwd"]}))
def test_every_candidate_agrees(seed, poison, block_h):
    B, T, D = 1, 3, 24
    q, k = torch.randn(B, 5, T, D), torch.randn(B, 3, T, D)
    cos, sin = torch.randn(T, D), torch.randn(T, D)  # unequal halves: the backward is the exact transpose
    want = op.reference(q, k, cos, sin)
    config = {"BLOCK_H": block_h, "num_warps": 4, "num_stages": 1}
    assert config in op.CANDIDATES["fwd"] and config in op.CANDIDATES["bwd"]
    got = (q.clone(), k.clone())
    op._launch(*got, cos, sin, False, config)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
    grads = (torch.randn_like(q), torch.randn_like(k))
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    want_grads = torch.autograd.grad(op.reference(qr, kr, cos, sin), [qr, kr], grads)
    got_grads = tuple(torch.empty_like(g) for g in grads)
    op._launch(*grads, cos, sin, True, config, *got_grads)
    assert all(rel_err(g, w) < 1e-5 for g, w in zip(got_grads, want_grads))


def test_gradcheck_fp64(seed):
    T, D = 2, 6
    q = torch.randn(1, 2, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, T, D, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(T, D, dtype=torch.float64), torch.randn(T, D, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: op.apply_rope(a * 1.0, b * 1.0, cos, sin), (q, k))


def test_refuses_what_autograd_cannot_track():
    T, D = 2, 16
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    leaf = torch.randn(1, 1, T, D, requires_grad=True)
    for q in (leaf, leaf.transpose(1, 2).transpose(1, 2)):
        with pytest.raises(RuntimeError, match="leaf"):
            op.apply_rope(q, torch.randn(1, 1, T, D), cos, sin)
    with pytest.raises(ValueError, match="cos/sin"):
        op.apply_rope(torch.randn(1, 1, T, D), torch.randn(1, 1, T, D), cos.requires_grad_(), sin)
    with pytest.raises(ValueError, match="even D"):
        op.apply_rope(torch.randn(1, 1, T, D), torch.randn(1, 1, T + 1, D), sin, sin)
    # a tensor another op saved for its backward must not be rotated behind autograd's back
    x = torch.randn(1, 2, T, D, requires_grad=True)
    saved = x.exp()  # exp saves its output
    q, k = op.apply_rope(saved[:, :1], saved[:, 1:], sin, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (q.sum() + k.sum()).backward()


@pytest.mark.parametrize("preset", ["llama-3-8b", "gemma-7b", "qwen2.5-7b"])
def test_problems_have_candidate_defaults(preset):
    problems = op.problems(build_config(preset), 16384, torch.bfloat16)
    assert [p for p, _ in problems] == ["fwd", "bwd"]
    for pass_name, problem in problems:
        assert json.loads(json.dumps(problem)) == problem and problem["tokens"] == 16384
        assert problem["head_dim"] in (128, 256)
        assert op.heuristic(pass_name, problem) in op.CANDIDATES[pass_name]


@pytest.mark.parametrize("pass_name", ["fwd", "bwd"])
def test_tune_case_checks_out(seed, pass_name):
    problem = op._key(torch.float32, 3, 1, 32, 5)
    case = op.SPEC.tune_case(pass_name, problem, "cpu")
    got = case.run(op.heuristic(pass_name, problem))
    assert all(rel_err(g, e) < case.tolerance for g, e in zip(got, case.expected))


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama-3-8b", "gemma-7b", "qwen2.5-7b"])
def test_real_sizes_on_gpu(seed, poison, preset):
    cfg = build_config(preset)
    n_q, n_k = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    B, T = 2, 2048
    proj = torch.randn(B, T, (n_q + n_k) * D, device="cuda", dtype=torch.bfloat16)
    heads = (proj * 1.0).requires_grad_().view(B, T, n_q + n_k, D)
    q, k = heads[:, :, :n_q].transpose(1, 2) * 1.0, heads[:, :, n_q:].transpose(1, 2) * 1.0
    cos, sin = hf_cos_sin(packed_positions(B, T).cuda(), D, torch.bfloat16)
    want_q, want_k = op.reference(q.double(), k.double(), cos.double(), sin.double())
    out_q, out_k = op.apply_rope(q, k, cos, sin)
    assert rel_err(out_q, want_q) < 1e-2 and rel_err(out_k, want_k) < 1e-2
    gq, gk = torch.randn_like(out_q), torch.randn_like(out_k)
    got = torch.autograd.grad((out_q, out_k), [q, k], (gq, gk))
    want = op.reference(gq.double(), gk.double(), cos.double(), -sin.double())
    assert all(rel_err(g, w) < 1e-2 for g, w in zip(got, want))


def test_without_grad_mode_the_same_rotation_in_place(seed):
    """Outside grad mode (a checkpointed layer's forward) the rotation runs without the autograd Function: the
    same values, in q's and k's own memory, their version counters bumped as the Function does."""
    cos, sin = hf_cos_sin(packed_positions(2, 9), 16, torch.float32)
    _, q, k, _ = fused_qkv(2, 9, 4, 2, 16, torch.float32)
    want = op.apply_rope(q.detach().clone(), k.detach().clone(), cos, sin)
    with torch.no_grad():
        q2, k2 = q.detach(), k.detach()
        versions = (q2._version, k2._version)
        got = op.apply_rope(q2, k2, cos, sin)
    assert got[0] is q2 and got[1] is k2 and (q2._version, k2._version) > versions
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("block_t", [1, 4, None])
def test_tiles_of_tokens_match_reference(seed, block_t):
    """One token per program (the tiling of the usual head sizes) and several (narrow heads), with a last tile
    running past the tokens (10 tokens in tiles of 4), forward and backward, out of place."""
    B, T, D, n_q, n_k = 2, 5, 16, 3, 1
    q, k = torch.randn(B, n_q, T, D), torch.randn(B, n_k, T, D)
    cos, sin = hf_cos_sin(packed_positions(B, T), D, torch.float32)
    config = op.heuristic("fwd", op._key(torch.float32, n_q, n_k, D, B * T))
    for backward in (False, True):
        got = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
        op._launch(q, k, cos, sin, backward, config, *got, block_t=block_t)
        want = op.reference(q, k, cos, -sin if backward else sin)
        assert all(rel_err(g, w) < 1e-6 for g, w in zip(got, want))


def test_tokens_per_program():
    """One token a program for the families' head sizes; a tile of tokens for narrow heads, no larger than
    the tokens there are."""
    for n_q, head_dim in ((32, 128), (28, 128), (16, 256), (32, 64)):
        assert op.tokens_per_program(4096, n_q, head_dim) == 1
    assert op.tokens_per_program(4096, 4, 16) == 32
    assert op.tokens_per_program(10, 4, 16) == 16
