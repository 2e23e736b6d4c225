"""On the GPU: every checkpointing mode (offload's side stream and pinned buffers included) gives the
gradients of keeping everything, over several steps, in bf16 and on an NF4 base; also for a forward of more
tokens than one MLP chunk (the MLP then runs a chunk of tokens at a time)."""
import pytest
import torch

from fastbench import FastLanguageModel


def lora_grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 64), (1, 5000)])
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_checkpointing_modes_agree_on_gpu(seed, load_in_4bit, shape):
    results = {}
    for mode in (False, True, "offload", 1e-3, "auto"):
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.bfloat16, device="cuda",
                                                    load_in_4bit=load_in_4bit, seed=1)
        model = FastLanguageModel.get_peft_model(base, r=8, random_state=2, use_gradient_checkpointing=mode,
                                                 fallback=False)
        g = torch.Generator(device="cuda").manual_seed(seed)
        grads = []
        for _ in range(3):  # buffers are reused from the second step on
            ids = torch.randint(0, 512, shape, device="cuda", generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
            grads.append(lora_grads(model))
        results[mode] = torch.stack(grads)
    for mode, grads in results.items():
        assert torch.isfinite(grads).all()
        assert ((grads - results[False]).norm() / results[False].norm()).item() < 1e-2, mode


@pytest.mark.gpu
def test_left_padding_on_gpu_matches_peft(seed):
    """Rows with no key to attend (left padding) through the GPU's SDPA kernels: finite, and as transformers
    computes them (bf16 tolerance)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from fastbench.model import DEFAULT_TARGETS

    base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.bfloat16, device="cuda", seed=1)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGETS)))
    fused = FastLanguageModel.get_peft_model(base, r=8, lora_alpha=16, fallback=False)
    fused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    labels = ids.masked_fill(mask == 0, -100)
    losses = [m(input_ids=ids, attention_mask=mask, labels=labels).loss for m in (fused, ref)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert abs(losses[0].item() - losses[1].item()) / losses[1].item() < 1e-2
    losses[0].backward()
    assert torch.isfinite(lora_grads(fused)).all()
