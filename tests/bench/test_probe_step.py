"""tools/probe_step.py, what the step probes share: the bits:ckpt arm words, and one training step of an arm
built on a tiny preset on the CPU."""
import pytest
import torch

from tool_scripts import load_tool


@pytest.fixture(scope="module")
def probe():
    return load_tool("probe_step")


@pytest.mark.parametrize("arm, parsed", [("4bit:offload", (True, "offload")), ("bf16:40", (False, "40")),
                                         ("4bit:auto", (True, "auto")), ("bf16:True", (False, True)),
                                         ("bf16:false", (False, False))])
def test_arm_words(probe, arm, parsed):
    assert probe.parse_arm(arm) == parsed


@pytest.mark.parametrize("arm, message", [
    ("offload", "write bits:ckpt"), ("8bit:offload", "write bits:ckpt"),
    ("4bit:sometimes", "ckpt 'sometimes': use true, false, offload, auto or a budget")])
def test_bad_arm_words_say_what_to_write(probe, arm, message):
    with pytest.raises(ValueError, match=message):
        probe.parse_arm(arm)


def test_a_step_of_an_arm_on_a_tiny_preset(probe, monkeypatch, seed):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, optimizer = probe.build("bf16:offload", "llama-3-8b-tiny", "cpu")
    batch = probe.random_batch(model, seq=16, batch=2)
    assert batch["input_ids"].shape == (2, 16) and int(batch["input_ids"].max()) < model.config.vocab_size
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = probe.train_step(model, optimizer, batch)
    assert torch.isfinite(loss)
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in before.items())
    assert all(trained[n].grad is None for n in before)
