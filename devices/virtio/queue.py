"""Split virtqueues, device side (VIRTIO 1.2 section 2.7).

Everything a guest writes into a ring is untrusted: indexes, descriptor addresses, lengths,
``next`` links and indirect tables are checked before use, and a violation raises
:class:`VirtqueueError` (the transport then sets DEVICE_NEEDS_RESET) instead of crashing or
looping. Buffers are handed to devices as memoryviews of guest RAM (zero copy).

The queue's state is the plain :class:`QueueState` dataclass, the same fields as rust-vmm's
``virtio-queue`` ``QueueState``, so that migration can serialise it as it is.
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import trio

from vfu_server.pci.dma import GuestMemory
from vfu_server.pci.polling import AdaptivePoll
from vfu_server.protocol.errors import DmaError

from .spec import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    NO_VECTOR,
    USED_F_NO_NOTIFY,
)

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_NATIVE_LE = sys.byteorder == "little"
_USED_ELEM = struct.Struct("<II")
# A full memory barrier: taking an uncontended lock is an atomic read-modify-write, which
# orders our used-index store before the used_event load (and likewise for avail_event).
_fence_lock = threading.Lock()


def _mb() -> None:
    with _fence_lock:
        pass


def _load16(view: memoryview, offset: int) -> int:
    """The little-endian u16 at ``offset`` of ``view``, read with one 16-bit load.

    For the ring indexes and event fields, which the driver writes while we read: struct's
    ``"<H"`` assembles them a byte at a time, so it could combine two values. A memoryview's
    native ``"H"`` item is one 2-byte copy, a single load (the fields are 2-byte aligned,
    see :meth:`SplitQueue.check_layout`), as the driver's own access is.
    """
    value: int = view[offset : offset + 2].cast("H")[0]
    return value if _NATIVE_LE else (value >> 8) | (value & 0xFF) << 8


def _store16(view: memoryview, offset: int, value: int) -> None:
    """Store a little-endian u16 with one 16-bit store (see :func:`_load16`).

    Not ``struct.pack_into``: CPython's zeroes the field first and then writes it byte by
    byte, so a driver reading ``used->idx`` at that moment saw 0 (or half a new index), took
    the ring slots after its last seen index for completions and reaped stale ones.
    """
    if not _NATIVE_LE:
        value = (value >> 8) | (value & 0xFF) << 8
    view[offset : offset + 2].cast("H")[0] = value


class VirtqueueError(Exception):
    """The driver broke the ring protocol; the device must be reset."""


@dataclass
class QueueState:
    """Migratable state of one split virtqueue."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_table: int = 0
    avail_ring: int = 0
    used_ring: int = 0
    next_avail: int = 0
    next_used: int = 0
    event_idx_enabled: bool = False
    msix_vector: int = NO_VECTOR

    def __post_init__(self) -> None:
        if self.size == 0:
            self.size = self.max_size


@dataclass(slots=True)
class DescriptorChain:
    """One request: the head index and its buffers, device-readable then device-writable."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    #: total bytes of ``readable`` / ``writable``, counted while the chain is walked
    read_len: int = 0
    write_len: int = 0
    #: work the device began when it popped the chain, for the request's task to await (a
    #: virtio-blk FLUSH's :class:`~vfu_server.block.base.PendingFlush`)
    started: Any = None

    def read_bytes(self, limit: int | None = None) -> bytes:
        """Copy (up to ``limit`` bytes of) the readable part."""
        out = bytearray()
        for v in self.readable:
            if limit is not None and len(out) + v.nbytes >= limit:
                out += v[: limit - len(out)]
                break
            out += v
        return bytes(out)

    def write_bytes(self, data: bytes | bytearray | memoryview, start: int = 0) -> int:
        """Copy ``data`` into the writable part from byte ``start``; returns bytes stored."""
        src = memoryview(data).cast("B")
        done = 0
        for v in self.writable:
            if start >= v.nbytes:
                start -= v.nbytes
                continue
            n = min(v.nbytes - start, src.nbytes - done)
            v[start : start + n] = src[done : done + n]
            done += n
            start = 0
            if done == src.nbytes:
                break
        return done


class Doorbell:
    """A wake-up flag for one task: ``ring()`` from anywhere on the loop, ``await wait()``."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._waiting = False

    def ring(self) -> None:
        self._event.set()

    @property
    def parked(self) -> bool:
        """A task sleeps in :meth:`wait` and was not rung since: it holds nothing mid-way."""
        return self._waiting and not self._event.is_set()

    async def wait(self) -> None:
        self._waiting = True
        try:
            await self._event.wait()
        finally:
            self._waiting = False
        self._event = trio.Event()


