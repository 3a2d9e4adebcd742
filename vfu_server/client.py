"""A vfio-user client: drive a device server without a VM.

It does what QEMU's ``vfio-user-pci`` does, and the migration commands QEMU 11.1 does not::

    async with await Client.connect("/run/dev.sock") as client:
        ram = GuestRam(64 << 20)                     # memfd-backed "guest memory"
        await client.dma_map(ram)                    # announced with DMA_MAP + the memfd
        print(await client.config_read(0, 4))        # vendor/device ID
        vectors = await client.enable_msix(4)        # eventfds for MSI-X vectors 0..3
        await client.write32(0, 0x04, 0xCAFE)        # BAR0 register write (posted or waited)
        await vectors[0].wait()                      # an interrupt arrived

Server-to-client DMA_READ/DMA_WRITE requests (the spec's layout: address u64, count u64, data at
message byte 32) are served from the mapped :class:`GuestRam`, whether it was mapped with its fd
or without one (``dma_map(ram, with_fd=False)``, the way QEMU maps guest RAM that is not shared).
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import trio

from .protocol import messages as m
from .protocol.codec import Message, encode
from .protocol.connection import ClientConnection
from .protocol.constants import (
    Command,
    DmaMapFlags,
    DmaUnmapFlags,
    FeatureFlags,
    IrqIndex,
    IrqSetFlags,
    PciRegion,
    RegionFlags,
)
from .protocol.errors import DmaError, ProtocolError, RemoteError, VfioUserError
from .protocol.negotiation import Session, client_offer
from .transport.channel import MessageChannel
from .transport.pending import PendingReplies


class GuestRam:
    """Shared memory standing in for guest RAM: a memfd the server maps from DMA_MAP.

    ``alloc`` is a bump allocator for test drivers (queues, buffers); addresses are offsets
    from ``base`` (the IOVA the memory is mapped at). Close it (or use it as a context manager);
    one that is dropped unclosed closes its memfd when it is collected.
    """

    def __init__(self, size: int, base: int = 0, name: str = "vfu-guest-ram") -> None:
        self.size = size
        self.base = base
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        try:
            os.ftruncate(self.fd, size)
            self.mem = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            self._close_fd()
            raise
        self._next = 0

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def alloc(self, size: int, align: int = 4096) -> int:
        start = (self._next + align - 1) // align * align
        if start + size > self.size:
            raise MemoryError(f"guest RAM exhausted ({self.size} bytes)")
        self._next = start + size
        return self.base + start

    def _off(self, addr: int, length: int) -> int:
        off = addr - self.base
        if off < 0 or off + length > self.size:
            raise DmaError(f"address {addr:#x}+{length} outside guest RAM")
        return off

    def read(self, addr: int, length: int) -> bytes:
        off = self._off(addr, length)
        return self.mem[off : off + length]

    def write(self, addr: int, data: bytes) -> None:
        off = self._off(addr, len(data))
        self.mem[off : off + len(data)] = data

    def read32(self, addr: int) -> int:
        return struct.unpack("<I", self.read(addr, 4))[0]

    def write32(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<I", value))

    def read64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def write64(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value))

    def close(self) -> None:
        try:
            self.mem.close()
        except BufferError:
            pass  # a view of it is still alive; the mapping goes with the last one
        self._close_fd()


class EventFd:
    """An eventfd handed to the server for one interrupt vector. The :class:`Client` that made it
    (:meth:`Client.enable_irqs`) owns it and closes it when the connection closes; passing its
    ``fd`` to another client's :meth:`Client.set_irq_fds` (a migration's destination) only lends
    it."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def count(self) -> int:
        """Interrupts signalled since the last call (non-blocking)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    async def wait(self) -> int:
        while True:
            n = self.count()
            if n:
                return n
            await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                trio.lowlevel.notify_closing(self.fd)  # wake a wait() on it with an error
            except RuntimeError:
                pass  # outside trio: nobody can be waiting
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Mapping:
    iova: int
    size: int
    ram: GuestRam
    offset: int
    flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE


@dataclass(frozen=True)
class BarInfo:
    """One BAR as enumeration found it: sized through config space (as firmware does) and
    checked against the region's DEVICE_GET_REGION_INFO."""

    index: int
    size: int
    address: int  #: the address enumeration assigned (and wrote to the BAR)
    io: bool = False
    is64: bool = False
    prefetchable: bool = False
    mmap: bool = False  #: the region offers mmappable areas


