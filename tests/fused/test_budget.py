"""The budget mode's plan (fastbench.fused.checkpointing.budget) from made-up byte counts, and the policy that
runs a plan: layers kept, recomputed from inputs on the GPU, recomputed from inputs on the host."""
import warnings

import pytest
import torch

from fastbench.fused.checkpointing import CheckpointConfig, LayerCheckpointing
from fastbench.fused.checkpointing import budget as budgeting
from fastbench.fused.checkpointing.budget import FRAGMENTATION, SLACK, Plan, StepBytes, plan
from two_part_layers import TwoPartLayers

GiB, MiB = 1 << 30, 1 << 20
# 8 layers: 10 GiB resident; a kept layer saves 1 GiB, a recomputed one keeps 128 MiB; the loss needs 768 MiB
STEP = StepBytes(layers=8, fixed=10 * GiB, keep=GiB, inputs=128 * MiB, loss=768 * MiB)


def reserved(allocated):
    return allocated * (1 + FRAGMENTATION) + SLACK


def test_the_estimate_counts_the_step():
    # every layer kept: fixed + 8 keep + one layer's gradients (1 GiB > the loss)
    assert STEP.allocated(8, 0) == 10 * GiB + 8 * GiB + GiB
    # 3 kept, 5 recomputed: their inputs, and a recomputed layer's activations again beside its gradients
    assert STEP.allocated(3, 0) == 10 * GiB + 3 * GiB + 5 * 128 * MiB + 2 * GiB
    # 6 offloaded: their inputs leave the GPU; two layers' copies on the bus and a layer fetched ahead come instead
    assert STEP.allocated(0, 6) == 10 * GiB + 2 * 128 * MiB + (2 * 128 * MiB + 128 * MiB) + 2 * GiB
    assert STEP.allocated(0, 1) == 10 * GiB + 7 * 128 * MiB + (128 * MiB + 128 * MiB) + 2 * GiB
    assert STEP.queue_limit == 2 * 128 * MiB  # what the plan's offloader may hold on the bus
    assert STEP.reserved(3, 0) == int(reserved(STEP.allocated(3, 0)))
    assert StepBytes(8, 10, 1, 1, margins=False).reserved(8, 0) == 10 + 8 + 1  # a CPU: tensors' bytes only


@pytest.mark.parametrize("keep", range(8))
def test_the_most_layers_kept_that_fit(keep):
    budget = STEP.reserved(keep, 0) + STEP.keep // 2  # not enough for one more kept layer
    got = plan(budget, STEP)
    assert got.reserved <= budget and got.fits and got.offload == 0
    if keep < 7:
        assert (got.keep, got.recompute) == (keep, 8 - keep)
        assert [got.kind(i) for i in range(8)] == ["keep"] * keep + ["recompute"] * (8 - keep)
    else:  # keeping every layer needs no layer recomputed in the backward: less than keeping 7
        assert STEP.reserved(8, 0) < STEP.reserved(7, 0) and (got.keep, got.recompute) == (8, 0)


def test_where_recomputing_every_layer_does_not_fit_the_first_layers_inputs_go_to_the_host():
    budget = STEP.reserved(0, 5)  # 5 layers offloaded fit; 4 do not
    assert STEP.reserved(0, 4) > budget >= STEP.reserved(0, 5) and STEP.reserved(0, 0) > budget
    got = plan(budget, STEP)
    assert (got.keep, got.offload, got.recompute, got.fits) == (0, 5, 3, True)
    assert [got.kind(i) for i in range(8)] == ["offload"] * 5 + ["recompute"] * 3


def test_nothing_fits_every_layer_offloaded_and_said():
    got = plan(10 * GiB, STEP)  # the resident bytes alone are over it
    assert (got.keep, got.offload, got.fits) == (0, 8, False) and got.reserved == STEP.reserved(0, 8)
    assert "over the budget" in got.describe()


def test_auto_plans_within_this_processs_share_of_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * GiB, 140 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0, raising=False)
    assert budgeting.auto_budget("cuda") == 80 * GiB * 0.95 - 512 * MiB  # free + what it holds, less the margin
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 16 / 140, raising=False)
    assert budgeting.auto_budget("cuda") == pytest.approx(16 * GiB * 0.95 - 512 * MiB)  # a 16 GiB card


