"""Offloaded checkpointing across unusual step shapes: a backward that failed half-way (an OOM retry)
must leave nothing that a later step could mistake for its own, and two forwards before one backward
must work. The offload mode here recomputes every layer (save_every=0; the default keeps every 4th layer's
last part) unless a test says otherwise."""
import time
import warnings

import pytest
import torch

from fastbench.fused.checkpointing import CheckpointConfig, LayerCheckpointing, OffloadConfig
from fastbench.fused.checkpointing import offload as offload_module
from two_part_layers import SideBySide, TwoPartLayers


def policy(setting, layers=None, **offload):
    """The checkpointing of ``use_gradient_checkpointing=setting``; in the offload mode with save_every=0 unless
    given in ``offload``."""
    if setting == "offload":
        return LayerCheckpointing(CheckpointConfig.of(setting, {"save_every": 0, **offload}), layers)
    return LayerCheckpointing(CheckpointConfig.of(setting), layers)


class Layers:
    """A stack of tanh(x W) layers; ``fail_at`` makes the recomputation of that layer raise."""

    def __init__(self, n=4, width=8, device="cpu"):
        self.weights = [(torch.randn(width, width, device=device) / width ** 0.5).requires_grad_() for _ in range(n)]
        self.fail_at = None

    def layer_fn(self, i):
        def run(x, context):
            if torch.is_grad_enabled() and self.fail_at == i:
                raise RuntimeError("simulated out of memory")
            return torch.tanh(x @ self.weights[i])
        return run

    def loss(self, ckpt, x):
        for i, w in enumerate(self.weights):
            x = ckpt(i, x, [(self.layer_fn(i), [w])])
        return (x ** 2).sum()

    def grads(self, ckpt, *inputs):
        for w in self.weights:
            w.grad = None
        sum(self.loss(ckpt, x) for x in inputs).backward()
        return torch.cat([w.grad.flatten() for w in self.weights])


def test_failed_backward_leaves_no_stale_input(seed):
    layers, x1, x2 = Layers(), torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    offload = policy("offload")
    layers.fail_at = 1  # layers 3 and 2 recompute (layer 1's input is prefetched), then layer 1 raises
    with pytest.raises(RuntimeError, match="simulated"):
        layers.loss(offload, x1).backward()
    layers.fail_at = None
    expected = layers.grads(policy(False), x2)
    assert torch.allclose(layers.grads(offload, x2), expected, rtol=1e-6, atol=1e-7)


