"""Activation checkpointing per decoder layer, for the fused path.

A layer comes as consecutive parts (the fused decoder: attention with its residual, then the MLP with
its residual). A recomputed unit keeps its input and, in the backward, recomputes its parts from it;
the output of its last part is then only the root of that backward, so while :func:`recomputing` is
true the last part may skip the products that compute nothing but its output. The offload and budget
modes recompute each part as a unit of its own (two inputs kept per layer; the fused decoder then skips
the O and down projections' forwards and the GLU: about a third of a layer's recomputed matmul FLOPs);
``True`` recomputes the whole layer as one unit (one input per layer, the least memory; it skips the
down projection and the GLU).

``use_gradient_checkpointing`` picks one policy for all layers of a model:

- ``False``: keep every layer's activations (fastest, most memory).
- ``True``: keep only each layer's input, recompute the layer in the backward.
- ``"offload"`` (or ``"unsloth"``, the name Unsloth's users know it by): keep each part's input in pinned CPU
  memory (copied on a side stream, overlapped with the next layers' compute; back ahead of use during the
  backward) and recompute the part; except that every ``FASTBENCH_OFFLOAD_SAVE_EVERY``-th layer (default 2;
  0: none) keeps its MLP's graph, the activations it saves offloaded to pinned memory as well, so its MLP is
  not recomputed. On the H200 (PCIe 5, ~53 GB/s each way) every 2nd layer took llama-3-8b's step from 371 to
  333 ms for 0.6 GiB more GPU memory; every layer made the copies the bottleneck (460 ms). Experiments, off by
  default and not yet measured on a GPU: the last ``FASTBENCH_OFFLOAD_KEEP_LAST`` layers keep on the GPU what
  would go to the host (their backward comes first, and on one copy stream their fetches would wait behind
  the forward's last copies out); ``FASTBENCH_OFFLOAD_STREAMS=2`` puts the copies out and back on two streams;
  with ``FASTBENCH_OFFLOAD_WHOLE_LAYERS=1`` a layer whose MLP is recomputed keeps one input instead of two
  (recomputing its attention's O projection too). The fused path also keeps an untied, frozen input embedding
  table in pinned host memory in this mode (fastbench.fused.host_embedding).
- a number (GiB) or ``"auto"``: a budget. The first layer of the first step runs un-checkpointed
  while the bytes its autograd graph saves are counted; from then on the first
  ``budget // bytes_per_layer`` layers keep their activations and the rest recompute. ``"auto"``
  budgets 70% of the GPU memory free at the first step (on a CPU: keeps everything).

A recomputed part must be deterministic (no dropout): the fused path refuses lora_dropout > 0.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import threading
import time
import weakref
from typing import Callable, Sequence

import torch

GiB = 1 << 30
# device memory that queued copies to the host may hold (their sources are not reused before the copy read them)
# before the host waits for the oldest: bounds the offload mode's memory where the bus is slower than the compute
MAX_COPYING_BYTES = 2 * GiB

_state = threading.local()
_host_wait = {"s": None}  # seconds the host spent waiting for queued copies to the host, all offloaders together


def offload_host_wait_s() -> float | None:
    """Seconds this process's host thread has waited, in total, for copies to the host (the offload mode's
    bound on the memory their sources hold, MAX_COPYING_BYTES): time the host could not issue work in, the
    bus being slower than the compute; None where no offloader was made. The harness records it over its
    timed steps."""
    return _host_wait["s"]


_fetch_waits: dict = {"events": None}  # while timed: (before, after) CUDA events around each fetch wait


@contextlib.contextmanager
def timed_fetch_waits():
    """Within: each wait of the compute stream for an input fetched back from the host is bracketed by two
    timing events (any thread: the backward runs in autograd's). Yields a function that, once the GPU has
    run the work (synchronize first), gives the milliseconds the compute stream stood waiting in total: the
    time the bus, not the host or the kernels, set the pace."""
    events = _fetch_waits["events"] = []
    try:
        yield lambda: sum(before.elapsed_time(after) for before, after in events)
    finally:
        _fetch_waits["events"] = None


def recomputing() -> bool:
    """True while a checkpointed part is being recomputed for its backward: its output's value is then
    never read (only its autograd graph is), so the part may return placeholders for it."""
    return getattr(_state, "recomputing", False)


def derived(t: torch.Tensor, source: torch.Tensor, recompute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Declares ``t == recompute(source)``, bit for bit (a deterministic function of one tensor, such as a norm);
    returns t. Where the offload mode copies a part's saved activations to the host and both t and source are
    among them, t is not copied but recomputed from source in the backward (the bus carries less); elsewhere
    this does nothing."""
    derivations = getattr(_state, "derivations", None)
    if derivations is not None:
        derivations[id(t)] = (t, source, recompute)
    return t


@contextlib.contextmanager
def _recomputation():
    before = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = before


class HostOffloader:
    """Copies checkpointed inputs to pinned host buffers on a side stream and back, prefetching one ahead.

    By default every copy runs on one side stream, so a buffer's copy back to the GPU is ordered after its
    copy to the host, and a reused buffer's next copy after both. With ``streams=2`` (an experiment:
    ``FASTBENCH_OFFLOAD_STREAMS=2``) the copies to the host and those back run on two streams, so that the
    bus carries both directions at once (where the backward's first fetches meet the forward's last copies
    out); the same order is then kept by events: a copy back waits for its copy out, and a buffer's next
    copy out for the copy back that read it. Each copy first makes its stream wait for all work queued on
    the compute stream: it then reads only finished data, and writes only memory that no queued kernel
    still uses (a buffer the compute stream freed while the CPU ran ahead)."""

    def __init__(self, streams: int = 1):
        # keys are (forward number, slot), slots numbering a forward's checkpointed parts 0, 1, ...: an entry
        # left by a step whose backward never finished (an OOM retry) can never be mistaken for a later step's
        # -> (buffer, host view, device, the copy's event or None)
        self._saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.device, object]] = {}
        self._prefetched: dict[tuple[int, int], tuple[torch.Tensor, object]] = {}  # -> (x on its device, copy done)
        self._free: list[torch.Tensor] = []  # flat host buffers to reuse
        self._groups: dict[tuple[int, int], tuple] = {}  # key -> its group (entries fetched back together)
        self._members: dict[tuple, list[tuple[int, int]]] = {}  # group -> its keys, in slot order
        self._lookahead = 0  # bytes to keep fetched ahead in a backward: the largest group of the forward
        self._copying: collections.deque = collections.deque()  # (done event, bytes) of queued copies to the host
        self._copying_bytes = 0
        self._registered: list[torch.Tensor] = []  # every buffer pinned by registration, unregistered when self goes
        weakref.finalize(self, _unregister, self._registered)
        self._forward = 0
        self._two_streams = streams == 2
        self._streams: dict[str, torch.cuda.Stream] = {}  # "out" (to the host), "in" (back): one stream unless two
        self._reads: dict[int, object] = {}  # a freed buffer's data_ptr -> the event of the copy back that read it
        _host_wait["s"] = _host_wait["s"] or 0.0

    def _side_stream_after_compute(self, direction: str):
        """The stream of the copies ``direction`` ("out" to the host, "in" back), made to wait for the compute
        stream."""
        # current_stream() must be read here, outside `torch.cuda.stream(side)`: inside, it is the side
        # stream itself (an earlier version waited on itself there and raced on the H200)
        if not self._streams:
            self._streams["out"] = torch.cuda.Stream()
            self._streams["in"] = torch.cuda.Stream() if self._two_streams else self._streams["out"]
        stream = self._streams[direction]
        stream.wait_stream(torch.cuda.current_stream())
        return stream

    def _host_buffer(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A flat buffer of at least like.numel() elements and its view shaped like ``like``: a free one
        where one is large enough; else a new one, rounded up (so that inputs a little longer than the last
        ones reuse it), and the free buffers too small for this input are released. Pinned host memory then
        stays about one forward's worth when the lengths of a run's batches vary, instead of growing with
        each new longest batch."""
        need = like.numel()
        for i, buf in enumerate(self._free):
            if buf.dtype == like.dtype and buf.numel() >= need:
                return self._free.pop(i), buf[:need].view(like.shape)
        self._release_smaller(need, like.dtype)
        size = _rounded_up(need)
        buf = (_pinned_empty(size, like.dtype, self._registered) if like.is_cuda
               else torch.empty(size, dtype=like.dtype))
        return buf, buf[:need].view(like.shape)

    def _release_smaller(self, numel: int, dtype: torch.dtype) -> None:
        small = [b for b in self._free if b.dtype == dtype and b.numel() < numel]
        if not small:
            return
        self._free = [b for b in self._free if all(b is not s for s in small)]
        for b in small:
            self._reads.pop(b.data_ptr(), None)
        registered = [b for b in small if any(b is r for r in self._registered)]
        if registered:
            self._registered[:] = [r for r in self._registered if all(r is not b for b in registered)]
            _unregister(registered)  # after the copies still queued on them

    def _release_before(self, forward: int) -> None:
        """Forget what forwards before ``forward`` left behind (their backward never ran to the end)."""
        for key in [k for k in self._saved if k[0] < forward]:  # never fetched: no copy back read them
            self._free.append(self._saved.pop(key)[0])
        for key in [k for k in self._prefetched if k[0] < forward]:
            del self._prefetched[key]
        for key in [k for k in self._groups if k[0] < forward]:
            self._members.pop(self._groups.pop(key), None)

    def save(self, slot: int, x: torch.Tensor, group=None) -> tuple[int, int]:
        """Starts copying ``x`` to the host; returns the key that ``load`` takes. Slot 0 starts a new
        forward; the entries of the previous forward are kept (two forwards before one backward work),
        older ones are released. Entries saved under one ``group`` (within a forward) come back together."""
        if slot == 0:
            self._forward += 1
            self._release_before(self._forward - 1)
            self._lookahead = 0
        key = (self._forward, slot)
        group = (self._forward, slot if group is None else group)
        self._groups[key] = group
        members = self._members.setdefault(group, [])
        members.append(key)
        self._lookahead = max(self._lookahead, sum(self._saved[k][1].nbytes for k in members[:-1]) + x.nbytes)
        buf, host = self._host_buffer(x)
        done = None
        if x.is_cuda:
            stream = self._side_stream_after_compute("out")
            read = self._reads.pop(buf.data_ptr(), None)
            if read is not None:  # two streams: the copy back that last read this buffer must have finished
                stream.wait_event(read)
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            x.record_stream(stream)  # x's memory is not reused before the copy has read it
            self._copying.append((done, x.nbytes))
            self._bound_copying(x.nbytes)
        else:
            host.copy_(x)
        self._saved[key] = (buf, host, x.device, done)
        return key

    def _bound_copying(self, nbytes: int) -> None:
        """Forgets the copies to the host that finished; while the rest hold more than MAX_COPYING_BYTES of
        device memory, waits for the oldest (the GPU then still has every later layer queued)."""
        self._copying_bytes += nbytes
        while self._copying and (self._copying_bytes > MAX_COPYING_BYTES or self._copying[0][0].query()):
            done, size = self._copying.popleft()
            start = time.perf_counter()
            done.synchronize()  # at once where query() said it finished
            _host_wait["s"] += time.perf_counter() - start
            self._copying_bytes -= size

    def _fetch(self, key: tuple[int, int]):
        if key not in self._saved:
            raise RuntimeError("the offloaded input of this layer was released: offloaded checkpointing keeps "
                               "the inputs of the last two forwards until their backward")
        buf, host, device, copied_out = self._saved.pop(key)
        self._free.append(buf)  # a later save's copy into it waits for this copy (the same stream, or its event)
        if device.type != "cuda":
            return host.clone(), None
        x = torch.empty(host.shape, dtype=host.dtype, device=device)
        stream = self._side_stream_after_compute("in")
        if self._two_streams:
            stream.wait_event(copied_out)
        with torch.cuda.stream(stream):
            x.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        x.record_stream(stream)
        if self._two_streams:
            self._reads[buf.data_ptr()] = done
        return x, done

    def load(self, key: tuple[int, int]) -> torch.Tensor:
        """The input saved under ``key`` on its device; starts fetching what comes below it."""
        x, done = self._prefetched.pop(key, None) or self._fetch(key)
        self._prefetch_below(key)
        if done is not None:
            compute = torch.cuda.current_stream()
            timed = _fetch_waits["events"]
            if timed is None:
                compute.wait_event(done)
            else:
                before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                before.record(compute)
                compute.wait_event(done)
                after.record(compute)
                timed.append((before, after))
        return x

    def _prefetch_below(self, key: tuple[int, int]) -> None:
        """Fetches the groups of the slots below ``key``, nearest first, while less than the forward's largest
        group is on its way (at least one group): with one input per group, the next input alone."""
        ahead = sum(x.nbytes for k, (x, _) in self._prefetched.items() if k[0] == key[0])
        for slot in range(key[1] - 1, -1, -1):
            below = (key[0], slot)
            if below in self._prefetched:
                continue
            if below not in self._saved or (ahead and ahead >= self._lookahead):
                return
            for member in self._members[self._groups[below]]:
                if member in self._saved:
                    self._prefetched[member] = fetched = self._fetch(member)
                    ahead += fetched[0].nbytes


def _rounded_up(n: int) -> int:
    """n rounded up to a multiple of 1/8 of the power of two below it (at most 12.5% more)."""
    step = max(1, (1 << max(0, n.bit_length() - 1)) >> 3)
    return -(-n // step) * step


_registration = {"works": True}  # False once cudaHostRegister failed in this process (WSL, some ARM boards)


def _pinned_empty(numel: int, dtype: torch.dtype, registered: list[torch.Tensor]) -> torch.Tensor:
    """A host buffer of ``numel`` elements that the GPU copies to and from asynchronously, appended to
    ``registered`` when pinned by registration. Its pages are faulted in by torch's intra-op threads
    (``zero_``) and then registered with CUDA: 2 GiB took 0.21 s so on the H200's host, against 0.74 s
    through ``pin_memory=True`` (cudaHostAlloc, one thread), which the offload mode's first step paid in
    full. Where registration fails, ``pin_memory=True`` from then on."""
    if _registration["works"]:
        buf = torch.empty(numel, dtype=dtype)
        buf.zero_()
        cudart = torch.cuda.cudart()
        # flags 0 (cudaHostRegisterDefault): with unified addressing, portable to every device's context and mapped
        if cudart.cudaHostRegister(buf.data_ptr(), buf.untyped_storage().nbytes(), 0) == cudart.cudaError.success:
            registered.append(buf)
            return buf
        _registration["works"] = False
        _clear_cuda_error()
    return torch.empty(numel, dtype=dtype, pin_memory=True)


def _clear_cuda_error() -> None:
    """Reads (and so resets) CUDA's last error: a failed cudaHostRegister leaves it set, and torch's next
    kernel-launch check would raise it as that kernel's error. torch does not bind cudaGetLastError; the
    CUDA runtime it loaded does."""
    try:
        with open("/proc/self/maps") as maps:  # Linux only; elsewhere the error is left set
            paths = {line.split(maxsplit=5)[5].strip() for line in maps if "libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, IndexError, AttributeError):  # no such file or symbol: nothing more to do
        return


def _unregister(registered: list[torch.Tensor]) -> None:
    """Unregisters the buffers of :func:`_pinned_empty` once no copy still uses them, before their memory is freed."""
    if registered and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        cudart = torch.cuda.cudart()
        for buf in registered:
            cudart.cudaHostUnregister(buf.data_ptr())
    registered.clear()


class _RecomputedUnit(torch.autograd.Function):
    """Runs the parts ``fns`` one after the other on x without a graph; the backward recomputes them from
    the kept (or offloaded) x, the last one with :func:`recomputing` true, and returns the gradients of x
    and of ``params`` (the parts' trainable parameters)."""

    @staticmethod
    def forward(ctx, fns, offloader, slot, x, *params):
        y = _chain(fns, x)  # a Function's forward runs without building a graph
        ctx.fns, ctx.offloader = fns, offloader
        device = x.device.type  # the recomputation must run under the same autocast as this forward
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        if offloader is not None:
            ctx.key = offloader.save(slot, x)
            ctx.save_for_backward(*params)
        else:
            ctx.save_for_backward(x, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        if ctx.offloader is not None:
            x, params = ctx.offloader.load(ctx.key), saved
        else:
            x, params = saved[0], saved[1:]
        needs = ctx.needs_input_grad[3:]
        x = x.detach().requires_grad_(needs[0])
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            y = _chain(ctx.fns[:-1], x)
            with _recomputation():
                y = ctx.fns[-1](y)
        inputs = [t for t, need in zip((x, *params), needs) if need]
        grads = iter(torch.autograd.grad(y, inputs, dy, allow_unused=True))
        return (None, None, None, *[next(grads) if need else None for need in needs])


def parse_setting(setting) -> tuple[str, float | None]:
    """``use_gradient_checkpointing`` -> (mode, budget in bytes); mode in keep/recompute/offload/budget."""
    if setting is False or setting is None:
        return "keep", None
    if setting is True:
        return "recompute", None
    if setting in ("offload", "unsloth"):  # "unsloth": what Unsloth's users pass for its offloaded checkpointing
        return "offload", None
    if setting == "auto":
        return "budget", None
    if isinstance(setting, str):
        try:
            setting = float(setting)
        except ValueError:
            setting = None
    if isinstance(setting, (int, float)) and setting >= 0:
        return "budget", float(setting) * GiB
    raise ValueError(f"use_gradient_checkpointing must be True, False, 'offload' (or 'unsloth', the same), 'auto' "
                     f"or a budget in GiB; got {setting!r}")


# (fn, its trainable parameters or a callable returning them)
Part = tuple[Callable, "Sequence[torch.Tensor] | Callable"]


SAVE_EVERY_ENV = "FASTBENCH_OFFLOAD_SAVE_EVERY"
KEEP_LAST_ENV = "FASTBENCH_OFFLOAD_KEEP_LAST"
STREAMS_ENV = "FASTBENCH_OFFLOAD_STREAMS"
WHOLE_LAYERS_ENV = "FASTBENCH_OFFLOAD_WHOLE_LAYERS"
EMBEDDING_ENV = "FASTBENCH_OFFLOAD_EMBEDDING"


def _whole_number(name: str, default: str, meaning: str) -> int:
    value = os.environ.get(name, default)
    if not value.strip().isdigit():
        raise ValueError(f"{name}={value!r}: give a whole number n >= 0 ({meaning})")
    return int(value)


def _save_every() -> int:
    return _whole_number(SAVE_EVERY_ENV, "2", "every n-th layer's MLP activations offloaded instead of recomputed; "
                                              "0: recompute every layer")


def _one_of(name: str, default: str, meanings: dict[str, str]) -> str:
    """The switch's value, one of ``meanings``' keys; else an error that says each and what it means."""
    value = os.environ.get(name, default)
    if value not in meanings:
        raise ValueError(f"{name}={value!r}: give " + " or ".join(f"{v} ({m})" for v, m in meanings.items()))
    return value


def _offload_streams() -> int:
    return int(_one_of(STREAMS_ENV, "1", {"1": "one copy stream for both directions, the default",
                                          "2": "copies to the host and back on two streams"}))


def _whole_layers() -> bool:
    return _one_of(WHOLE_LAYERS_ENV, "0", {
        "0": "each half-layer recomputed from its own offloaded input, the default",
        "1": "a layer whose MLP is recomputed keeps one input, recomputed as a whole"}) == "1"


def _keep_last() -> int:
    return _whole_number(KEEP_LAST_ENV, "0", "the last n layers keep on the GPU what the offload mode would copy to "
                                             "the host; 0: none")


def embedding_offloaded() -> bool:
    """Whether the offload mode keeps the input embedding's table in pinned host memory
    (fastbench.fused.host_embedding): ``FASTBENCH_OFFLOAD_EMBEDDING`` 1 (the default) or 0."""
    return _one_of(EMBEDDING_ENV, "1", {"1": "the offload mode keeps the input embedding's table in pinned host "
                                             "memory, the default", "0": "on the GPU"}) == "1"


def check_offload_switches() -> None:
    """Raises on a bad value of the offload mode's environment switches (before a model is touched)."""
    _save_every()
    _keep_last()
    _offload_streams()
    _whole_layers()
    embedding_offloaded()


class LayerCheckpointing:
    """Runs each decoder layer of a forward under the model's checkpointing policy."""

    def __init__(self, setting, layers: int | None = None):
        self.setting = setting
        self.mode, self.budget = parse_setting(setting)
        self.offloader = HostOffloader(_offload_streams()) if self.mode == "offload" else None
        self.bytes_per_token: float | None = None  # measured by the budget mode
        self._kept = 0
        self._slot = 0  # the next offload slot of this forward
        # offload mode: every n-th layer (0: none) keeps its last part's graph, with the activations that part
        # saves offloaded, instead of recomputing it
        self.save_last_every = _save_every() if self.mode == "offload" else 0
        # offload mode, a model of ``layers`` layers: its last keep_last layers keep on the GPU what would go to
        # the host (their backward comes first, while the copies of the layers before still drain)
        self.layers = layers
        self.keep_last = _keep_last() if self.mode == "offload" and layers else 0
        # offload mode: a layer whose MLP is recomputed keeps one input (recomputed as one unit) instead of two
        self.whole_layers = self.mode == "offload" and _whole_layers()

    def __call__(self, index: int, x: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        """Layer ``index`` of a forward, given as consecutive parts ``[(fn, params), ...]`` (x -> fn_1(x) ->
        fn_2(...) ...), under the policy; ``params``: the part's trainable parameters, or a callable
        returning them (asked for only when the part is recomputed)."""
        if self.mode == "keep" or not torch.is_grad_enabled():
            return _chain((fn for fn, _ in parts), x)
        if self.mode == "budget":
            if index == 0:
                self._kept = 0
            if self.bytes_per_token is None:
                return self._measure(parts, x)
            if (self._kept + 1) * self.bytes_per_token * x.shape[:-1].numel() <= self._budget(x):
                self._kept += 1
                return _chain((fn for fn, _ in parts), x)
        if index == 0:
            self._slot = 0
        saved_last = self.offloader is not None and self.save_last_every and index % self.save_last_every == 0
        whole = self.mode == "recompute" or (self.whole_layers and not saved_last)
        units = [parts] if whole else [[part] for part in parts]
        on_gpu = self.keep_last and index >= self.layers - self.keep_last
        offloader = None if on_gpu else self.offloader
        for unit in units[:-1] if saved_last else units:
            params = [t for _, p in unit for t in (p() if callable(p) else p)]
            x = _RecomputedUnit.apply(tuple(fn for fn, _ in unit), offloader, self._next_slot(), x, *params)
        if saved_last:
            fn = units[-1][0][0]
            x = fn(x) if on_gpu else self._offloading_saved(fn, x)
        return x

    def _next_slot(self) -> int:
        self._slot += 1
        return self._slot - 1

    def _offloading_saved(self, fn, x: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` with its graph kept and the activations it saves for the backward (the tensors of at least
        an eighth of x's size, parameters aside) copied to the host instead of kept on the device, one group
        that comes back as a whole in the backward. A view of a contiguous tensor at most twice its size is
        saved as that tensor (once for all its views), so views that lie side by side in one tensor (a fused
        product's outputs) still do after the backward fetched them. A tensor declared :func:`derived` from
        one saved before it is not copied but recomputed from that one in the backward."""
        group, bases, derivations = self._slot, {}, {}

        def base_of(t):  # a view goes as its base, once for all its views, unless the base is far larger
            base = t._base
            return t if base is None or not base.is_contiguous() or base.numel() > 2 * t.numel() else base

        def packed(t, entry, base):
            entry["uses"] += 1
            return entry, t.shape, t.stride(), t.storage_offset() - base.storage_offset() if base is not t else None

        def pack(t):
            if isinstance(t, torch.nn.Parameter) or t.numel() * 8 < x.numel():
                return t
            how = derivations.get(id(t))
            if how is not None and how[0] is t:
                _, source, recompute = how
                entry = bases.get(id(base_of(source)))
                if entry is not None:
                    return packed(source, entry, base_of(source)), recompute
            base = base_of(t)
            entry = bases.get(id(base))
            if entry is None:
                entry = bases[id(base)] = {"key": self.offloader.save(self._next_slot(), base, group),
                                           "uses": 0, "fetched": None, "base": base}
            return packed(t, entry, base)

        def restored(entry, shape, stride, offset):
            if entry["fetched"] is None:
                entry["fetched"] = self.offloader.load(entry["key"])
            base = entry["fetched"]
            entry["uses"] -= 1
            if entry["uses"] == 0:
                entry["fetched"] = None
            return base if offset is None else base.as_strided(shape, stride, base.storage_offset() + offset)

        def unpack(saved):
            if not isinstance(saved, tuple):
                return saved
            if len(saved) == 2:  # a derived tensor: (its source as saved, recompute)
                with torch.no_grad():
                    return saved[1](restored(*saved[0]))
            return restored(*saved)

        _state.derivations = derivations
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                y = fn(x)
        finally:
            _state.derivations = None
        for entry in bases.values():  # held only so that no other tensor took a base's id during fn
            del entry["base"]
        derivations.clear()
        return y

    def _budget(self, x) -> float:
        if self.budget is None:  # "auto", decided once at the first step
            if x.is_cuda:
                free, _ = torch.cuda.mem_get_info(x.device)
                self.budget = 0.7 * (free + torch.cuda.memory_reserved(x.device)
                                     - torch.cuda.memory_allocated(x.device))
            else:
                self.budget = float("inf")
        return self.budget

    def _measure(self, parts, x) -> torch.Tensor:
        storages = {}

        def pack(t):
            if isinstance(t, torch.nn.Parameter):
                return t
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = _chain((fn for fn, _ in parts), x)
        self.bytes_per_token = sum(storages.values()) / x.shape[:-1].numel()
        self._kept = 1
        return y

    def describe(self) -> str:
        n = self.save_last_every
        offload = ("recompute every layer, inputs" if not n else
                   "recompute every layer's attention, inputs and every MLP's activations" if n == 1 else
                   f"recompute every layer but every {_ordinal(n)} layer's MLP, inputs and those MLPs' activations")
        kept = (f" (the last {self.keep_last} layers' on the GPU)" if self.keep_last else "") + \
            ("; a layer recomputed whole keeps one input" if self.whole_layers else "")
        return {"keep": "no activation checkpointing", "recompute": "recompute every layer",
                "offload": f"{offload} offloaded to pinned CPU memory{kept}",
                "budget": f"keep layers within a budget of {self.setting} GiB, recompute the rest"}[self.mode]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _chain(fns, x):
    """fn_n(... fn_1(x))."""
    for fn in fns:
        x = fn(x)
    return x
