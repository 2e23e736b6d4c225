"""GPU microbenchmarks: fused linear cross-entropy and NF4 dequantize.

- LCE forward+backward (grad of hidden; the LM head frozen, as in LoRA) at 4096 and 16384 tokens for
  (H=4096, V=128256) (Llama-3) and (3072, 256000) (Gemma), fused vs the reference that materializes
  the logits (eager and torch.compile). extra_info: median ms (triton.testing.do_bench) and the peak
  memory above the inputs (torch.cuda.max_memory_allocated). Targets: peak <= 1/4 of the reference's,
  time <= 1.1x.
- NF4 dequantize at the projection shapes of llama-3-8b, gemma-7b and qwen2.5-7b, fastbench vs
  bitsandbytes' dequantize_4bit, ``copy``: a device-to-device copy moving the same bytes (half read, half
  written; ``copy_`` of one uint8 buffer into another, which a CUDA graph runs as a memcpy node) and
  ``copy_sm``: the same bytes through an elementwise kernel on the multiprocessors (``bitwise_not``), the two
  references at that size, where the fixed cost of a launch and its tail weigh more than at the size the
  4.3 TB/s copy ceiling was measured; extra_info: GPU ms without launch cost
  (fastbench.bench.gpu_timing) and GB/s (packed + absmax codes + absmax2 + output bytes).
"""
import pytest
import torch
import torch.nn.functional as F

from fastbench.bench.gpu_timing import eager_ms, gpu_ms
from fastbench.kernels import linear_cross_entropy as lce
from fastbench.kernels import nf4

pytestmark = pytest.mark.gpu


def _peak_bytes(fn):
    """Peak allocated memory above what was allocated before ``fn``."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def _reference_loss(hidden, weight, labels):
    """What a Hugging Face model does: bf16 logits, upcast to fp32, F.cross_entropy."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100)


_compiled_reference = None


def _lce_impl(name):
    global _compiled_reference
    if name == "fused":
        return lce.fused_linear_cross_entropy
    if name == "eager":
        return _reference_loss
    if _compiled_reference is None:
        _compiled_reference = torch.compile(_reference_loss)
    return _compiled_reference


@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
@pytest.mark.parametrize("hidden_size,vocab", [(4096, 128256), (3072, 256000)], ids=["llama3", "gemma"])
@pytest.mark.parametrize("tokens", [4096, 16384])
def test_lce_fwd_bwd(benchmark, impl, hidden_size, vocab, tokens):
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[::7] = -100
    loss_fn = _lce_impl(impl)

    def step():
        hidden.grad = None
        loss_fn(hidden, weight, labels).backward()

    step()  # compile / warm up
    peak = _peak_bytes(step)
    ms = eager_ms(step, rep=1500)  # a step takes 20-200 ms: enough repeats for a median
    benchmark.group = f"lce {tokens}x{hidden_size}x{vocab}"
    benchmark.extra_info.update(op="linear_cross_entropy", impl=impl, tokens=tokens, hidden=hidden_size,
                                vocab=vocab, median_ms=ms, peak_bytes=peak, peak_gib=peak / 2 ** 30)
    benchmark.pedantic(_synced(step), rounds=5, warmup_rounds=1)


def _nf4_shapes():
    from fastbench.presets import build_config

    shapes = []
    for model in ("llama-3-8b", "gemma-7b", "qwen2.5-7b"):
        for shape in dict.fromkeys(nf4._projection_shapes(build_config(model))):
            shapes.append(pytest.param(shape, id=f"{model}-{shape[0]}x{shape[1]}"))
    return shapes


@pytest.mark.parametrize("impl", ["fastbench", "bitsandbytes", "copy", "copy_sm"])
@pytest.mark.parametrize("shape", _nf4_shapes())
def test_nf4_dequantize(benchmark, impl, shape):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
    numel = weight.numel()
    nbytes = (numel + 1) // 2 + state.absmax.numel() + 4 * state.state2.absmax.numel() + 2 * numel
    if impl == "fastbench":
        def run():
            nf4.dequantize_nf4_weight(packed, out, quant_state=state)
    elif impl in ("copy", "copy_sm"):
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)

        def run():
            dst.copy_(src) if impl == "copy" else torch.bitwise_not(src, out=dst)
    else:
        def run():
            bnbf.dequantize_4bit(packed, state, out=out)
    ms, timing = gpu_ms(run)
    benchmark.group = f"nf4 {shape[0]}x{shape[1]}"
    benchmark.extra_info.update(op="nf4_dequantize", impl=impl, rows=shape[0], cols=shape[1], median_ms=ms,
                                timing=timing,
                                bytes=nbytes, gbps=nbytes / ms / 1e6)
    benchmark.pedantic(_synced(run), rounds=20, warmup_rounds=2)
