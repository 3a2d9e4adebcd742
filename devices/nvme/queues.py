"""Queue mechanics: fetching SQ entries, posting CQ entries, doorbells and shadow doorbells.

The queue *state* (base, size, head, tail, phase) is in :mod:`.state`; this module holds the
runtime objects beside it (wake-up events, in-flight counts, completions waiting for CQ room)
and the pure rules (phase tags, wrap-around, event-index arithmetic).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

import trio

from vfu_server.pci.polling import AdaptivePoll
from vfu_server.protocol.errors import DmaError

from .constants import CQE_SIZE, SQE_SIZE
from .dptr import Memory
from .state import CompletionQueueState, ShadowDoorbells, SubmissionQueueState

_CQE = struct.Struct("<IIHHHH")
_U32 = struct.Struct("<I")


class InflightCounter:
    """Commands started but not completed; lets a task wait for zero or for room."""

    def __init__(self) -> None:
        self.count = 0
        #: created only while someone waits: dec() is on every command's path
        self._changed: trio.Event | None = None

    def inc(self) -> None:
        self.count += 1

    def dec(self) -> None:
        self.count -= 1
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    async def wait_below(self, limit: int) -> None:
        while self.count >= limit:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    async def wait_zero(self) -> None:
        await self.wait_below(1)


@dataclass(eq=False)
class SqRuntime:
    qid: int
    wake: trio.Event = field(default_factory=trio.Event)
    #: the SQ task is parked on ``wake`` with nothing fetched: the doorbell may run the SQ
    idle: bool = False
    stop: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    inflight: InflightCounter = field(default_factory=InflightCounter)
    #: polling of the shadow tail once the SQ ran dry (I/O queues with shadow doorbells)
    poll: AdaptivePoll = field(default_factory=lambda: AdaptivePoll(0))


@dataclass(slots=True)
class PendingCompletion:
    sqid: int
    cid: int
    status: int
    dw0: int


@dataclass(eq=False)
class CqRuntime:
    qid: int
    #: completions that found the CQ full, posted in order as the host frees entries
    waiting: deque[PendingCompletion] = field(default_factory=deque)


def cq_full(cq: CompletionQueueState) -> bool:
    return (cq.tail + 1) % cq.size == cq.head


def cq_pending(cq: CompletionQueueState) -> int:
    """Entries posted and not yet consumed by the host."""
    return (cq.tail - cq.head) % cq.size


def valid_cq_head(cq: CompletionQueueState, new_head: int) -> bool:
    """The host may only release entries that were posted."""
    return new_head < cq.size and (new_head - cq.head) % cq.size <= cq_pending(cq)


def post_cqe(mem: Memory, cq: CompletionQueueState, entry: PendingCompletion, sq_head: int) -> None:
    """Write one completion at the CQ tail with the current phase tag and advance the tail.

    Raises DmaError when the CQ memory is gone; the caller decides what that means.
    """
    addr = cq.base + cq.tail * CQE_SIZE
    views = mem.views(addr, CQE_SIZE, write=True)
    data = _CQE.pack(entry.dw0 & 0xFFFFFFFF, 0, sq_head, entry.sqid, entry.cid,
                     cq.phase | (entry.status & 0x7FFF) << 1)
    # Dwords 0-2 first, then dword 3 with the phase tag: the host polls the phase bit, so it
    # must never see the new phase next to stale dwords.
    if len(views) == 1:
        v = views[0]
        v[:12] = data[:12]
        v[12:16] = data[12:16]
    else:
        pos = 0
        for v in views:
            v[:] = data[pos : pos + len(v)]
            pos += len(v)
    cq.tail += 1
    if cq.tail == cq.size:
        cq.tail = 0
        cq.phase ^= 1


def read_sqe(mem: Memory, sq: SubmissionQueueState) -> bytes | memoryview:
    """The entry at the SQ head: a view of guest memory when it lies in one region (decode
    copies the fields out at once), else the bytes joined from its pieces."""
    addr = sq.base + sq.head * SQE_SIZE
    view = getattr(mem, "view", None)
    if view is not None:
        try:
            return view(addr, SQE_SIZE)
        except DmaError:
            pass  # crosses a region boundary or unmapped: read() splits, or raises the error
    return mem.read(addr, SQE_SIZE)


# -- shadow doorbells (Doorbell Buffer Config) ----------------------------------------------

def shadow_offset(qid: int, completion: bool) -> int:
    # CAP.DSTRD is 0: 4-byte stride, SQ y tail at 2y, CQ y head at 2y+1.
    return (2 * qid + (1 if completion else 0)) * 4


def read_shadow(mem: Memory, shadow: ShadowDoorbells, qid: int, completion: bool) -> int | None:
    try:
        return _U32.unpack(mem.read(shadow.doorbells + shadow_offset(qid, completion), 4))[0]
    except DmaError:
        return None


def write_u32(mem: Memory, addr: int, value: int) -> bool:
    try:
        views = mem.views(addr, 4, write=True)
    except DmaError:
        return False
    data = _U32.pack(value & 0xFFFFFFFF)
    pos = 0
    for v in views:
        v[:] = data[pos : pos + len(v)]
        pos += len(v)
    return True


def write_shadow(mem: Memory, shadow: ShadowDoorbells, qid: int, completion: bool, value: int) -> None:
    write_u32(mem, shadow.doorbells + shadow_offset(qid, completion), value)


def write_event_idx(mem: Memory, shadow: ShadowDoorbells, qid: int, completion: bool, value: int) -> None:
    write_u32(mem, shadow.event_idx + shadow_offset(qid, completion), value)
