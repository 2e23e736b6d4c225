"""The offload mode's pinned host memory estimate against what the offloader allocates, and the up-front check."""
import warnings

import pytest
import torch

from fastbench.fused.checkpointing.config import OffloadConfig
from fastbench.distributed.host_memory import (GiB, HostMemoryShort, check_host_memory, host_share_bytes,
                                               offload_host_bytes)


def offloader_bytes(model):
    """The host bytes the offload mode holds after a step: its reusable buffers and the embedding table."""
    base = model.get_base_model()
    offloader = base.get_decoder()._fastbench.checkpointing.offloader
    table = base.get_input_embeddings().weight
    return sum(b.nbytes for b in offloader._free) + (0 if isinstance(table, torch.nn.Parameter) else table.nbytes)


@pytest.mark.parametrize("save_every", ["0", "1", "2"])  # 2: layer 0 keeps its MLP's activations, layer 1 its two inputs
def test_estimate_bounds_what_the_offloader_holds(seed, save_every):
    from fastbench import FastLanguageModel
    from fastbench.presets import build_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, _ = FastLanguageModel.from_pretrained("llama-3-8b-tiny", dtype=torch.float32, device="cpu", seed=seed)
        model = FastLanguageModel.get_peft_model(base, r=4, random_state=seed, use_gradient_checkpointing="offload",
                                                 offload={"save_every": int(save_every)}, fallback=False)
    B, T = 2, 24
    ids = torch.randint(0, 512, (B, T))
    model(input_ids=ids, labels=ids).loss.backward()
    held = offloader_bytes(model)
    estimate = offload_host_bytes(build_config("llama-3-8b-tiny"), B * T, dtype_bytes=4,
                                  offload=OffloadConfig(save_every=int(save_every)))
    assert held <= estimate <= 1.25 * held, (held, estimate)


def test_layouts():
    from fastbench.presets import build_config

    config = build_config("llama-3-8b")  # 32 layers, h 4096, i 14336, untied 128256 x 4096 table
    t, b = 2 * 2048, 2
    table = 128256 * 4096 * b
    every2 = offload_host_bytes(config, t, b, OffloadConfig(save_every=2))
    assert every2 == int(9 / 8 * t * b * (16 * (2 * 4096 + 2 * 14336) + 16 * 2 * 4096)) + table
    assert offload_host_bytes(config, t, b, OffloadConfig(save_every=0, embedding=False)) == int(9 / 8 * t * b * 32 * 2 * 4096)
    long = 8192  # past save_max_tokens (4096): every MLP recomputed, only the inputs go to the host
    assert offload_host_bytes(config, long, b, OffloadConfig(save_every=2)) == int(9 / 8 * long * b * 32 * 2 * 4096) + table


def test_the_least_layout_and_each_processs_share():
    from fastbench.presets import build_config

    config = build_config("llama-3-8b")
    t, b, table = 2 * 2048, 2, 128256 * 4096 * 2
    assert offload_host_bytes(config, t, b, whole_layers=True) == int(9 / 8 * t * b * 32 * 4096) + table
    assert host_share_bytes(config, t, 2, b, available=100 * GiB) == 50 * GiB - 4 * GiB - table
    with pytest.raises(HostMemoryShort, match=r"each of 8 processes pins at least 2.1 GiB of host memory \(one layer "
                                              r"input a layer, each layer recomputed whole\)"):
        host_share_bytes(config, t, 8, b, available=40 * GiB)


def test_the_check_refuses_with_the_numbers():
    check_host_memory(6 * GiB, 2, available=40 * GiB)
    with pytest.raises(HostMemoryShort, match=r"each of 4 processes pins about 6.0 GiB .* 40.0 GiB in all, and this "
                                              r"host has 30.0 GiB available"):
        check_host_memory(6 * GiB, 4, available=30 * GiB)


def _cgroup_tree(tmp_path, files: dict, self_cgroup: str):
    """A fake /sys/fs/cgroup under tmp_path/"fs" ({relative path: text}) and /proc/self/cgroup's text."""
    for rel, text in files.items():
        path = tmp_path / "fs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "self").write_text(self_cgroup)
    return tmp_path / "fs", tmp_path / "self"


def test_cgroup_v2_room_is_the_tightest_limit_less_usage_without_droppable_cache(tmp_path):
    from fastbench.distributed.host_memory import cgroup_memory_room

    root, me = _cgroup_tree(tmp_path, {
        "memory.max": "max\n",  # the root: no limit
        "job/memory.max": f"{100 * GiB}\n", "job/memory.current": f"{30 * GiB}\n",
        "job/memory.stat": f"anon {20 * GiB}\ninactive_file {4 * GiB}\n",
        "job/task/memory.max": "max\n", "job/task/memory.current": f"{25 * GiB}\n",
    }, "0::/job/task\n")
    assert cgroup_memory_room(root, me) == 100 * GiB - (30 - 4) * GiB
    (root / "job" / "task" / "memory.max").write_text(f"{40 * GiB}\n")  # a tighter limit below
    assert cgroup_memory_room(root, me) == 15 * GiB


def test_cgroup_v1_room_and_no_limit(tmp_path):
    from fastbench.distributed.host_memory import cgroup_memory_room

    unlimited = "9223372036854771712\n"
    root, me = _cgroup_tree(tmp_path, {
        "memory/memory.limit_in_bytes": unlimited,
        "memory/box/memory.limit_in_bytes": f"{128 * GiB}\n", "memory/box/memory.usage_in_bytes": f"{120 * GiB}\n",
        "memory/box/memory.stat": f"cache {9 * GiB}\ntotal_inactive_file {2 * GiB}\n",
    }, "5:cpu,cpuacct:/\n4:memory:/box\n0::/\n")
    assert cgroup_memory_room(root, me) == 10 * GiB
    # a container that mounts its own group as the root while /proc/self/cgroup names the host's path
    root, me = _cgroup_tree(tmp_path / "c", {
        "memory/memory.limit_in_bytes": f"{8 * GiB}\n", "memory/memory.usage_in_bytes": f"{1 * GiB}\n",
    }, "4:memory:/docker/abc\n")
    assert cgroup_memory_room(root, me) == 7 * GiB
    root, me = _cgroup_tree(tmp_path / "n", {"memory/memory.limit_in_bytes": unlimited}, "4:memory:/\n")
    assert cgroup_memory_room(root, me) is None
    assert cgroup_memory_room(tmp_path / "missing", tmp_path / "missing-self") is None


def test_available_host_bytes_is_at_most_the_cgroup_room(monkeypatch):
    from fastbench.distributed import host_memory

    monkeypatch.setattr(host_memory, "cgroup_memory_room", lambda: 3 * GiB)
    assert host_memory.available_host_bytes() <= 3 * GiB
    monkeypatch.setattr(host_memory, "cgroup_memory_room", lambda: None)
    assert host_memory.available_host_bytes() > 0
