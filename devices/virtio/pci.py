"""The virtio-pci modern transport (VIRTIO 1.2 section 4.1), written once for every device.

A virtio device subclasses :class:`VirtioPciDevice` and declares its device type, queues,
feature bits and configuration layout; this class provides the PCI side::

    BAR1  MSI-X table (0x000) and PBA (0x800)
    BAR4  0x0000 common cfg | 0x1000 ISR | 0x2000 device cfg | 0x3000 notify (4 bytes per queue)

plus the vendor capabilities that point there, and the PCI configuration access capability
(``VIRTIO_PCI_CAP_PCI_CFG``: a window into BAR4 through config space). Feature negotiation,
device status, reset, MSI-X vectors with INTx/ISR fallback and the queue tasks are all here.

Queue processing: one task per queue, woken by notify writes. A device implements
:meth:`VirtioPciDevice.process` (one request -> bytes written); with ``max_inflight > 1`` the
requests of a queue run concurrently. Devices with other needs (virtio-net's receive queues)
override :meth:`VirtioPciDevice.serve_queue` and use the :class:`SplitQueue` primitives.
"""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from vfu_server.migration import MigrationFormatError
from vfu_server.pci import (
    Capability,
    MemoryBar,
    Msix,
    PciDevice,
    PciExpress,
    PciIdentity,
    PowerManagement,
    VendorSpecific,
)
from vfu_server.pci.endpoint import Endpoint
from vfu_server.pci.polling import MAX_POLL_US, AdaptivePoll
from vfu_server.protocol.constants import IrqIndex
from vfu_server.protocol.errors import VfioUserError

from .queue import DescriptorChain, QueueState, SplitQueue, VirtqueueError
from .spec import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    ISR_CONFIG,
    ISR_QUEUE,
    NO_VECTOR,
    PCI_DEVICE_ID_BASE,
    VIRTIO_VENDOR_ID,
    CfgType,
    Common,
    Status,
    bit,
)

if TYPE_CHECKING:
    from .migration_format import VirtioDevState, VirtioProfile

log = logging.getLogger("vfu_server.virtio")

VIRTIO_BAR = 4
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
MSIX_BAR = 1
TRANSPORT_FEATURES = bit(F_VERSION_1) | bit(F_EVENT_IDX) | bit(F_INDIRECT_DESC)


@dataclass
class TransportState:
    """Migratable state of the transport (queues are in ``queues``)."""

    status: int = 0
    device_feature_select: int = 0
    driver_feature_select: int = 0
    driver_features: int = 0
    config_msix_vector: int = NO_VECTOR
    queue_select: int = 0
    config_generation: int = 0
    isr: int = 0
    queues: list[QueueState] = field(default_factory=list)


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """Payload of ``struct virtio_pci_cap`` after the 3 header bytes (vndr, next, len)."""
    return struct.pack("<BBBxxII", cfg_type, VIRTIO_BAR, 0, offset, length) + extra


