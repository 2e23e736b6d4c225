"""Data parallelism on two gloo ranks (CPU, fp32) against one process training the whole batch: losses,
LoRA gradients and weights over optimizer steps with gradient accumulation, ragged rows and a rank left
without rows; checkpoints written by rank 0 alone and resumed by the same world only."""
import itertools
import os
import warnings

import pytest
import torch

from _worlds import TIMEOUT_S, run_world

PRESET = "llama-3.2-1b-tiny"
VOCAB, SEQ = 512, 12
# rows of each global micro-batch, per optimizer step: 5 rows split 3 + 2; the 1-row micro-batch leaves rank 1
# without rows (it runs a label-less row)
ROWS = ((5, 4), (3, 1), (5, 5))


def global_steps(seed, rows=ROWS):
    """Optimizer steps of global micro-batches of ragged rows (right padding, prompt tokens without labels),
    deterministic in ``seed``; then again, endlessly."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for step_rows in rows:
            step = []
            for n in step_rows:
                ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
                lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
                mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
                labels = ids.masked_fill(mask == 0, -100)
                labels[:, :2] = -100
                step.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
            yield step


def lora_model(seed, lora_seed, fused=False, targets=("q_proj", "v_proj", "down_proj")):
    """The tiny preset (base weights from ``seed``) with LoRA adapters initialised from ``lora_seed``: the fused
    path, or plain PEFT with non-zero B (so that every LoRA weight has a gradient from the first step)."""
    from peft import LoraConfig, get_peft_model

    from fastbench import FastLanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained(PRESET, dtype=torch.float32, device="cpu", seed=seed)
        if fused:
            model = FastLanguageModel.get_peft_model(base, r=4, lora_alpha=8, random_state=lora_seed,
                                                     use_gradient_checkpointing=True, fallback=False)
        else:
            torch.manual_seed(lora_seed)
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                    task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(lora_seed + len(name)))
    return model


def step_loss(model, micro_batches, world):
    """The trainer's accumulation of one optimizer step of collated micro-batches; returns its loss."""
    from fastbench.train.loop import accumulate
    from fastbench.train.packing import MicroBatch

    return accumulate(model, [MicroBatch(b, 0) for b in micro_batches], world)[0]


