"""On the GPU: what the caching allocator reserves in a training step of the fused path, against what the
step allocates (the offload mode's copies must not make it hold memory back from reuse)."""
import os
import pathlib
import pickle
import subprocess
import sys

import pytest

MiB = 1 << 20
TOOL = pathlib.Path(__file__).parent.parent.parent / "tools" / "memory_timeline.py"


@pytest.mark.gpu
@pytest.mark.slow
def test_offload_reserves_little_more_than_it_allocates(tmp_path):
    """8 layers of llama-3-8b's width, NF4, offloaded checkpointing, seq 4096: a step (after two) reserves at
    most a tenth more than its peak allocated, plus 256 MiB. Run in a fresh process (tools/memory_timeline.py),
    under fastbench's default allocator settings, which the summary it writes records."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    args = [sys.executable, str(TOOL), "--layers", "8", "--seq", "4096", "--batch", "1", "--warmup", "2",
            "--checkpointing", "offload", "--out", str(tmp_path)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "allocator settings: expandable_segments:True" in summary
    peaks = pickle.loads((tmp_path / "snapshot.pickle").read_bytes())["fastbench_peaks"]
    assert peaks["reserved"] <= 1.10 * peaks["allocated"] + 256 * MiB, summary


GiB = 1 << 30


def llama_3_8b_4bit():
    """llama-3-8b, NF4, random weights, on the GPU; the bf16 weights it was quantized from released."""
    import gc
    import warnings

    import torch

    from fastbench import FastLanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b", load_in_4bit=True, device="cuda", seed=0)
    gc.collect()
    torch.cuda.empty_cache()
    return base


def train(model, seq: int, steps: int = 2) -> int:
    """``steps`` AdamW steps on random batches of one row of ``seq`` tokens; returns the peak reserved bytes."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved()


def plan_of(model) -> str:
    return model.get_base_model().get_decoder()._fastbench.checkpointing.plan.describe()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("card_gib", [24, 16])
def test_auto_trains_llama_3_8b_4bit_on_a_smaller_card(card_gib):
    """This GPU made a 24 or a 16 GiB card (set_per_process_memory_fraction, after loading): "auto" plans within
    it and trains seq 2048 and 8192 without running out of memory."""
    import torch

    from fastbench import FastLanguageModel

    base = llama_3_8b_4bit()
    torch.cuda.set_per_process_memory_fraction(card_gib * GiB / torch.cuda.get_device_properties(0).total_memory)
    try:
        model = FastLanguageModel.get_peft_model(base, r=16, use_gradient_checkpointing="auto", fallback=False)
        for seq in (2048, 8192):
            reserved = train(model, seq)
            assert reserved <= card_gib * GiB, (seq, reserved / GiB, plan_of(model))
            print(f"{card_gib} GiB card, seq {seq}: {reserved / GiB:.2f} GiB reserved; {plan_of(model)}")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.gpu
@pytest.mark.slow
def test_a_budget_of_40_gib_bounds_the_steps_reserved_memory_at_seq_8192():
    from fastbench import FastLanguageModel

    model = FastLanguageModel.get_peft_model(llama_3_8b_4bit(), r=16, use_gradient_checkpointing=40, fallback=False)
    reserved = train(model, 8192, steps=3)
    print(f"budget 40 GiB, seq 8192: {reserved / GiB:.2f} GiB reserved; {plan_of(model)}")
    assert reserved < 40 * GiB, (reserved / GiB, plan_of(model))
