"""On the GPU: every checkpointing mode (offload's side stream and pinned buffers included) gives the
gradients of keeping everything, over several steps, in bf16 and on an NF4 base."""
import pytest
import torch

from fastbench import FastLanguageModel


def lora_grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.gpu
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_checkpointing_modes_agree_on_gpu(seed, load_in_4bit):
    results = {}
    for mode in (False, True, "offload", 1e-3, "auto"):
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.bfloat16, device="cuda",
                                                    load_in_4bit=load_in_4bit, seed=1)
        model = FastLanguageModel.get_peft_model(base, r=8, random_state=2, use_gradient_checkpointing=mode,
                                                 fallback=False)
        g = torch.Generator(device="cuda").manual_seed(seed)
        grads = []
        for _ in range(3):  # buffers are reused from the second step on
            ids = torch.randint(0, 512, (2, 64), device="cuda", generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
            grads.append(lora_grads(model))
        results[mode] = torch.stack(grads)
    for mode, grads in results.items():
        assert torch.isfinite(grads).all()
        assert ((grads - results[False]).norm() / results[False].norm()).item() < 1e-2, mode
