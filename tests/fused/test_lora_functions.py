"""The fused LoRA Functions against plain autograd over ``fastbench.kernels.lora.reference``."""
import pytest
import torch
import torch.nn.functional as F

from fastbench.fused.decoder import _GLUS
from fastbench.kernels.lora import LoRA, LoraFactorCache, Projection, lora_mlp, lora_projections, reference


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_projection(i, o, r, dtype, bias=False, lora=True):
    A = (torch.randn(r, i) / i ** 0.5).requires_grad_()  # adapters stay fp32, as PEFT keeps them
    B = (torch.randn(o, r) / r ** 0.5).requires_grad_()
    return Projection(torch.randn(o, i, dtype=dtype) / i ** 0.5, torch.randn(o, dtype=dtype) if bias else None,
                      LoRA(A, B, 0.7) if lora else None)


def upcast(x, projections):
    """The same inputs in fp32: the oracle for every dtype."""
    x32 = x.detach().float().requires_grad_()
    return x32, [p._replace(weight=p.weight.float(), bias=None if p.bias is None else p.bias.float()) for p in projections]


def grads(loss, x, projections):
    params = [x] + [t for p in projections if p.lora for t in (p.lora.A, p.lora.B)]
    return torch.autograd.grad(loss, params)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_projections_match_autograd(seed, dtype):
    x = torch.randn(3, 7, 40, dtype=dtype, requires_grad=True)
    q, k, v = make_projection(40, 24, 4, dtype, bias=True), make_projection(40, 8, 4, dtype), \
        make_projection(40, 8, 4, dtype, lora=False)
    w = [torch.randn(3, 7, p.weight.shape[0], dtype=dtype) for p in (q, k, v)]
    fused = lora_projections(x, q, k, v)
    x32, ps = upcast(x, (q, k, v))
    ref = [reference(x32, p) for p in ps]
    for a, b in zip(fused, ref):
        assert rel(a, b) < TOL[dtype]
    g_fused = grads(sum((y * wi).sum() for y, wi in zip(fused, w)), x, (q, k, v))
    g_ref = grads(sum((y * wi.float()).sum() for y, wi in zip(ref, w)), x32, ps)
    for a, b in zip(g_fused, g_ref):
        assert rel(a, b) < TOL[dtype]


