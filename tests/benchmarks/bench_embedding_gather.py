"""Microbenchmark of the embedding lookup (bf16) at llama-3-8b's and qwen2.5-7b's tables, 4096 and 16384 tokens.

    pytest tests/benchmarks/bench_embedding_gather.py --benchmark-only -m gpu --benchmark-json=OUT.json

Implementations: ``triton_device`` (fastbench's gather, the table on the GPU), ``triton_host`` (the same, the
table in pinned host memory: what the offload mode runs; bound by the bus) and ``eager`` (torch's
F.embedding, table on the GPU). extra_info: GPU ms without launch cost (fastbench.bench.gpu_timing), the
bytes moved (the rows read once, the output written once) and GB/s.
"""
import pytest
import torch

from fastbench.bench.gpu_timing import gpu_ms
from fastbench.kernels import embedding_gather as op
from fastbench.presets import build_config


@pytest.mark.parametrize("impl", ["triton_device", "triton_host", "eager"])
@pytest.mark.parametrize("tokens", [4096, 16384])
@pytest.mark.parametrize("model", ["llama-3-8b", "qwen2.5-7b"])
def test_embedding_gather(benchmark, model, tokens, impl):
    cfg = build_config(model)
    torch.manual_seed(0)
    table = torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
    if impl == "triton_host":
        table = table.cpu().pin_memory()
    ids = torch.randint(0, cfg.vocab_size, (tokens,), device="cuda")
    run = (lambda: op.reference(ids, table)) if impl == "eager" else (lambda: op.embedding_gather(ids, table))
    ms, timing = gpu_ms(run)
    nbytes = 2 * tokens * cfg.hidden_size * table.element_size() + ids.numel() * ids.element_size()
    benchmark.group = f"embedding {model} {tokens}"
    benchmark.extra_info.update(op="embedding_gather", impl=impl, model=model, tokens=tokens, median_ms=ms,
                                timing=timing, bytes=nbytes, gbps=nbytes / ms / 1e6)

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, warmup_rounds=2)
