"""The driver side of virtio-pci, for tests and device developers: no VM needed.

It does what a guest driver does, through :class:`vfu_server.client.Client`::

    async with await Client.connect(sock) as client:
        ram = GuestRam(64 << 20)
        await client.dma_map(ram)
        dev = await VirtioDriver.attach(client, ram)      # finds the virtio capabilities
        await dev.negotiate(want=VIRTIO_F_EVENT_IDX)       # ACK, DRIVER, features, FEATURES_OK
        q = await dev.setup_queue(0)                       # split rings in GuestRam, MSI-X vector
        await dev.driver_ok()
        req = q.add(out=[b"..."], in_sizes=[512])          # a descriptor chain
        await q.kick()
        done = await q.wait_used()                         # [(request, bytes written)]

Buffers are placed in a per-head slot of the queue's data area (``slot_size`` bytes per
descriptor head, so a chain's buffers stay valid until it is reaped), or given explicitly as
:class:`Buf` addresses. Raw ring access (:meth:`DriverQueue.put_descriptor`, ``avail_idx``)
lets tests build malformed chains on purpose.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from ..client import Client, EventFd, GuestRam
from ..protocol.constants import IrqIndex

VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
NO_VECTOR = 0xFFFF

# common cfg offsets
DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0x00, 0x04, 0x08, 0x0C
CONFIG_MSIX_VECTOR, NUM_QUEUES, DEVICE_STATUS, CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI = 1, 2, 3, 4, 5


class VirtioTimeout(TimeoutError):
    pass


def _ring16(ram: GuestRam, addr: int, value: int | None = None) -> int:
    """Read (or write ``value`` to) a ring index or event field with one 16-bit access.

    The device changes these while the driver looks. A 2-byte ``mmap`` slice is a ``memcpy``
    that may load the two bytes separately, so it could return half of an old index and half
    of a new one; a memoryview's native ``"H"`` item is a single load or store, like a
    driver's ``READ_ONCE``/``WRITE_ONCE``.
    """
    off = addr - ram.base
    if off < 0 or off + 2 > ram.size or off % 2:
        raise ValueError(f"ring field {addr:#x} outside guest RAM or misaligned")
    item = memoryview(ram.mem)[off : off + 2].cast("H")
    swap = sys.byteorder != "little"
    if value is not None:
        value &= 0xFFFF
        item[0] = (value >> 8) | (value & 0xFF) << 8 if swap else value
        return value
    got: int = item[0]
    return (got >> 8) | (got & 0xFF) << 8 if swap else got


@dataclass(frozen=True)
class VirtioCap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    position: int  # in config space
    notify_multiplier: int = 0


@dataclass(frozen=True)
class Buf:
    """A buffer at a guest address chosen by the caller."""

    addr: int
    length: int


@dataclass
class Request:
    """A chain the driver made available; ``inbufs`` are the device-writable buffers."""

    head: int
    descriptors: list[int]
    outbufs: list[Buf]
    inbufs: list[Buf]
    ram: GuestRam = field(repr=False)
    written: int | None = None

    def data(self, index: int = 0) -> bytes:
        """Contents of device-writable buffer ``index``."""
        b = self.inbufs[index]
        return self.ram.read(b.addr, b.length)

    def all_data(self) -> bytes:
        return b"".join(self.ram.read(b.addr, b.length) for b in self.inbufs)


class DriverQueue:
    """One split virtqueue as a driver sees it."""

    def __init__(self, dev: VirtioDriver, index: int, size: int, vector: int, event_idx: bool,
                 slot_size: int) -> None:
        ram = dev.ram
        self.dev, self.ram, self.index, self.size = dev, ram, index, size
        self.vector, self.event_idx, self.slot_size = vector, event_idx, slot_size
        self.desc = ram.alloc(16 * size, 4096)
        self.avail = ram.alloc(6 + 2 * size, 4096)
        self.used = ram.alloc(6 + 8 * size, 4096)
        self.data = ram.alloc(slot_size * size, 4096)
        ram.write(self.desc, bytes(16 * size))
        ram.write(self.avail, bytes(6 + 2 * size))
        ram.write(self.used, bytes(6 + 8 * size))
        self.free = list(range(size - 1, -1, -1))
        self.outstanding: dict[int, Request] = {}
        self.avail_idx = 0  # driver's shadow of avail->idx
        self.last_used = 0
        self.kicks = 0
        self.notify_offset = 0

    # -- ring primitives (also for building malformed rings) ---------------------------------

    def put_descriptor(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0,
                       table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.ram.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next))

    def publish(self, head: int, *, advance: bool = True) -> None:
        """Put ``head`` in the next avail slot and (by default) bump avail->idx."""
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if advance:
            self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        _ring16(self.ram, self.avail + 2, value)

    def set_avail_flags(self, flags: int) -> None:
        _ring16(self.ram, self.avail, flags)

    def set_used_event(self, value: int) -> None:
        _ring16(self.ram, self.avail + 4 + 2 * self.size, value)

    def used_idx(self) -> int:
        return _ring16(self.ram, self.used + 2)

    def avail_event(self) -> int:
        return _ring16(self.ram, self.used + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return _ring16(self.ram, self.used)

    # -- chains --------------------------------------------------------------------------

    def add(self, out: Sequence[bytes | Buf] = (), in_sizes: Sequence[int | Buf] = (), *,
            indirect: bool = False, publish: bool = True) -> Request:
        """Make a chain available: device-readable ``out`` then device-writable ``in_sizes``."""
        need = 1 if indirect else len(out) + len(in_sizes)
        if need == 0:
            raise ValueError("a chain needs at least one buffer")
        if len(self.free) < need:
            raise RuntimeError(f"queue {self.index}: no free descriptors")
        descs = [self.free.pop() for _ in range(need)]
        head = descs[0]
        slot, slot_end = self.data + head * self.slot_size, self.data + (head + 1) * self.slot_size

        def place(length: int) -> int:
            nonlocal slot
            addr = slot
            slot = (slot + length + 15) & ~15
            if slot > slot_end:
                raise ValueError(f"chain needs more than slot_size={self.slot_size} bytes")
            return addr

        entries: list[tuple[int, int, int]] = []
        outbufs, inbufs = [], []
        for item in out:
            if isinstance(item, Buf):
                buf = item
            else:
                buf = Buf(place(len(item)), len(item))
                self.ram.write(buf.addr, item)
            outbufs.append(buf)
            entries.append((buf.addr, buf.length, 0))
        for item in in_sizes:
            buf = item if isinstance(item, Buf) else Buf(place(item), item)
            if not isinstance(item, Buf):
                self.ram.write(buf.addr, b"\xa5" * buf.length)  # poison: see what the device wrote
            inbufs.append(buf)
            entries.append((buf.addr, buf.length, DESC_F_WRITE))
        if indirect:
            table = place(16 * len(entries))
            for i, (addr, length, flags) in enumerate(entries):
                last = i == len(entries) - 1
                self.put_descriptor(i, addr, length, flags | (0 if last else DESC_F_NEXT), i + 1, table=table)
            self.put_descriptor(head, table, 16 * len(entries), DESC_F_INDIRECT)
        else:
            for i, (addr, length, flags) in enumerate(entries):
                last = i == len(entries) - 1
                self.put_descriptor(descs[i], addr, length, flags | (0 if last else DESC_F_NEXT),
                                    0 if last else descs[i + 1])
        req = Request(head, descs, outbufs, inbufs, self.ram)
        self.outstanding[head] = req
        if publish:
            self.publish(head)
        return req

    async def kick(self, *, force: bool = False) -> bool:
        """Notify the device, unless it said it does not want it (EVENT_IDX's avail_event, or
        else VIRTQ_USED_F_NO_NOTIFY), as Linux's virtqueue_kick_prepare does. Returns if it did."""
        if self.event_idx and not force:
            event = self.avail_event()
            new, old = self.avail_idx, self._kicked_at
            self._kicked_at = new
            if not (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF:
                return False
        elif not force and self.used_flags() & USED_F_NO_NOTIFY:
            self._kicked_at = self.avail_idx
            return False
        self._kicked_at = self.avail_idx
        self.kicks += 1
        await self.dev.notify(self)
        return True

    _kicked_at = 0

    def reap(self) -> list[Request]:
        """Used entries that arrived so far (non-blocking); their descriptors are freed."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.ram.read(slot, 8))
            self.last_used = (self.last_used + 1) & 0xFFFF
            req = self.outstanding.pop(head, None)
            if req is None:
                raise AssertionError(f"queue {self.index}: device returned head {head} that is not outstanding")
            req.written = length
            self.free.extend(reversed(req.descriptors))
            out.append(req)
        if self.event_idx:
            self.set_used_event(self.last_used)
        return out

    async def wait_used(self, count: int = 1, timeout: float = 10.0) -> list[Request]:
        """Wait (on the queue's MSI-X eventfd) until ``count`` requests completed."""
        done: list[Request] = []
        irq = self.dev.vectors[self.vector] if self.dev.vectors and self.vector != NO_VECTOR else None
        with trio.move_on_after(timeout):
            while True:
                done += self.reap()
                if len(done) >= count:
                    return done
                if irq is None:
                    await trio.sleep(0.005)
                else:
                    with trio.move_on_after(0.5):  # a missed interrupt still shows as a slow pass
                        await irq.wait()
        raise VirtioTimeout(f"queue {self.index}: {len(done)} of {count} requests completed in {timeout}s")


class VirtioDriver:
    """A virtio-pci function as seen by a driver."""

    def __init__(self, client: Client, ram: GuestRam, caps: dict[int, VirtioCap]) -> None:
        self.client, self.ram, self.caps = client, ram, caps
        self.vectors: list[EventFd] = []
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0

    @classmethod
    async def attach(cls, client: Client, ram: GuestRam, *, msix: bool = True) -> VirtioDriver:
        caps: dict[int, VirtioCap] = {}
        pos = await client.config_read(0x34, 1)
        seen: set[int] = set()
        while pos and pos not in seen:
            seen.add(pos)
            cap_id = await client.config_read(pos, 1)
            if cap_id == 0x09:
                cfg_type = await client.config_read(pos + 3, 1)
                bar = await client.config_read(pos + 4, 1)
                offset = await client.config_read(pos + 8)
                length = await client.config_read(pos + 12)
                mult = await client.config_read(pos + 16) if cfg_type == CAP_NOTIFY else 0
                caps.setdefault(cfg_type, VirtioCap(cfg_type, bar, offset, length, pos, mult))
            pos = await client.config_read(pos + 1, 1)
        for needed in (CAP_COMMON, CAP_NOTIFY, CAP_ISR):
            if needed not in caps:
                raise AssertionError(f"virtio capability type {needed} missing")
        self = cls(client, ram, caps)
        await client.enable_bus_master()
        if msix:
            cap = await client.find_capability(0x11)
            assert cap is not None
            n = (await client.config_read(cap + 2, 2) & 0x7FF) + 1
            control = await client.config_read(cap + 2, 2)
            await client.config_write(cap + 2, control | 0x8000, 2)
            self.vectors = await client.enable_irqs(IrqIndex.MSIX, n)
        return self

    # -- register access ----------------------------------------------------------------

    async def common_read(self, offset: int, size: int = 4) -> int:
        c = self.caps[CAP_COMMON]
        return await self.client.read(c.bar, c.offset + offset, size)

    async def common_write(self, offset: int, value: int, size: int = 4) -> None:
        c = self.caps[CAP_COMMON]
        await self.client.write(c.bar, c.offset + offset, value, size)

    async def config_read(self, offset: int, size: int = 4) -> int:
        c = self.caps[CAP_DEVICE]
        return await self.client.read(c.bar, c.offset + offset, size)

    async def config_write(self, offset: int, value: int, size: int = 4) -> None:
        c = self.caps[CAP_DEVICE]
        await self.client.write(c.bar, c.offset + offset, value, size)

    async def read_isr(self) -> int:
        c = self.caps[CAP_ISR]
        return await self.client.read(c.bar, c.offset, 1)

    async def status(self) -> int:
        return await self.common_read(DEVICE_STATUS, 1)

    async def set_status(self, value: int) -> None:
        await self.common_write(DEVICE_STATUS, value, 1)

    async def device_features(self) -> int:
        out = 0
        for sel in (0, 1):
            await self.common_write(DEVICE_FEATURE_SELECT, sel)
            out |= await self.common_read(DEVICE_FEATURE) << (32 * sel)
        return out

    async def notify(self, q: DriverQueue) -> None:
        c = self.caps[CAP_NOTIFY]
        await self.client.write(c.bar, c.offset + q.notify_offset * c.notify_multiplier, q.index, 2)

    # -- initialisation (3.1.1) ---------------------------------------------------------

    async def reset(self, timeout: float = 30.0) -> None:
        await self.set_status(0)
        with trio.move_on_after(timeout):
            while await self.status() != 0:
                await trio.sleep(0.001)
            self.queues.clear()
            return
        raise VirtioTimeout("device status did not return to 0 after reset")

    async def negotiate(self, want: int = 0, *, required: int = VIRTIO_F_VERSION_1) -> int:
        """Reset, ACKNOWLEDGE|DRIVER, accept ``want | required`` as far as offered, FEATURES_OK."""
        await self.reset()
        await self.set_status(ACKNOWLEDGE)
        await self.set_status(ACKNOWLEDGE | DRIVER)
        offered = await self.device_features()
        if required & ~offered:
            raise AssertionError(f"device lacks required features {required & ~offered:#x}")
        features = (want | required) & offered
        for sel in (0, 1):
            await self.common_write(DRIVER_FEATURE_SELECT, sel)
            await self.common_write(DRIVER_FEATURE, (features >> (32 * sel)) & 0xFFFFFFFF)
        await self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not await self.status() & FEATURES_OK:
            raise AssertionError(f"device refused features {features:#x}")
        self.features = features
        if self.vectors:
            await self.common_write(CONFIG_MSIX_VECTOR, 0, 2)
        return features

    async def num_queues(self) -> int:
        return await self.common_read(NUM_QUEUES, 2)

    async def setup_queue(self, index: int, size: int | None = None, *, slot_size: int = 4096,
                          vector: int | None = None) -> DriverQueue:
        await self.common_write(QUEUE_SELECT, index, 2)
        max_size = await self.common_read(QUEUE_SIZE, 2)
        if max_size == 0:
            raise AssertionError(f"queue {index} does not exist")
        size = size or max_size
        await self.common_write(QUEUE_SIZE, size, 2)
        if vector is None:
            vector = index + 1 if index + 1 < len(self.vectors) else (0 if self.vectors else NO_VECTOR)
        q = DriverQueue(self, index, size, vector, bool(self.features & VIRTIO_F_EVENT_IDX), slot_size)
        if self.vectors:
            await self.common_write(QUEUE_MSIX_VECTOR, vector, 2)
            if await self.common_read(QUEUE_MSIX_VECTOR, 2) != vector:
                raise AssertionError(f"queue {index}: vector {vector} refused")
        q.notify_offset = await self.common_read(QUEUE_NOTIFY_OFF, 2)
        for reg, addr in ((QUEUE_DESC, q.desc), (QUEUE_DRIVER, q.avail), (QUEUE_DEVICE, q.used)):
            await self.common_write(reg, addr & 0xFFFFFFFF)
            await self.common_write(reg + 4, addr >> 32)
        await self.common_write(QUEUE_ENABLE, 1, 2)
        self.queues[index] = q
        return q

    async def driver_ok(self) -> None:
        await self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    async def wait_config_interrupt(self, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            await self.vectors[0].wait()


async def init_device(client: Client, ram: GuestRam, want: int = 0, queues: Sequence[int] = (0,),
                      size: int | None = None, slot_size: int = 4096) -> tuple[VirtioDriver, list[DriverQueue]]:
    """attach + negotiate + set up ``queues`` + DRIVER_OK, the common case in one call."""
    dev = await VirtioDriver.attach(client, ram)
    await dev.negotiate(want)
    qs = [await dev.setup_queue(i, size, slot_size=slot_size) for i in queues]
    await dev.driver_ok()
    return dev, qs