class PciCfgAccess(VendorSpecific):
    """``VIRTIO_PCI_CAP_PCI_CFG``: the driver sets bar/offset/length, then reads or writes
    ``pci_cfg_data`` (cap bytes 16..19) to access that BAR location through config space."""

    DATA = 16

    def __init__(self) -> None:
        payload = struct.pack("<BBBxxII", CfgType.PCI, 0, 0, 0, 0) + bytes(4)
        # writable after the header: bar (1), offset (5..8), length (9..12), data (13..16)
        writable = bytes([0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        super().__init__(payload, writable)

    def _window(self) -> tuple[int, int, int] | None:
        regs = self.regs()
        bar, offset, length = regs[4], *struct.unpack_from("<II", regs, 8)
        device = self.device
        if device is None or length not in (1, 2, 4) or offset % length or bar > 5:
            return None
        target = device.bars[bar]
        if target is None or offset + length > target.size:
            return None
        return bar, offset, length

    def read(self, offset: int, size: int) -> int | None:
        if offset + size <= self.DATA:
            return None
        window = self._window()
        image = bytearray(self.regs())
        if window is not None:
            assert self.device is not None
            bar, off, length = window
            try:
                image[self.DATA : self.DATA + length] = Endpoint(self.device)._bar_read(bar, off, length)
            except VfioUserError:
                pass
        return int.from_bytes(image[offset : offset + size], "little")

    def written(self, offset: int, size: int, value: int, old: int) -> None:
        if offset + size <= self.DATA:
            return
        window = self._window()
        if window is None:
            return
        assert self.device is not None
        bar, off, length = window
        data = bytes(self.regs()[self.DATA : self.DATA + length])
        try:
            Endpoint(self.device)._bar_write(bar, off, data)
        except VfioUserError:
            pass


def virtio_capabilities(config_size: int, msix_vectors: int) -> tuple[Capability, ...]:
    caps: list[Capability] = [
        PowerManagement(),
        Msix(vectors=msix_vectors, table_bar=MSIX_BAR, pba_offset=0x800),
        PciExpress(),
        VendorSpecific(_virtio_cap(CfgType.COMMON, COMMON_OFF, Common.SIZE)),
        VendorSpecific(_virtio_cap(CfgType.NOTIFY, NOTIFY_OFF, 0x1000, struct.pack("<I", NOTIFY_MULTIPLIER))),
        VendorSpecific(_virtio_cap(CfgType.ISR, ISR_OFF, 1)),
    ]
    if config_size:
        caps.append(VendorSpecific(_virtio_cap(CfgType.DEVICE, DEVICE_OFF, config_size)))
    caps.append(PciCfgAccess())
    return tuple(caps)


class VirtioPciDevice(PciDevice):
    """Base class of virtio devices. Subclasses set ``virtio_id``, ``config_size``,
    ``msix_vectors`` and implement :meth:`process` (or :meth:`serve_queue`)."""

    virtio_id: ClassVar[int]
    #: PCI class code (base, sub, prog-if)
    class_code: ClassVar[int] = 0xFF0000
    #: bytes of device-specific configuration (read through :meth:`read_config`)
    config_size: ClassVar[int] = 0
    #: MSI-X vectors: one for config changes plus one per queue is what Linux asks for
    msix_vectors: ClassVar[int] = 2
    queue_max_size: ClassVar[int] = 256
    #: requests of one queue processed at the same time (1: one after the other)
    max_inflight: ClassVar[int] = 1
    intx = True

    bar1 = MemoryBar(0x1000)
    bar4 = MemoryBar(0x4000, is64=True, prefetchable=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        vid = cls.__dict__.get("virtio_id")
        if vid is not None:
            cls.identity = PciIdentity(
                vendor_id=VIRTIO_VENDOR_ID, device_id=PCI_DEVICE_ID_BASE + vid, class_code=cls.class_code,
                revision=1, subsystem_vendor_id=VIRTIO_VENDOR_ID, subsystem_id=int(vid))
            if "capabilities" not in cls.__dict__:
                cls.capabilities = virtio_capabilities(cls.config_size, cls.msix_vectors)

    def __init__(self, num_queues: int = 1, device_features: int = 0, poll_us: int = 0) -> None:
        super().__init__()
        if not 0 <= poll_us <= MAX_POLL_US:
            raise ValueError(f"--poll-us must be 0..{MAX_POLL_US}")
        #: the longest a queue that ran dry polls the avail ring before it asks the driver
        #: for a kick (0: never, the default here; virtio-blk offers --poll-us), see
        #: vfu_server.pci.polling
        self.poll_ns = poll_us * 1000
        if num_queues > 0x3FF:
            raise ValueError("at most 1023 virtqueues fit the notify area")
        self.num_queues = num_queues
        self.device_features = device_features | TRANSPORT_FEATURES
        self.vstate = TransportState()
        self.queues: list[SplitQueue] = []
        self._queue_nursery: trio.Nursery | None = None
        self._queue_scope: trio.CancelScope | None = None
        self._queues_done = trio.Event()
        self._queues_done.set()
        self._status_while_draining = 0
        self._draining_done: trio.Event | None = None
        #: quiesced for migration: queues take no new requests until :meth:`resume`
        self._mig_stopped = False
        self._new_queues()

    # -- for subclasses --------------------------------------------------------------------

    async def process(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        """Handle one request; return the number of bytes written into ``chain.writable``."""
        raise NotImplementedError

    def complete_fast(self, queue: SplitQueue) -> int:
        """Complete requests from the avail ring without Python's per-request work (a C fast
        path), before the queue loop pops; returns how many (their used elements are in the
        ring, :meth:`SplitQueue.flush` publishes them). The base class has none."""
        return 0

    def process_nowait(self, queue: SplitQueue, chain: DescriptorChain) -> int | None:
        """Handle one request now if that needs no waiting, like :meth:`process`; None: it
        would wait, nothing was done, :meth:`process` runs in a task. Used with
        ``max_inflight > 1``."""
        return None

    def queue_kicked(self, queue: SplitQueue) -> None:
        """The driver wrote the queue's notify register: wake its task. A device may serve
        the kick right here instead (it runs between two messages and must not block), but
        only while no task holds work of that queue, must ring the doorbell for anything it
        leaves, and must not raise: a lost kick can stall a queue for good (EVENT_IDX)."""
        queue.doorbell.ring()

    def read_config(self) -> bytes:
        """The device-specific configuration structure, ``config_size`` bytes."""
        return bytes(self.config_size)

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote the device configuration (most fields are read-only)."""

    def features_ok(self, features: int) -> bool:
        """Called at FEATURES_OK with the driver's features; return False to refuse them."""
        return True

    def driver_ok(self) -> None:
        """The driver finished setting up (DRIVER_OK): queues are live."""

    def virtio_reset(self) -> None:
        """Device-specific part of a reset (status 0 or a PCI-level reset)."""

    @property
    def features(self) -> int:
        """The negotiated features (valid once FEATURES_OK is set)."""
        return self.vstate.driver_features

    def has(self, feature_bit: int) -> bool:
        return bool(self.vstate.driver_features >> feature_bit & 1)

    def config_changed(self) -> None:
        """The device configuration changed: new generation and a config interrupt."""
        self.vstate.config_generation = (self.vstate.config_generation + 1) & 0xFF
        self._config_interrupt()

    def needs_reset(self, reason: str) -> None:
        """The driver did something illegal: stop and ask it to reset the device."""
        if self.vstate.status & Status.DEVICE_NEEDS_RESET:
            return
        self.log.warning("device needs reset: %s", reason)
        self.vstate.status |= Status.DEVICE_NEEDS_RESET
        if self.vstate.status & Status.DRIVER_OK:
            self._config_interrupt()

    def drop_requests(self, reason: str) -> None:
        """Stop every queue at once: requests in flight are dropped without completing (a
        power cut), and the driver must reset the device."""
        if self._queue_scope is not None:
            self._queue_scope.cancel()
            self._queue_scope = None
            self._queue_nursery = None
        for q in self.queues:
            q.active = False
        self.needs_reset(reason)

    # -- interrupts ------------------------------------------------------------------------

    def _msix_on(self) -> bool:
        return self.msix is not None and (self.msix.enabled or self.irqs.lines[IrqIndex.MSIX].active)

    def _signal(self, vector: int, isr_bit: int) -> None:
        if self._msix_on():
            if vector != NO_VECTOR:
                self.irqs.signal(IrqIndex.MSIX, vector)
            return
        self.vstate.isr |= isr_bit
        if not self.config.intx_disabled:
            self.set_intx(True)

    def _config_interrupt(self) -> None:
        # The config bit of the ISR is set even with MSI-X (4.1.4.5.1).
        self.vstate.isr |= ISR_CONFIG
        self._signal(self.vstate.config_msix_vector, ISR_CONFIG)

    def notify_queue(self, queue: SplitQueue) -> None:
        """Publish the queue's used entries and interrupt the driver if it asked for it."""
        try:
            wanted = queue.flush()
        except VirtqueueError as exc:
            self.needs_reset(str(exc))
            return
        if wanted:
            self._signal(queue.state.msix_vector, ISR_QUEUE)

    # -- BAR4 -------------------------------------------------------------------------------

    @bar4.reader
    def _bar4_read(self, offset: int, size: int) -> int:
        if offset < ISR_OFF:
            return self._common_read(offset, size)
        if offset < DEVICE_OFF:
            if offset != ISR_OFF:
                return 0
            # Reading the ISR acknowledges it and deasserts INTx.
            value, self.vstate.isr = self.vstate.isr, 0
            self.set_intx(False)
            return value
        if offset < NOTIFY_OFF:
            off = offset - DEVICE_OFF
            return int.from_bytes(self.read_config()[off : off + size].ljust(size, b"\0"), "little")
        return 0

    @bar4.writer
    def _bar4_write(self, offset: int, size: int, value: int) -> None:
        if offset < ISR_OFF:
            self._common_write(offset, size, value)
        elif DEVICE_OFF <= offset < NOTIFY_OFF:
            off = offset - DEVICE_OFF
            if off + size <= self.config_size:
                self.write_config(off, value.to_bytes(size, "little"))
        elif offset >= NOTIFY_OFF:
            index = (offset - NOTIFY_OFF) // NOTIFY_MULTIPLIER
            if index < len(self.queues) and self.vstate.status & Status.DRIVER_OK:
                self.queue_kicked(self.queues[index])

    # -- common configuration ---------------------------------------------------------------

    def _selected(self) -> SplitQueue | None:
        sel = self.vstate.queue_select
        return self.queues[sel] if sel < len(self.queues) else None

    def _common_image(self) -> bytes:
        s = self.vstate
        q = self._selected()
        qs = q.state if q is not None else QueueState(max_size=0)
        sel = s.device_feature_select
        dev_features = (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        drv_sel = s.driver_feature_select
        drv_features = (s.driver_features >> (32 * drv_sel)) & 0xFFFFFFFF if drv_sel < 2 else 0
        status = self._status_while_draining if self._draining() else s.status
        return struct.pack(
            "<IIIIHHBBHHHHHQQQ", sel, dev_features, drv_sel, drv_features, s.config_msix_vector,
            len(self.queues), status, s.config_generation, s.queue_select,
            qs.size if q is not None else 0, qs.msix_vector if q is not None else NO_VECTOR,
            int(qs.ready), s.queue_select if q is not None else 0,
            qs.desc_table, qs.avail_ring, qs.used_ring)

    def _common_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._common_image()[offset : offset + size].ljust(size, b"\0"), "little")

    _FIELDS: ClassVar[list[tuple[int, int]]] = [
        (Common.DEVICE_FEATURE_SELECT, 4), (Common.DEVICE_FEATURE, 4), (Common.DRIVER_FEATURE_SELECT, 4),
        (Common.DRIVER_FEATURE, 4), (Common.CONFIG_MSIX_VECTOR, 2), (Common.NUM_QUEUES, 2),
        (Common.DEVICE_STATUS, 1), (Common.CONFIG_GENERATION, 1), (Common.QUEUE_SELECT, 2),
        (Common.QUEUE_SIZE, 2), (Common.QUEUE_MSIX_VECTOR, 2), (Common.QUEUE_ENABLE, 2),
        (Common.QUEUE_NOTIFY_OFF, 2), (Common.QUEUE_DESC, 8), (Common.QUEUE_DRIVER, 8), (Common.QUEUE_DEVICE, 8),
    ]

    def _common_write(self, offset: int, size: int, value: int) -> None:
        for start, width in self._FIELDS:
            if start <= offset and offset + size <= start + width:
                break
        else:
            return
        if width > size:
            # A partial write of a wider field (64-bit addresses as two 32-bit halves).
            image = bytearray(self._common_image()[start : start + width])
            image[offset - start : offset - start + size] = value.to_bytes(size, "little")
            value = int.from_bytes(image, "little")
        self._set_field(Common(start), value)

    def _vector(self, value: int) -> int:
        # An unusable vector reads back as NO_VECTOR, which is how the driver learns of it.
        return value if value < self.irqs.lines[IrqIndex.MSIX].count else NO_VECTOR

    def _set_field(self, reg: Common, value: int) -> None:
        s = self.vstate
        q = self._selected()
        if reg == Common.DEVICE_FEATURE_SELECT:
            s.device_feature_select = value
        elif reg == Common.DRIVER_FEATURE_SELECT:
            s.driver_feature_select = value
        elif reg == Common.DRIVER_FEATURE:
            if s.driver_feature_select < 2 and not s.status & Status.FEATURES_OK:
                shift = 32 * s.driver_feature_select
                s.driver_features = (s.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif reg == Common.CONFIG_MSIX_VECTOR:
            s.config_msix_vector = self._vector(value)
        elif reg == Common.DEVICE_STATUS:
            self._write_status(value & 0xFF)
        elif reg == Common.QUEUE_SELECT:
            s.queue_select = value
        elif q is None or (q.state.ready and reg != Common.QUEUE_MSIX_VECTOR):
            return  # the driver must not reconfigure an enabled queue
        elif reg == Common.QUEUE_SIZE:
            if 0 < value <= q.state.max_size and value & (value - 1) == 0:
                q.state.size = value
        elif reg == Common.QUEUE_MSIX_VECTOR:
            q.state.msix_vector = self._vector(value)
        elif reg == Common.QUEUE_ENABLE:
            if value == 1:
                self._enable_queue(q)
        elif reg == Common.QUEUE_DESC:
            q.state.desc_table = value
        elif reg == Common.QUEUE_DRIVER:
            q.state.avail_ring = value
        elif reg == Common.QUEUE_DEVICE:
            q.state.used_ring = value

    def _enable_queue(self, q: SplitQueue) -> None:
        q.state.ready = True
        if self.vstate.status & Status.DRIVER_OK and self._queue_nursery is not None:
            self._start_queue(q)

    # -- status, features, reset -----------------------------------------------------------

    def _write_status(self, value: int) -> None:
        s = self.vstate
        if value == 0:
            self._begin_reset()
            return
        old = s.status
        new = value | (old & Status.DEVICE_NEEDS_RESET)
        if new & Status.FEATURES_OK and not old & Status.FEATURES_OK and not self._accept_features():
            new &= ~Status.FEATURES_OK
        s.status = new
        if new & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            if not new & Status.FEATURES_OK:
                self.needs_reset("DRIVER_OK without FEATURES_OK")
                return
            self._start_queues()
            self.driver_ok()

    def _accept_features(self) -> bool:
        f = self.vstate.driver_features
        if f & ~self.device_features or not f >> F_VERSION_1 & 1:
            self.log.info("refusing driver features %#x (offered %#x)", f, self.device_features)
            return False
        return self.features_ok(f)

    def _new_queues(self) -> None:
        states = [QueueState(max_size=self.queue_max_size) for _ in range(self.num_queues)]
        self.vstate.queues = states
        self.queues = [SplitQueue(i, st, self.dma) for i, st in enumerate(states)]
        for q in self.queues:
            q.accepting = not self._mig_stopped
            q.poll = AdaptivePoll(self.poll_ns)

    def _begin_reset(self) -> None:
        """Forget the driver's setup at once; in-flight requests drain in the background and
        the status reads non-zero until they did (the driver polls for 0, 4.1.4.3.2)."""
        if self._queue_scope is not None:
            self._status_while_draining = self.vstate.status or Status.ACKNOWLEDGE
            self._draining_done = self._queues_done
            self._queue_scope.cancel()
            self._queue_scope = None
            self._queue_nursery = None
        for q in self.queues:
            q.active = False
        self.vstate = TransportState()
        self._new_queues()
        self.set_intx(False)
        self.virtio_reset()

    def _draining(self) -> bool:
        done = self._draining_done
        if done is not None and done.is_set():
            self._draining_done = done = None
        return done is not None

    async def reset(self) -> None:
        self._begin_reset()
        await self._queues_done.wait()

    # -- queue tasks -------------------------------------------------------------------------

    def _start_queues(self) -> None:
        event_idx = self.has(F_EVENT_IDX)
        for q in self.queues:
            q.state.event_idx_enabled = event_idx
            q.indirect_ok = self.has(F_INDIRECT_DESC)
        self._queues_done = trio.Event()
        self._queue_scope = trio.CancelScope()
        self.spawn(self._run_queues, self._queue_scope, self._queues_done, name=f"{self.name}.queues")

    async def _run_queues(self, scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    if scope.cancel_called:
                        return
                    self._queue_nursery = nursery
                    for q in self.queues:
                        if q.state.ready:
                            self._start_queue(q)
                    await trio.sleep_forever()
        finally:
            done.set()

    def _start_queue(self, q: SplitQueue) -> None:
        assert self._queue_nursery is not None
        q.state.event_idx_enabled = self.has(F_EVENT_IDX)
        q.indirect_ok = self.has(F_INDIRECT_DESC)
        self._queue_nursery.start_soon(self.dma.executor.run_task, self._queue_main, q, name=f"{self.name}.q{q.index}")

    async def _queue_main(self, q: SplitQueue) -> None:
        try:
            q.check_layout()
            await self.serve_queue(q)
        except BaseExceptionGroup as group:
            # Errors of concurrent requests arrive grouped; a reset's Cancelled goes on up.
            cancelled, rest = group.split(trio.Cancelled)
            if rest is not None:
                self._queue_failed(q, rest)
            if cancelled is not None:
                raise cancelled from None
        except Exception as exc:
            self._queue_failed(q, exc)

    def _queue_failed(self, q: SplitQueue, exc: BaseException) -> None:
        bad = _first(exc, VirtqueueError)
        if bad is not None:
            self.notify_queue(q)  # what completed before the bad chain still completes
            self.needs_reset(str(bad))
            return
        # A device bug must not take the server (and the guest's other queues) down.
        self.log.error("queue %d failed", q.index, exc_info=exc)
        self.needs_reset(f"internal error on queue {q.index}")

    async def serve_queue(self, q: SplitQueue) -> None:
        """Pop requests when the driver kicks, run :meth:`process` on them, complete them."""
        if self.max_inflight <= 1:
            while True:
                while (chain := q.pop()) is not None:
                    q.push(chain, await self.process(q, chain))
                self.notify_queue(q)
                await self._sleep_until_kicked(q)
        async with trio.open_nursery() as nursery:
            slots = trio.Semaphore(self.max_inflight)
            completed = trio.Event()

            async def one(chain: DescriptorChain) -> None:
                nonlocal completed
                try:
                    written = await self.process(q, chain)
                finally:
                    slots.release()
                q.push(chain, written)
                if slots.value == self.max_inflight:
                    # The queue's only request in flight (a FLUSH at queue depth 1): nothing
                    # to share the interrupt with, so no scheduler pass for the flusher.
                    self.notify_queue(q)
                else:
                    completed.set()

            async def flusher() -> None:
                # Completions that finish in the same scheduler pass share one used-index
                # update and one interrupt.
                nonlocal completed
                while True:
                    await completed.wait()
                    completed = trio.Event()
                    await trio.lowlevel.checkpoint()
                    self.notify_queue(q)

            nursery.start_soon(self.dma.executor.run_task, flusher)
            inline = self.process_nowait
            while True:
                # One pass: requests the device can finish without waiting complete right
                # here (no task, no scheduler pass); the others get a task each. What the
                # pass completed is published with one used-index update and one interrupt.
                # At most a queue's worth per pass, so a guest that keeps the queue full
                # cannot starve the other tasks. A C fast path (complete_fast) goes first
                # whenever nothing of Python's waits to be published.
                budget = q.state.size
                while budget > 0:
                    budget -= self.complete_fast(q)
                    if budget <= 0 or (chain := q.pop()) is None:
                        break
                    budget -= 1
                    written = inline(q, chain)
                    if written is not None:
                        q.push(chain, written)
                        continue
                    if slots.value == 0:
                        self.notify_queue(q)
                    await slots.acquire()
                    self.dma.executor.start_soon(nursery, one, chain)
                self.notify_queue(q)
                if budget > 0:
                    await self._sleep_until_kicked(q)
                else:
                    await trio.lowlevel.checkpoint()

    async def _sleep_until_kicked(self, q: SplitQueue, beyond: int = 0) -> None:
        """Until the driver makes chains available (more than ``beyond`` of them)."""
        poll = q.poll
        # No polling through DMA_READ messages: each look would be a round trip on the
        # client's main loop.
        if poll.max_ns and not poll.driver_busy and not self.dma.message_mode:
            # Look at the avail ring for a while first, with kicks suppressed meanwhile.
            q.suppress_notification()
            if await poll.poll(lambda: q.pending() > beyond, lambda: not (q.active and q.accepting)):
                poll.arrived(q.driver_behind())
                return
        if q.enable_notification(beyond):
            # More work arrived meanwhile; still a checkpoint, so a guest that keeps the
            # queue full cannot starve other tasks or block a reset's cancellation.
            poll.woken()
            await trio.lowlevel.checkpoint()
        else:
            await q.doorbell.wait()
            poll.woken()
        if poll.max_ns:
            poll.arrived(q.driver_behind())

    async def drain(self, timeout: float = 20.0) -> None:
        """Server shutdown: finish what the driver made available before it (a kicked request
        is in flight as far as the guest knows), then stop taking requests and wait for the
        ones in flight."""
        with trio.move_on_after(timeout):
            for q in self.queues:
                if not (q.active and q.accepting and q.state.ready):
                    continue
                try:
                    target = q.avail_idx()
                except VirtqueueError:
                    continue
                q.doorbell.ring()
                while q.active and q.accepting and (target - q.state.next_avail) & 0xFFFF:
                    await trio.sleep(0.001)
        for q in self.queues:
            q.accepting = False
        with trio.move_on_after(timeout):
            for q in self.queues:
                await q.idle.wait()
                self.notify_queue(q)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "virtio_id": type(self).virtio_id, "queues": self.num_queues}

    # -- migration (formats: migration_format.py; spec: docs/migration-format.md 5.4) ---------

    def ro_config(self) -> bytes:
        """The device configuration as part of the guest-visible ABI: driver-writable and
        dynamic fields zeroed. Subclasses with such fields override this."""
        return self.read_config()

    # The state classes (.migration_format) are imported by the first migration, not with the
    # device: a server that never migrates does not pay for them at start-up.

    def virtio_profile(self) -> VirtioProfile:
        from .migration_format import VirtioProfile

        cfg = (VIRTIO_BAR, DEVICE_OFF, self.config_size) if self.config_size else (0, 0, 0)
        return VirtioProfile(
            device_id=int(type(self).virtio_id), device_features=self.device_features,
            num_queues=self.num_queues, queue_size_max=self.queue_max_size,
            notify_multiplier=NOTIFY_MULTIPLIER,
            caps=((VIRTIO_BAR, COMMON_OFF, Common.SIZE), (VIRTIO_BAR, NOTIFY_OFF, 0x1000),
                  (VIRTIO_BAR, ISR_OFF, 1), cfg),
            ro_config=self.ro_config())

    def migration_profile(self) -> Any:
        # No backend identity: storage is shared and may be reached by another path.
        from .migration_format import encode_virtio_profile

        return replace(super().migration_profile(), device_abi=encode_virtio_profile(self.virtio_profile()))

    def decode_device_abi(self, abi: bytes) -> Any:
        from .migration_format import decode_virtio_profile

        return decode_virtio_profile(abi)

    def save_device_state(self) -> dict[str, Any]:
        """Device-specific part of :class:`VirtioDevState` (``blk=`` / ``net=``)."""
        return {}

    def check_device_state(self, state: VirtioDevState) -> None:
        """Refuse (raise MigrationFormatError) a device-specific state this device cannot take."""

    def load_device_state(self, state: VirtioDevState) -> None:
        """Apply the device-specific part of a validated state."""

    def save_state(self) -> VirtioDevState:
        from .migration_format import TransportMig, VirtioDevState, VqMig

        s = self.vstate
        queues = tuple(VqMig(
            size=q.state.size, ready=q.state.ready, msix_vector=q.state.msix_vector,
            desc=q.state.desc_table, driver=q.state.avail_ring, device=q.state.used_ring,
            notify_off=q.index, last_avail_idx=q.state.next_avail, used_idx=q.state.next_used,
            signalled_used=q._signalled_used or 0, signalled_valid=q._signalled_used is not None)
            for q in self.queues)
        transport = TransportMig(
            driver_features=s.driver_features, device_feature_select=s.device_feature_select,
            driver_feature_select=s.driver_feature_select, config_msix_vector=s.config_msix_vector,
            queue_select=s.queue_select, status=s.status, config_generation=s.config_generation,
            isr=s.isr, queues=queues)
        return VirtioDevState(profile=self.migration_profile(), transport=transport,
                              **self.pci_state(), **self.save_device_state())

    def _check_state(self, state: VirtioDevState) -> None:
        t = state.transport

        def bad(reason: str) -> MigrationFormatError:
            return MigrationFormatError(errno.EINVAL, f"{self.name}: {reason}")

        if len(t.queues) != self.num_queues:
            raise bad(f"{len(t.queues)} queues, this device has {self.num_queues}")
        if t.driver_features & ~self.device_features:
            raise bad(f"driver features {t.driver_features:#x} were not offered")
        if t.status & Status.FEATURES_OK and not t.driver_features >> F_VERSION_1 & 1:
            raise bad("FEATURES_OK without VERSION_1")
        if t.status & Status.DRIVER_OK and not t.status & Status.FEATURES_OK:
            raise bad("DRIVER_OK without FEATURES_OK")
        for i, q in enumerate(t.queues):
            if not 0 < q.size <= self.queue_max_size or q.size & (q.size - 1):
                raise bad(f"queue {i}: size {q.size}")
            if q.notify_off != i:
                raise bad(f"queue {i}: notify offset {q.notify_off} (this device uses {i})")
            if (q.used_idx - q.last_avail_idx) & 0xFFFF:
                raise bad(f"queue {i}: requests in flight (avail {q.last_avail_idx}, used {q.used_idx})")
        self.check_device_state(state)

    def load_state(self, state: VirtioDevState) -> None:
        self._check_state(state)  # before anything changes: a refused load leaves the reset state
        self.load_pci_state(state)
        t = state.transport
        self.vstate = TransportState(
            status=t.status, device_feature_select=t.device_feature_select,
            driver_feature_select=t.driver_feature_select, driver_features=t.driver_features,
            config_msix_vector=self._vector(t.config_msix_vector), queue_select=t.queue_select,
            config_generation=t.config_generation, isr=t.isr & (ISR_QUEUE | ISR_CONFIG))
        self._new_queues()
        for q, m in zip(self.queues, t.queues, strict=True):
            st = q.state
            st.size, st.ready, st.msix_vector = m.size, m.ready, self._vector(m.msix_vector)
            st.desc_table, st.avail_ring, st.used_ring = m.desc, m.driver, m.device
            st.next_avail, st.next_used = m.last_avail_idx, m.used_idx
            q._signalled_used = m.signalled_used if m.signalled_valid else None
        self.load_device_state(state)
        if t.status & Status.DRIVER_OK:
            self._start_queues()

    def reset_state(self) -> None:
        self.config.reset()
        self._reset_msix_table()
        self._begin_reset()

    async def quiesce(self) -> None:
        """Migration: take no new requests, let the ones in flight complete and be marked used."""
        self._mig_stopped = True
        for q in self.queues:
            q.accepting = False
        await self.quiesce_device()
        with trio.move_on_after(30) as timeout:
            if self._draining_done is not None:
                await self._draining_done.wait()
            for q in self.queues:
                await q.idle.wait()
        if timeout.cancelled_caught:
            self.log.error("requests still in flight after 30 s of quiescing")
        for q in self.queues:
            self.notify_queue(q)

    def resume(self) -> None:
        self._mig_stopped = False
        for q in self.queues:
            q.accepting = True
            q.doorbell.ring()  # kicks that came while stopped were swallowed
        self.resume_device()

    async def quiesce_device(self) -> None:
        """Device-specific part of :meth:`quiesce` (e.g. stop taking frames from a backend)."""

    def resume_device(self) -> None:
        """Device-specific part of :meth:`resume`."""


def _first(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` or its (nested) exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first(inner, kind)
            if found is not None:
                return found
    return None
