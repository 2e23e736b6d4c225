"""FSDP2 on two gloo ranks (CPU, fp32) against one process, and what it refuses to shard."""
import itertools
import warnings

import pytest
import torch

from _worlds import TIMEOUT_S, run_world
from test_ddp import PRESET, assert_same_training, global_steps, lora_model, step_loss

STEPS = 2


def train_sharded(model, steps, world):
    from torch.distributed.tensor import DTensor

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss(model, step, world))
        grads = [full(p.grad).clone() for p in params]
        opt.step()
    return losses, grads, [full(p.detach()).clone() for p in params]


def _sharded(rank, seed, out):
    from torch.distributed.tensor import DTensor

    from fastbench.distributed.data import shard_steps
    from fastbench.distributed.fsdp import shard
    from fastbench.distributed.world import World, process_group
    from test_ddp import train

    with process_group(timeout_s=TIMEOUT_S) as world:
        model = shard(lora_model(seed, seed + 1), world)
        weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert isinstance(weight, DTensor) and weight.to_local().shape[0] == weight.shape[0] // 2
        mine = shard_steps(global_steps(seed), world.rank, world.world_size)
        result = train_sharded(model, itertools.islice(mine, STEPS), world)
    if rank == 0:
        reference = train(lora_model(seed, seed + 1), itertools.islice(global_steps(seed), STEPS), World())
        torch.save((result, reference), out)


def test_fsdp2_on_two_ranks_equals_one_process(seed, tmp_path):
    out = tmp_path / "results.pt"
    run_world(_sharded, 2, seed, str(out))
    assert_same_training(*torch.load(out))


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_fused_and_nf4_models_are_refused(seed, load_in_4bit):
    from fastbench import FastLanguageModel
    from fastbench.distributed.fsdp import ShardingRefused, shard
    from fastbench.distributed.world import World

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained(PRESET, dtype=torch.float32, device="cpu", seed=seed,
                                                    load_in_4bit=load_in_4bit)
        model = FastLanguageModel.get_peft_model(base, r=4, random_state=seed, fallback=False)
    with pytest.raises(ShardingRefused, match="fused path does not call its decoder layers' forward"):
        shard(model, World())
    if load_in_4bit:
        model.get_base_model().get_decoder()._fastbench = None  # as plain PEFT over the same NF4 base
        with pytest.raises(ShardingRefused, match="NF4 base"):
            shard(model, World())
