"""fastbench's default allocator settings: expandable segments where the user chose none, never over theirs."""
import pytest
import torch

from fastbench import memory


@pytest.fixture
def cuda(monkeypatch):
    """A machine with CUDA, not initialised in this process; records the allocator settings set."""
    applied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", applied.append, raising=False)
    return applied


def test_expandable_segments_where_the_user_chose_none(cuda):
    environ = {"PATH": "/bin"}
    assert memory.use_expandable_segments(environ)
    assert environ == {"PATH": "/bin", "PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    assert cuda == ["expandable_segments:True"]


@pytest.mark.parametrize("name", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
@pytest.mark.parametrize("value", ["expandable_segments:False", "max_split_size_mb:128"])
def test_a_users_setting_is_never_overridden(cuda, name, value):
    environ = {name: value}
    assert not memory.use_expandable_segments(environ)
    assert environ == {name: value} and cuda == []


def test_nothing_once_cuda_is_initialised_or_without_cuda(cuda, monkeypatch):
    environ = {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not memory.use_expandable_segments(environ)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not memory.use_expandable_segments(environ)
    assert environ == {} and cuda == []


@pytest.mark.parametrize("device, applies", [("cuda", True), ("cuda:0", True), ("cpu", False)])
def test_from_pretrained_sets_it_before_loading_onto_a_gpu(monkeypatch, device, applies):
    from fastbench import FastLanguageModel
    from fastbench import model as model_module
    from fastbench import presets

    calls = []

    class Loaded(Exception):
        pass

    def build_model(*args, **kwargs):
        calls.append("build")
        raise Loaded

    monkeypatch.setattr(model_module, "use_expandable_segments", lambda: calls.append("allocator"))
    monkeypatch.setattr(model_module, "default_dtype", lambda device: (calls.append("dtype"), torch.float32)[1])
    monkeypatch.setattr(presets, "build_model", build_model)
    with pytest.raises(Loaded):
        FastLanguageModel.from_pretrained("llama-3-8b-tiny", device=device)
    assert calls == (["allocator"] if applies else []) + ["dtype", "build"]
