"""The fused path inside the harness arms, HF Trainer and TRL's SFTTrainer (tiny presets, CPU, fp32)."""
import functools
import os
import warnings

import pytest
import torch

from fastbench import FastLanguageModel

VOCAB = 512


def first_loss(arm, cfg):
    from fastbench.bench.arms import get_arm

    model = get_arm(arm).build(cfg)
    torch.manual_seed(cfg.seed)
    ids = torch.randint(0, VOCAB, (cfg.batch, cfg.seq_len))
    return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("arm, baseline", [("fused:ckpt=offload", "peft"), ("fused-4bit", "qlora"),
                                           ("fused:ckpt=offload:save_every=1", "peft"),
                                           ("fused:ckpt=offload:copy_queue_gib=0.25", "peft")])
def test_arm_starts_where_its_baseline_starts(seed, arm, baseline, tmp_path, monkeypatch):
    from fastbench.bench.arms import RunConfig, parse_label

    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path))
    name, options = parse_label(arm)
    cfg = RunConfig(model="qwen2.5-7b-tiny", seq_len=12, batch=2, lora_r=4, lora_alpha=8, seed=seed % 1000,
                    dtype="float32", device="cpu", arm_options=options)
    fused, ref = first_loss(name, cfg), first_loss(baseline, RunConfig(**{**cfg.to_dict(), "arm_options": {},
                                                                        "targets": cfg.targets}))
    assert abs(fused - ref) / ref < 1e-5


@pytest.mark.parametrize("options, message", [({"ckpt": "40", "save_every": "3"}, "ckpt=offload only"),
                                               ({"ckpt": "offload", "save_every": "x"},
                                                "write save_every=<whole number>"),
                                               ({"ckpt": "offload", "every": "3"}, "has no option 'every'; valid: ckpt="),
                                               ({"ckpt": "true", "embedding": "1"}, "embedding applies to ckpt=offload"),
                                               ({"ckpt": "offload", "embedding": "no"}, "write embedding=0|1"),
                                               ({"ckpt": "offload", "copy_queue_gib": "0"},
                                                "write copy_queue_gib=<GiB>")])
def test_arm_offload_options_are_checked(options, message, tmp_path, monkeypatch):
    from fastbench.bench.arms import RunConfig, get_arm

    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path))
    cfg = RunConfig(model="llama-3-8b-tiny", seq_len=12, batch=1, lora_r=4, dtype="float32", device="cpu",
                    arm_options=options)
    with pytest.raises(ValueError, match=message):
        get_arm("fused").build(cfg)


def test_arm_options_become_the_models_offload_config(tmp_path, monkeypatch):
    from fastbench.bench.arms import RunConfig, get_arm, parse_label
    from fastbench.fused.checkpointing import OffloadConfig

    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path))
    _, options = parse_label("fused:ckpt=offload:save_every=3:embedding=0")
    cfg = RunConfig(model="llama-3-8b-tiny", seq_len=12, batch=1, lora_r=4, dtype="float32", device="cpu",
                    arm_options=options)
    model = get_arm("fused").build(cfg)
    state = model.get_base_model().get_decoder()._fastbench
    assert state.config.offload == OffloadConfig(save_every=3, embedding=False)
    assert isinstance(model.get_input_embeddings().weight, torch.nn.Parameter)  # embedding=0: left on the device
    cfg = RunConfig(**{**cfg.to_dict(), "arm_options": {"ckpt": "offload"}, "targets": cfg.targets})
    assert get_arm("fused").build(cfg).get_base_model().get_decoder()._fastbench.config.offload == OffloadConfig()


def test_worker_records_the_copy_queue_waits_of_an_offload_arm(tmp_path, monkeypatch):
    """The harness's worker, in this process: an offload arm records how many copies to the host per step its
    compute stream had to wait for (0 on a CPU, where the copies are synchronous)."""
    from fastbench.bench import worker
    from fastbench.bench.arms import RunConfig

    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path))
    cfg = RunConfig(model="llama-3-8b-tiny", seq_len=12, batch=1, lora_r=4, dtype="float32", device="cpu", steps=2,
                    warmup=1).to_dict()
    record = worker.run({"arm": "fused:ckpt=offload:save_every=1", "config": cfg, "repeat": 0})
    assert record["status"] == "ok", record["error"]
    assert record["offload_queue_waits"] == 0.0 and len(record["step_s"]) == 2


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def texts(n, rng):
    return [" ".join(f"w{int(rng.integers(0, 40))}" for _ in range(int(rng.integers(4, 10)))) for _ in range(n)]