class SplitQueue:
    """Device-side access to one split virtqueue in guest memory."""

    def __init__(self, index: int, state: QueueState, dma: GuestMemory) -> None:
        self.index = index
        self.state = state
        self.dma = dma
        #: rung by the transport on a notify write (and by completions, to flush)
        self.doorbell = Doorbell()
        #: False once the device was reset: late completions are dropped, pops return nothing
        self.active = True
        #: False while the server shuts down: in-flight requests finish, no new ones start
        self.accepting = True
        self.inflight = 0
        self.idle = trio.Event()
        self.idle.set()
        self._used: list[tuple[int, int]] = []
        #: used elements a C fast path already wrote into the ring after next_used
        self._used_elsewhere = 0
        # None until the first notification decision: the first one always interrupts, as
        # QEMU and vhost do, since the driver's used_event may predate us.
        self._signalled_used: int | None = None
        self.indirect_ok = True
        # The avail index as last read (None: read it). Chains up to it are known to be
        # available, so pop() reads the index from guest memory only once it caught up.
        self._avail_seen: int | None = None
        self._notify_suppressed = False
        #: how long to poll the avail ring after running dry (the transport sets the maximum)
        self.poll = AdaptivePoll(0)

    # -- validation -----------------------------------------------------------------------

    def check_layout(self) -> None:
        """Called when the driver enables the queue: sizes and alignment (2.7 Table)."""
        s = self.state
        if not (0 < s.size <= s.max_size and s.size & (s.size - 1) == 0):
            raise VirtqueueError(f"queue {self.index}: bad size {s.size}")
        if s.desc_table % 16 or s.avail_ring % 2 or s.used_ring % 4:
            raise VirtqueueError(f"queue {self.index}: misaligned rings")
        for name, addr, length in self._ring_areas():
            if not self.dma.contains(addr, length):
                raise VirtqueueError(f"queue {self.index}: {name} ring {addr:#x}+{length:#x} is not mapped")

    def _ring_areas(self) -> list[tuple[str, int, int]]:
        n = self.state.size
        return [("descriptor", self.state.desc_table, 16 * n), ("available", self.state.avail_ring, 6 + 2 * n),
                ("used", self.state.used_ring, 6 + 8 * n)]

    def _view(self, addr: int, length: int, write: bool = False) -> memoryview:
        try:
            # update: a ring written in place (guest memory without an fd reads it first)
            return self.dma.view(addr, length, write=write, update=write)
        except DmaError as exc:
            raise VirtqueueError(f"queue {self.index}: ring not accessible: {exc}") from None

    # -- driver -> device ----------------------------------------------------------------

    def avail_idx(self) -> int:
        return _load16(self._view(self.state.avail_ring + 2, 2), 0)

    def pending(self) -> int:
        """Number of chains the driver made available that we did not pop yet."""
        idx = self.avail_idx()
        n = (idx - self.state.next_avail) & 0xFFFF
        if n > self.state.size:
            raise VirtqueueError(f"queue {self.index}: avail index jumped by {n} (size {self.state.size})")
        self._avail_seen = idx
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None. Raises :class:`VirtqueueError` on a bad ring."""
        if not (self.active and self.accepting):
            return None
        s = self.state
        seen = self._avail_seen
        # Re-read the index only when the chains seen last time are used up (or if
        # next_avail moved behind our back): one read per batch instead of one per chain.
        if (seen is None or not 0 < (seen - s.next_avail) & 0xFFFF <= s.size) and self.pending() == 0:
            return None
        size = s.size
        head = _U16.unpack_from(self._view(s.avail_ring + 4 + 2 * (s.next_avail % size), 2))[0]
        s.next_avail = (s.next_avail + 1) & 0xFFFF
        chain = self._walk(head)
        self.inflight += 1
        self.idle = trio.Event() if self.inflight == 1 else self.idle
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        s = self.state
        size = s.size
        if head >= size:
            raise VirtqueueError(f"queue {self.index}: head {head} >= size {size}")
        table = self._view(s.desc_table, 16 * size)
        chain = DescriptorChain(head)
        index, limit, count = head, size, 0
        indirect = False
        seen_write = False
        while True:
            count += 1
            # Every chain, indirect tables included, is at most queue-size long (2.7.5.3.1),
            # which also ends any loop in the next links.
            if count > size:
                raise VirtqueueError(f"queue {self.index}: chain from head {head} is longer than {size}")
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
            if flags & DESC_F_INDIRECT:
                if indirect or not self.indirect_ok:
                    raise VirtqueueError(f"queue {self.index}: nested or unnegotiated indirect descriptor")
                if flags & DESC_F_NEXT or length == 0 or length % 16:
                    raise VirtqueueError(f"queue {self.index}: bad indirect descriptor (len {length}, flags {flags:#x})")
                limit = length // 16
                if limit > size:
                    raise VirtqueueError(f"queue {self.index}: indirect table of {limit} entries > size {size}")
                table = self._view(addr, length)
                indirect, index, count = True, 0, 0
                continue
            write = bool(flags & DESC_F_WRITE)
            if write:
                seen_write = True
            elif seen_write:
                raise VirtqueueError(f"queue {self.index}: readable descriptor after a writable one")
            if length:
                try:
                    # deferred: guest memory without an fd sees the buffer when push() says
                    # the request is done, whichever task filled it.
                    views = self.dma.views(addr, length, write=write, deferred=write)
                except DmaError as exc:
                    raise VirtqueueError(f"queue {self.index}: buffer {addr:#x}+{length:#x}: {exc}") from None
                if write:
                    chain.writable += views
                    chain.write_len += length
                else:
                    chain.readable += views
                    chain.read_len += length
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= limit:
                raise VirtqueueError(f"queue {self.index}: next {nxt} outside a table of {limit}")
            index = nxt

    # -- device -> driver ----------------------------------------------------------------

    def unpop(self, count: int) -> None:
        """Give the last ``count`` popped chains back (none of them pushed): they are popped
        again later. For a device that needs several chains for one request and found too
        few (virtio-net's mergeable receive buffers)."""
        if not 0 <= count <= self.inflight:
            raise ValueError(f"cannot give back {count} chains, {self.inflight} in flight")
        s = self.state
        s.next_avail = (s.next_avail - count) & 0xFFFF
        self.inflight -= count
        if self.inflight == 0:
            self.idle.set()

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Queue a used element; it becomes visible to the driver at the next :meth:`flush`."""
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()
        if chain.writable:
            self.dma.seal(chain.writable)
        if self.active:
            self._used.append((chain.head, written))

    def completed_elsewhere(self, count: int, next_avail: int) -> None:
        """A C fast path consumed chains up to ``next_avail`` and wrote ``count`` used
        elements into the ring from ``next_used`` on; :meth:`flush` publishes them. Only
        while nothing else waits to be published (:meth:`can_complete_elsewhere`)."""
        self.state.next_avail = next_avail
        self._used_elsewhere += count

    def can_complete_elsewhere(self) -> bool:
        return self.active and self.accepting and not self._used

    @property
    def pending_elsewhere(self) -> int:
        """Used elements written by :meth:`completed_elsewhere` callers, not yet published."""
        return self._used_elsewhere

    def flush(self) -> bool:
        """Publish the queued used elements; True if the driver wants an interrupt for them."""
        if not (self._used or self._used_elsewhere) or not self.active:
            return False
        s = self.state
        size = s.size
        if self.dma.message_mode:
            return self._flush_by_messages()
        used = self._view(s.used_ring, 6 + 8 * size, write=True)
        old = s.next_used
        idx = (old + self._used_elsewhere) & 0xFFFF
        self._used_elsewhere = 0
        for head, length in self._used:
            _USED_ELEM.pack_into(used, 4 + 8 * (idx % size), head, length)
            idx = (idx + 1) & 0xFFFF
        self._used.clear()
        # x86 keeps stores in order, so the elements are visible before the index; the
        # index itself changes in one store (a driver may be reading it right now).
        _store16(used, 2, idx)
        s.next_used = idx
        return self._needs_interrupt(old, idx)

    def _flush_by_messages(self) -> bool:
        """:meth:`flush` for a ring the device reaches through DMA_WRITE messages: the new
        elements and the index, written as they are (no read of the whole ring first; the
        writes go out in this order, elements before the index)."""
        s = self.state
        size = s.size
        old = s.next_used
        idx = (old + self._used_elsewhere) & 0xFFFF
        self._used_elsewhere = 0
        for head, length in self._used:
            self._used_write(4 + 8 * (idx % size), _USED_ELEM.pack(head, length))
            idx = (idx + 1) & 0xFFFF
        self._used.clear()
        self._used_write(2, _U16.pack(idx))
        s.next_used = idx
        return self._needs_interrupt(old, idx)

    def _used_write(self, offset: int, data: bytes) -> None:
        try:
            self.dma.write(self.state.used_ring + offset, data)
        except DmaError as exc:
            raise VirtqueueError(f"queue {self.index}: ring not accessible: {exc}") from None

    def _needs_interrupt(self, old: int, new: int) -> bool:
        s = self.state
        avail = self._view(s.avail_ring, 6 + 2 * s.size)
        if not s.event_idx_enabled:
            return not _load16(avail, 0) & AVAIL_F_NO_INTERRUPT
        _mb()
        used_event = _load16(avail, 4 + 2 * s.size)
        first = self._signalled_used is None
        self._signalled_used = new
        # vring_need_event: did the used index pass used_event in this step (old, new]?
        return first or (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

    def driver_behind(self) -> bool:
        """The driver has not yet taken two or more of the used elements we published: its
        used_event (EVENT_IDX, set to what it consumed when it re-enables interrupts) lies that
        far behind our used index. One is not enough: a driver may finish a request, and its
        submitter may send the next, before it re-enables interrupts. False without EVENT_IDX,
        where the driver says nothing of it, and for a used_event of 0, which Linux writes
        while interrupts are off (virtqueue_disable_cb)."""
        s = self.state
        if not s.event_idx_enabled or not self.active:
            return False
        try:
            avail = self.dma.view(s.avail_ring + 4 + 2 * s.size, 2)
        except DmaError:
            return False
        used_event = _load16(avail, 0)
        lag = (s.next_used - used_event) & 0xFFFF
        return used_event != 0 and 2 <= lag <= s.size

    def enable_notification(self, beyond: int = 0) -> bool:
        """Before sleeping: ask the driver to kick for anything after ``next_avail`` (plus
        ``beyond`` chains that are available already but not enough).

        Returns True if more chains arrived meanwhile (then do not sleep)."""
        if not (self.active and self.accepting):
            return False
        s = self.state
        if self.dma.message_mode:
            if s.event_idx_enabled:
                self._used_write(4 + 8 * s.size, _U16.pack((s.next_avail + beyond) & 0xFFFF))
            elif self._notify_suppressed:
                self._used_write(0, _U16.pack(0))
        else:
            used = self._view(s.used_ring, 6 + 8 * s.size, write=True)
            if s.event_idx_enabled:
                _store16(used, 4 + 8 * s.size, (s.next_avail + beyond) & 0xFFFF)
            elif self._notify_suppressed:
                _store16(used, 0, 0)
        self._notify_suppressed = False
        _mb()
        return self.pending() > beyond

    def suppress_notification(self) -> None:
        """While polling: tell the driver it need not kick for new chains.

        With EVENT_IDX, avail_event goes one behind ``next_avail``, which the driver's
        avail index only crosses after a whole lap; without it, VIRTQ_USED_F_NO_NOTIFY.
        :meth:`enable_notification` undoes it before the queue sleeps."""
        if not (self.active and self.accepting):
            return
        s = self.state
        if self.dma.message_mode:
            if s.event_idx_enabled:
                self._used_write(4 + 8 * s.size, _U16.pack((s.next_avail - 1) & 0xFFFF))
            else:
                self._used_write(0, _U16.pack(USED_F_NO_NOTIFY))
        else:
            used = self._view(s.used_ring, 6 + 8 * s.size, write=True)
            if s.event_idx_enabled:
                _store16(used, 4 + 8 * s.size, (s.next_avail - 1) & 0xFFFF)
            else:
                _store16(used, 0, USED_F_NO_NOTIFY)
        self._notify_suppressed = True
