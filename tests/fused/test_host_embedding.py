"""The offload mode's input embedding in pinned host memory: which tables move, and what stays as it was."""
import warnings

import pytest
import torch

from fastbench.fused.host_embedding import why_not_offloadable
from fastbench.model import FastLanguageModel


def fused(preset, checkpointing="offload", seed=0, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained(preset, dtype=torch.float32, device="cpu", seed=seed)
        before = base.get_input_embeddings().weight.detach().clone()
        model = FastLanguageModel.get_peft_model(base, r=4, use_gradient_checkpointing=checkpointing,
                                                 random_state=seed, fallback=False, **kwargs)
    return model, before


def test_an_untied_table_becomes_a_host_buffer_with_the_same_rows(seed):
    model, before = fused("llama-3-8b-tiny", seed=seed)
    emb = model.get_input_embeddings()
    assert not isinstance(emb.weight, torch.nn.Parameter) and emb.weight.device.type == "cpu"
    assert torch.equal(emb.weight, before)
    assert all("embed_tokens" not in name for name, _ in model.named_parameters())
    assert torch.equal(model.state_dict()["base_model.model.model.embed_tokens.weight"], before)
    assert any("pinned host memory" in line for line in model.get_base_model().fastbench_patches)
    ids = torch.randint(0, before.shape[0], (2, 7))
    assert torch.equal(emb(ids), before[ids])


@pytest.mark.parametrize("checkpointing", [True, False, 1.0])
def test_other_modes_leave_the_table_alone(seed, checkpointing):
    model, _ = fused("llama-3-8b-tiny", checkpointing, seed=seed)
    assert isinstance(model.get_input_embeddings().weight, torch.nn.Parameter)


def test_a_tied_table_stays_a_parameter(seed):
    """gemma ties its LM head to the input embedding: the head reads the whole table every step."""
    model, _ = fused("gemma-7b-tiny", seed=seed)
    assert isinstance(model.get_input_embeddings().weight, torch.nn.Parameter)


def test_why_a_table_stays(seed):
    model, _ = fused("llama-3-8b-tiny", checkpointing=True, seed=seed)
    emb = model.get_input_embeddings()
    assert why_not_offloadable(model) is None
    emb.max_norm = 1.0
    assert "max_norm" in why_not_offloadable(model)
    emb.max_norm = None
    emb.weight.requires_grad_(True)
    assert "trained" in why_not_offloadable(model)
    emb.weight.requires_grad_(False)
    model.get_output_embeddings().weight = emb.weight
    assert "tied" in why_not_offloadable(model)


def test_the_setting_keeps_it_on_the_device_or_says_what_to_give(seed):
    model, _ = fused("llama-3-8b-tiny", seed=seed, offload={"embedding": False})
    assert isinstance(model.get_input_embeddings().weight, torch.nn.Parameter)
    assert not any("pinned host memory" in line for line in model.get_base_model().fastbench_patches)
    base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cpu", seed=seed)
    for bad, says in (({"embedding": "yes"}, "embedding='yes': give 1"),
                      ({"embedding": True, "save_every": "two"}, "save_every='two': give a whole number"),
                      ({"embeding": False}, "unknown option.*embeding; valid: .*embedding")):
        with pytest.raises(ValueError, match=says):
            FastLanguageModel.get_peft_model(base, r=4, use_gradient_checkpointing="offload", offload=bad)
        assert not any("lora" in name for name, _ in base.named_modules())  # raised before touching it
    with pytest.raises(ValueError, match="offload' only; the mode here is 'recompute'"):
        FastLanguageModel.get_peft_model(base, r=4, use_gradient_checkpointing=True, offload={"embedding": False})
    assert not any("lora" in name for name, _ in base.named_modules())