def test_two_forwards_before_one_backward(seed):
    layers, x1, x2 = Layers(), torch.randn(5, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    offload = policy("offload")
    expected = layers.grads(policy(False), x1, x2)
    assert torch.allclose(layers.grads(offload, x1, x2), expected, rtol=1e-6, atol=1e-7)


def test_host_memory_stays_one_forward_when_batch_lengths_vary(seed):
    """Batches of varying length: a new longest one must not add a forward's worth of host buffers."""
    layers, offload = Layers(n=4), policy("offload")
    reference = policy(False)
    for rows in (3, 5, 4, 9, 2, 17, 16, 12):
        x = torch.randn(rows, 8, requires_grad=True)
        expected = layers.grads(reference, x)
        assert torch.allclose(layers.grads(offload, x), expected, rtol=1e-6, atol=1e-7)
        held = offload.offloader._free
        assert len(held) == 4 and all(b.numel() >= rows * 8 for b in held)
    assert sum(b.numel() for b in held) <= 4 * 17 * 8 * 1.125


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_failed_step_gives_up_its_host_buffers_when_the_host_runs_short(seed, monkeypatch, device):
    """A forward whose step failed before its backward (out of GPU memory in the loss, say) keeps its inputs
    for two forwards; the next forward, with no host memory to spare, takes over its buffers (pinned, on a GPU,
    with copies of the failed forward perhaps still on the bus) instead of pinning more, and trains as without
    offloading."""
    layers, offload = Layers(n=4, device=device), policy("offload", host_reserve_gib=0)
    layers.loss(offload, torch.randn(5, 8, device=device, requires_grad=True))  # no backward
    abandoned = {id(entry[0]) for entry in offload.offloader._saved.values()}
    monkeypatch.setattr(offload_module, "available_host_bytes", lambda: 0)
    x = torch.randn(4, 8, device=device, requires_grad=True)
    expected = layers.grads(policy(False), x)
    assert torch.allclose(layers.grads(offload, x), expected, rtol=1e-6, atol=1e-7)
    assert {id(b) for b in offload.offloader._free} == abandoned


def test_no_host_memory_for_a_buffer_raises_what_to_change(seed, monkeypatch):
    """A new host buffer that would leave less than host_reserve_gib available raises PinnedMemoryShort (a
    MemoryError) with the numbers and what to change, instead of the operating system killing the process;
    with room again the same offloader trains on."""
    layers, offload = Layers(n=3), policy("offload", host_reserve_gib=1)
    x = torch.randn(6, 8, requires_grad=True)
    monkeypatch.setattr(offload_module, "available_host_bytes", lambda: 2**30 + 100)
    with pytest.raises(offload_module.PinnedMemoryShort,
                       match=r"needs 0\.00 GiB more host memory .* has 1\.0 GiB available, of which it leaves 1 GiB "
                             r"free \(OffloadConfig\.host_reserve_gib\)\. Train shorter sequences .*=True") as failed:
        layers.loss(offload, x)
    assert isinstance(failed.value, MemoryError)
    monkeypatch.setattr(offload_module, "available_host_bytes", lambda: 2 * 2**30)
    expected = layers.grads(policy(False), x)
    assert torch.allclose(layers.grads(offload, x), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", [True, "offload", 1e-9])
def test_layers_of_two_parts(seed, mode):
    """Offload and budget recompute each part alone (slots 2i, 2i+1), True the whole layer from its
    input; only the last part of a recomputed unit is told (its context) that it is recomputing."""
    layers, x = Layers(), torch.randn(5, 8, requires_grad=True)
    seen = []

    def first(i):
        inner = layers.layer_fn(i)

        def run(h, context):
            seen.append(("first", context.recomputing))
            return inner(h, context)
        return run

    def square(h, context):
        seen.append(("square", context.recomputing))
        return h * h

    def loss(ckpt):
        h = x
        for i, w in enumerate(layers.weights):
            h = ckpt(i, h, [(first(i), [w]), (square, [])])
        return h.sum()

    expected = torch.autograd.grad(loss(policy(False)), [x, *layers.weights])
    seen.clear()
    ckpt = policy(mode, layers=4)
    if mode == 1e-9:  # a budget no layer fits: measured on a first forward, then every layer recomputed
        loss(ckpt)
        seen.clear()
    got = torch.autograd.grad(loss(ckpt), [x, *layers.weights])
    forward, backward = seen[:8], seen[8:]
    assert forward == [("first", False), ("square", False)] * 4
    if mode is True:  # one unit per layer: its first part recomputes in full
        assert backward == [("first", False), ("square", True)] * 4
    else:  # one unit per part, last layer first
        assert backward == [("square", True), ("first", True)] * 4
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


class FakeCudart:
    """Records what the offloader registers with CUDA; ``fail`` makes registration fail."""

    class cudaError:
        success = 0

    def __init__(self, fail=False):
        self.fail, self.registered = fail, {}

    def cudaHostRegister(self, ptr, nbytes, flags):
        if self.fail:
            return 1
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr):
        del self.registered[ptr]
        return 0


@pytest.fixture
def fake(monkeypatch):
    """A CUDA runtime that records registrations, in a process where CUDA is 'initialized'."""
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return fake


def test_pinned_buffers_are_registered_until_the_offloader_goes(fake):
    import gc
    from fastbench.fused.checkpointing.offload import HostOffloader, _pinned_empty
    offloader = HostOffloader()
    bufs = [_pinned_empty(n, dtype, offloader._registered) for n, dtype in ((1000, torch.bfloat16), (7, torch.float32))]
    assert fake.registered == {b.data_ptr(): b.numel() * b.element_size() for b in bufs}
    assert all(not b.any() for b in bufs)  # every page touched before registration
    del offloader
    gc.collect()
    assert fake.registered == {}


def test_pinning_falls_back_to_pin_memory_when_registration_fails(fake, monkeypatch):
    ckpt = offload_module
    fake.fail = True
    monkeypatch.setattr(ckpt, "_registration", {"works": True})
    cleared = []
    monkeypatch.setattr(ckpt, "_clear_cuda_error", lambda: cleared.append(True))
    calls = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        calls.append(pin_memory)
        return real_empty(*args, **kwargs)
    monkeypatch.setattr(torch, "empty", empty)
    registered = []
    buf = ckpt._pinned_empty(10, torch.float32, registered)
    assert calls == [False, True] and registered == [] and buf.numel() == 10
    assert cleared == [True]  # the failure is not left for torch's next launch check to raise
    fake.fail = False
    ckpt._pinned_empty(10, torch.float32, registered)
    assert calls[2:] == [True] and registered == []  # no second try in this process


def test_buffer_sizes_round_up_by_at_most_an_eighth():
    from fastbench.fused.checkpointing.offload import _rounded_up
    for n in [0, 1, 7, 8, 9, 17, 1000, 2**24, 3 * 2**22, 2**24 + 1, 12_300_000]:
        assert n <= _rounded_up(n) <= max(n, n * 1.125)
    assert _rounded_up(2**24 + 1) == 2**24 + 2**21 and _rounded_up(3 * 2**22) == 3 * 2**22  # 8B shapes: exact


def test_released_buffers_are_unregistered(fake):
    from fastbench.fused.checkpointing.offload import HostOffloader, _pinned_empty
    offloader = HostOffloader()
    small, large = (_pinned_empty(n, torch.bfloat16, offloader._registered) for n in (10, 100))
    offloader._free += [small, large]
    offloader._release_smaller(50, torch.bfloat16)
    assert [b is large for b in offloader._free + offloader._registered] == [True, True]
    assert list(fake.registered) == [large.data_ptr()]


def test_the_registration_error_is_read_back_from_the_loaded_cuda_runtime(monkeypatch):
    import ctypes
    import io

    ckpt = offload_module
    maps = ("7f00-7f01 r-xp 00000000 08:01 12 /opt/nvidia/lib/libcudart.so.13\n"
            "7f02-7f03 r--p 00000000 08:01 12 /opt/nvidia/lib/libcudart.so.13\n"
            "7f04-7f05 r-xp 00000000 08:01 13 /usr/lib/libc.so.6\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: io.StringIO(maps) if path == "/proc/self/maps"
                        else real_open(path, *a, **k))
    read = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path: type("Lib", (), {"cudaGetLastError": lambda self: read.append(path)})())
    ckpt._clear_cuda_error()
    assert read == ["/opt/nvidia/lib/libcudart.so.13"]
    monkeypatch.setattr(ctypes, "CDLL", lambda path: (_ for _ in ()).throw(OSError("gone")))
    ckpt._clear_cuda_error()  # a runtime that cannot be opened again is not an error of its own


