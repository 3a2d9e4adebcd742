"""A small NVMe host driver for tests: queues in :class:`GuestRam`, doorbells over vfio-user.

::

    async with running_server("nvme", "--size", "16M") as server:
        async with await Client.connect(server.socket_path) as client:
            drv = NvmeTestDriver(client, GuestRam(32 << 20))
            await drv.start()                      # map RAM, MSI-X, enable, admin queue
            ident = await drv.identify(1)          # Identify Controller bytes
            q = await drv.create_io_queue_pair(1, entries=64)
            buf = drv.ram.alloc(4096)
            c = await drv.io(q, IO_WRITE, nsid=1, slba=0, nlb=7, buf=buf, length=4096)
            assert c.ok

Everything is explicit so that tests can also build broken commands: :meth:`submit` takes
any :class:`SubmissionEntry`, :meth:`ring_sq` any value.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from ..client import Client, EventFd, GuestRam
from .process import ServerProcess, running_server

PAGE = 4096
REG_CAP, REG_VS, REG_INTMS, REG_INTMC, REG_CC, REG_CSTS = 0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C
REG_AQA, REG_ASQ, REG_ACQ = 0x24, 0x28, 0x30
DOORBELLS = 0x1000

ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_GET_LOG_PAGE = 0x00, 0x01, 0x02
ADMIN_DELETE_CQ, ADMIN_CREATE_CQ, ADMIN_IDENTIFY = 0x04, 0x05, 0x06
ADMIN_ABORT, ADMIN_SET_FEATURES, ADMIN_GET_FEATURES = 0x08, 0x09, 0x0A
ADMIN_AER, ADMIN_KEEP_ALIVE, ADMIN_DBBUF, ADMIN_FORMAT = 0x0C, 0x18, 0x7C, 0x80
IO_FLUSH, IO_WRITE, IO_READ, IO_COMPARE = 0x00, 0x01, 0x02, 0x05
IO_WRITE_ZEROES, IO_DSM, IO_VERIFY = 0x08, 0x09, 0x0C

_SQE = struct.Struct("<BBHIIIQQQ6I")
_CQE = struct.Struct("<IIHHHH")


@dataclass
class SubmissionEntry:
    opcode: int
    nsid: int = 0
    prp1: int = 0
    prp2: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0
    flags: int = 0  # byte 1 of CDW0: FUSE (1:0) and PSDT (7:6)
    cid: int | None = None
    mptr: int = 0
    #: 16 raw bytes replacing PRP1/PRP2 (an SGL descriptor); None uses prp1/prp2
    dptr: bytes | None = None

    def pack(self, cid: int) -> bytes:
        raw = bytearray(_SQE.pack(self.opcode & 0xFF, self.flags & 0xFF, cid & 0xFFFF, self.nsid & 0xFFFFFFFF,
                                  0, 0, self.mptr & (2**64 - 1), self.prp1 & (2**64 - 1), self.prp2 & (2**64 - 1),
                                  *(x & 0xFFFFFFFF for x in (self.cdw10, self.cdw11, self.cdw12, self.cdw13,
                                                             self.cdw14, self.cdw15))))
        if self.dptr is not None:
            raw[24:40] = self.dptr[:16].ljust(16, b"\0")
        return bytes(raw)


@dataclass(frozen=True)
class Completion:
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # 15-bit status field: SC 7:0, SCT 10:8, CRD, M, DNR 14

    @property
    def sc(self) -> int:
        return self.status & 0xFF

    @property
    def sct(self) -> int:
        return (self.status >> 8) & 7

    @property
    def code(self) -> int:
        """SCT << 8 | SC, comparable with ``devices.nvme.constants.Status``."""
        return self.status & 0x7FF

    @property
    def dnr(self) -> bool:
        return bool(self.status >> 14 & 1)

    @property
    def ok(self) -> bool:
        return self.code == 0


class NvmeCommandError(AssertionError):
    def __init__(self, completion: Completion, what: str) -> None:
        super().__init__(f"{what} failed: SCT {completion.sct:#x} SC {completion.sc:#x}")
        self.completion = completion


@dataclass(eq=False)
class QueuePair:
    qid: int
    entries: int
    sq_base: int
    cq_base: int
    vector: int
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1
    next_cid: int = 0
    done: dict[int, Completion] = field(default_factory=dict)
    outstanding: set[int] = field(default_factory=set)

    @property
    def sq_free(self) -> int:
        return self.entries - 1 - len(self.outstanding)


class NvmeTestDriver:
    """Drives one NVMe controller through a :class:`Client`; all memory lives in ``ram``."""

    def __init__(self, client: Client, ram: GuestRam, *, bar: int = 0) -> None:
        self.client = client
        self.ram = ram
        self.bar = bar
        self.vectors: list[EventFd] = []
        self.admin_q: QueuePair | None = None
        self.queues: dict[int, QueuePair] = {}
        self.shadow_db = 0
        self.shadow_ei = 0
        self.mmio_doorbells = 0  # doorbell writes actually sent (for shadow doorbell tests)
        self.cq_doorbells = 0  # of which CQ head doorbells
        self.timeout = 10.0

    # -- registers ---------------------------------------------------------------------------

    async def read32(self, offset: int) -> int:
        return await self.client.read32(self.bar, offset)

    async def read64(self, offset: int) -> int:
        lo = await self.read32(offset)
        return lo | await self.read32(offset + 4) << 32

    async def write32(self, offset: int, value: int) -> None:
        await self.client.write32(self.bar, offset, value)

    async def write64(self, offset: int, value: int) -> None:
        await self.write32(offset, value & 0xFFFFFFFF)
        await self.write32(offset + 4, value >> 32)

    async def cap(self) -> int:
        return await self.read64(REG_CAP)

    async def csts(self) -> int:
        return await self.read32(REG_CSTS)

    async def wait_csts(self, mask: int, value: int, timeout: float | None = None) -> int:
        with trio.fail_after(timeout or self.timeout):
            while True:
                csts = await self.csts()
                if csts & mask == value:
                    return csts
                await trio.sleep(0.002)

    # -- bring-up ------------------------------------------------------------------------------

    async def start(self, *, admin_entries: int = 32, msix_vectors: int = 8, map_ram: bool = True,
                    enable: bool = True, with_fd: bool = True) -> None:
        """``with_fd=False``: map the RAM as QEMU maps guest RAM that is not shared, so the
        device reaches it through DMA_READ/DMA_WRITE messages that the client serves."""
        if map_ram:
            await self.client.dma_map(self.ram, with_fd=with_fd)
        await self.client.enable_bus_master()
        if msix_vectors:
            self.vectors = await self.client.enable_msix(msix_vectors)
        if enable:
            await self.enable(admin_entries=admin_entries)

    async def enable(self, *, admin_entries: int = 32, cc_extra: int = 0) -> None:
        q = self._new_queue(0, admin_entries, vector=0)
        self.admin_q = q
        self.queues = {0: q}
        self.shadow_db = self.shadow_ei = 0
        await self.write32(REG_AQA, (admin_entries - 1) << 16 | (admin_entries - 1))
        await self.write64(REG_ASQ, q.sq_base)
        await self.write64(REG_ACQ, q.cq_base)
        # IOCQES 4, IOSQES 6, MPS 0 (4 KiB), CSS NVM, EN
        await self.write32(REG_CC, 4 << 20 | 6 << 16 | cc_extra | 1)
        await self.wait_csts(0x3, 0x1)

    async def disable(self) -> None:
        cc = await self.read32(REG_CC)
        await self.write32(REG_CC, cc & ~1)
        await self.wait_csts(0x1, 0x0)
        self.queues = {}
        self.admin_q = None

    async def shutdown(self) -> int:
        """Normal shutdown notification; returns CSTS once SHST says complete."""
        cc = await self.read32(REG_CC)
        await self.write32(REG_CC, (cc & ~(3 << 14)) | 1 << 14)
        return await self.wait_csts(0xC, 0x8)

    def _new_queue(self, qid: int, entries: int, vector: int) -> QueuePair:
        sq = self.ram.alloc(entries * 64, PAGE)
        cq = self.ram.alloc(entries * 16, PAGE)
        self.ram.write(sq, bytes(entries * 64))
        self.ram.write(cq, bytes(entries * 16))
        return QueuePair(qid, entries, sq, cq, vector)

    # -- doorbells --------------------------------------------------------------------------------

    def _shadow_update(self, index: int, value: int) -> bool:
        """Write the shadow doorbell; True if the MMIO doorbell must be rung (event index)."""
        if not self.shadow_db:
            return True
        db_addr, ei_addr = self.shadow_db + 4 * index, self.shadow_ei + 4 * index
        old = self.ram.read32(db_addr)
        self.ram.write32(db_addr, value)
        event_idx = self.ram.read32(ei_addr)
        # Ring if event_idx lies in [old, value) modulo 2^16, as the Linux driver does.
        return ((value - event_idx - 1) & 0xFFFF) < ((value - old) & 0xFFFF)

    async def ring_sq(self, qid: int, tail: int, *, force: bool = False) -> None:
        if self._shadow_update(2 * qid, tail) or force or qid == 0:
            self.mmio_doorbells += 1
            await self.client.write32(self.bar, DOORBELLS + 8 * qid, tail, posted=True)

    async def ring_cq(self, qid: int, head: int) -> None:
        if self._shadow_update(2 * qid + 1, head) or qid == 0:
            self.mmio_doorbells += 1
            self.cq_doorbells += 1
            await self.client.write32(self.bar, DOORBELLS + 8 * qid + 4, head, posted=True)

    # -- submission and completion ---------------------------------------------------------------

    def _alloc_cid(self, q: QueuePair) -> int:
        for _ in range(0x10000):
            cid = q.next_cid
            q.next_cid = (q.next_cid + 1) & 0xFFFF
            if cid not in q.outstanding and cid not in q.done:
                return cid
        raise RuntimeError("no free command id")

    async def submit(self, q: QueuePair | int, entry: SubmissionEntry, *, ring: bool = True) -> int:
        q = self.queues[q] if isinstance(q, int) else q
        if q.sq_free <= 0:
            raise RuntimeError(f"SQ {q.qid} is full")
        cid = self._alloc_cid(q) if entry.cid is None else entry.cid
        self.ram.write(q.sq_base + 64 * q.sq_tail, entry.pack(cid))
        q.sq_tail = (q.sq_tail + 1) % q.entries
        q.outstanding.add(cid)
        if ring:
            await self.ring_sq(q.qid, q.sq_tail)
        return cid

    def posted(self, q: QueuePair) -> int:
        """How many completions the controller has posted on ``q``'s CQ that are not consumed
        yet (nothing is consumed)."""
        head, phase, n = q.cq_head, q.phase, 0
        while n < q.entries - 1:
            st = _CQE.unpack(self.ram.read(q.cq_base + 16 * head, 16))[5]
            if st & 1 != phase:
                break
            n += 1
            head += 1
            if head == q.entries:
                head, phase = 0, phase ^ 1
        return n

    async def reap(self, q: QueuePair, limit: int | None = None) -> int:
        """Consume the new CQ entries of ``q`` (and of SQs sharing its CQ), at most ``limit``
        of them; ring the CQ head."""
        n = 0
        while limit is None or n < limit:
            raw = self.ram.read(q.cq_base + 16 * q.cq_head, 16)
            dw0, _dw1, sqhd, sqid, cid, st = _CQE.unpack(raw)
            if st & 1 != q.phase:
                break
            c = Completion(dw0, sqhd, sqid, cid, st >> 1)
            owner = self.queues.get(sqid, q)
            owner.outstanding.discard(cid)
            owner.done[cid] = c
            q.cq_head += 1
            if q.cq_head == q.entries:
                q.cq_head = 0
                q.phase ^= 1
            n += 1
        if n:
            await self.ring_cq(q.qid, q.cq_head)
        return n

    async def wait(self, q: QueuePair | int, cid: int, timeout: float | None = None) -> Completion:
        q = self.queues[q] if isinstance(q, int) else q
        with trio.fail_after(timeout or self.timeout):
            while cid not in q.done:
                await self.reap(q)
                if cid in q.done:
                    break
                efd = self.vectors[q.vector] if q.vector < len(self.vectors) else None
                if efd is None:
                    await trio.sleep(0.001)
                else:
                    with trio.move_on_after(0.05):
                        await efd.wait()
        return q.done.pop(cid)

    async def command(self, q: QueuePair | int, entry: SubmissionEntry, *, check: bool = False,
                      what: str = "command") -> Completion:
        q = self.queues[q] if isinstance(q, int) else q
        cid = await self.submit(q, entry)
        c = await self.wait(q, cid)
        if check and not c.ok:
            raise NvmeCommandError(c, what)
        return c

    async def admin(self, opcode: int, *, check: bool = False, **fields: int) -> Completion:
        return await self.command(0, SubmissionEntry(opcode, **fields), check=check,
                                  what=f"admin opcode {opcode:#x}")

    # -- data buffers and PRPs --------------------------------------------------------------------

    def buffer(self, length: int, align: int = PAGE) -> int:
        return self.ram.alloc(max(length, 1), align)

    def prps(self, addr: int, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for a contiguous buffer, building (chained) PRP lists as needed."""
        first = min(length, PAGE - addr % PAGE)
        rest = length - first
        if rest <= 0:
            return addr, 0
        pages = [addr + first + i * PAGE for i in range((rest + PAGE - 1) // PAGE)]
        if len(pages) == 1:
            return addr, pages[0]
        return addr, self.prp_list(pages)

    def prp_list(self, pages: list[int], per_page: int = PAGE // 8) -> int:
        """Write a PRP list (chained every ``per_page`` entries) and return its address."""
        head = 0
        prev_slot = None
        while pages:
            lst = self.ram.alloc(PAGE, PAGE)
            if head == 0:
                head = lst
            if prev_slot is not None:
                self.ram.write64(prev_slot, lst)
            if len(pages) <= per_page:
                chunk, pages = pages, []
                prev_slot = None
            else:
                chunk, pages = pages[: per_page - 1], pages[per_page - 1 :]
                prev_slot = lst + 8 * (per_page - 1)
            self.ram.write(lst, struct.pack(f"<{len(chunk)}Q", *chunk))
        return head

    # -- admin helpers -------------------------------------------------------------------------------

    async def identify(self, cns: int, nsid: int = 0, csi: int = 0, cntid: int = 0) -> bytes:
        buf = self.buffer(4096)
        p1, p2 = self.prps(buf, 4096)
        await self.admin(ADMIN_IDENTIFY, nsid=nsid, prp1=p1, prp2=p2, cdw10=cns | cntid << 16,
                         cdw11=csi << 24, check=True)
        return self.ram.read(buf, 4096)

    async def get_log_page(self, lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0,
                           rae: bool = False) -> bytes:
        buf = self.buffer(length)
        p1, p2 = self.prps(buf, length)
        numd = length // 4 - 1
        await self.admin(ADMIN_GET_LOG_PAGE, nsid=nsid, prp1=p1, prp2=p2,
                         cdw10=lid | (rae << 15) | (numd & 0xFFFF) << 16, cdw11=numd >> 16,
                         cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32, check=True)
        return self.ram.read(buf, length)

    async def get_feature(self, fid: int, cdw11: int = 0, sel: int = 0) -> Completion:
        return await self.admin(ADMIN_GET_FEATURES, cdw10=fid | sel << 8, cdw11=cdw11)

    async def set_feature(self, fid: int, cdw11: int, *, save: bool = False) -> Completion:
        return await self.admin(ADMIN_SET_FEATURES, cdw10=fid | save << 31, cdw11=cdw11)

    async def set_num_queues(self, n: int) -> tuple[int, int]:
        c = await self.set_feature(0x07, (n - 1) << 16 | (n - 1))
        if not c.ok:
            raise NvmeCommandError(c, "set number of queues")
        return (c.dw0 & 0xFFFF) + 1, (c.dw0 >> 16) + 1

    async def create_io_queue_pair(self, qid: int, entries: int = 64, vector: int | None = None,
                                   *, irq: bool = True) -> QueuePair:
        if vector is None:
            vector = qid % max(1, len(self.vectors)) if self.vectors else 0
        q = self._new_queue(qid, entries, vector)
        await self.admin(ADMIN_CREATE_CQ, prp1=q.cq_base, cdw10=(entries - 1) << 16 | qid,
                         cdw11=vector << 16 | (2 if irq else 0) | 1, check=True)
        await self.admin(ADMIN_CREATE_SQ, prp1=q.sq_base, cdw10=(entries - 1) << 16 | qid,
                         cdw11=qid << 16 | 1, check=True)
        self.queues[qid] = q
        return q

    async def delete_io_queue_pair(self, qid: int) -> None:
        await self.admin(ADMIN_DELETE_SQ, cdw10=qid, check=True)
        await self.admin(ADMIN_DELETE_CQ, cdw10=qid, check=True)
        self.queues.pop(qid, None)

    async def enable_shadow_doorbells(self) -> None:
        db = self.buffer(PAGE)
        ei = self.buffer(PAGE)
        self.ram.write(db, bytes(PAGE))
        self.ram.write(ei, bytes(PAGE))
        await self.admin(ADMIN_DBBUF, prp1=db, prp2=ei, check=True)
        self.shadow_db, self.shadow_ei = db, ei

    # -- I/O helpers ----------------------------------------------------------------------------------

    async def io(self, q: QueuePair | int, opcode: int, *, nsid: int = 1, slba: int = 0, nlb: int = 0,
                 buf: int | None = None, length: int = 0, cdw12_extra: int = 0, check: bool = False,
                 **fields: int) -> Completion:
        """An I/O command on ``nlb`` + 1 blocks; ``buf``/``length`` get PRPs built for them."""
        if buf is not None and length:
            fields["prp1"], fields["prp2"] = self.prps(buf, length)
        entry = SubmissionEntry(opcode, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                                cdw12=(nlb & 0xFFFF) | cdw12_extra, **fields)
        return await self.command(q, entry, check=check, what=f"I/O opcode {opcode:#x}")

    async def write(self, q: QueuePair | int, slba: int, data: bytes, *, block: int = 512, nsid: int = 1,
                    fua: bool = False) -> Completion:
        buf = self.buffer(len(data))
        self.ram.write(buf, data)
        return await self.io(q, IO_WRITE, nsid=nsid, slba=slba, nlb=len(data) // block - 1, buf=buf,
                             length=len(data), cdw12_extra=(1 << 30) if fua else 0, check=True)

    async def read(self, q: QueuePair | int, slba: int, length: int, *, block: int = 512,
                   nsid: int = 1) -> bytes:
        buf = self.buffer(length)
        await self.io(q, IO_READ, nsid=nsid, slba=slba, nlb=length // block - 1, buf=buf, length=length,
                      check=True)
        return self.ram.read(buf, length)


def sgl_descriptor(addr: int, length: int, kind: int, subtype: int = 0) -> bytes:
    """One 16-byte SGL descriptor (kind 0 data block, 1 bit bucket, 2 segment, 3 last segment)."""
    return struct.pack("<QI3xB", addr, length, kind << 4 | subtype)


PSDT_SGL = 1 << 6  # flags byte value selecting SGLs for the data pointer


@asynccontextmanager
async def nvme_session(*args: str, ram_size: int = 32 << 20, msix_vectors: int = 8,
                       enable: bool = True, with_fd: bool = True, max_data_xfer_size: int = 1 << 20,
                       ) -> AsyncIterator[tuple[NvmeTestDriver, ServerProcess]]:
    """``vfu-server nvme *args`` in a process, connected, RAM mapped (``with_fd=False``: for
    message DMA), controller enabled."""
    with GuestRam(ram_size) as ram:
        async with running_server("nvme", *args) as server, await Client.connect(
                server.socket_path, max_data_xfer_size=max_data_xfer_size) as client:
            drv = NvmeTestDriver(client, ram)
            try:
                await drv.start(msix_vectors=msix_vectors, enable=enable, with_fd=with_fd)
                yield drv, server
            except BaseException as exc:
                exc.add_note(f"--- server stderr ---\n{server.stderr()[-4000:]}")
                raise