def test_a_plan_keeps_recomputes_and_offloads_as_it_says(seed, monkeypatch):
    """Plan: layer 0 kept, 1 and 2 from inputs on the host, 3 from its inputs on the GPU; gradients as keeping
    everything; the MLPs run once where kept, twice where recomputed; only the offloaded layers' two parts go to
    the host, the first under slot 0 (a new forward)."""
    layers, x = TwoPartLayers(), torch.randn(5, 8, requires_grad=True)
    expected = layers.grads(LayerCheckpointing(CheckpointConfig.of(False)), x)
    monkeypatch.setattr(budgeting, "plan", lambda budget, step: Plan(1, 2, 1, 0))
    ckpt = LayerCheckpointing(CheckpointConfig.of(1.0), layers=4)
    for step in range(2):  # the first forward measures; the second runs the plan only
        layers.mlp_runs = [0] * 4
        got = layers.grads(ckpt, x)
        if step == 1:
            saved = []
            save = ckpt.offloader.save
            monkeypatch.setattr(ckpt.offloader, "save", lambda slot, t, group=None: (saved.append(slot), save(slot, t))[1])
            layers.mlp_runs = [0] * 4
            got = layers.grads(ckpt, x)
            assert saved == [0, 1, 2, 3]
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert layers.mlp_runs == [1, 2, 2, 2] and ckpt.plan == Plan(1, 2, 1, 0)
    assert not ckpt.offloader._saved and not ckpt.offloader._prefetched


def test_the_first_forward_measures_what_a_kept_layer_saves(seed, monkeypatch):
    """The bytes per token a kept layer saves, measured on a throwaway run of the first layer (its graph
    dropped), and a recomputed layer's two inputs; a budget of one byte: nothing fits, said once."""
    layers, x = TwoPartLayers(), torch.randn(5, 8, requires_grad=True)
    steps = []
    real = budgeting.plan
    monkeypatch.setattr(budgeting, "plan", lambda budget, step: (steps.append(step), real(budget, step))[1])
    ckpt = LayerCheckpointing(CheckpointConfig.of(1 / GiB), layers=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers.grads(ckpt, x)
        layers.grads(ckpt, torch.randn(3, 8, requires_grad=True))
    # attention saves its input (for h @ W) and tanh's output; the MLP its input (for h @ V) and both halves of
    # the product h V, views of one [tokens, 16] tensor counted once: 8 + 8 + 8 + 16 floats a token
    assert steps[0] == StepBytes(layers=4, fixed=0, keep=40 * 5 * 4, inputs=2 * 5 * 8 * 4, margins=False)
    assert steps[1].keep == 40 * 3 * 4 and steps[1].inputs == 2 * 3 * 8 * 4  # the next batch's tokens
    assert len([w for w in caught if "needs about" in str(w.message)]) == 1
    assert ckpt.plan.offload == 4 and not ckpt.plan.fits


def test_a_fused_model_counts_its_optimizer_state_workspace_and_vocab(seed):
    from fastbench import FastLanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, load_in_4bit=True,
                                                    device="cpu", seed=seed)
        model = FastLanguageModel.get_peft_model(base, r=4, use_gradient_checkpointing=2, fallback=False)
    counts = model.get_base_model().get_decoder()._fastbench.checkpointing.model
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    # the tiny llama: its largest single weight, gate's, up's or down's [192, 64] fp32 (gate and up, together
    # larger, are dequantized one at a time)
    assert counts == budgeting.ModelBytes(optimizer=4 * trainable, workspace=192 * 64 * 4, vocab=512,
                                          factors=counts.factors)
    assert counts.factors == _factor_bytes(base.config, r=4, nf4=True, itemsize=4)


def _factor_bytes(config, r: int, nf4: bool, itemsize: int) -> int:
    """A decoder's LoRA factors as the cache keeps them, counted from the config: per group of projections sharing
    an input (Q/K/V, O, gate/up, down), the stacked A's and the B's; for NF4 groups of more than one projection
    whose weights together fit the largest single weight (dequantized side by side), the block-diagonal B too."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    groups = [((h, q), (h, kv), (h, kv)), ((q, h),), ((h, i), (h, i)), ((i, h),)]  # (in, out) of each
    largest = max(inp * out for group in groups for inp, out in group)  # elements of the largest single weight
    total = 0
    for group in groups:
        rank = r * len(group)
        total += rank * group[0][0] + sum(out * r for _, out in group)
        if nf4 and len(group) > 1 and group[0][0] * sum(out for _, out in group) <= largest:
            total += sum(out for _, out in group) * rank
    return total * itemsize * config.num_hidden_layers


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_the_counted_lora_factors_are_what_the_cache_keeps(seed, load_in_4bit):
    """After two training steps the model's factor cache holds exactly the bytes the budget counts for it, and its
    dequantize workspace those it counts (4-bit)."""
    from fastbench import FastLanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cpu",
                                                    load_in_4bit=load_in_4bit, seed=seed)
        model = FastLanguageModel.get_peft_model(base, r=4, use_gradient_checkpointing=2, fallback=False)
    decoder = model.get_base_model().get_decoder()
    counts = decoder._fastbench.checkpointing.model
    assert counts.factors == _factor_bytes(base.config, r=4, nf4=load_in_4bit, itemsize=4)
    ids = torch.randint(0, base.config.vocab_size, (2, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    cache = decoder._fastbench.lora_cache
    assert cache.held_bytes() == counts.factors
    # the dequantize workspace, made at its counted size, never grew
    assert [buf.nbytes for buf, _ in cache._workspaces.values()] == ([counts.workspace] if load_in_4bit else [])