def fused_model(seed, checkpointing=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cpu", seed=seed)
    return FastLanguageModel.get_peft_model(base, r=4, lora_alpha=8, random_state=seed, fallback=False,
                                            use_gradient_checkpointing=checkpointing)


def test_hf_trainer_passes_the_accumulated_label_count(seed, tmp_path):
    import numpy as np
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok, rng = tiny_tokenizer(), np.random.default_rng(seed)
    data = Dataset.from_dict({"text": texts(8, rng)}).map(lambda b: tok(b["text"]), batched=True,
                                                          remove_columns=["text"])
    model = fused_model(seed)
    seen = []
    inner = model.get_base_model()
    forward = inner.forward

    @functools.wraps(forward)  # Trainer reads the forward's signature
    def spy(**kwargs):
        seen.append(kwargs.get("num_items_in_batch"))
        return forward(**kwargs)

    inner.forward = spy
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1)
    result = Trainer(model=model, args=args, train_dataset=data,
                     data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
    assert np.isfinite(result.training_loss)
    assert len(seen) == 4 and all(n is not None for n in seen)


@pytest.mark.parametrize("checkpointing", [True, "offload"])  # offload: the input embedding is a host buffer
def test_trl_sft_trainer_runs_fused_and_saves_an_adapter(seed, tmp_path, monkeypatch, checkpointing):
    import numpy as np
    from datasets import Dataset

    import fastbench.fused.causal_lm as causal_lm
    trl = pytest.importorskip("trl")

    calls, parts = [], causal_lm.layer_parts
    monkeypatch.setattr(causal_lm, "layer_parts", lambda *a, **k: (calls.append(1), parts(*a, **k))[1])

    tok, rng = tiny_tokenizer(), np.random.default_rng(seed)
    data = Dataset.from_dict({"text": texts(8, rng)})
    model = fused_model(seed, checkpointing)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                         report_to=[], use_cpu=True, save_strategy="no", max_length=16, logging_steps=1)
    result = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train()
    assert np.isfinite(result.training_loss)
    assert calls  # TRL calls the backbone itself (its own fused LM head): the backbone runs fused
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_autotune_off_option_serves_heuristics(tmp_path, monkeypatch):
    from fastbench.autotune import lookup
    from fastbench.bench.arms import RunConfig, get_arm

    monkeypatch.setenv("FASTBENCH_CHECKPOINT_CACHE", str(tmp_path))
    monkeypatch.delenv(lookup.OFF_ENV, raising=False)
    cfg = RunConfig(model="llama-3-8b-tiny", seq_len=8, batch=1, dtype="float32", device="cpu",
                    arm_options={"autotune": "off"})
    try:
        get_arm("fused").build(cfg)
        assert lookup.default().cache_off
        with pytest.raises(ValueError, match=r"write autotune=on\|off"):
            get_arm("fused").build(RunConfig(**{**cfg.to_dict(), "arm_options": {"autotune": "maybe"}}))
    finally:  # build() set the switch in os.environ itself (its process runs one arm): undo it here
        os.environ.pop(lookup.OFF_ENV, None)
        lookup.reset()


def test_bad_checkpointing_setting_leaves_the_model_untouched():
    base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastLanguageModel.get_peft_model(base, use_gradient_checkpointing="sometimes")
    assert not any("lora" in name for name, _ in base.named_modules())


@pytest.mark.parametrize("text, setting", [("true", True), ("FALSE", False), (True, True), ("offload", "offload"),
                                           ("auto", "auto"), ("20", "20"), ("0.5", "0.5")])
def test_a_setting_written_as_text(text, setting):
    """What the command line and the tools take for use_gradient_checkpointing: true/false in any case as the
    booleans, the rest as written; anything parse_setting refuses names the choices."""
    from fastbench.fused.checkpointing import setting_from_text

    assert setting_from_text(text) == setting and type(setting_from_text(text)) is type(setting)
    with pytest.raises(ValueError, match="'sometimes': use true, false, offload, auto or a budget in GiB"):
        setting_from_text("sometimes")


def test_unsloth_names_work(seed):
    """What Unsloth's users write (its notebooks' get_peft_model call): use_gradient_checkpointing="unsloth"
    is the offloaded checkpointing, max_seq_length and loftq_config=None are taken, and
    for_inference/for_training switch the model's mode."""
    from fastbench.fused.checkpointing import parse_setting

    assert parse_setting("unsloth") == parse_setting("offload") == ("offload", None)
    base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", max_seq_length=2048, dtype=None, device="cpu")
    model = FastLanguageModel.get_peft_model(
        base, r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=3407,
        use_rslora=False, loftq_config=None, max_seq_length=4096, fallback=False)
    assert "offloaded" in " ".join(model.get_base_model().fastbench_patches)
    assert model.get_base_model().max_seq_length == 4096
    assert FastLanguageModel.for_inference(model) is model and not model.training
    assert FastLanguageModel.for_training(model) is model and model.training


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}])
def test_hf_gradient_checkpointing_enable_changes_nothing(seed, monkeypatch, kwargs):
    """TrainingArguments(gradient_checkpointing=True) makes Trainer call gradient_checkpointing_enable on the
    model: the layers still run fused, under the checkpointing get_peft_model chose, with the same gradients."""
    import fastbench.fused.causal_lm as causal_lm

    calls, parts = [], causal_lm.layer_parts
    monkeypatch.setattr(causal_lm, "layer_parts", lambda *a, **k: (calls.append(1), parts(*a, **k))[1])
    ids = torch.randint(0, VOCAB, (2, 12))

    def loss_and_grads(model):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    loss, grads = loss_and_grads(fused_model(seed))
    model = fused_model(seed)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    calls.clear()
    loss_hf, grads_hf = loss_and_grads(model)
    assert calls and torch.equal(loss, loss_hf) and torch.equal(grads, grads_hf)
