"""Microbenchmarks of rms_norm, rope, swiglu and geglu (bf16) at the shapes of three 7-8B models.

    pytest tests/benchmarks/bench_norm_rope_glu.py --benchmark-only -m gpu --benchmark-json=OUT.json

Implementations: ``triton`` (fastbench), ``eager`` (the op's reference), ``compile`` (the reference
under torch.compile) and ``liger`` (Liger-Kernel's op, when installed). ``bwd`` times the
autograd backward of one forward. Times are GPU time without the CPU's launch cost
(fastbench.bench.gpu_timing.graph_ms: CUDA-graph replay, L2 flushed before each call); ``bwd`` is
(forward + backward) minus forward, both captured. benchmark.extra_info records ms, the bytes moved
(each input read once, each output written once), GB/s and the fraction of the card's copy ceiling;
pytest-benchmark's own statistics time eager synchronised calls (launch cost included).
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastbench.bench.gpu_timing import gpu_ms
from fastbench.kernels import geglu, rms_norm, rope, swiglu
from fastbench.presets import build_config

COPY_CEILING = 4.3e12  # bytes/s, a device-to-device copy on one H200
MODELS = ("llama-3-8b", "gemma-7b", "qwen2.5-7b")
TOKENS = (4096, 16384)
SEQ_LEN = 2048  # rope: tokens are batch x SEQ_LEN
DTYPE = torch.bfloat16


def _liger(module: str, name: str):
    try:
        return getattr(__import__(f"liger_kernel.ops.{module}", fromlist=[name]), name)
    except ImportError:
        pytest.skip("liger-kernel is not installed")


def _compiled(fn):
    """fn under torch.compile, compiled afresh for this case. Dynamo keeps at most
    ``torch._dynamo.config.recompile_limit`` (8) versions of one function and runs it eagerly past that:
    without the reset, the 9th to 12th shapes of an op (qwen2.5-7b's rms_norm and rope in the 2026-11-29
    run) were timed as eager."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def _rms_norm_case(cfg, tokens, impl):
    """(fn, tensors to differentiate, bytes of fwd, bytes of bwd) for the layer norm of a model."""
    n, eps = cfg.hidden_size, cfg.rms_norm_eps
    offset = 1.0 if cfg.model_type == "gemma" else 0.0
    x, w = _rand(tokens, n), 1 + 0.1 * _rand(n)
    fn = {
        "triton": lambda x: rms_norm.rms_norm(x, w, eps, offset),
        "eager": lambda x: rms_norm.reference(x, w, eps, offset),
        "compile": functools.partial(_compiled(rms_norm.reference), weight=w, eps=eps, offset=offset),
        "liger": lambda x: _liger("rms_norm", "LigerRMSNormFunction").apply(
            x, w, eps, offset, "gemma" if offset else "llama"),
    }[impl]
    row_bytes = x.numel() * x.element_size()
    return fn, (x,), 2 * row_bytes + w.nbytes, 3 * row_bytes + w.nbytes


def _rope_case(cfg, tokens, impl):
    """q and k as transposed views of one projection output (Hugging Face's layout), cos/sin [B, T, D]."""
    n_q, n_k = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    b = tokens // SEQ_LEN
    proj = _rand(b, SEQ_LEN, (n_q + n_k) * d).view(b, SEQ_LEN, n_q + n_k, d)
    q, k = proj[:, :, :n_q].transpose(1, 2), proj[:, :, n_q:].transpose(1, 2)
    angle = torch.rand(b, SEQ_LEN, d // 2, device="cuda") * SEQ_LEN
    cos, sin = (f(torch.cat((angle, angle), -1)).to(DTYPE) for f in (torch.cos, torch.sin))
    fn = {
        "triton": lambda q, k: rope.apply_rope(q, k, cos, sin),
        "eager": lambda q, k: rope.reference(q, k, cos, sin),
        "compile": functools.partial(_compiled(rope.reference), cos=cos, sin=sin),
        "liger": lambda q, k: __import__("liger_kernel.transformers.rope", fromlist=["x"])
        .liger_rotary_pos_emb(q, k, cos, sin),
    }[impl]
    if impl == "liger":
        _liger("rope", "LigerRopeFunction")
    moved = 2 * proj.nbytes + cos.nbytes + sin.nbytes
    return fn, (q, k), moved, moved


def _glu_case(cfg, tokens, impl):
    gate, up = _rand(tokens, cfg.intermediate_size), _rand(tokens, cfg.intermediate_size)
    if cfg.model_type == "gemma":
        fns = {"triton": geglu.geglu, "eager": geglu.reference, "liger": ("geglu", "LigerGELUMulFunction")}
    else:
        fns = {"triton": swiglu.swiglu, "eager": swiglu.reference, "liger": ("swiglu", "LigerSiLUMulFunction")}
    if impl == "compile":
        fn = _compiled(fns["eager"])
    elif impl == "liger":
        fn = _liger(*fns["liger"]).apply
    else:
        fn = fns[impl]
    return fn, (gate, up), 3 * gate.nbytes, 5 * gate.nbytes


OPS = {"rms_norm": _rms_norm_case, "rope": _rope_case, "glu": _glu_case}


@functools.lru_cache(maxsize=None)
def _config(model):
    return build_config(model)


@pytest.mark.parametrize("impl", ["triton", "eager", "compile", "liger"])
@pytest.mark.parametrize("pass_name", ["fwd", "bwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("op", list(OPS))
def test_bandwidth(benchmark, op, model, tokens, pass_name, impl):
    torch.manual_seed(0)
    fn, inputs, fwd_bytes, bwd_bytes = OPS[op](_config(model), tokens, impl)
    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward():
        inner = [t * 1 for t in leaves]  # non-leaf copies (rope rotates its inputs in place; leaves refuse
        out = fn(*inner)  # that); elementwise ops keep the strides' order: still [B, T, H, D] in memory
        return inner, (out if isinstance(out, tuple) else (out,))

    grads = [torch.randn_like(o) for o in forward()[1]]

    def forward_backward():
        inner, outs = forward()
        return torch.autograd.grad(outs, inner, grads)

    def forward_only():
        with torch.no_grad():
            return fn(*inputs)

    if pass_name == "fwd":
        run, moved = forward_only, fwd_bytes
        ms, timing = gpu_ms(forward_only)
    else:
        run, moved = forward_backward, bwd_bytes
        (both, timing), (fwd, _) = gpu_ms(forward_backward), gpu_ms(forward)
        ms, timing = both - fwd, f"{timing}: (fwd+bwd) - fwd"
    gbps = moved / (ms * 1e-3) / 1e9
    benchmark.extra_info.update(op=op, model=model, tokens=tokens, pass_name=pass_name, impl=impl, timing=timing,
                                ms=ms, bytes=moved, gb_per_s=gbps, fraction_of_copy=gbps * 1e9 / COPY_CEILING)

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=10, warmup_rounds=2)