@pytest.mark.parametrize("glu", ["silu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_matches_autograd(seed, dtype, glu):
    act = {"silu": F.silu, "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh"), "gelu": F.gelu}[glu]
    fn = lambda g, u: act(g) * u  # noqa: E731  (the fp32 oracle)
    x = torch.randn(2, 9, 32, dtype=dtype, requires_grad=True)
    gate, up, down = make_projection(32, 56, 3, dtype), make_projection(32, 56, 3, dtype), \
        make_projection(56, 32, 3, dtype)
    w = torch.randn(2, 9, 32, dtype=dtype)
    y = lora_mlp(x, gate, up, down, _GLUS[glu])
    x32, (g32, u32, d32) = upcast(x, (gate, up, down))
    y_ref = reference(fn(reference(x32, g32), reference(x32, u32)), d32)
    assert rel(y, y_ref) < TOL[dtype]
    g_fused = grads((y * w).sum(), x, (gate, up, down))
    g_ref = grads((y_ref * w.float()).sum(), x32, (g32, u32, d32))
    # in bf16 the gradients go through a chain of roundings (gate, up, h, dh, dgate, dup): on shapes this
    # small, plain autograd in bf16 itself lands up to ~1.3% from the fp32 oracle, ours as far (the
    # ratio of the two errors: median 1.0, up to ~2 over 200 draws); ours may be off by 1e-2, or 2.5x
    # what autograd in bf16 is, never over 3%
    x16 = x.detach().clone().requires_grad_()
    y16 = reference(fn(reference(x16, gate), reference(x16, up)), down)
    g16 = grads((y16 * w).sum(), x16, (gate, up, down))
    for a, b, c in zip(g_fused, g_ref, g16):
        bound = TOL[dtype] if dtype == torch.float32 else min(3e-2, max(TOL[dtype], 2.5 * rel(c, b)))
        assert torch.isfinite(a).all() and rel(a, b) < bound


def test_nf4_weight_is_dequantized(seed):
    bnb = pytest.importorskip("bitsandbytes")
    weight = bnb.nn.Params4bit(torch.randn(48, 64), requires_grad=False, quant_type="nf4",
                               compress_statistics=True).to("cpu")
    dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    p4, pd = Projection(weight, None, LoRA(torch.randn(4, 64), torch.randn(48, 4), 2.0)), None
    pd = p4._replace(weight=dense)
    x = torch.randn(5, 64, requires_grad=True)
    (y4,), (yd,) = lora_projections(x, p4), lora_projections(x, pd)
    assert torch.equal(y4, yd)
    (g4,), (gd,) = torch.autograd.grad(y4.sum(), x), torch.autograd.grad(yd.sum(), x)
    assert torch.equal(g4, gd)


def test_mlp_second_backward_is_refused(seed):
    x = torch.randn(2, 5, 16, requires_grad=True)
    gate, up, down = make_projection(16, 24, 2, torch.float32), make_projection(16, 24, 2, torch.float32), \
        make_projection(24, 16, 2, torch.float32)
    loss = lora_mlp(x, gate, up, down, _GLUS["silu"]).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_stacked_factors_with_different_ranks_scales_and_a_gap(seed):
    """Q, K, V stack their A's: a projection without LoRA between two with different r and s, and one
    whose A is frozen (no dA), still give each its own gradients."""
    q, k, v = make_projection(40, 24, 4, torch.float32), make_projection(40, 8, 4, torch.float32, lora=False), \
        make_projection(40, 8, 6, torch.float32)
    q = q._replace(lora=q.lora._replace(scale=2.5))
    v.lora.A.requires_grad_(False)
    x = torch.randn(5, 40, requires_grad=True)
    w = [torch.randn(5, p.weight.shape[0]) for p in (q, k, v)]
    fused = lora_projections(x, q, k, v)
    ref = [reference(x, p) for p in (q, k, v)]
    wanted = [x, q.lora.A, q.lora.B, v.lora.B]
    g_fused = torch.autograd.grad(sum((y * wi).sum() for y, wi in zip(fused, w)), wanted)
    g_ref = torch.autograd.grad(sum((y * wi).sum() for y, wi in zip(ref, w)), wanted)
    for a, b in zip(g_fused, g_ref):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("cached", [False, True])
def test_cast_factors_follow_an_in_place_update(seed, cached):
    """The cast LoRA factors are cached within a step (given a cache); an optimizer's in-place update (a new
    version of the parameter) is seen by the next call even when nobody starts a new step."""
    q = make_projection(16, 8, 2, torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    cache = LoraFactorCache() if cached else None
    before = lora_projections(x, q, cache=cache)[0]
    with torch.no_grad():
        q.lora.B.add_(1.0)
    after = lora_projections(x, q, cache=cache)[0]
    assert rel(after, reference(x, q)) < 1e-2 and rel(after, before) > 1e-2


def test_a_cache_serves_the_same_factors_as_a_direct_call(seed):
    """A call with a cache casts a group's factors once and reuses them (forward and backward); a call without
    one casts them each time: the outputs and gradients are the same, bit for bit."""
    qkv = [make_projection(40, o, r, torch.bfloat16) for o, r in ((24, 4), (8, 4), (8, 6))]
    x = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    w = [torch.randn(5, p.weight.shape[0], dtype=torch.bfloat16) for p in qkv]
    cache = LoraFactorCache()
    results = []
    for c in (None, cache):
        ys = lora_projections(x, *qkv, cache=c)
        results.append((*ys, *grads(sum((y * wi).sum() for y, wi in zip(ys, w)), x, qkv)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    ((key, (_, _, factors)),) = cache._factors.items()
    lora_projections(x, *qkv, cache=cache)
    assert list(cache._factors) == [key] and cache._factors[key][2] is factors  # served from the cache


def test_a_step_casts_the_previous_steps_factors_at_once(seed, monkeypatch):
    """After new_step, the first request casts every group the previous step asked for in one multi-tensor
    copy (after one multiply for the scales that are not 1), into buffers kept between steps; the factors
    equal those cast group by group, and follow the optimizer's updates."""
    cache = LoraFactorCache()
    qkv = [make_projection(40, o, r, torch.bfloat16) for o, r in ((24, 4), (8, 4), (8, 6))]
    qkv[1] = qkv[1]._replace(lora=qkv[1].lora._replace(scale=1))
    down = [make_projection(40, 16, 4, torch.bfloat16)]
    x = torch.randn(5, 40, dtype=torch.bfloat16)

    def step():
        cache.new_step()
        return [cache.factors([p.lora for p in group], torch.bfloat16) for group in (qkv, down)]

    casts = []
    monkeypatch.setattr(cache, "_cast_known_groups", lambda f=cache._cast_known_groups: (casts.append(1), f())[1])
    individual = step()  # first step: group by group
    assert casts == [] and set(cache._groups) == set(cache._factors)
    with torch.no_grad():
        for p in qkv + down:
            p.lora.B.add_(0.5)  # the optimizer's update between steps
    batched = step()
    assert casts == [1]
    for f, group in zip(batched, (qkv, down)):
        loras = [p.lora for p in group]
        assert f.A is cache._casts[(torch.bfloat16, *(id(l.A) for l in loras))].A
        assert torch.equal(f.A, torch.cat([l.A for l in loras]).to(torch.bfloat16))
        for B, l in zip(f.B_scaled, loras):
            want = (l.B if l.scale == 1 else l.B * l.scale).to(torch.bfloat16)
            assert torch.equal(B, want)
    assert not torch.equal(batched[0].B_scaled[0], individual[0].B_scaled[0])  # the update is seen
    assert [len(y) for y in (lora_projections(x, *qkv, cache=cache),)] == [3]  # the cached factors serve them
    before = batched[0].B_block.clone()
    with torch.no_grad():
        for p in qkv:
            p.lora.B.add_(0.5)
    again = step()  # the block-diagonal B, kept between steps, is cast again with the rest
    assert casts == [1, 1]
    assert torch.equal(again[0].B_block, torch.block_diag(*again[0].B_scaled))
    assert not torch.equal(again[0].B_block, before)
    cache.new_step()  # a step that asked for nothing: the next one casts nothing at once
    cache.new_step()
    assert cache._groups == {} and cache._casts == {}


def test_graph_only_forward_gives_the_same_gradients(seed):
    """A recomputed part returns placeholders for the O/down outputs; its backward must not change."""
    x = torch.randn(2, 5, 24, requires_grad=True)
    o = make_projection(24, 16, 3, torch.float32)
    gate, up, down = make_projection(24, 40, 3, torch.float32), make_projection(24, 40, 3, torch.float32), \
        make_projection(40, 24, 3, torch.float32)
    dy_o, dy_mlp = torch.randn(2, 5, 16), torch.randn(2, 5, 24)
    results = []
    for graph_only in (False, True):
        (y_o,) = lora_projections(x, o, graph_only=graph_only)
        y_mlp = lora_mlp(x, gate, up, down, _GLUS["silu"], graph_only=graph_only)
        assert y_o.shape == (2, 5, 16) and y_mlp.shape == (2, 5, 24)
        if graph_only:  # a broadcast zero: no memory of the output's size
            assert y_o.stride() == (0, 0, 0) and y_mlp.stride() == (0, 0, 0)
        results.append(torch.autograd.grad((y_o, y_mlp), [x] + [t for p in (o, gate, up, down)
                                                             for t in (p.lora.A, p.lora.B)], (dy_o, dy_mlp)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("graph_only", [False, True])
def test_mlp_in_chunks_of_tokens_matches_one_chunk(seed, graph_only, nf4):
    """The MLP run a chunk of rows at a time (a forward without autograd; a backward, which recomputes gate
    and up when the forward ran graph-only) gives the one-chunk outputs and gradients, the LoRA gradients
    summed over the chunks; uneven splits and chunks larger than the input too."""
    gate, up, down = make_projection(64, 128, 3, torch.float32), make_projection(64, 128, 3, torch.float32), \
        make_projection(128, 64, 3, torch.float32)
    if nf4:
        gate, up, down = (_nf4(p)[0] for p in (gate, up, down))
    ps = (gate, up, down)
    x = torch.randn(2, 11, 64, requires_grad=True)
    dy = torch.randn(2, 11, 64)
    params = [x] + [t for p in ps for t in (p.lora.A, p.lora.B)]
    results = []
    for rows in (22, 5, 7, 100):
        cache = LoraFactorCache()
        with torch.no_grad():
            y = lora_mlp(x, *ps, _GLUS["silu"], cache=cache, chunk_rows=rows)
        y_graph = lora_mlp(x, *ps, _GLUS["silu"], graph_only=graph_only, cache=cache, chunk_rows=rows)
        results.append((y, *torch.autograd.grad(y_graph, params, dy)))
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            assert rel(a, b) < 1e-5


def _nf4(projection):
    """The projection with its weight quantized to NF4 (bitsandbytes, on the CPU), and the same with the
    dequantized weight: one reference for the other. (in_features >= 64 here: for a 48 x 32 weight, this
    CPU's bitsandbytes dequantize_4bit and ours disagree, ours the closer to the weight; not looked into.)"""
    bnb = pytest.importorskip("bitsandbytes")
    w = bnb.nn.Params4bit(projection.weight.float(), requires_grad=False, quant_type="nf4",
                          compress_statistics=True).to("cpu")
    return projection._replace(weight=w), projection._replace(weight=bnb.functional.dequantize_4bit(w.data, w.quant_state))


@pytest.mark.parametrize("case", ["plain", "bias_scale_frozen_A", "partial_lora"])
def test_nf4_group_side_by_side_matches_separate_products(seed, case):
    """Q/K/V with NF4 weights are dequantized side by side and multiplied once (W and the block-diagonal
    B's); the same projections with dense weights take one product each: same outputs and gradients."""
    q, k, v = (make_projection(64, o, r, torch.float32, bias=case == "bias_scale_frozen_A",
                               lora=not (case == "partial_lora" and o == 16)) for o, r in ((64, 4), (16, 4), (16, 6)))
    if case == "bias_scale_frozen_A":
        q = q._replace(lora=q.lora._replace(scale=2.5))
        v.lora.A.requires_grad_(False)
    (q4, qd), (k4, kd), (v4, vd) = _nf4(q), _nf4(k), _nf4(v)
    x = torch.randn(3, 5, 64, requires_grad=True)
    w = [torch.randn(3, 5, o) for o in (64, 16, 16)]
    results = []
    cache = LoraFactorCache()  # NF4 weights dequantized into its workspace; without one, into new tensors
    for ps, c in (((qd, kd, vd), None), ((q4, k4, v4), None), ((q4, k4, v4), cache)):
        ys = lora_projections(x, *ps, cache=c)
        wanted = [x] + [t for p in ps if p.lora is not None for t in (p.lora.A, p.lora.B) if t.requires_grad]
        results.append((ys, torch.autograd.grad(sum((y * wi).sum() for y, wi in zip(ys, w)), wanted)))
    (yd, gd), *nf4 = results
    for y4, g4 in nf4:
        for a, b in zip((*y4, *g4), (*yd, *gd), strict=True):
            assert rel(a, b) < 1e-5
    assert cache._workspaces


def _nf4_mlp():
    """gate, up, down of a small MLP with NF4 weights, the same with their dequantized weights, an input and an
    output gradient."""
    gate, up, down = make_projection(64, 128, 3, torch.float32), make_projection(64, 128, 3, torch.float32), \
        make_projection(128, 64, 3, torch.float32)
    (g4, gd), (u4, ud), (d4, dd) = _nf4(gate), _nf4(up), _nf4(down)
    return (g4, u4, d4), (gd, ud, dd), torch.randn(2, 7, 64, requires_grad=True), torch.randn(2, 7, 64)


def test_nf4_mlp_gate_up_side_by_side_matches_separate_products(seed, monkeypatch):
    """gate/up with NF4 weights: one product forward and, since the GLU's gradients are written over the
    side-by-side gate/up outputs, one product backward without a copy (no torch.cat of the gradients)."""
    import fastbench.kernels.lora as lora

    (g4, u4, d4), (gd, ud, dd), x, dy = _nf4_mlp()
    joined = []
    find = lora._columns_of_one_buffer
    monkeypatch.setattr(lora, "_columns_of_one_buffer", lambda blocks: joined.append(find(blocks)) or joined[-1])
    results = []
    for ps in ((g4, u4, d4), (gd, ud, dd)):
        y = lora_mlp(x, *ps, _GLUS["silu"])
        results.append((y, *torch.autograd.grad(y, [x] + [t for p in ps for t in (p.lora.A, p.lora.B)], dy)))
    assert len(joined) == 1 and joined[0] is not None  # the NF4 run's gate/up gradients, taken as they lie
    for a, b in zip(*results, strict=True):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("chunk_rows", [4096, 5])
def test_nf4_mlp_beyond_the_workspace_dequantizes_one_weight_at_a_time(seed, monkeypatch, chunk_rows):
    """A cache whose workspace holds one weight: gate and up, together twice that, are dequantized one at a time
    into it, each right before its product (the workspace never grows, no gate/up buffer side by side, no
    block-diagonal B); outputs and gradients as with the dense weights, in the forward and in a graph-only
    forward's backward, chunked or not."""
    import fastbench.kernels.lora as lora

    (g4, u4, d4), (gd, ud, dd), x, dy = _nf4_mlp()
    joined = []
    monkeypatch.setattr(lora, "_columns_of_one_buffer", lambda blocks: joined.append(blocks))
    cache = LoraFactorCache(workspace_bytes=128 * 64 * 4)
    wanted = [x] + [t for p in (g4, u4, d4) for t in (p.lora.A, p.lora.B)]
    y_ref = lora_mlp(x, gd, ud, dd, _GLUS["silu"])
    g_ref = torch.autograd.grad(y_ref, wanted, dy)
    for graph_only in (False, True):
        cache.new_step()
        y = lora_mlp(x, g4, u4, d4, _GLUS["silu"], graph_only=graph_only, cache=cache, chunk_rows=chunk_rows)
        if not graph_only:
            assert rel(y, y_ref) < 1e-5
        for a, b in zip(torch.autograd.grad(y, wanted, dy), g_ref, strict=True):
            assert rel(a, b) < 1e-5
    assert not joined
    assert [buf.numel() for buf, _ in cache._workspaces.values()] == [128 * 64]
    assert all(cast.factors.block is None for cast in cache._casts.values())
    assert cache.held_bytes() == sum(lora.cached_factor_bytes(ps, torch.float32, cache) for ps in ((g4, u4), (d4,)))


def test_columns_of_one_buffer():
    from fastbench.kernels.lora import _columns_of_one_buffer

    base = torch.randn(6, 10)
    blocks = [base[:, :4], base[:, 4:7], base[:, 7:]]
    joined = _columns_of_one_buffer(blocks)
    assert joined is not None and torch.equal(joined, base) and joined.data_ptr() == base.data_ptr()
    assert _columns_of_one_buffer([base[:, :4], base[:, 5:]]) is None  # a gap
    assert _columns_of_one_buffer([base[:, 4:7], base[:, :4]]) is None  # out of order
    assert _columns_of_one_buffer([torch.randn(6, 4), torch.randn(6, 6)]) is None  # two buffers


@pytest.mark.parametrize("cached", [False, True])
def test_without_grad_mode_the_same_projections_and_no_graph(seed, cached):
    """Outside grad mode (a checkpointed layer's forward) the products run without the autograd Function: the
    same outputs, bit for bit, and nothing recorded."""
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    projections = [make_projection(32, o, 4, torch.bfloat16, bias=True) for o in (32, 16, 16)]
    cache = LoraFactorCache() if cached else None
    want = lora_projections(x, *projections, cache=cache)
    with torch.no_grad():
        got = lora_projections(x, *projections, cache=cache)
    assert all(y.grad_fn is None and torch.equal(y, w) for y, w in zip(got, want))
    assert [y.shape for y in got] == [w.shape for w in want]


@pytest.mark.gpu
def test_lora_gradient_products_in_fp32_on_gpu(seed):
    """On a GPU the LoRA gradients' products give fp32 from the GEMM's accumulator: the fp32 product of the same
    bf16 inputs, to fp32 rounding."""
    from fastbench.kernels.lora import _product_in

    a, b = (torch.randn(n, m, device="cuda").to(torch.bfloat16) for n, m in ((512, 48), (512, 4096)))
    got = _product_in(a.t(), b, torch.float32)  # dY B transposed, as the backward passes it
    assert got.dtype == torch.float32
    assert rel(got, a.float().t() @ b.float()) < 1e-5
