"""The offload mode's copies: :class:`HostOffloader` moves checkpointed inputs to pinned host memory on a side
stream and back ahead of their use; :func:`offloading_saved` runs a part with its graph kept and the activations
it saves copied to the host.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import weakref
from typing import Callable

import torch

from fastbench.distributed.host_memory import available_host_bytes
from fastbench.fused.checkpointing.config import GiB, OffloadConfig
from fastbench.fused.checkpointing.context import PartContext

# device memory that queued copies to the host may hold (their sources are not reused before the copy read them)
# before the compute stream waits for the oldest: bounds the offload mode's memory where the bus is slower than
# the compute
MAX_COPYING_BYTES = OffloadConfig().copy_queue_bytes
HOST_RESERVE_BYTES = OffloadConfig().host_reserve_bytes  # host memory that new host buffers leave available


class PinnedMemoryShort(MemoryError):
    """The host lacks the memory for the offload mode's next host buffer: ``shortage`` gives the numbers, the
    message them and what to change."""

    def __init__(self, shortage: str):
        self.shortage = shortage
        super().__init__(f"{shortage}. Train shorter sequences or smaller batches, use a budget in GiB "
                         "(use_gradient_checkpointing=<GiB>: it offloads only what does not fit the GPU), or "
                         "use_gradient_checkpointing=True (nothing in host memory)")


class HostOffloader:
    """Copies checkpointed inputs to pinned host buffers on a side stream and back, prefetching one ahead.

    The copies to the host and those back run on two streams, so that the bus carries both directions at once
    (where the backward's first fetches meet the forward's last copies out). Events keep the order that one
    stream would: a copy back waits for its copy out, and a buffer's next copy out for the copy back that read
    it. Each copy first makes its stream wait for all work queued on the compute stream: it then reads only
    finished data, and writes only memory that no queued kernel still uses (a buffer the compute stream freed
    while the CPU ran ahead).

    Device memory stays the compute stream's: nothing is allocated on a side stream, and nothing is marked as
    used by one (``record_stream``, which holds a block back from reuse until all that the side stream queued
    by the time the block is freed has run, and so makes the allocator reserve more). A source copied to the
    host is kept referenced until its copy is seen finished, or, once the sources of copies still on the bus
    hold more than ``max_copying_bytes`` (default MAX_COPYING_BYTES) of device memory, until the compute
    stream is made to wait for the oldest copy: its source's memory then goes back to the compute stream's
    pool, where only work queued after that wait can reuse it. The host never waits for the bus, so it goes
    on issuing work; the compute stream waits only where the bus is that far behind. An input fetched back
    is allocated on the compute stream, which waits for the copy's event before the input is used or
    dropped.

    ``queue_waits``: how many copies to the host the compute stream was made to wait for, in total (the copy
    queue full: the bus slower than the compute). :meth:`timed_waits` times the compute stream's waits, for
    copies to the host and for inputs fetched back.

    Host memory: a new host buffer that would leave less than ``host_reserve_bytes`` of the host's memory
    available first takes the place of the inputs the forwards before this one left (a step that failed, out
    of GPU memory say, leaves its forward's until two forwards later; a second forward before one backward
    then loses its inputs), and otherwise raises :class:`PinnedMemoryShort` instead of letting the operating
    system kill the process. So does one that would make the buffers hold more than ``host_limit_bytes`` (None:
    no limit but the host's)."""

    def __init__(self, max_copying_bytes: int = MAX_COPYING_BYTES, host_reserve_bytes: int = HOST_RESERVE_BYTES,
                 prefetch_groups: int = 0, host_limit_bytes: int | None = None):
        self.max_copying_bytes = max_copying_bytes
        self.prefetch_groups = prefetch_groups
        self.host_reserve_bytes = host_reserve_bytes
        self.host_limit_bytes = host_limit_bytes
        # keys are (forward number, slot), slots numbering a forward's checkpointed parts 0, 1, ...: an entry
        # left by a step whose backward never finished (an OOM retry) can never be mistaken for a later step's
        # -> (buffer, host view, device, the copy's event or None)
        self._saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.device, object]] = {}
        self._prefetched: dict[tuple[int, int], tuple[torch.Tensor, object]] = {}  # -> (x on its device, copy done)
        self._free: list[torch.Tensor] = []  # flat host buffers to reuse
        self._groups: dict[tuple[int, int], tuple] = {}  # key -> its group (entries fetched back together)
        self._members: dict[tuple, list[tuple[int, int]]] = {}  # group -> its keys, in slot order
        self._lookahead = 0  # bytes to keep fetched ahead in a backward: the largest group of the forward
        self._copying: collections.deque = collections.deque()  # (done event, source) of queued copies to the host
        self._copying_bytes = 0
        self._registered: list[torch.Tensor] = []  # every buffer pinned by registration, unregistered when self goes
        weakref.finalize(self, _unregister, self._registered)
        weakref.finalize(self, _wait_for_fetches, self._prefetched)
        self._forward = 0
        self._streams: dict[str, torch.cuda.Stream] = {}  # "out" (to the host), "in" (back)
        self._reads: dict[int, object] = {}  # a freed buffer's data_ptr -> the event of the copy back that read it
        self.queue_waits = 0
        self._timed: dict | None = None  # while timed: "out"/"in" -> (before, after) CUDA events around each wait

    @contextlib.contextmanager
    def timed_waits(self):
        """Within: each wait of the compute stream for a copy, to the host ("out", the copy queue full) or back
        from it ("in", an input fetched back), is bracketed by two timing events (any thread: the backward runs
        in autograd's). Yields a function that, once the GPU has run the work (synchronize first), gives the
        milliseconds the compute stream stood waiting in total, (out, in): the time the bus, not the host or
        the kernels, set the pace."""
        events = self._timed = {"out": [], "in": []}
        try:
            yield lambda: tuple(sum(before.elapsed_time(after) for before, after in events[kind])
                                for kind in ("out", "in"))
        finally:
            self._timed = None

    def _compute_waits_for(self, done, device: torch.device, kind: str) -> None:
        """Makes the compute stream of ``device`` wait for the copy whose event is ``done`` (``kind``: "out" or
        "in", as :meth:`timed_waits` counts it)."""
        compute = torch.cuda.current_stream(device)
        timed = self._timed
        if timed is None:
            compute.wait_event(done)
            return
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(done)
        after.record(compute)
        timed[kind].append((before, after))

    def _side_stream_after_compute(self, direction: str, device: torch.device):
        """The stream of the copies ``direction`` ("out" to the host, "in" back), made to wait for the compute
        stream of ``device``."""
        # current_stream() must be read here, outside `torch.cuda.stream(side)`: inside, it is the side
        # stream itself, and a stream that waits on itself orders nothing (the copies would race the compute)
        if not self._streams:
            self._streams = {"out": torch.cuda.Stream(device), "in": torch.cuda.Stream(device)}
        stream = self._streams[direction]
        stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def _host_buffer(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A flat buffer of at least like.numel() elements and its view shaped like ``like``: a free one
        where one is large enough; else a new one, rounded up (so that inputs a little longer than the last
        ones reuse it), and the free buffers too small for this input are released. Pinned host memory then
        stays about one forward's worth when the lengths of a run's batches vary, instead of growing with
        each new longest batch."""
        need, size = like.numel(), _rounded_up(like.numel())
        nbytes = size * like.element_size()
        buf = self._reuse(need, like.dtype)
        room = buf is not None or self._has_room(nbytes)
        if not room:
            self._release_before(self._forward)  # the inputs of earlier forwards: an abandoned step's, likely
            buf = self._reuse(need, like.dtype)
        if buf is None:
            self._release_smaller(need, like.dtype)
            if not room:  # what was released may have made room
                self._check_host_room(nbytes)
            buf = (_pinned_empty(size, like.dtype, self._registered) if like.is_cuda
                   else torch.empty(size, dtype=like.dtype))
        return buf, buf[:need].view(like.shape)

    def host_room_bytes(self) -> int:
        """The bytes of inputs a new forward could leave in host memory: the buffers this offloader holds (free,
        or an earlier forward's, which it gives up when short) and the host's available memory less the
        reserve, at most the limit."""
        room = self._held_bytes() + available_host_bytes() - self.host_reserve_bytes
        return room if self.host_limit_bytes is None else min(room, self.host_limit_bytes)

    def _has_room(self, nbytes: int) -> bool:
        """Whether a new buffer of ``nbytes`` leaves the reserve available and the buffers within the limit."""
        if self.host_limit_bytes is not None and self._held_bytes() + nbytes > self.host_limit_bytes:
            return False
        return available_host_bytes() - nbytes >= self.host_reserve_bytes

    def _held_bytes(self) -> int:
        return sum(b.untyped_storage().nbytes() for b in self._free) + sum(
            entry[0].untyped_storage().nbytes() for entry in self._saved.values())

    def _reuse(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A free buffer of ``dtype`` with at least ``numel`` elements, taken from the free list; else None."""
        for i, buf in enumerate(self._free):
            if buf.dtype == dtype and buf.numel() >= numel:
                return self._free.pop(i)
        return None

    def _check_host_room(self, nbytes: int) -> None:
        """Raises :class:`PinnedMemoryShort` where ``nbytes`` more host memory would leave less than the reserve,
        or make the buffers hold more than the limit."""
        if self._has_room(nbytes):
            return
        available, held, limit = available_host_bytes(), self._held_bytes(), self.host_limit_bytes
        if limit is not None and held + nbytes > limit:
            raise PinnedMemoryShort(
                f"offloaded checkpointing needs {nbytes / GiB:.2f} GiB more host memory for this forward's inputs, "
                f"beside the {held / GiB:.1f} GiB it holds, past this process's limit of {limit / GiB:.1f} GiB "
                "(OffloadConfig.host_limit_gib, fastbench train --offload-host-gib)")
        raise PinnedMemoryShort(
            f"offloaded checkpointing needs {nbytes / GiB:.2f} GiB more host memory for this forward's inputs, "
            f"beside the {held / GiB:.1f} GiB it holds, and the host has {available / GiB:.1f} GiB available, of "
            f"which it leaves {self.host_reserve_bytes / GiB:g} GiB free (OffloadConfig.host_reserve_gib)")

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
        """Forget what forwards before ``forward`` left behind (their backward never ran to the end). An input
        fetched ahead and never loaded is dropped only once the compute stream waits for its copy back: its
        memory, the compute stream's, may then be reused at once."""
        for key in [k for k in self._saved if k[0] < forward]:  # never fetched: no copy back read them
            self._free.append(self._saved.pop(key)[0])
        _wait_for_fetches({k: self._prefetched.pop(k) for k in [k for k in self._prefetched if k[0] < forward]})
        for key in [k for k in self._groups if k[0] < forward]:
            self._members.pop(self._groups.pop(key), None)

    def save(self, slot: int, x: torch.Tensor, group=None) -> tuple[int, int]:
        """Starts copying ``x`` to the host; returns the key that ``load`` takes. Slot 0 starts a new
        forward; the entries of the previous forward are kept (two forwards before one backward work),
        older ones are released. Entries saved under one ``group`` (within a forward) come back together."""
        self._drain_copies()
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
            # a strided source would be made contiguous inside the copy, in memory of the side stream's own
            # pool (reserved, and never reused by the compute stream): done here, on the compute stream
            x = x if x.is_contiguous() else x.contiguous()
            stream = self._side_stream_after_compute("out", x.device)
            read = self._reads.pop(buf.data_ptr(), None)
            if read is not None:  # the copy back that last read this buffer must have finished
                stream.wait_event(read)
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            self._hold_until_copied(x, done)
        else:
            host.copy_(x)
        self._saved[key] = (buf, host, x.device, done)
        return key

    def _hold_until_copied(self, x: torch.Tensor, done) -> None:
        """Keeps ``x``, the source of a copy to the host, referenced until that copy's event ``done`` is seen
        finished or the compute stream is made to wait for it (:meth:`_drain_copies`). Marking x as used by the
        side stream instead (``record_stream``) keeps its memory from reuse until all that the side stream
        queued by the time x is freed has run, and the allocator reserves new memory meanwhile."""
        self._copying.append((done, x))
        self._copying_bytes += x.nbytes
        self._drain_copies()

    def _drain_copies(self) -> None:
        """Drops the sources of the copies to the host that finished (oldest first: one stream runs them in
        order), their memory back to the compute stream's pool at once; while the rest hold more than
        ``max_copying_bytes`` of device memory, drops the oldest too, after making the compute stream wait for
        its copy (the host does not wait: it goes on queuing work)."""
        while self._copying and (self._copying_bytes > self.max_copying_bytes or self._copying[0][0].query()):
            done, x = self._copying.popleft()
            if not done.query():
                self._compute_waits_for(done, x.device, "out")
                self.queue_waits += 1
            self._copying_bytes -= x.nbytes

    def _fetch(self, key: tuple[int, int]):
        """Starts copying the input saved under ``key`` back to its device: (x, the copy's event or None).
        x is allocated on the compute stream, and that stream waits for the event before x is used or
        dropped (:meth:`load`, :meth:`_release_before`), so x's memory needs no side-stream bookkeeping."""
        if key not in self._saved:
            raise RuntimeError("the offloaded input of this layer was released: offloaded checkpointing keeps "
                               "the inputs of the last two forwards until their backward, and gives up the "
                               "earlier forward's where the host runs short of memory")
        buf, host, device, copied_out = self._saved.pop(key)
        self._free.append(buf)  # a later save's copy into it waits for this copy's event
        if device.type != "cuda":
            return host.clone(), None
        x = torch.empty(host.shape, dtype=host.dtype, device=device)
        stream = self._side_stream_after_compute("in", device)
        stream.wait_event(copied_out)
        with torch.cuda.stream(stream):
            x.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._reads[buf.data_ptr()] = done
        return x, done

    def load(self, key: tuple[int, int]) -> torch.Tensor:
        """The input saved under ``key`` on its device, the compute stream made to wait for its copy; starts
        fetching what comes below it."""
        self._drain_copies()
        x, done = self._prefetched.pop(key, None) or self._fetch(key)
        self._prefetch_below(key)
        if done is not None:
            self._compute_waits_for(done, x.device, "in")
        return x

    def _prefetch_below(self, key: tuple[int, int]) -> None:
        """Fetches the groups of the slots below ``key``, nearest first, while fewer than ``prefetch_groups``
        groups (0: less than the forward's largest group's bytes, at least one group) are on their way."""
        ahead = sum(x.nbytes for k, (x, _) in self._prefetched.items() if k[0] == key[0])
        groups = len({self._groups[k] for k in self._prefetched if k[0] == key[0]})
        for slot in range(key[1] - 1, -1, -1):
            below = (key[0], slot)
            if below in self._prefetched:
                continue
            full = groups >= self.prefetch_groups if self.prefetch_groups else (ahead and ahead >= self._lookahead)
            if below not in self._saved or full:
                return
            groups += 1
            for member in self._members[self._groups[below]]:
                if member in self._saved:
                    self._prefetched[member] = fetched = self._fetch(member)
                    ahead += fetched[0].nbytes


def _wait_for_fetches(prefetched: dict) -> None:
    """Makes the compute stream wait for the copies back of inputs fetched ahead (``{key: (x, done)}``), which
    are then dropped: their memory returns to the compute stream's pool, which must not reuse it before the
    copies into it finished."""
    for x, done in prefetched.values():
        if done is not None:
            torch.cuda.current_stream(x.device).wait_event(done)
    prefetched.clear()


def _rounded_up(n: int) -> int:
    """n rounded up to a multiple of 1/8 of the power of two below it (at most 12.5% more)."""
    step = max(1, (1 << max(0, n.bit_length() - 1)) >> 3)
    return -(-n // step) * step


_registration = {"works": True}  # False once cudaHostRegister failed in this process (WSL, some ARM boards)


def _pinned_empty(numel: int, dtype: torch.dtype, registered: list[torch.Tensor]) -> torch.Tensor:
    """A host buffer of ``numel`` elements that the GPU copies to and from asynchronously, appended to
    ``registered`` when pinned by registration. Its pages are faulted in by torch's intra-op threads
    (``zero_``) and then registered with CUDA: faster than ``pin_memory=True`` (cudaHostAlloc, which
    faults the pages in on one thread), a cost the offload mode's first step pays. Where registration
    fails, ``pin_memory=True`` from then on."""
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


def offloading_saved(fn, x: torch.Tensor, offloader: HostOffloader, next_slot: Callable[[], int]) -> torch.Tensor:
    """``fn(x, context)`` with its graph kept and the activations it saves for the backward (the tensors of at
    least an eighth of x's size, parameters aside) copied to the host instead of kept on the device, one group
    that comes back as a whole in the backward. A view of a contiguous tensor at most twice its size is saved
    as that tensor (once for all its views), so views that lie side by side in one tensor (a fused product's
    outputs) still do after the backward fetched them. A tensor declared derived from one saved before it
    (:meth:`PartContext.derived`) is not copied but recomputed from that one in the backward. ``next_slot()``
    gives each copy its offloader slot; the group is named by the first one."""
    bases, derivations, group = {}, {}, []
    # pack must not reference x: autograd keeps the hooks, with what they reference, as long as the graph, and x
    # would stay on the device until the backward beside its copy on the host
    small = x.numel() / 8

    def base_of(t):  # a view goes as its base, once for all its views, unless the base is far larger
        base = t._base
        return t if base is None or not base.is_contiguous() or base.numel() > 2 * t.numel() else base

    def packed(t, entry, base):
        entry["uses"] += 1
        return entry, t.shape, t.stride(), t.storage_offset() - base.storage_offset() if base is not t else None

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or t.numel() < small:
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
            slot = next_slot()
            if not group:
                group.append(slot)
            entry = bases[id(base)] = {"key": offloader.save(slot, base, group[0]),
                                       "uses": 0, "fetched": None, "base": base}
        return packed(t, entry, base)

    def restored(entry, shape, stride, offset):
        if entry["fetched"] is None:
            entry["fetched"] = offloader.load(entry["key"])
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

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = fn(x, PartContext(derivations=derivations))
    for entry in bases.values():  # held only so that no other tensor took a base's id during fn
        del entry["base"]
    derivations.clear()
    return y
