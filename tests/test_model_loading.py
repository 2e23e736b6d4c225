"""Loading a user's checkpoint never runs its code: safetensors by default, pickle-based weights only with
allow_pickle=True (and then only through torch.load(weights_only=True)), trust_remote_code off unless
passed. Tiny checkpoints saved both ways in tmp dirs; nothing is downloaded."""
import json
import os
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fastbench import FastLanguageModel
from fastbench import model as model_module
from fastbench.model import UnsafeCheckpoint

PRESET = "llama-3-8b-tiny"


@pytest.fixture(scope="module")
def safe(tmp_path_factory):
    """A tiny Llama checkpoint (safetensors, with a tokenizer)."""
    from fastbench.bench.checkpoint_cache import save_checkpoint

    return save_checkpoint(PRESET, str(tmp_path_factory.mktemp("safe") / "llama-tiny"), seed=5)


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture
def pickled(safe, tmp_path):
    """The same checkpoint with its weights in pytorch_model.bin (a pickle) instead of safetensors."""
    path = tmp_path / "pickled"
    shutil.copytree(safe, path)
    torch.save(weights(safe), path / "pytorch_model.bin")
    os.remove(path / "model.safetensors")
    return str(path)


class Planted:
    """A pickle payload: unpickling it creates the file ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def load(path, **kwargs):
    return FastLanguageModel.from_pretrained(path, device="cpu", dtype=torch.float32, **kwargs)


def same_weights(model, path):
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in weights(path).items())


def test_safetensors_load_without_warning(safe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, tok = load(safe)
    assert tok is not None and same_weights(model, safe)


def test_pickle_weights_are_refused_saying_what_to_pass(pickled):
    with pytest.raises(UnsafeCheckpoint) as e:
        load(pickled)
    assert str(e.value) == (f"{pickled} holds pickle-based weights only (pytorch_model.bin), which can run code when "
                            "loaded; fastbench loads safetensors: convert them, or pass allow_pickle=True "
                            "(`--allow-pickle` on the CLI) to load them anyway, only for a checkpoint you trust")
    assert isinstance(e.value, OSError) and isinstance(e.value, ValueError)


def test_pickle_weights_load_with_allow_pickle_and_a_warning(pickled, safe):
    with pytest.warns(UserWarning, match=r"loading pickle-based weights of .* because allow_pickle=True"):
        model, _ = load(pickled, allow_pickle=True)
    assert same_weights(model, safe)


def test_allow_pickle_still_never_unpickles_code(pickled, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": Planted(str(marker))}, os.path.join(pickled, "pytorch_model.bin"))
    with pytest.raises(Exception), pytest.warns(UserWarning, match="allow_pickle=True"):
        load(pickled, allow_pickle=True)
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_beside_them(safe, tmp_path):
    path = tmp_path / "both"
    shutil.copytree(safe, path)
    marker = tmp_path / "pwned"
    torch.save({"x": Planted(str(marker))}, path / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = load(str(path))
    assert same_weights(model, safe) and not marker.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"weights_only": False}, "weights_only=False would let a pickle-based checkpoint run code; fastbench loads "
                              "pickle-based weights only through weights_only=True (with allow_pickle=True)"),
    ({"use_safetensors": False}, "use_safetensors=False asks for pickle-based weights, which can run code when "
                                 "loaded; pass allow_pickle=True (`--allow-pickle` on the CLI) to load them anyway, "
                                 "only for a checkpoint you trust"),
])
def test_options_that_would_unpickle_are_refused(safe, kwargs, message):
    with pytest.raises(UnsafeCheckpoint) as e:
        load(safe, **kwargs)
    assert str(e.value) == message


def test_a_hub_checkpoint_without_safetensors_is_refused(monkeypatch):
    seen = {}

    def hub_without_safetensors(name, *args, **kwargs):
        seen.update(kwargs)
        raise OSError(f"{name} does not appear to have a file named model.safetensors or "
                      "model.safetensors.index.json and thus cannot be loaded with `safetensors`. Please do not "
                      "set `use_safetensors=True`.")

    monkeypatch.setattr(model_module, "_load_checkpoint", hub_without_safetensors)
    with pytest.raises(UnsafeCheckpoint) as e:
        load("someone/some-model")
    assert str(e.value) == ("someone/some-model has no safetensors weights; its pickle-based weights (.bin, .pt) can "
                            "run code when loaded: pass allow_pickle=True (`--allow-pickle` on the CLI) to load them "
                            "anyway, only for a checkpoint you trust")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    with pytest.raises(OSError, match="does not appear"):
        load("someone/some-model", allow_pickle=True)
    assert seen["use_safetensors"] is None and seen["weights_only"] is True


def test_remote_code_does_not_run_unless_trusted(safe, tmp_path):
    """A checkpoint whose config maps the model to its own module: that module is never imported."""
    path = tmp_path / "custom"
    shutil.copytree(safe, path)
    marker = tmp_path / "ran"
    (path / "modeling_planted.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                              "from transformers import LlamaForCausalLM\n"
                                              # a class of its own: transformers registers the class it loads
                                              # for auto-class saving, which must not touch Llama's own
                                              "class PlantedForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_planted.PlantedForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    model, _ = load(str(path))
    assert not marker.exists() and same_weights(model, safe)
    with pytest.warns(UserWarning, match="trust_remote_code=True"):
        load(str(path), trust_remote_code=True)
    assert marker.exists()  # the switch works: the module ran because it was asked to


def test_the_cli_refuses_in_one_line(pickled, tmp_path):
    from fastbench.train.cli import train_command

    result = CliRunner().invoke(train_command, [pickled, "--data", "random", "--steps", "1", "--output",
                                                str(tmp_path / "out")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "pickle-based weights only (pytorch_model.bin)" in result.output and "--allow-pickle" in result.output