@pytest.mark.parametrize("every", [1, 2])
def test_offload_keeping_saved_activations_of_every_nth_mlp(seed, every):
    """Offload mode with save_last_every=n: layers 0, n, 2n, ... keep their last part's graph with its saved
    activations on the host (that part runs once, not again in the backward), the others recompute; the
    gradients are those of keeping everything, and views of one tensor come back as views of one tensor."""
    layers, x = TwoPartLayers(), torch.randn(5, 8, requires_grad=True)
    expected = layers.grads(policy(False), x)
    ckpt = policy("offload", save_every=every)
    for _ in range(2):  # the second step reuses the host buffers
        layers.mlp_runs, SideBySide.shared = [0] * 4, []
        got = layers.grads(ckpt, x)
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        assert layers.mlp_runs == [1 if i % every == 0 else 2 for i in range(4)]
        assert SideBySide.shared == [True] * 4
    assert not ckpt.offloader._saved and not ckpt.offloader._prefetched


def test_forwards_longer_than_save_max_tokens_recompute_every_mlp(seed):
    """save_every applies to forwards of at most save_max_tokens tokens; a longer one recomputes every layer's
    last part too (same gradients), and a short one after it keeps every n-th again."""
    layers, long, short = TwoPartLayers(), torch.randn(6, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    ckpt = policy("offload", save_every=1, save_max_tokens=5)
    for x, runs in ((long, [2] * 4), (short, [1] * 4)):
        expected = layers.grads(policy(False), x)
        layers.mlp_runs, SideBySide.shared = [0] * 4, []
        for a, b in zip(layers.grads(ckpt, x), expected):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        assert layers.mlp_runs == runs
    assert "in forwards of at most 5 tokens" in ckpt.describe()


@pytest.mark.parametrize("view", [False, True])
def test_a_derived_tensor_is_recomputed_from_its_saved_source(seed, monkeypatch, view):
    """A saved part's tensor declared derived(t, source, f) goes to the host only as its source (which the part
    saves anyway; a view of it too) and comes back as f(source): same gradients, one copy fewer."""
    width = 16 if view else 8
    W, V = torch.randn(width, width, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    x = torch.randn(5, width, requires_grad=True)

    def mlp(h, context, derive=True):
        source = h[:, :8] if view else h  # a view of half its base is saved as that base
        a = source.sin()  # saves source
        m = source.cos()
        m = context.derived(m, source, torch.cos) if derive else m
        return h[:, :8] + a * (m @ V)  # saves m (or recomputes it) and V

    def run(ckpt, derive):
        parts = [(lambda h, context: h + torch.tanh(h @ W), [W]), (lambda h, context: mlp(h, context, derive), [V])]
        y = ckpt(0, x, parts)
        return torch.autograd.grad((y ** 2).sum(), [x, W, V])

    expected = run(policy(False), True)
    saves = {}
    for derive in (True, False):
        ckpt = policy("offload", save_every=1)
        save = ckpt.offloader.save
        saves[derive] = []
        monkeypatch.setattr(ckpt.offloader, "save",
                            lambda slot, t, group=None, log=saves[derive]: (log.append(t.shape), save(slot, t, group))[1])
        got = run(ckpt, derive)
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert len(saves[False]) - len(saves[True]) == 1  # m was not copied


def test_a_group_comes_back_whole_and_single_inputs_one_ahead(seed):
    """A backward keeps the forward's largest group's bytes on their way back (at least one group), a group
    fetched as a whole: with inputs saved alone, that is the next input only."""
    from fastbench.fused.checkpointing.offload import HostOffloader

    alone = HostOffloader()
    keys = [alone.save(slot, torch.randn(4)) for slot in range(4)]
    alone.load(keys[3])
    assert set(alone._prefetched) == {keys[2]}
    alone.load(keys[2])
    assert set(alone._prefetched) == {keys[1]}

    off = HostOffloader()
    single = [off.save(slot, torch.randn(4)) for slot in range(3)]  # slots 0-2, 16 bytes each
    group = [off.save(slot, torch.randn(4), group="mlp") for slot in range(3, 6)]  # 48 bytes: the lookahead
    last = [off.save(slot, torch.randn(4)) for slot in range(6, 8)]
    off.load(last[1])  # slot 6 (16 bytes on the way), then the whole group below it (64 >= 48)
    assert set(off._prefetched) == {last[0], *group}
    off.load(last[0])  # the group (48) is on its way: nothing more
    assert set(off._prefetched) == set(group)
    x = off.load(group[2])  # 32 on the way: slot 2 as well
    assert set(off._prefetched) == {group[0], group[1], single[2]}
    assert x.shape == (4,)


def test_prefetch_groups_bounds_the_groups_on_their_way_back(seed):
    """With ``prefetch_groups=n`` a backward keeps n groups on their way back, whatever their bytes."""
    from fastbench.fused.checkpointing.offload import HostOffloader

    off = HostOffloader(prefetch_groups=1)
    single = [off.save(slot, torch.randn(4)) for slot in range(3)]
    group = [off.save(slot, torch.randn(4), group="mlp") for slot in range(3, 6)]
    last = [off.save(slot, torch.randn(4)) for slot in range(6, 8)]
    off.load(last[1])
    assert set(off._prefetched) == {last[0]}
    off.load(last[0])
    assert set(off._prefetched) == set(group)
    off.load(group[2])  # the rest of its group is still on its way: one group
    assert set(off._prefetched) == {group[0], group[1]}
    off.load(group[1])
    off.load(group[0])
    assert set(off._prefetched) == {single[2]}

    two = HostOffloader(prefetch_groups=2)
    keys = [two.save(slot, torch.randn(4)) for slot in range(5)]
    two.load(keys[4])
    assert set(two._prefetched) == {keys[3], keys[2]}


def test_saved_groups_with_two_forwards_and_after_a_failed_backward(seed):
    """Offload with every layer's last part saved: two forwards before one backward, and a backward that
    failed half-way (its groups must not be mistaken for the next step's)."""
    layers = TwoPartLayers()
    x1, x2 = torch.randn(5, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    ckpt = policy("offload", save_every=1)

    def both(c):
        h1, h2 = x1, x2
        for i in range(4):
            h1 = c(i, h1, layers.parts(i))
        for i in range(4):
            h2 = c(i, h2, layers.parts(i))
        return torch.autograd.grad((h1 ** 2).sum() + (h2 ** 2).sum(), [x1, x2, *layers.W, *layers.V])

    expected = both(policy(False))
    for a, b in zip(both(ckpt), expected):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)

    class Boom(Exception):
        pass

    def fail_in_backward(grad):
        raise Boom

    h = x1
    for i in range(4):
        h = ckpt(i, h, layers.parts(i))
        if i == 1:
            h.register_hook(fail_in_backward)  # layers 3 and 2 went back, then this raises
    with pytest.raises(Boom):
        (h ** 2).sum().backward()
    expected = layers.grads(policy(False), x2)
    for a, b in zip(layers.grads(ckpt, x2), expected):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


class Copy:
    """A copy's event: finished or not (``query``)."""

    def __init__(self, finished):
        self.finished = finished

    def query(self):
        return self.finished


def test_copies_to_the_host_hold_a_bounded_amount_of_device_memory():
    """Where the bus is slower than the compute, queued copies keep their sources alive: past
    max_copying_bytes (default MAX_COPYING_BYTES) the compute stream is made to wait for the oldest copy, whose
    source is then dropped (the host does not wait); finished copies are forgotten without a wait."""
    offloader = offload_module.HostOffloader(max_copying_bytes=100)
    waited = []
    offloader._compute_waits_for = lambda done, device, kind: waited.append((done, kind))
    copies = [Copy(False), Copy(False), Copy(True), Copy(False)]
    sources = [torch.empty(n, dtype=torch.uint8) for n in (40, 40, 40, 10)]
    for copy, x in zip(copies[:2], sources):
        offloader._hold_until_copied(x, copy)
    assert offloader._copying_bytes == 80 and not waited
    offloader._hold_until_copied(sources[2], copies[2])  # 120 > 100: the compute stream waits for the oldest only
    assert waited == [(copies[0], "out")] and offloader._copying_bytes == 80
    assert offloader.queue_waits == 1  # counted, on the offloader, for the harness
    copies[1].finished = True
    offloader._hold_until_copied(sources[3], copies[3])  # the two oldest finished: forgotten; the newest stays
    assert [c for c, _ in offloader._copying] == [copies[3]] and offloader._copying_bytes == 10
    assert len(waited) == 1 and offloader.queue_waits == 1


def test_a_copy_source_is_held_until_its_copy_is_seen_finished(seed):
    """A source copied to the host stays referenced by the offloader (its memory not reused) until its copy's
    event says finished; every save and load drops the finished ones, oldest first."""
    import gc
    import weakref

    from fastbench.fused.checkpointing.offload import HostOffloader

    offloader = HostOffloader()
    offloader._compute_waits_for = lambda *args: pytest.fail("no wait for a copy below the bound")
    copies, held = [Copy(False), Copy(False)], []
    for copy in copies:
        x = torch.randn(8)
        held.append(weakref.ref(x))
        offloader._hold_until_copied(x, copy)
        del x
    gc.collect()
    assert all(ref() is not None for ref in held)  # both copies still on the bus
    copies[0].finished = True
    key = offloader.save(0, torch.randn(4))  # a save drops the finished one
    gc.collect()
    assert held[0]() is None and held[1]() is not None
    copies[1].finished = True
    offloader.load(key)  # and so does a load
    gc.collect()
    assert held[1]() is None and offloader._copying_bytes == 0 and offloader.queue_waits == 0


def test_an_input_fetched_ahead_and_dropped_is_waited_for_first(seed, monkeypatch):
    """An input fetched back ahead of its use and never loaded (a backward that stopped half-way) is dropped
    only after the compute stream was made to wait for its copy: its memory is the compute stream's."""
    from fastbench.fused.checkpointing.offload import HostOffloader

    waits = []

    class Stream:
        def wait_event(self, event):
            waits.append(event)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    offloader = HostOffloader()
    keys = [offloader.save(slot, torch.randn(4)) for slot in range(3)]
    done = Copy(True)
    offloader._prefetched[keys[1]] = (torch.randn(4), done)  # as a fetch on a GPU leaves it
    offloader.save(0, torch.randn(4))  # a second forward: the first one's entries are kept
    assert waits == []
    offloader.save(0, torch.randn(4))  # a third: the first one's are released, the compute stream waits first
    assert waits == [done] and not offloader._prefetched
    offloader._prefetched[keys[0]] = (torch.randn(4), Copy(False))
    del offloader  # and so when the offloader goes with an input on its way back
    import gc
    gc.collect()
    assert len(waits) == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_host_short_for_two_inputs_a_layer_gets_one_and_recomputes_whole_layers(seed, monkeypatch, device):
    """Offload mode where the host has room for each layer's input but not for its two parts' inputs: one input a
    layer goes to the host and each layer is recomputed whole from it (its MLP part too, where save_every would
    keep it), with the gradients of keeping everything and one warning; with room again, two a layer."""
    layers, x = TwoPartLayers(device=device), torch.randn(5, 8, device=device, requires_grad=True)
    expected = layers.grads(policy(False), x)
    ckpt = policy("offload", layers=4, save_every=1, host_reserve_gib=0)
    saves = []
    save = ckpt.offloader.save
    monkeypatch.setattr(ckpt.offloader, "save", lambda slot, t, group=None: saves.append(slot) or save(slot, t, group))
    # the host reports room for 3 inputs (a constant here); after the first step the offloader also holds the
    # 4 buffers of one input a layer: 7 inputs' room, short of 8 (2 a layer) in both steps
    monkeypatch.setattr(offload_module, "available_host_bytes", lambda: 3 * x.nbytes)
    for step in range(2):
        saves.clear()
        layers.mlp_runs = [0] * 4
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            got = layers.grads(ckpt, x)
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        assert saves == [0, 1, 2, 3] and layers.mlp_runs == [2] * 4
        assert [str(w.message) for w in said] == ([
            "fastbench: offloaded checkpointing: a forward of 5 tokens would keep 0.0 MiB of layer inputs in host "
            "memory (2 a layer) and 0.0 MiB is free for them (less OffloadConfig.host_reserve_gib): each layer's "
            "input alone goes to the host (0.0 MiB) and the whole layer is recomputed from it, while the host is "
            "this short"] if step == 0 else [])
    monkeypatch.setattr(offload_module, "available_host_bytes", lambda: 2**30)
    saves.clear()
    layers.mlp_runs = [0] * 4
    for a, b in zip(layers.grads(ckpt, x), expected):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    # a layer: its attention part's input, and the MLP part's two saved tensors (kept, save_every=1: runs once)
    assert len(saves) == 12 and layers.mlp_runs == [1] * 4
    assert "where the host is short of memory for them, each layer's input alone" in ckpt.describe()


def test_a_host_limit_short_of_two_inputs_a_layer_gets_one_and_past_one_stops(seed, monkeypatch):
    """OffloadConfig.host_limit_gib bounds what the offloader holds whatever the host has: a limit with room for
    one input a layer but not two recomputes whole layers (the gradients of keeping everything), and one short of
    even that raises PinnedMemoryShort naming the limit."""
    layers, x = TwoPartLayers(), torch.randn(5, 8, requires_grad=True)
    expected = layers.grads(policy(False), x)
    monkeypatch.setattr(offload_module, "available_host_bytes", lambda: 2**40)  # a host with room for anything
    ckpt = policy("offload", layers=4, save_every=1, host_reserve_gib=0, host_limit_gib=7 * x.nbytes / 2**30)
    saves = []
    save = ckpt.offloader.save
    monkeypatch.setattr(ckpt.offloader, "save", lambda slot, t, group=None: saves.append(slot) or save(slot, t, group))
    layers.mlp_runs = [0] * 4
    with pytest.warns(UserWarning, match="this process's limit, OffloadConfig.host_limit_gib"):
        got = layers.grads(ckpt, x)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert saves == [0, 1, 2, 3] and layers.mlp_runs == [2] * 4
    assert ckpt.offloader.host_room_bytes() == ckpt.offloader.host_limit_bytes

    short = policy("offload", layers=4, save_every=1, host_reserve_gib=0, host_limit_gib=2 * x.nbytes / 2**30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(offload_module.PinnedMemoryShort, match=r"past this process's limit of 0.0 GiB "
                                                                   r"\(OffloadConfig.host_limit_gib"):
            layers.grads(short, x)


@pytest.mark.parametrize("limit", [0, -1, float("inf"), True])
def test_a_host_limit_is_a_positive_number_of_gib(limit):
    with pytest.raises(ValueError, match=f"host_limit_gib={limit!r}: give a number of GiB > 0"):
        OffloadConfig(host_limit_gib=limit)
    assert OffloadConfig(host_limit_gib=1.5).host_limit_bytes == int(1.5 * 2**30)
    assert OffloadConfig().host_limit_bytes is None


@pytest.mark.parametrize("every, says", [(0, "recompute every layer, inputs offloaded"),
                                         (1, "every layer's attention"), (2, "but every 2nd layer's MLP"),
                                         (3, "every 3rd layer's MLP")])
def test_the_offload_mode_says_what_it_recomputes(every, says):
    assert says in policy("offload", save_every=every).describe()


@pytest.mark.parametrize("setting, says", [(40, "a budget of 40 GiB"), ("auto", "a budget of this GPU's free memory"),
                                           (False, "no activation checkpointing"), (True, "recompute every layer")])
def test_the_other_modes_say_what_they_keep(setting, says):
    assert says in policy(setting).describe()


@pytest.mark.parametrize("offload, message", [
    ({"save_every": "two"}, "save_every='two': give a whole number n >= 0"),
    ({"save_every": -1}, "save_every=-1: give a whole number n >= 0"),
    ({"save_max_tokens": 1.5}, "save_max_tokens=1.5: give a whole number n >= 0"),
    ({"embedding": "yes"}, r"embedding='yes': give 1 \(the input embedding's table"),
    ({"embedding": 2}, r"embedding=2: give 1 \(the input embedding's table"),
    ({"every": 3}, "unknown option.*every; valid: save_every, embedding"),
    ({"streams": 2}, "unknown option.*streams; valid: save_every, embedding"),
    ({"host_reserve_gib": -1}, r"host_reserve_gib=-1: give a number of GiB >= 0 \(the host memory"),
    ("save_every=3", "an OffloadConfig or a dict of its fields")])
def test_a_bad_offload_setting_says_what_was_wrong_and_what_to_give(offload, message):
    with pytest.raises(ValueError, match=message):
        CheckpointConfig.of("offload", offload)


def test_offload_config_fields_and_where_they_apply():
    assert OffloadConfig() == OffloadConfig(save_every=4, embedding=True)
    assert OffloadConfig(embedding=0) == OffloadConfig(embedding=False)
    assert CheckpointConfig.of("unsloth").offload == OffloadConfig()
    assert CheckpointConfig.of("offload", {"save_every": 3}).offload.save_every == 3
    assert CheckpointConfig.of(True) == CheckpointConfig("recompute") and CheckpointConfig.of(True).offload is None
    assert CheckpointConfig.of("1.5").budget == 1.5 * 2**30 and CheckpointConfig.of("auto").budget is None
    config = CheckpointConfig.of("offload", OffloadConfig(save_every=1))
    assert CheckpointConfig.of(config) is config
    with pytest.raises(ValueError, match="apply to use_gradient_checkpointing='offload' only"):
        CheckpointConfig.of(True, {"save_every": 1})
    with pytest.raises(ValueError, match="mode 'sometimes': give one of keep, recompute, offload, budget"):
        CheckpointConfig("sometimes")
    with pytest.raises(ValueError, match="budget -1: give a number of bytes >= 0"):
        CheckpointConfig("budget", -1)


def test_a_part_whose_activations_go_to_the_host_does_not_hold_its_input(seed):
    """offloading_saved copies what a part saves to the host; nothing keeps the part's input on the device as well
    until the backward (autograd keeps the saved-tensor hooks as long as the graph)."""
    import gc
    import weakref

    w, x0 = torch.randn(8, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    slots = iter(range(10))
    x = x0 * 2  # not a leaf: only the graph's saved tensors could keep it
    input_ref = weakref.ref(x)
    y = offload_module.offloading_saved(lambda t, context: torch.tanh(t @ w), x, offload_module.HostOffloader(),
                                        lambda: next(slots))
    del x
    gc.collect()
    assert input_ref() is None
    y.sum().backward()
    dx0, dw = torch.autograd.grad(torch.tanh((x0 * 2) @ w).sum(), [x0, w])
    assert torch.allclose(x0.grad, dx0, rtol=1e-6, atol=1e-7) and torch.allclose(w.grad, dw, rtol=1e-6, atol=1e-7)
