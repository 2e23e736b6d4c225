"""The attention warm-up that runs while a model loads: the head layout it reads from each family's config, where
it starts (a GPU computing in fp16/bf16 only), that it never raises and never outlives the load; on a GPU, that it
runs torch's own attention (cuDNN where torch picks it) and leaves the process's SDPA settings as they were."""
import contextlib
import threading

import pytest
import torch

from fastbench import FastLanguageModel
from fastbench.fused import attention_warmup as warmup_module
from fastbench.fused.attention_warmup import AttentionLayout, attention_warmup, start_attention_warmup
from fastbench.presets import build_config, build_model

FAMILIES = ["llama-3-8b", "mistral-7b", "gemma-7b", "qwen2.5-7b", "qwen3-8b"]


@pytest.mark.parametrize("preset", [f"{name}-tiny" for name in FAMILIES])
def test_layout_is_the_models_attention(preset):
    """The layout read from the config is the one the model's attention computes with."""
    model = build_model(preset)
    attention = model.model.layers[0].self_attn
    q_width = attention.q_proj.out_features
    kv_width = attention.k_proj.out_features
    layout = AttentionLayout.of(model.config)
    assert layout.head_dim == attention.head_dim
    assert (layout.heads, layout.kv_heads) == (q_width // attention.head_dim, kv_width // attention.head_dim)


def test_layout_of_known_models():
    assert AttentionLayout.of(build_config("llama-3-8b")) == AttentionLayout(32, 8, 128)
    assert AttentionLayout.of(build_config("gemma-7b")) == AttentionLayout(16, 16, 256)


def test_no_layout_without_heads():
    class NoAttention:
        hidden_size = 64

    assert AttentionLayout.of(NoAttention()) is None


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32),
                                           ("cuda", torch.float32)])
def test_nothing_to_warm(device, dtype):
    """The CPU and fp32 have no cuDNN attention to compile (and without a GPU, nothing starts)."""
    assert start_attention_warmup(build_config("llama-3-8b-tiny"), dtype, device) is None


def test_a_failing_warmup_is_kept_not_raised(monkeypatch):
    def fail(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(warmup_module, "causal_attention_step", fail)
    warmup = warmup_module.AttentionWarmup(AttentionLayout(4, 2, 16), torch.bfloat16, torch.device("cuda", 0))
    warmup.join()
    assert not warmup.ran and isinstance(warmup.error, RuntimeError)


class _SlowWarmup:
    """Stands for an AttentionWarmup whose thread takes a while."""

    def __init__(self):
        self.done = threading.Event()
        self._thread = threading.Thread(target=lambda: self.done.wait(0.2) or self.done.set())
        self._thread.start()

    def join(self):
        self._thread.join()


@pytest.mark.parametrize("fails", [False, True])
def test_the_load_waits_for_the_warmup(monkeypatch, fails):
    """No warm-up thread outlives the load, also when the load raises."""
    started = []
    monkeypatch.setattr(warmup_module, "start_attention_warmup",
                        lambda *args: started.append(_SlowWarmup()) or started[-1])
    with pytest.raises(KeyError) if fails else contextlib.nullcontext():
        with attention_warmup(object(), torch.bfloat16, "cuda") as warmup:
            assert warmup is started[0]
            if fails:
                raise KeyError("the load failed")
    assert started[0].done.is_set()


def test_disabled_or_without_config_starts_nothing(monkeypatch):
    monkeypatch.setattr(warmup_module, "start_attention_warmup", pytest.fail)
    with attention_warmup(object(), torch.bfloat16, "cuda", enabled=False) as warmup:
        assert warmup is None
    with attention_warmup(None, torch.bfloat16, "cuda") as warmup:
        assert warmup is None


def test_from_pretrained_on_the_cpu_loads_without_a_warmup(monkeypatch):
    monkeypatch.setattr(warmup_module, "AttentionWarmup", pytest.fail)
    with pytest.warns(UserWarning, match="random weights"):
        model, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", device="cpu")
    assert model.config.model_type == "llama"


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama-3-8b", "gemma-7b"])
def test_warmup_on_the_gpu(preset):
    """The warm-up runs torch's own pick for causal attention (cuDNN on Hopper) without an error, and leaves the
    SDPA backend settings alone."""
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    warmup = start_attention_warmup(build_config(preset), torch.bfloat16, "cuda")
    warmup.join()
    assert warmup.error is None
    layout = AttentionLayout.of(build_config(preset))
    q = torch.randn(1, layout.heads, 64, layout.head_dim, dtype=torch.bfloat16, device="cuda")
    kv = torch.randn(1, layout.kv_heads, 64, layout.head_dim, dtype=torch.bfloat16, device="cuda")
    assert warmup.ran == warmup_module._uses_cudnn(q, kv, kv, layout.heads != layout.kv_heads)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert warmup.ran, "torch runs attention on cuDNN on Hopper: the warm-up should have compiled it"
    assert flags == (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())


@pytest.mark.gpu
def test_a_presets_weights_are_the_same_with_the_warmup_and_without(seed):
    """The warm-up draws its inputs from its own generator: the weights a preset draws while it runs (and the
    process's random stream after it) are those of a load without it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loads = [FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.bfloat16, device="cuda", seed=1,
                                                   warmup_attention=on)[0] for on in (False, True, True)]
    after = []
    for on in (False, True):
        torch.cuda.manual_seed(seed)
        with attention_warmup(build_config("llama-3-8b"), torch.bfloat16, "cuda", enabled=on):
            pass
        after.append(torch.randn(4, device="cuda"))
    for model in loads[1:]:
        for a, b in zip(loads[0].parameters(), model.parameters()):
            assert torch.equal(a, b)
    assert torch.equal(*after)
