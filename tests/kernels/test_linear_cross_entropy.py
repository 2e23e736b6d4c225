"""Fused linear cross-entropy against F.cross_entropy on materialized fp32 logits."""
import pytest
import torch

from fastbench.kernels import linear_cross_entropy as lce

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(got, want):
    got, want = got.double(), want.double()
    err = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
    assert err == err, "NaN"
    return err


def make(n, h, v, dtype, device="cpu", ignore_frac=0.2, bias=False):
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) / h ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignore_frac] = -100
    return hidden, weight, b, labels


def check(hidden, weight, bias, labels, dtype, **kw):
    params = [t for t in (hidden, weight, bias) if t is not None]
    loss = lce.fused_linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    grads = torch.autograd.grad(loss, params)
    want = lce.reference(hidden, weight, labels, bias=bias, **kw)
    want_grads = torch.autograd.grad(want, params)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, want) < TOL[dtype]
    for g, w, p in zip(grads, want_grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert rel_err(g, w) < TOL[dtype]
    return loss


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 rows at V=3001 fp32 (and 16 in bf16), so N=37 spans a partial last chunk."""
    monkeypatch.setattr(lce, "CHUNK_BYTES", 8 * 3001 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_across_chunks(seed, small_chunks, dtype):
    hidden, weight, bias, labels = make(37, 24, 3001, dtype, bias=True)
    assert lce.rows_per_chunk(37, 3001, dtype.itemsize) < 37
    check(hidden, weight, bias, labels, dtype)


def test_matches_plain_cross_entropy_mean(seed):
    hidden, weight, _, labels = make(19, 16, 515, torch.float32)
    loss = lce.fused_linear_cross_entropy(hidden, weight, labels)
    want = torch.nn.functional.cross_entropy(hidden.float() @ weight.float().t(), labels)
    assert rel_err(loss, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(seed, dtype):
    hidden, weight, _, labels = make(13, 16, 1500, dtype)
    with torch.no_grad():
        weight.mul_(20)  # logits well beyond the cap, where tanh saturates
    check(hidden, weight, None, labels, dtype, softcap=7.5)


def test_one_row_and_3d_input(seed):
    hidden, weight, _, labels = make(1, 8, 1030, torch.float32, ignore_frac=0.0)
    check(hidden, weight, None, labels, torch.float32)
    hidden3 = torch.randn(2, 5, 8, requires_grad=True)
    labels3 = torch.randint(0, 1030, (2, 5))
    check(hidden3, weight, None, labels3, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_gives_zero(seed, reduction):
    hidden, weight, _, labels = make(5, 8, 300, torch.float32)
    labels.fill_(-100)
    loss = lce.fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_sum_with_num_items_equals_full_batch_mean(seed, small_chunks):
    """Gradient accumulation: two halves, each sum / total count, add up to the full batch's mean."""
    hidden, weight, _, labels = make(30, 16, 3001, torch.float32)
    full = lce.fused_linear_cross_entropy(hidden, weight, labels)
    g_full = torch.autograd.grad(full, [hidden, weight])
    total = (labels != -100).sum()
    halves = [lce.fused_linear_cross_entropy(hidden[s], weight, labels[s], reduction="sum", num_items_in_batch=n)
              for s, n in ((slice(0, 11), total), (slice(11, 30), int(total)))]
    g_halves = torch.autograd.grad(halves[0] + halves[1], [hidden, weight])
    assert rel_err(halves[0] + halves[1], full) < 1e-5
    for a, b in zip(g_halves, g_full):
        assert rel_err(a, b) < 1e-5
    check(hidden, weight, None, labels, torch.float32, reduction="sum")
    check(hidden, weight, None, labels, torch.float32, reduction="sum", num_items_in_batch=total)


def test_grad_output_scales_gradients_and_frozen_weight(seed):
    hidden, weight, _, labels = make(9, 16, 700, torch.float32)
    weight.requires_grad_(False)
    (lce.fused_linear_cross_entropy(hidden, weight, labels) * 3.0).backward()
    want = torch.autograd.grad(lce.reference(hidden, weight, labels) * 3.0, hidden)[0]
    assert weight.grad is None
    assert rel_err(hidden.grad, want) < 1e-5


def test_no_grad_forward_and_second_backward_refused(seed):
    hidden, weight, _, labels = make(9, 16, 700, torch.float32)
    with torch.no_grad():
        assert rel_err(lce.fused_linear_cross_entropy(hidden, weight, labels), lce.reference(hidden, weight, labels)) < 1e-5
    loss = lce.fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second forward"):
        loss.backward()


@pytest.mark.parametrize("softcap", [False, True])
def test_every_candidate_passes_its_tune_case(seed, softcap):
    case = lce.tune_case("fwd", lce.problem_key(6, 2500, torch.float32, softcap), "cpu")
    for config in lce.SPEC.candidates["fwd"]:
        for got, want in zip(case.run(config), case.expected):
            assert rel_err(got, want) <= case.tolerance, config


def test_problems_and_heuristic():
    from fastbench.presets import build_config

    (pass_name, problem), = lce.problems(build_config("gemma-7b"), 16384, torch.bfloat16)
    assert pass_name == "fwd" and problem["vocab"] == 256000 and problem["tokens"] == 16384
    assert lce.heuristic("fwd", problem) in lce.SPEC.candidates["fwd"]
    assert lce.heuristic("fwd", lce.problem_key(7, 512, torch.float32, False)) in lce.SPEC.candidates["fwd"]
    rows = lce.rows_per_chunk(16384, 128256, 2)
    assert rows * 128256 * 2 <= lce.CHUNK_BYTES and 16384 % rows == 0


@pytest.mark.gpu
@pytest.mark.parametrize("h,v,softcap", [(4096, 128256, None), (3072, 256000, 30.0)])
def test_real_vocab_gpu(seed, h, v, softcap):
    hidden, weight, _, labels = make(4096, h, v, torch.bfloat16, device="cuda")
    check(hidden, weight, None, labels, torch.bfloat16, softcap=softcap)


@pytest.mark.parametrize("bad", [-1, 97])
def test_labels_out_of_range_are_refused(bad):
    hidden, weight = torch.randn(5, 16), torch.randn(97, 16)
    labels = torch.randint(0, 97, (5,))
    labels[2] = bad
    with pytest.raises(RuntimeError, match="labels must lie in"):
        lce.fused_linear_cross_entropy(hidden, weight, labels)
