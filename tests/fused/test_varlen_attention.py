"""Varlen attention for packed rows (fastbench.fused.varlen_attention).

On the CPU the FlashAttention ops are not there: the tests stand a reference in for them (the per-run SDPA of
``reference``, differentiated by autograd) and check everything around the kernels: the runs read off
position_ids, the layouts handed over and back, the gradients' way to q/k/v views, the decoder's dispatch
and the model's loss and LoRA gradients against the dense-mask path. The kernels themselves are checked
against the reference on the GPU.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from fastbench.fused import varlen_attention as va
from fastbench.fused.varlen_attention import PackedSequences


def packed_positions(rng: random.Random, B: int, T: int) -> tuple[torch.Tensor, list[int]]:
    """Random packed rows' position_ids [B, T] and the flat start offsets of their runs."""
    pos, starts = torch.zeros(B, T, dtype=torch.long), []
    for b in range(B):
        t = 0
        while t < T:
            n = min(rng.randint(1, max(1, T // 2)), T - t)
            pos[b, t: t + n] = torch.arange(n)
            starts.append(b * T + t)
            t += n
    return pos, starts


def dense(q, k, v, position_ids, window=None):
    """Block-diagonal causal SDPA over [B, T, H, D], as the dense-mask path builds it."""
    T = q.shape[1]
    seq = (position_ids == 0).cumsum(-1)
    i = torch.arange(T)
    keep = (i[:, None] >= i[None, :])[None, None] & (seq[:, None, :, None] == seq[:, None, None, :])
    if window is not None:
        keep = keep & ((i[:, None] - i[None, :]) < window)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                                       scale=0.3, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


@pytest.fixture
def reference_kernels(monkeypatch):
    """The reference in place of FlashAttention's varlen forward and backward (flat [N, H, D] layouts)."""
    calls = []

    def forward(q, k, v, seqs, scale):
        calls.append("forward")
        assert q.stride(-1) == 1 and seqs.cu.dtype == torch.int32
        out = va.reference(q[None], k[None], v[None], seqs, scale)[0]
        return out, (torch.empty(0),)

    def backward(dout, q, k, v, out, saved, seqs, scale):
        calls.append("backward")
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            o = va.reference(*(x[None] for x in leaves), seqs, scale)[0]
            return torch.autograd.grad(o, leaves, dout)

    monkeypatch.setattr(va, "flash_forward", forward)
    monkeypatch.setattr(va, "flash_backward", backward)
    return calls


def test_runs_start_at_each_row_and_each_zero_position(seed):
    rng = random.Random(seed)
    for _ in range(5):
        B, T = rng.randint(1, 3), rng.randint(1, 40)
        pos, starts = packed_positions(rng, B, T)
        seqs = PackedSequences.from_position_ids(pos, B, T, "cpu")
        assert seqs.cu.tolist() == starts + [B * T]
        assert seqs.longest == max(b - a for a, b in zip(seqs.cu.tolist()[:-1], seqs.cu.tolist()[1:]))
    rows = PackedSequences.from_position_ids(None, 3, 7, "cpu")
    assert rows.cu.tolist() == [0, 7, 14, 21] and rows.longest == 7
    shifted = PackedSequences.from_position_ids(torch.tensor([[5, 6, 0, 1]]), 1, 4, "cpu")  # a row not at 0
    assert shifted.cu.tolist() == [0, 2, 4]


@pytest.mark.parametrize("heads,window", [((4, 4), None), ((4, 2), None), ((6, 2), 3)])
def test_varlen_attention_equals_the_block_diagonal_mask(seed, reference_kernels, heads, window):
    """Forward and q/k/v gradients, GQA and a sliding window, through views of one projection output."""
    g = torch.Generator().manual_seed(seed)
    B, T, D = 2, 24, 8
    Hq, Hk = heads
    pos, _ = packed_positions(random.Random(seed), B, T)
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = (qkv[..., a:b].view(B, T, -1, D) for a, b in
               ((0, Hq * D), (Hq * D, (Hq + Hk) * D), ((Hq + Hk) * D, (Hq + 2 * Hk) * D)))
    seqs = PackedSequences.from_position_ids(pos, B, T, "cpu").with_window(window)
    out = va.varlen_attention(q, k, v, seqs, 0.3)
    want = dense(q, k, v, pos, window)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (expected,) = torch.autograd.grad(want, qkv, grad)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert reference_kernels == ["forward", "backward"]


def test_masks_hand_packed_rows_to_varlen_and_padded_rows_to_sdpa():
    from fastbench.fused.decoder import SdpaMasks

    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    masks = SdpaMasks(None, pos, 2, 6, "cpu")
    seqs = masks.get(None, varlen=True)
    assert isinstance(seqs, PackedSequences) and seqs.cu.tolist() == [0, 3, 5, 6, 10, 12]
    assert masks.get(4, varlen=True).window == 4 and masks.get(4, varlen=True).cu is seqs.cu
    attend, keyless = masks.get(None)  # a caller that cannot run varlen still gets the mask
    assert attend.shape == (2, 1, 6, 6) and keyless is None
    plain = SdpaMasks(None, torch.arange(6)[None].expand(2, 6), 2, 6, "cpu")
    assert plain.get(None, varlen=True) is None  # plain causal rows: SDPA's causal kernel
    assert plain.get(4, varlen=True).cu.tolist() == [0, 6, 12]  # rows longer than the window: varlen
    padded = SdpaMasks(torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]), pos, 2, 6, "cpu")
    assert isinstance(padded.get(None, varlen=True), tuple)  # key padding: the dense mask


@pytest.mark.parametrize("window", [None, 5])
def test_fused_model_on_packed_rows_equals_the_dense_mask_path(seed, reference_kernels, monkeypatch, window):
    """Loss and LoRA gradients of a tiny fused model on packed rows: varlen attention vs the dense mask."""
    from fastbench.fused import causal_lm

    from chat_tokenizer import FAMILY_PRESETS
    from test_train_packing import lora_model, random_examples
    from fastbench.train.packing import pack_rows, packed_batch

    model = lora_model(FAMILY_PRESETS["qwen3"], seed % 10_000, fused=True)
    if window is not None:
        monkeypatch.setattr(causal_lm, "_window", lambda model, attn: window)
    lengths = [7, 4, 9, 3, 11]
    examples = random_examples(seed % 10_000, lengths)
    batch = packed_batch([[examples[i] for i in row] for row in pack_rows(lengths, 16)], 0, 16).inputs

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    dense_loss, dense_grads = step()
    assert not reference_kernels
    monkeypatch.setattr(va, "usable", lambda q: True)
    varlen_loss, varlen_grads = step()
    assert reference_kernels and set(reference_kernels) == {"forward", "backward"}
    torch.testing.assert_close(varlen_loss, dense_loss, rtol=1e-6, atol=0)
    assert varlen_grads.keys() == dense_grads.keys() and dense_grads
    for name, g in dense_grads.items():
        assert torch.linalg.norm(varlen_grads[name] - g) <= 1e-5 * torch.linalg.norm(g), name


@pytest.mark.gpu
@pytest.mark.parametrize("D,heads,window", [(128, (8, 2), None), (64, (4, 4), None), (256, (4, 1), None),
                                            (128, (8, 2), 100)])
def test_flash_varlen_kernels_match_the_reference_on_the_gpu(seed, D, heads, window):
    """The real kernels (bf16) against the per-run SDPA reference in fp32: METHOD.md's bf16 tolerances."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, T = 2, 1024
    Hq, Hk = heads
    pos, _ = packed_positions(random.Random(seed), B, T)
    pos = pos.cuda()
    q = torch.randn(B, T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hk, D, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, Hk, D, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    seqs = PackedSequences.from_position_ids(pos, B, T, "cuda").with_window(window)
    assert va.usable(q)
    out = va.varlen_attention(q, k, v, seqs, D ** -0.5)
    grad = torch.randn(out.shape, device="cuda", generator=g, dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = va.reference(*leaves, seqs, D ** -0.5)
    expected = torch.autograd.grad(want, leaves, grad.float())
    for a, b in zip((out, *got), (want, *expected)):
        assert torch.isfinite(a).all() and torch.linalg.norm(a.float() - b) <= 1e-2 * torch.linalg.norm(b)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "qwen2", "qwen3"])
def test_bf16_fused_model_on_packed_rows_varlen_vs_dense_mask_on_the_gpu(seed, monkeypatch, family):
    """Each family's tiny model in bf16 on packed rows: the varlen kernels against the dense-mask SDPA path
    (loss and LoRA gradients, bf16 tolerances)."""
    import warnings

    from chat_tokenizer import FAMILY_PRESETS
    from test_train_packing import random_examples

    from fastbench import FastLanguageModel
    from fastbench.train.packing import pack_rows, packed_batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained(FAMILY_PRESETS[family], dtype=torch.bfloat16, device="cuda",
                                                    seed=seed % 10_000)
        model = FastLanguageModel.get_peft_model(base, r=8, random_state=seed % 10_000, fallback=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    lengths = [37, 12, 90, 55, 8, 23, 61, 40]
    examples = random_examples(seed % 10_000, lengths)
    rows = pack_rows(lengths, 128)
    batch = {k: v.cuda() for k, v in packed_batch([[examples[i] for i in r] for r in rows], 0, capacity=128)
             .inputs.items()}

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    real = va.flash_forward
    monkeypatch.setattr(va, "flash_forward", lambda *a: calls.append(1) or real(*a))
    varlen_loss, varlen_grads = step()
    assert calls, "the varlen kernels did not run"
    monkeypatch.setattr(va, "usable", lambda q: False)
    dense_loss, dense_grads = step()
    assert abs(varlen_loss - dense_loss) <= 1e-2 * dense_loss
    for name, g in dense_grads.items():
        assert torch.linalg.norm(varlen_grads[name] - g) <= 3e-2 * torch.linalg.norm(g), name
