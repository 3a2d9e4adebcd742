"""The PCI device model a device author subclasses.

A device is a class with declarations (identity, BARs, capabilities) and a few methods::

    class Example(PciDevice):
        identity = PciIdentity(vendor_id=0x1234, device_id=0xfe01)
        bar0 = MemoryBar(0x1000)
        capabilities = (PowerManagement(), Msix(vectors=4, table_bar=2), PciExpress())

        @bar0.reader
        def read_regs(self, offset, size): ...

The base class turns those into everything vfio-user needs: config space, region info, region
access routing (including the MSI-X table and PBA), interrupts through the client's eventfds,
DMA through :attr:`dma`, and reset. The server (one per device process) drives it; a device
never sees a message or a socket.

Callbacks run on the server's event loop and must not block. Work that takes time (block I/O,
a packet backend) runs in tasks started with :meth:`spawn`, which live as long as the device,
across client connections.
"""

from __future__ import annotations

import argparse
import copy
import errno
import importlib
import inspect
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

import trio

from ..migration.errors import MigrationError
from ..protocol.constants import (
    DeviceFlags,
    IrqIndex,
    PciRegion,
    RegionFlags,
)
from ..protocol.errors import VfioUserError
from ..protocol.messages import DeviceFeature, MsixMappableCap, RegionInfo, SparseMmapCap
from ..sandbox import SandboxNeeds
from .bar import Bar, BarBacking
from .capabilities import Capability, Msi, Msix
from .config import CMD_MASTER, ConfigSpace, PciIdentity
from .dma import GuestMemory
from .irq import Interrupts
from .migration import DeviceMigration

log = logging.getLogger("vfu_server.device")