def train(model, steps, world, opt=None):
    """Optimizer steps over ``steps``; returns (losses, the last step's LoRA gradients, the LoRA weights after)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss(model, step, world))
        grads = [p.grad.clone() for p in params]
        opt.step()
    return losses, grads, [p.detach().clone() for p in params]


def _parity(rank, seed, out):
    from fastbench.distributed import ddp
    from fastbench.distributed.data import shard_steps
    from fastbench.distributed.world import World, process_group

    with process_group(timeout_s=TIMEOUT_S) as world:
        assert (world.rank, world.world_size, world.backend) == (rank, 2, "gloo")
        model = ddp.wrap(lora_model(seed, seed + 1 + rank), world)  # the ranks' LoRA inits differ: rank 0's is broadcast
        ignored = model.parameters_to_ignore
        assert ignored and all("lora_" not in n for n in ignored)
        assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in ignored
        mine = shard_steps(global_steps(seed), world.rank, world.world_size)
        result = train(model, itertools.islice(mine, len(ROWS)), world)
        resumed = _interrupted_and_resumed(seed, world, os.path.join(os.path.dirname(out), "run"))
        assert resumed == result[0][-1]
    if rank == 0:
        reference = train(lora_model(seed, seed + 1), itertools.islice(global_steps(seed), len(ROWS)), World())
        torch.save((result, reference), out)


def _interrupted_and_resumed(seed, world, output):
    """Trains all steps but the last, rank 0 saving a checkpoint; then a fresh model resumes from it with the same
    world (a world of another size is refused) and trains the last step; returns its loss."""
    from fastbench.distributed import ddp
    from fastbench.distributed.data import shard_steps
    from fastbench.distributed.world import World, WorldSizeMismatch, barrier, check_resume, world_record

    done = len(ROWS) - 1
    model = ddp.wrap(lora_model(seed, seed + 1 + world.rank), world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, itertools.islice(shard_steps(global_steps(seed), world.rank, world.world_size), done), world, opt)
    path = os.path.join(output, f"checkpoint-{done}", "state.pt")
    if world.is_main:
        os.makedirs(os.path.dirname(path))
        lora = {n: p.detach() for n, p in ddp.unwrap(model).named_parameters() if p.requires_grad}
        torch.save({"lora": lora, "optimizer": opt.state_dict(), "step": done, **world_record(world)}, path + ".tmp")
        os.replace(path + ".tmp", path)
    barrier(world)
    assert sorted(os.listdir(output)) == [f"checkpoint-{done}"] and os.listdir(os.path.dirname(path)) == ["state.pt"]
    saved = torch.load(path)
    with pytest.raises(WorldSizeMismatch, match="written by a run of 2 processes and this run has 1: resume it with "
                                                "--nproc 2"):
        check_resume(saved, World())
    check_resume(saved, world)
    model = lora_model(seed, seed + 7)
    model.load_state_dict(saved["lora"], strict=False)
    model = ddp.wrap(model, world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.load_state_dict(saved["optimizer"])
    mine = shard_steps(global_steps(seed), world.rank, world.world_size, start=saved["step"])
    return train(model, itertools.islice(mine, 1), world, opt)[0][0]


def assert_same_training(result, reference):
    (losses, grads, weights), (ref_losses, ref_grads, ref_weights) = result, reference
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # AdamW divides by sqrt(v): where a gradient is near zero, summation-order differences of ~1e-7 in it move
    # that weight's update by a fraction of lr (1e-2), so weights get an absolute tolerance of lr / 100 (the
    # gradients above, linear in the data, keep the tight one)
    for w, r in zip(weights, ref_weights):
        torch.testing.assert_close(w, r, rtol=1e-4, atol=1e-4)


def test_two_ranks_equal_one_process_with_the_whole_batch(seed, tmp_path):
    """... and a run interrupted before its last step, resumed by the same world from rank 0's checkpoint, ends
    with the same loss."""
    out = tmp_path / "results.pt"
    run_world(_parity, 2, seed, str(out))
    assert_same_training(*torch.load(out))


def _fused(rank, seed, out):
    from fastbench.distributed import ddp
    from fastbench.distributed.data import shard_steps
    from fastbench.distributed.world import process_group

    with process_group(timeout_s=TIMEOUT_S) as world:
        model = ddp.wrap(lora_model(seed, seed + 1 + rank, fused=True), world)
        step = next(shard_steps(global_steps(seed, rows=((3, 2),)), world.rank, world.world_size))
        result = train(model, [step], world)
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow
def test_fused_model_with_checkpointing_under_ddp(seed, tmp_path):
    """The fused path's autograd Functions and recomputed layers under DDP (two micro-batches, the first under
    no_sync): the same step as one process of plain PEFT with the same adapters on the whole batch."""
    from fastbench.distributed.world import World
    from fastbench.presets import DEFAULT_TARGETS

    out = tmp_path / "fused.pt"
    run_world(_fused, 2, seed, str(out))
    losses, grads, _ = torch.load(out)
    fused = dict(lora_model(seed, seed + 1, fused=True).named_parameters())  # rank 0's adapters, broadcast to all
    reference = lora_model(seed, seed + 1, targets=DEFAULT_TARGETS)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.requires_grad:
                p.copy_(fused[name])
    loss = step_loss(reference, next(global_steps(seed, rows=((3, 2),))), World())
    assert abs(losses[0] - loss) < 1e-5 * abs(loss)
    ref_grads = [p.grad for p in reference.parameters() if p.requires_grad]
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)