@dataclass
class Enumerated:
    """What :meth:`Client.enumerate` found and set up."""

    vendor_id: int
    device_id: int
    class_code: int
    revision: int
    subsystem_vendor_id: int
    subsystem_id: int
    bars: dict[int, BarInfo]
    #: capability id -> config offset (standard list; the first of each id)
    capabilities: dict[int, int]
    #: ``"msix"``, ``"msi"``, ``"intx"`` or None: which interrupts were configured
    interrupt_kind: str | None = None
    #: one eventfd per configured vector (one for INTx), in vector order
    interrupts: list[EventFd] = field(default_factory=list)


#: where enumeration puts BARs: 32-bit memory below 4 GiB, 64-bit memory above, I/O ports low
_MEM32_BASE, _MEM64_BASE, _IO_BASE = 0xC000_0000, 0x80_0000_0000, 0x1000
_MSI_ADDRESS, _MSI_DATA = 0xFEE0_0000, 0x4000


class Client:
    """One connection to a vfio-user server. Use :meth:`connect`."""

    def __init__(self, sock: trio.socket.SocketType, max_data_xfer_size: int = 1 << 20) -> None:
        #: the protocol rules and state (sans-IO, client role); the channel feeds its decoder
        self.core = ClientConnection(max_data_xfer_size + 4096)
        self.channel = MessageChannel(sock, max_data_xfer_size + 4096, 16, self.core.decoder)
        self._pending = PendingReplies(self.core.requests)
        self._maps: list[_Mapping] = []
        self._cancel = trio.CancelScope()
        self._reader_done = trio.Event()
        self.closed_reason: str | None = None
        self.server_requests = 0
        #: the largest DMA_READ/DMA_WRITE this client serves (it offers this in VERSION)
        self.max_data_xfer_size = max_data_xfer_size
        #: an errno to refuse every server DMA request with (tests of a client that says no)
        self.refuse_dma: int | None = None
        #: bytes moved and request sizes of the server's DMA_READ/DMA_WRITE served so far
        self.dma_bytes = 0
        self.dma_sizes: list[int] = []
        self._eventfds: list[EventFd] = []
        self._offered_xfer = max_data_xfer_size
        #: The socket path given to :meth:`connect` (None for a socket passed in).
        self.path: str | None = None

    # -- connection -------------------------------------------------------------------------

    @classmethod
    async def connect(cls, path: str, *, write_multiple: bool = True, max_data_xfer_size: int = 1 << 20) -> Client:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except OSError:
            sock.close()
            raise
        self = cls(sock, max_data_xfer_size)
        self.path = path
        self._offer = client_offer(write_multiple=write_multiple, max_data_xfer_size=max_data_xfer_size)
        return self

    @property
    def session(self) -> Session | None:
        return self.core.session

    async def __aenter__(self) -> Client:
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        nursery.start_soon(self._reader)
        try:
            await self.negotiate(self._offer)
        except BaseException as exc:
            await self._shutdown(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> bool | None:
        return await self._shutdown(et, ev, tb)

    async def _shutdown(self, et, ev, tb):  # type: ignore[no-untyped-def]
        # The body's exception is not the reader task's business: close the reader and let the
        # original exception propagate unwrapped (no ExceptionGroup around a RemoteError).
        self._cancel.cancel()
        self.channel.close()
        try:
            await self._nursery_manager.__aexit__(None, None, None)
        finally:
            self._close_eventfds()
        return False

    def _close_eventfds(self) -> None:
        for efd in self._eventfds:
            efd.close()
        self._eventfds.clear()

    async def negotiate(self, offer: m.Version | None = None) -> Session:
        offer = offer or client_offer()
        self._offered_xfer = int(offer.capabilities.get("max_data_xfer_size", 1 << 20))
        reply = await self.request(Command.VERSION, offer.pack())
        return self.core.version_accepted(reply)

    async def _reader(self) -> None:
        with self._cancel:
            try:
                while True:
                    batch = await self.channel.receive()
                    if batch is None:
                        self.closed_reason = "server closed the connection"
                        break
                    for msg in batch:
                        if msg.is_reply:
                            if not self._pending.deliver(msg):
                                msg.close_fds()
                                raise self.core.unexpected_reply(msg)
                        else:
                            await self._serve_request(msg)
            except (ProtocolError, OSError, trio.ClosedResourceError) as exc:
                self.closed_reason = str(exc)
        self._pending.close()
        self._reader_done.set()

    async def _serve_request(self, msg: Message) -> None:
        """Answer the server's DMA_READ/DMA_WRITE from our mapped memory, as QEMU does: no
        more than our ``max_data_xfer_size`` per request, writes only to writable maps."""
        self.server_requests += 1
        try:
            if self.refuse_dma is not None:
                raise VfioUserError("client refuses DMA requests", self.refuse_dma)
            if msg.command == Command.DMA_READ:
                req = m.DmaAccess.unpack(msg.payload, with_data=False)
                self._check_dma_size(req.count)
                data = self._dma_access(req.address, req.count)
                payload = m.DmaAccess(req.address, req.count, data).pack()
            elif msg.command == Command.DMA_WRITE:
                req = m.DmaAccess.unpack(msg.payload, with_data=True)
                self._check_dma_size(req.count)
                self._dma_access(req.address, req.count, req.data)
                payload = m.DmaAccess(req.address, req.count).pack()
            else:
                raise VfioUserError(f"client does not serve command {msg.command}", errno.ENOSYS)
            self.dma_bytes += req.count
            self.dma_sizes.append(req.count)
        except VfioUserError as exc:
            self.core.refuse(msg, exc)
        else:
            self.core.respond(msg, payload)
        finally:
            msg.close_fds()
        answer = self.core.outbox.take()  # None for NO_REPLY
        if answer is not None:
            await self.channel.send(answer)

    def _check_dma_size(self, count: int) -> None:
        if count > self.max_data_xfer_size:
            raise VfioUserError(f"DMA request of {count} bytes > max_data_xfer_size {self.max_data_xfer_size}",
                                errno.EINVAL)

    def _dma_access(self, address: int, count: int, data: bytes | None = None) -> bytes:
        for mp in self._maps:
            if mp.iova <= address and address + count <= mp.iova + mp.size:
                if data is not None and not mp.flags & DmaMapFlags.WRITE:
                    raise VfioUserError(f"DMA_WRITE to read-only map at {address:#x}", errno.EPERM)
                addr = mp.ram.base + mp.offset + (address - mp.iova)
                if data is None:
                    return mp.ram.read(addr, count)
                mp.ram.write(addr, data)
                return b""
        raise VfioUserError(f"DMA to unmapped address {address:#x}", errno.EFAULT)

    # -- raw requests -------------------------------------------------------------------------

    async def request(self, command: int, payload: bytes = b"", fds: Sequence[int] = (), *, check: bool = True) -> Message:
        """Send a request and wait for its reply. Raises :class:`RemoteError` on an error reply."""
        if self._reader_done.is_set():
            raise VfioUserError(f"connection closed: {self.closed_reason}", errno.ENOTCONN)
        # Cancellation is checked before the id is taken: a request cancelled later may have
        # gone out, so its id stays taken until its reply (or the connection's end) comes.
        await trio.lowlevel.checkpoint_if_cancelled()
        msg_id, waiter = self._pending.expect_next()
        rest = self.channel.send_now(encode(msg_id, command, payload), fds)
        if rest is not None:
            await self.channel.send_rest(rest)
        reply = await waiter.wait()
        if reply is None:
            raise VfioUserError(f"connection closed: {self.closed_reason}", errno.ENOTCONN)
        if check and reply.is_error:
            reply.close_fds()
            raise RemoteError(f"{Command(command).name if command in Command._value2member_map_ else command} failed: "
                              f"{os.strerror(reply.error)}", reply.error)
        return reply

    async def post(self, command: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a request with NO_REPLY (posted)."""
        await self.channel.send(self.core.post(command, payload), fds)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (for tests of malformed input)."""
        await self.channel.send(data, fds)

    # -- DMA ----------------------------------------------------------------------------------

    async def dma_map(self, ram: GuestRam, iova: int | None = None, offset: int = 0, size: int | None = None,
                      flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE, with_fd: bool = True) -> None:
        iova = ram.base + offset if iova is None else iova
        size = ram.size - offset if size is None else size
        fds = [ram.fd] if with_fd else []
        await self.request(Command.DMA_MAP, m.DmaMap(flags, offset if with_fd else 0, iova, size).pack(), fds)
        self._maps.append(_Mapping(iova, size, ram, offset, int(flags)))

    async def dma_unmap(self, iova: int, size: int) -> None:
        await self.request(Command.DMA_UNMAP, m.DmaUnmap(0, iova, size).pack())
        self._maps = [mp for mp in self._maps if not (mp.iova == iova and mp.size == size)]

    async def dma_unmap_all(self) -> None:
        await self.request(Command.DMA_UNMAP, m.DmaUnmap(DmaUnmapFlags.ALL, 0, 0).pack())
        self._maps.clear()

    # -- device info --------------------------------------------------------------------------

    async def device_info(self) -> m.DeviceInfo:
        reply = await self.request(Command.DEVICE_GET_INFO, m.DeviceInfo().pack())
        return m.DeviceInfo.unpack(reply.payload)

    async def region_info(self, index: int) -> tuple[m.RegionInfo, int | None]:
        """Region info with capabilities (re-asking with a larger argsz like QEMU does) and the
        fd that came with it (the caller owns it)."""
        argsz = 32
        for _ in range(4):
            reply = await self.request(Command.DEVICE_GET_REGION_INFO, m.RegionInfo.request(index, argsz))
            info = m.RegionInfo.unpack(reply.payload)
            if info.argsz <= argsz:
                fd = reply.fds.pop() if reply.fds else None
                reply.close_fds()
                return info, fd
            reply.close_fds()
            argsz = info.argsz
        raise ProtocolError("region info argsz keeps growing")

    async def irq_info(self, index: int) -> m.IrqInfo:
        reply = await self.request(Command.DEVICE_GET_IRQ_INFO, m.IrqInfo(index).pack())
        return m.IrqInfo.unpack(reply.payload)

    async def region_io_fds(self, index: int) -> m.RegionIoFds:
        reply = await self.request(Command.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 4096, 0, index, 0))
        reply.close_fds()
        return m.RegionIoFds.unpack(reply.payload)

    async def mmap_region(self, index: int) -> tuple[mmap.mmap, m.RegionInfo]:
        """mmap a region's fd (the sparse areas are where access is allowed)."""
        info, fd = await self.region_info(index)
        if fd is None:
            raise VfioUserError(f"region {index} came without an fd", errno.EINVAL)
        try:
            return mmap.mmap(fd, info.size, flags=mmap.MAP_SHARED, offset=info.offset), info
        finally:
            os.close(fd)

    # -- region access -----------------------------------------------------------------------

    async def region_read(self, index: int, offset: int, count: int) -> bytes:
        reply = await self.request(Command.REGION_READ, m.REGION_ACCESS.pack(offset, index, count))
        acc = m.RegionAccess.unpack(reply.payload, with_data=True)
        if acc.count != count:
            raise ProtocolError(f"short region read: {acc.count} of {count}")
        return acc.data

    async def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        payload = m.REGION_ACCESS.pack(offset, index, len(data)) + bytes(data)
        if posted:
            await self.post(Command.REGION_WRITE, payload)
        else:
            await self.request(Command.REGION_WRITE, payload)

    async def write_multi(self, writes: Sequence[tuple[int, int, bytes]]) -> None:
        """REGION_WRITE_MULTI of ``(region, offset, data)`` entries (always posted)."""
        await self.post(Command.REGION_WRITE_MULTI, m.pack_write_multi(writes))

    async def read(self, region: int, offset: int, size: int = 4) -> int:
        return int.from_bytes(await self.region_read(region, offset, size), "little")

    async def write(self, region: int, offset: int, value: int, size: int = 4, *, posted: bool = False) -> None:
        await self.region_write(region, offset, value.to_bytes(size, "little"), posted=posted)

    async def read32(self, bar: int, offset: int) -> int:
        return await self.read(bar, offset, 4)

    async def write32(self, bar: int, offset: int, value: int, *, posted: bool = False) -> None:
        await self.write(bar, offset, value, 4, posted=posted)

    async def config_read(self, offset: int, size: int = 4) -> int:
        return await self.read(PciRegion.CONFIG, offset, size)

    async def config_write(self, offset: int, value: int, size: int = 4) -> None:
        await self.write(PciRegion.CONFIG, offset, value, size)

    # -- interrupts --------------------------------------------------------------------------

    async def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 0,
                       fds: Sequence[int] = (), data: bytes = b"") -> None:
        await self.request(Command.DEVICE_SET_IRQS, m.IrqSet(flags, index, start, count, data).pack(), fds)

    async def set_irq_fds(self, index: int, fds: Sequence[int], start: int = 0) -> None:
        """Trigger vectors ``start ..`` of ``index`` through ``fds`` (the caller keeps them), in
        as many SET_IRQS messages as the server's ``max_msg_fds`` needs, as QEMU splits them."""
        per_message = max(1, self.session.peer_max_msg_fds if self.session else 1)
        for first in range(0, len(fds), per_message):
            chunk = fds[first : first + per_message]
            await self.set_irqs(index, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER,
                                start + first, len(chunk), chunk)

    async def enable_irqs(self, index: int, count: int, start: int = 0) -> list[EventFd]:
        """New eventfds for vectors ``start .. start+count-1`` of ``index``
        (:meth:`set_irq_fds`). The client owns them and closes them when it closes."""
        efds = [EventFd() for _ in range(count)]
        self._eventfds += efds
        await self.set_irq_fds(index, [e.fd for e in efds], start)
        return efds

    async def enable_msix(self, count: int) -> list[EventFd]:
        """Set MSI-X enable in config space (as a guest driver would) and hand out eventfds."""
        cap = await self.find_capability(0x11)
        if cap is None:
            raise VfioUserError("device has no MSI-X capability", errno.ENODEV)
        control = await self.config_read(cap + 2, 2)
        await self.config_write(cap + 2, control | 0x8000, 2)
        return await self.enable_irqs(IrqIndex.MSIX, count)

    async def disable_irqs(self, index: int) -> None:
        await self.set_irqs(index, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, 0, 0)

    async def find_capability(self, cap_id: int) -> int | None:
        pos = await self.config_read(0x34, 1)
        seen = set()
        while pos and pos not in seen:
            seen.add(pos)
            if await self.config_read(pos, 1) == cap_id:
                return pos
            pos = await self.config_read(pos + 1, 1)
        return None

    async def enable_bus_master(self) -> None:
        cmd = await self.config_read(0x04, 2)
        await self.config_write(0x04, cmd | 0x6, 2)

    async def enumerate(self, *, enable_bus_mastering: bool = False, configure_msi: bool = False,
                        vectors: int | None = None) -> Enumerated:
        """Enumerate the device as firmware and a driver's probe would: read its identity and
        capability list, size every BAR through config space, assign it an address and enable
        memory and I/O decoding. A BAR whose sized value disagrees with the region's info is a
        device model bug and raises :class:`VfioUserError`.

        ``enable_bus_mastering`` sets Bus Master Enable (the device may then DMA).
        ``configure_msi`` sets up interrupts the way a Linux driver prefers them: MSI-X if the
        device has it, else MSI (address, data and as many vectors as it offers), else INTx, with
        one eventfd per vector in :attr:`Enumerated.interrupts`; ``vectors`` caps the number.
        """
        ident = await self.config_read(0x00)
        class_rev = await self.config_read(0x08)
        subsys = await self.config_read(0x2C)
        caps: dict[int, int] = {}
        pos, seen = await self.config_read(0x34, 1) & 0xFC, set()
        while pos and pos not in seen:
            seen.add(pos)
            caps.setdefault(await self.config_read(pos, 1), pos)
            pos = await self.config_read(pos + 1, 1) & 0xFC
        bars = await self._size_bars()
        command = await self.config_read(0x04, 2)
        command |= (0x1 if any(b.io for b in bars.values()) else 0) | (
            0x2 if any(not b.io for b in bars.values()) else 0) | (0x4 if enable_bus_mastering else 0)
        found = Enumerated(ident & 0xFFFF, ident >> 16, class_rev >> 8, class_rev & 0xFF,
                           subsys & 0xFFFF, subsys >> 16, bars, caps)
        if configure_msi:
            if 0x11 in caps:
                table_size = (await self.config_read(caps[0x11] + 2, 2) & 0x7FF) + 1
                found.interrupt_kind = "msix"
                found.interrupts = await self.enable_msix(min(table_size, vectors or table_size))
            elif 0x05 in caps:
                found.interrupt_kind = "msi"
                found.interrupts = await self._enable_msi(caps[0x05], vectors)
            elif await self.config_read(0x3D, 1):
                found.interrupt_kind = "intx"
                found.interrupts = await self.enable_irqs(IrqIndex.INTX, 1)
                command &= ~0x400  # Interrupt Disable off
        await self.config_write(0x04, command, 2)
        return found

    async def _size_bars(self) -> dict[int, BarInfo]:
        bars: dict[int, BarInfo] = {}
        next_addr = {"io": _IO_BASE, "mem32": _MEM32_BASE, "mem64": _MEM64_BASE}
        index = 0
        while index < 6:
            off = 0x10 + 4 * index
            original = await self.config_read(off)
            await self.config_write(off, 0xFFFFFFFF)
            sized = await self.config_read(off)
            io, is64 = bool(sized & 1), not sized & 1 and (sized >> 1) & 3 == 2
            mask = sized & (0xFFFFFFFC if io else 0xFFFFFFF0)
            if is64 and index < 5:
                await self.config_write(off + 4, 0xFFFFFFFF)
                mask |= await self.config_read(off + 4) << 32
                width = 64
            else:
                width = 16 if io else 32
                mask &= (1 << width) - 1 if io else 0xFFFFFFFF
            if not mask:
                await self.config_write(off, original)
                index += 1
                continue
            size = ((~mask) & ((1 << width) - 1)) + 1
            info, _ = await self.region_info(index)
            if info.size != size:
                raise VfioUserError(f"BAR{index} sizes to {size:#x} in config space but its region "
                                    f"info says {info.size:#x}", errno.EPROTO)
            kind = "io" if io else "mem64" if is64 else "mem32"
            address = (next_addr[kind] + size - 1) // size * size
            next_addr[kind] = address + size
            await self.config_write(off, address & 0xFFFFFFFF | (sized & (0x3 if io else 0xF)))
            if is64:
                await self.config_write(off + 4, address >> 32)
            bars[index] = BarInfo(index, size, address, io, is64, bool(not io and sized & 0x8),
                                  bool(info.flags & RegionFlags.MMAP))
            index += 2 if is64 else 1
        return bars

    async def _enable_msi(self, cap: int, vectors: int | None) -> list[EventFd]:
        """Program MSI as a driver would (address, data, Multiple Message Enable, enable) and
        hand out one eventfd per enabled vector."""
        control = await self.config_read(cap + 2, 2)
        capable = 1 << ((control >> 1) & 7)
        count = min(capable, vectors or capable)
        count = 1 << (count.bit_length() - 1)  # MME is a power of two
        await self.config_write(cap + 4, _MSI_ADDRESS)
        data_off = 0x0C if control & 0x80 else 0x08
        if control & 0x80:
            await self.config_write(cap + 8, 0)
        await self.config_write(cap + data_off, _MSI_DATA, 2)
        mme = (count.bit_length() - 1) << 4
        await self.config_write(cap + 2, (control & ~0x70) | mme | 1, 2)
        return await self.enable_irqs(IrqIndex.MSI, count)

    # -- reset, features, migration ----------------------------------------------------------

    async def reset(self) -> None:
        await self.request(Command.DEVICE_RESET)

    async def feature(self, index: int, *, get: bool = False, set: bool = False, probe: bool = False,
                      data: bytes = b"", argsz: int | None = None) -> bytes:
        """DEVICE_FEATURE; returns the reply's data (for GET, the feature's data). A GET reply
        whose ``argsz`` says it needs more room than offered is asked for again with that much,
        as the spec's "Message sizes" rule intends."""
        flags = index | (FeatureFlags.GET if get else 0) | (FeatureFlags.SET if set else 0) | (
            FeatureFlags.PROBE if probe else 0)
        room = argsz or 8 + max(len(data), 64)
        for _ in range(4):
            payload = m.DeviceFeature(flags, data, argsz=room).pack()
            reply = await self.request(Command.DEVICE_FEATURE, payload)
            back = m.DeviceFeature.unpack(reply.payload)
            if not get or probe or back.argsz <= room or len(reply.payload) >= back.argsz:
                return back.data
            room = back.argsz
        raise ProtocolError(f"DEVICE_FEATURE {index:#x}: reply argsz keeps growing")

    @property
    def max_transfer(self) -> int:
        """The most data one MIG_DATA_READ/WRITE may carry: both sides' ``max_data_xfer_size``
        (libvfio-user checks the client's, this project's server the smaller of the two)."""
        offered = self._offered_xfer
        server = self.session.max_data_xfer_size if self.session else offered
        return min(offered, server)

    async def mig_data_read(self, size: int) -> bytes:
        """One MIG_DATA_READ; fewer bytes than ``size`` back means the stream has no more."""
        reply = await self.request(Command.MIG_DATA_READ, m.MigData.read_request(size))
        back = m.MigData.unpack(reply.payload, with_data=True)
        if back.size > size:
            raise ProtocolError(f"MIG_DATA_READ returned {back.size} bytes, {size} asked")
        return back.data

    async def mig_data_write(self, data: bytes) -> None:
        await self.request(Command.MIG_DATA_WRITE, m.MigData(len(data), data).pack())

    async def aclose(self) -> None:
        self._cancel.cancel()
        self.channel.close()
        self._close_eventfds()