class ExtraRegion(Protocol):
    """A device-specific region (index >= 9), e.g. the legacy migration region."""

    def info(self, index: int) -> RegionInfo: ...
    def read(self, offset: int, count: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> Awaitable[None] | None: ...


class PciDevice:
    """Base class of every device. See the module docstring for the declaration style."""

    #: name on the ``vfu-server`` command line (defaults to the class name, lower case)
    cli_name: ClassVar[str | None] = None
    identity: ClassVar[PciIdentity]
    capabilities: ClassVar[tuple[Capability, ...]] = ()
    #: offer legacy INTx (interrupt pin A) as a fallback when the driver uses no MSI/MSI-X
    intx: ClassVar[bool] = False
    #: size of an expansion ROM (0: none); the content comes from :meth:`rom_bytes`
    rom_size: ClassVar[int] = 0
    #: the device's migration formats: a :class:`vfu_server.migration.FormatSet`, or
    #: ``"package.module:NAME"`` of one, imported when a migration first needs it (a big state
    #: format then costs a server nothing at start-up). A device with formats must implement
    #: :meth:`save_state` and :meth:`load_state`.
    migration_formats: ClassVar[Any] = None

    @classmethod
    def get_migration_formats(cls) -> Any:
        """The device's :class:`~vfu_server.migration.FormatSet` (``migration_formats``, imported
        if it is named by a string), or None for a device that does not migrate."""
        formats = cls.migration_formats
        if not isinstance(formats, str):
            return formats
        module_name, _, attr = formats.partition(":")
        from ..migration.formats import FormatSet

        try:
            found = getattr(importlib.import_module(module_name), attr) if attr else None
        except (ImportError, AttributeError) as exc:
            raise TypeError(f"{cls.__name__}.migration_formats = {formats!r}: {exc}") from None
        if not isinstance(found, FormatSet):
            raise TypeError(f"{cls.__name__}.migration_formats = {formats!r}: expected "
                            "'package.module:NAME' of a FormatSet")
        return found

    def __init__(self) -> None:
        cls = type(self)
        self.log = logging.getLogger(f"vfu_server.device.{self.name}")
        self.bars: list[Bar | None] = [None] * 6
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                if isinstance(value, Bar) and value.index is not None:
                    self.bars[value.index] = value
        self.caps: list[Capability] = [copy.deepcopy(c) for c in cls.capabilities]
        for cap in self.caps:
            cap.device = self
        self.config = ConfigSpace(
            cls.identity, self.bars, self.caps, interrupt_pin=1 if cls.intx else 0, rom_size=cls.rom_size
        )
        self.backing = [BarBacking(b, f"{self.name}-bar{i}") if b else None for i, b in enumerate(self.bars)]
        self.msix: Msix | None = next((c for c in self.caps if isinstance(c, Msix)), None)
        self.msi: Msi | None = next((c for c in self.caps if isinstance(c, Msi)), None)
        if self.msix is not None:
            self._check_msix(self.msix)
        self.msix_table = bytearray(self.msix.table_size if self.msix else 0)
        self._reset_msix_table()
        self.irqs = Interrupts(
            intx=cls.intx,
            msi_vectors=self.msi.vectors if self.msi else 0,
            msix_vectors=self.msix.vectors if self.msix else 0,
        )
        self.dma = GuestMemory()
        self.dma.config_image = self.config.data
        self.dma.window_filter = self._own_window
        self.dma.executor.spawn = self._spawn_unwrapped
        self.irqs.before_signal = self.dma.before_interrupt
        self.extra_regions: dict[int, ExtraRegion] = {}
        self._nursery: trio.Nursery | None = None
        self._pending_reset: str | None = None
        self.migration: DeviceMigration | None = None
        if cls.migration_formats is not None:
            self.migration = DeviceMigration(self)
            self.extra_regions[PciRegion.MIGRATION] = self.migration.region

    # -- naming and command line ------------------------------------------------------------

    @property
    def name(self) -> str:
        return type(self).cli_name or type(self).__name__.lower()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add device options to the ``vfu-server`` command line."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PciDevice:
        """Build the device from parsed command-line options."""
        return cls()

    # -- lifecycle hooks for subclasses -----------------------------------------------------

    def reset(self) -> Awaitable[None] | None:
        """Device-specific reset (DEVICE_RESET, FLR). Config space is already back to power-on."""

    async def run(self) -> None:
        """Long-running device work, started once when the server starts. Optional.

        A device that needs the event loop to get ready (connect an NBD backend, open a TAP
        device) declares ``async def run(self, task_status=trio.TASK_STATUS_IGNORED)`` and calls
        ``task_status.started()`` once ready: the server says ``listening`` only after that, and
        an exception before it becomes a one-line start-up error instead of a running server
        with a broken device.
        """

    async def shutdown(self) -> None:
        """The server is exiting: finish in-flight work and flush backends."""

    def sandbox_needs(self) -> SandboxNeeds:
        """What the device still does once started beyond serving its client (``--sandbox``):
        sockets it opens again (a backend that reconnects), files it reads or removes.
        Called after :meth:`run` reported ready. None by default."""
        return SandboxNeeds()

    def client_connected(self) -> None:
        """A client negotiated a session."""

    def client_disconnected(self) -> Awaitable[None] | None:
        """The client went away: DMA maps and eventfds are gone, device state stays."""

    # -- migration hooks (only for devices that declare migration_formats) ------------------

    async def quiesce(self) -> None:
        """Stop starting new work and wait for in-flight DMA and interrupts to finish. Called
        before the device leaves a running migration state."""

    def resume(self) -> None:
        """Undo :meth:`quiesce`: the device is running again (after a migration or a failed one)."""

    def save_state(self) -> Any:
        """The device state as plain data, in the shape its formats encode."""
        raise NotImplementedError(f"{type(self).__name__} declares migration_formats but no save_state")

    def load_state(self, state: Any) -> None:
        """Apply a fully validated state (called on the RESUMING -> STOP arc only)."""
        raise NotImplementedError(f"{type(self).__name__} declares migration_formats but no load_state")

    def reset_state(self) -> None:
        """Power-on state before loading (entering RESUMING). Override if :meth:`reset` is async."""
        self.config.reset()
        self._reset_msix_table()
        result = self.reset()
        if result is not None:
            raise TypeError(f"{type(self).__name__}.reset is async: override reset_state")

    def migration_arc(self, src: Any, dst: Any) -> None:
        """One migration state-machine arc; the device was already quiesced if it stops."""

    def migration_profile(self) -> Any:
        """The guest-visible profile a destination compares before loading."""
        from .migration_state import pci_profile

        return pci_profile(self)

    def pci_state(self) -> dict[str, Any]:
        """The generic PCI part of the state: ``{"pci": ..., "msix": ..., "intx": ...}``."""
        from .migration_state import pci_state

        return pci_state(self)

    def load_pci_state(self, state: Any) -> None:
        from .migration_state import load_pci_state

        load_pci_state(self, state.pci, state.msix, state.intx)

    # -- live handover hooks (vfu_server.handover, docs/handover.md) ------------------------

    def handover_refusal(self) -> str | None:
        """Why this device cannot hand over right now (a one-line reason), or None. The
        state must be all in :meth:`save_state`; a device that keeps more (state no format
        holds) returns a reason, and every handover is refused cleanly."""
        return None

    def decode_device_abi(self, abi: bytes) -> Any:
        """The profile's ``device_abi`` bytes as a (dataclass) value, so that a refused
        handover can say which guest-visible setting differs. Default: the bytes."""
        return abi

    def handover_export(self) -> tuple[dict[str, Any], list[int]]:
        """Predecessor side, device quiesced: resources a successor cannot simply reopen (a
        TAP fd, a connected peer socket, a RAM disk), as plain data and fds. The fds stay
        ours (the successor gets copies) until :meth:`handover_released`."""
        return {}, []

    def handover_adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        """Successor side, before the state is loaded: take over what the predecessor's
        :meth:`handover_export` gave. The fds become ours (close the ones not kept; raise
        ValueError, after closing them, to refuse)."""
        for fd in fds:
            os.close(fd)
        if data or fds:
            raise ValueError(f"{self.name} cannot adopt device resources {sorted(data)}")

    def handover_released(self) -> None:
        """Predecessor side: the successor took over. Closing our copies is fine (the process
        exits), but nothing shared may be torn down (unlinking a socket path the successor
        now listens on)."""

    async def device_feature(self, req: DeviceFeature) -> bytes:
        if self.migration is None:
            raise VfioUserError(f"device feature {req.index:#x} not supported", errno.ENOTTY)
        return await self.migration.feature(req)

    def migration_data_read(self, size: int) -> bytes:
        if self.migration is None:
            raise VfioUserError("device is not migratable", errno.ENOTTY)
        try:
            return self.migration.controller.read_data(size)
        except MigrationError as exc:
            raise VfioUserError(exc.reason, exc.errno) from None

    def migration_data_write(self, data: bytes) -> None:
        if self.migration is None:
            raise VfioUserError("device is not migratable", errno.ENOTTY)
        try:
            self.migration.controller.write_data(data)
        except MigrationError as exc:
            raise VfioUserError(exc.reason, exc.errno) from None

    def describe(self) -> dict[str, Any]:
        """Facts for logs and ``--list-devices``."""
        ident = type(self).identity
        return {"vendor": f"{ident.vendor_id:04x}", "device": f"{ident.device_id:04x}"}

    # -- services for subclasses ------------------------------------------------------------

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """Start a task that lives as long as the device (until the server shuts down).

        An exception escaping the task is a device bug: it is logged with its traceback and
        ends that task only. It never takes the server down, since QEMU cannot survive a
        server that dies (the next guest reset aborts the VM)."""
        if self._nursery is None:
            raise RuntimeError("device is not attached to a running server")
        self._nursery.start_soon(self._guarded, fn, args, True, name=name or getattr(fn, "__name__", None))

    def _spawn_unwrapped(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """:meth:`spawn` for the message-DMA executor's own tasks (which take its lock themselves)."""
        if self._nursery is None:
            raise RuntimeError("device is not attached to a running server")
        self._nursery.start_soon(self._guarded, fn, args, False, name=name)

    async def _guarded(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], dma_task: bool) -> None:
        try:
            if dma_task:
                # Synchronous code in the task may reach guest memory without an fd.
                await self.dma.executor.run_task(fn, *args)
            else:
                await fn(*args)
        except Exception:
            self.log.exception("device task %s failed", getattr(fn, "__qualname__", fn))
        except BaseExceptionGroup as group:
            # Cancellation (server shutdown) goes on; everything else is logged here.
            cancelled, rest = group.split(trio.Cancelled)
            if rest is not None:
                self.log.error("device task %s failed", getattr(fn, "__qualname__", fn), exc_info=rest)
            if cancelled is not None:
                raise cancelled from None

    def _own_window(self, iova: int, size: int) -> bool:
        """Whether ``[iova, iova + size)`` lies in one of our memory BARs as programmed (QEMU
        DMA-maps a device's mmapped BAR windows to it, without an fd; they are no guest RAM)."""
        data = self.config.data
        for i, bar in enumerate(self.bars):
            if bar is None or bar.kind.io:
                continue
            low = struct.unpack_from("<I", data, 0x10 + 4 * i)[0]
            addr = low & ~0xF
            if low & 0x4 and i < 5:
                addr |= struct.unpack_from("<I", data, 0x14 + 4 * i)[0] << 32
            if addr and addr <= iova and iova + size <= addr + bar.size:
                return True
        return False

    @property
    def bus_master(self) -> bool:
        return bool(self.config.data[4] & CMD_MASTER)

    def interrupt(self, vector: int = 0) -> bool:
        """Raise an interrupt the way the driver configured: MSI-X, else MSI, else INTx.

        For INTx this asserts the line; the device must call :meth:`set_intx` (False) when the
        cause is cleared, as level-triggered hardware does.
        """
        irqs = self.irqs
        if self.msix is not None and (self.msix.enabled or irqs.lines[IrqIndex.MSIX].active):
            return irqs.signal(IrqIndex.MSIX, vector)
        if self.msi is not None and (self.msi.enabled or irqs.lines[IrqIndex.MSI].active):
            return irqs.signal(IrqIndex.MSI, vector)
        if type(self).intx and not self.config.intx_disabled:
            self.set_intx(True)
            return True
        return False

    def set_intx(self, asserted: bool) -> None:
        self.config.set_interrupt_status(asserted)
        if asserted and self.config.intx_disabled:
            return
        self.irqs.set_intx(asserted)

    def request_reset(self, reason: str) -> None:
        """Ask for a device reset from inside a callback (e.g. FLR); it runs after the callback."""
        self._pending_reset = reason

    def rom_bytes(self) -> bytes:
        return b""

    # -- used by the server ------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start :meth:`run` in ``nursery`` and wait until the device is ready."""
        self._nursery = nursery
        if "task_status" in inspect.signature(self.run).parameters:
            await nursery.start(self._run_until_ready, name=f"{self.name}.run")
        else:
            self.spawn(self.run, name=f"{self.name}.run")

    async def _run_until_ready(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        ready = False

        class Status:
            def started(self, value: Any = None) -> None:
                nonlocal ready
                ready = True
                task_status.started(value)

        try:
            await self.run(task_status=Status())  # type: ignore[call-arg]
        except Exception:
            if not ready:
                raise  # a start-up error: nursery.start() re-raises it to the server
            self.log.exception("device task run failed")
        except BaseExceptionGroup as group:
            cancelled, rest = group.split(trio.Cancelled)
            if rest is not None:
                if not ready:
                    raise rest from None
                self.log.error("device task run failed", exc_info=rest)
            if cancelled is not None:
                raise cancelled from None

    def attach(self, nursery: trio.Nursery) -> None:
        """Start :meth:`run` without waiting for readiness (tests, embedding)."""
        self._nursery = nursery
        self.spawn(self.run, name=f"{self.name}.run")

    @property
    def device_flags(self) -> int:
        return DeviceFlags.PCI | DeviceFlags.RESET

    @property
    def num_regions(self) -> int:
        return max([PciRegion.VGA + 1, *(i + 1 for i in self.extra_regions)])

    async def do_reset(self) -> None:
        self._pending_reset = None
        self.config.reset()
        self._reset_msix_table()
        self.irqs.set_intx(False)
        for b in self.backing:
            if b is not None and isinstance(b.memory, bytearray):
                b.memory[:] = bytes(len(b.memory))
        result = self.reset()
        if result is not None:
            await result
        if self.migration is not None:
            self.migration.reset()

    @property
    def reset_pending(self) -> bool:
        """A config write asked for a reset (FLR) that the server has yet to do."""
        return self._pending_reset is not None

    def take_pending_reset(self) -> str | None:
        reason, self._pending_reset = self._pending_reset, None
        return reason

    def region_info(self, index: int) -> tuple[RegionInfo, int | None]:
        """Region info and the fd to send with it (for mmappable BARs)."""
        if 0 <= index <= 5:
            bar = self.bars[index]
            if bar is None:
                return RegionInfo(index), None
            flags = RegionFlags.READ | RegionFlags.WRITE
            backing = self.backing[index]
            if bar.mmap_areas and backing is not None and backing.fd is not None:
                caps: tuple = (SparseMmapCap(bar.mmap_areas),)
                if self.msix is not None and index == self.msix.table_bar and self._msix_in_mmap(bar):
                    caps = (*caps, MsixMappableCap())
                return RegionInfo(index, flags | RegionFlags.MMAP, bar.size, 0, caps), backing.fd
            return RegionInfo(index, flags, bar.size), None
        if index == PciRegion.ROM:
            return RegionInfo(index, RegionFlags.READ if self.rom_size else 0, self.rom_size), None
        if index == PciRegion.CONFIG:
            return RegionInfo(index, RegionFlags.READ | RegionFlags.WRITE, self.config.size), None
        if index == PciRegion.VGA:
            return RegionInfo(index), None
        extra = self.extra_regions.get(index)
        if extra is not None:
            return extra.info(index), None
        raise VfioUserError(f"no region {index}", errno.EINVAL)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            try:
                return self.config.read(offset, count)
            except IndexError as exc:
                raise VfioUserError(str(exc), errno.EINVAL) from None
        if 0 <= index <= 5:
            return self._bar_read(index, offset, count)
        if index == PciRegion.ROM:
            rom = self.rom_bytes().ljust(self.rom_size, b"\0")
            if offset + count > self.rom_size:
                raise VfioUserError(f"ROM read {offset:#x}+{count} past {self.rom_size:#x}", errno.EINVAL)
            return rom[offset : offset + count]
        extra = self.extra_regions.get(index)
        if extra is not None:
            return extra.read(offset, count)
        raise VfioUserError(f"region {index} is not readable", errno.EINVAL)

    def region_write(self, index: int, offset: int, data: bytes) -> Awaitable[None] | None:
        """Apply a write. Returns an awaitable when the write needs async work (a migration
        state change that must first quiesce the device); the server awaits it in order."""
        if index == PciRegion.CONFIG:
            try:
                self.config.write(offset, data)
            except IndexError as exc:
                raise VfioUserError(str(exc), errno.EINVAL) from None
            return
        if 0 <= index <= 5:
            if self.dma.message_mode:
                # The device may reach guest RAM through messages: never wait for one here.
                return self.dma.executor.call(self._bar_write, index, offset, data)
            self._bar_write(index, offset, data)
            return
        if index == PciRegion.ROM:
            return  # ROM writes are dropped, as on hardware
        extra = self.extra_regions.get(index)
        if extra is not None:
            return extra.write(offset, data)
        raise VfioUserError(f"region {index} is not writable", errno.EINVAL)

    # -- BAR access routing -------------------------------------------------------------------

    def _bar(self, index: int, offset: int, count: int) -> Bar:
        bar = self.bars[index]
        if bar is None:
            raise VfioUserError(f"BAR{index} does not exist", errno.EINVAL)
        if offset < 0 or count <= 0 or offset + count > bar.size:
            raise VfioUserError(f"BAR{index} access {offset:#x}+{count} outside {bar.size:#x}", errno.EINVAL)
        return bar

    def _bar_read(self, index: int, offset: int, count: int) -> bytes:
        bar = self._bar(index, offset, count)
        msix = self.msix
        if msix is not None:
            if index == msix.table_bar and msix.table_offset <= offset < msix.table_offset + msix.table_size:
                o = offset - msix.table_offset
                return bytes(self.msix_table[o : o + count]).ljust(count, b"\0")
            if index == msix.pba_bar and msix.pba_offset <= offset < msix.pba_offset + msix.pba_size:
                return self._pba_bytes()[offset - msix.pba_offset :][:count].ljust(count, b"\0")
        backing = self.backing[index]
        if backing is not None and backing.memory is not None and (
            bar.read_fn is None or backing.in_mmap_area(offset, count)
        ):
            return bytes(backing.memory[offset : offset + count])
        if bar.read_fn is None:
            return bytes(count)
        if bar.register_size:
            return self._register_read(bar, offset, count)
        if count in (1, 2, 4, 8) and offset % count == 0:
            return (bar.read_fn(self, offset, count) & ((1 << (8 * count)) - 1)).to_bytes(count, "little")
        out = bytearray()
        for off, size in _split(offset, count):
            out += (bar.read_fn(self, off, size) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return bytes(out)

    def _bar_write(self, index: int, offset: int, data: bytes) -> None:
        count = len(data)
        bar = self._bar(index, offset, count)
        msix = self.msix
        if msix is not None:
            if index == msix.table_bar and msix.table_offset <= offset < msix.table_offset + msix.table_size:
                self._msix_table_write(offset - msix.table_offset, data)
                return
            if index == msix.pba_bar and msix.pba_offset <= offset < msix.pba_offset + msix.pba_size:
                return  # the PBA is read-only
        backing = self.backing[index]
        if backing is not None and backing.memory is not None and (
            bar.write_fn is None or backing.in_mmap_area(offset, count)
        ):
            backing.memory[offset : offset + count] = data
            return
        if bar.write_fn is None:
            return
        if bar.register_size:
            self._register_write(bar, offset, data)
            return
        if count in (1, 2, 4, 8) and offset % count == 0:
            bar.write_fn(self, offset, count, int.from_bytes(data, "little"))
            return
        pos = 0
        for off, size in _split(offset, count):
            bar.write_fn(self, off, size, int.from_bytes(data[pos : pos + size], "little"))
            pos += size

    def _register_read(self, bar: Bar, offset: int, count: int) -> bytes:
        size = bar.register_size
        assert size and bar.read_fn is not None
        first = offset - offset % size
        mask = (1 << (8 * size)) - 1
        buf = bytearray()
        for reg in range(first, offset + count, size):
            buf += (bar.read_fn(self, reg, size) & mask).to_bytes(size, "little")
        return bytes(buf[offset - first : offset - first + count])

    def _register_write(self, bar: Bar, offset: int, data: bytes) -> None:
        size = bar.register_size
        assert size and bar.write_fn is not None
        end = offset + len(data)
        for reg in range(offset - offset % size, end, size):
            lo, hi = max(reg, offset), min(reg + size, end)
            part = data[lo - offset : hi - offset]
            if hi - lo == size:
                bar.write_fn(self, reg, size, int.from_bytes(part, "little"))
                continue
            current = bytearray(
                (bar.read_fn(self, reg, size) if bar.read_fn else 0).to_bytes(size, "little"))
            current[lo - reg : hi - reg] = part
            bar.write_fn(self, reg, size, int.from_bytes(current, "little"))

    # -- MSI-X table (for clients that, unlike QEMU, do not emulate it) ---------------------

    def _check_msix(self, msix: Msix) -> None:
        for which, bar_index, off, size in (("table", msix.table_bar, msix.table_offset, msix.table_size),
                                            ("PBA", msix.pba_bar, msix.pba_offset, msix.pba_size)):
            bar = self.bars[bar_index]
            if bar is None or bar.kind.io or off + size > bar.size:
                raise ValueError(f"MSI-X {which} does not fit in memory BAR{bar_index}")

    def _msix_in_mmap(self, bar: Bar) -> bool:
        assert self.msix is not None
        lo, hi = self.msix.table_offset, self.msix.table_offset + self.msix.table_size
        return any(o < hi and lo < o + n for o, n in bar.mmap_areas)

    def _reset_msix_table(self) -> None:
        table = self.msix_table
        table[:] = bytes(len(table))
        for off in range(12, len(table), 16):
            table[off] = 1  # every vector starts masked

    def _msix_table_write(self, offset: int, data: bytes) -> None:
        table = self.msix_table
        end = min(offset + len(data), len(table))
        table[offset:end] = data[: end - offset]
        first, last = offset // 16, (end - 1) // 16
        line = self.irqs.lines[IrqIndex.MSIX]
        for vec in range(first, last + 1):
            masked = bool(table[vec * 16 + 12] & 1)
            was = line.masked[vec]
            line.masked[vec] = masked
            if was and not masked and line.pending[vec]:
                line.pending[vec] = False
                self.irqs.signal(IrqIndex.MSIX, vec)

    def _pba_bytes(self) -> bytes:
        assert self.msix is not None
        bits = self.irqs.pending_bits(IrqIndex.MSIX)
        value = sum(1 << i for i, p in enumerate(bits) if p)
        return value.to_bytes(self.msix.pba_size, "little")

    def close(self) -> None:
        self.irqs.close()
        self.dma.clear()
        for b in self.backing:
            if b is not None:
                b.close()


def _split(offset: int, count: int) -> list[tuple[int, int]]:
    """Split an access into naturally aligned pieces of at most 8 bytes."""
    out = []
    while count:
        size = 8
        while size > count or offset % size:
            size //= 2
        out.append((offset, size))
        offset += size
        count -= size
    return out


U32 = struct.Struct("<I")
