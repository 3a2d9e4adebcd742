"""The server's side of a :class:`~vfu_server.pci.device.PciDevice`.

A device author writes declarations, callbacks and hooks on :class:`PciDevice`; the vfio-user
server talks to an :class:`Endpoint` wrapped around it: region info and region access routing
(config space, BARs with their register callbacks, the MSI-X table and PBA, the ROM, extra
regions such as the legacy migration region), device reset, device features and migration data,
starting and closing the device. Keeping these here keeps ``help(PciDevice)`` to what an author
uses.

An endpoint holds no state of its own (everything lives on the device, which migration and the
device's own code share), so any number of them may wrap one device.
"""

from __future__ import annotations

import errno
import inspect
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import trio

from ..migration.errors import MigrationError
from ..protocol.constants import DeviceFlags, IrqIndex, PciRegion, RegionFlags
from ..protocol.errors import VfioUserError
from ..protocol.messages import DeviceFeature, MsixMappableCap, RegionInfo, SparseMmapCap
from .bar import Bar

if TYPE_CHECKING:
    from .device import PciDevice
    from .dma import GuestMemory
    from .irq import Interrupts
    from .migration import DeviceMigration


class Endpoint:
    """What the server calls on a device."""

    __slots__ = ("device",)

    def __init__(self, device: PciDevice) -> None:
        self.device = device

    # -- the device's parts the server shares ------------------------------------------------

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def dma(self) -> GuestMemory:
        return self.device.dma

    @property
    def irqs(self) -> Interrupts:
        return self.device.irqs

    @property
    def migration(self) -> DeviceMigration | None:
        return self.device.migration

    def client_connected(self) -> None:
        self.device.client_connected()

    def client_disconnected(self) -> Awaitable[None] | None:
        return self.device.client_disconnected()

    async def shutdown(self) -> None:
        await self.device.shutdown()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the device's ``run`` in ``nursery`` and wait until the device is ready."""
        d = self.device
        d._nursery = nursery
        if "task_status" in inspect.signature(d.run).parameters:
            await nursery.start(self._run_until_ready, name=f"{d.name}.run")
        else:
            d.spawn(d.run, name=f"{d.name}.run")

    async def _run_until_ready(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        d = self.device
        ready = False

        class Status:
            def started(self, value: Any = None) -> None:
                nonlocal ready
                ready = True
                task_status.started(value)

        try:
            await d.run(task_status=Status())  # type: ignore[call-arg]
        except Exception:
            if not ready:
                raise  # a start-up error: nursery.start() re-raises it to the server
            d.log.exception("device task run failed")
        except BaseExceptionGroup as group:
            cancelled, rest = group.split(trio.Cancelled)
            if rest is not None:
                if not ready:
                    raise rest from None
                d.log.error("device task run failed", exc_info=rest)
            if cancelled is not None:
                raise cancelled from None

    def attach(self, nursery: trio.Nursery) -> None:
        """Start the device's ``run`` without waiting for readiness (tests, embedding)."""
        d = self.device
        d._nursery = nursery
        d.spawn(d.run, name=f"{d.name}.run")

    def close(self) -> None:
        d = self.device
        d.irqs.close()
        d.dma.clear()
        for b in d.backing:
            if b is not None:
                b.close()

    # -- device info and reset ---------------------------------------------------------------

    @property
    def device_flags(self) -> int:
        return DeviceFlags.PCI | DeviceFlags.RESET

    @property
    def num_regions(self) -> int:
        return max([PciRegion.VGA + 1, *(i + 1 for i in self.device.extra_regions)])

    async def do_reset(self) -> None:
        d = self.device
        d._pending_reset = None
        d.config.reset()
        d._reset_msix_table()
        d.irqs.set_intx(False)
        for b in d.backing:
            if b is not None and isinstance(b.memory, bytearray):
                b.memory[:] = bytes(len(b.memory))
        result = d.reset()
        if result is not None:
            await result
        if d.migration is not None:
            d.migration.reset()

    @property
    def reset_pending(self) -> bool:
        """A config write asked for a reset (FLR) that the server has yet to do."""
        return self.device._pending_reset is not None

    def take_pending_reset(self) -> str | None:
        d = self.device
        reason, d._pending_reset = d._pending_reset, None
        return reason

    # -- device features and migration data --------------------------------------------------

    async def device_feature(self, req: DeviceFeature) -> bytes:
        migration = self.device.migration
        if migration is None:
            raise VfioUserError(f"device feature {req.index:#x} not supported", errno.ENOTTY)
        return await migration.feature(req)

    def migration_data_read(self, size: int) -> bytes:
        migration = self.device.migration
        if migration is None:
            raise VfioUserError("device is not migratable", errno.ENOTTY)
        try:
            return migration.controller.read_data(size)
        except MigrationError as exc:
            raise VfioUserError(exc.reason, exc.errno) from None

    def migration_data_write(self, data: bytes) -> None:
        migration = self.device.migration
        if migration is None:
            raise VfioUserError("device is not migratable", errno.ENOTTY)
        try:
            migration.controller.write_data(data)
        except MigrationError as exc:
            raise VfioUserError(exc.reason, exc.errno) from None

    # -- regions -----------------------------------------------------------------------------

    def region_info(self, index: int) -> tuple[RegionInfo, int | None]:
        """Region info and the fd to send with it (for mmappable BARs)."""
        d = self.device
        if 0 <= index <= 5:
            bar = d.bars[index]
            if bar is None:
                return RegionInfo(index), None
            flags = RegionFlags.READ | RegionFlags.WRITE
            backing = d.backing[index]
            if bar.mmap_areas and backing is not None and backing.fd is not None:
                caps: tuple = (SparseMmapCap(bar.mmap_areas),)
                if d.msix is not None and index == d.msix.table_bar and self._msix_in_mmap(bar):
                    caps = (*caps, MsixMappableCap())
                return RegionInfo(index, flags | RegionFlags.MMAP, bar.size, 0, caps), backing.fd
            return RegionInfo(index, flags, bar.size), None
        if index == PciRegion.ROM:
            return RegionInfo(index, RegionFlags.READ if d.rom_size else 0, d.rom_size), None
        if index == PciRegion.CONFIG:
            return RegionInfo(index, RegionFlags.READ | RegionFlags.WRITE, d.config.size), None
        if index == PciRegion.VGA:
            return RegionInfo(index), None
        extra = d.extra_regions.get(index)
        if extra is not None:
            return extra.info(index), None
        raise VfioUserError(f"no region {index}", errno.EINVAL)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        d = self.device
        if index == PciRegion.CONFIG:
            try:
                return d.config.read(offset, count)
            except IndexError as exc:
                raise VfioUserError(str(exc), errno.EINVAL) from None
        if 0 <= index <= 5:
            return self._bar_read(index, offset, count)
        if index == PciRegion.ROM:
            rom = d.rom_bytes().ljust(d.rom_size, b"\0")
            if offset + count > d.rom_size:
                raise VfioUserError(f"ROM read {offset:#x}+{count} past {d.rom_size:#x}", errno.EINVAL)
            return rom[offset : offset + count]
        extra = d.extra_regions.get(index)
        if extra is not None:
            return extra.read(offset, count)
        raise VfioUserError(f"region {index} is not readable", errno.EINVAL)

    def region_write(self, index: int, offset: int, data: bytes) -> Awaitable[None] | None:
        """Apply a write. Returns an awaitable when the write needs async work (a migration
        state change that must first quiesce the device); the server awaits it in order."""
        d = self.device
        if index == PciRegion.CONFIG:
            try:
                d.config.write(offset, data)
            except IndexError as exc:
                raise VfioUserError(str(exc), errno.EINVAL) from None
            return None
        if 0 <= index <= 5:
            if d.dma.message_mode:
                # The device may reach guest RAM through messages: never wait for one here.
                return d.dma.executor.call(self._bar_write, index, offset, data)
            self._bar_write(index, offset, data)
            return None
        if index == PciRegion.ROM:
            return None  # ROM writes are dropped, as on hardware
        extra = d.extra_regions.get(index)
        if extra is not None:
            return extra.write(offset, data)
        raise VfioUserError(f"region {index} is not writable", errno.EINVAL)

    # -- BAR access routing -------------------------------------------------------------------

    def _bar(self, index: int, offset: int, count: int) -> Bar:
        bar = self.device.bars[index]
        if bar is None:
            raise VfioUserError(f"BAR{index} does not exist", errno.EINVAL)
        if offset < 0 or count <= 0 or offset + count > bar.size:
            raise VfioUserError(f"BAR{index} access {offset:#x}+{count} outside {bar.size:#x}", errno.EINVAL)
        return bar

    def _bar_read(self, index: int, offset: int, count: int) -> bytes:
        d = self.device
        bar = self._bar(index, offset, count)
        msix = d.msix
        if msix is not None:
            if index == msix.table_bar and msix.table_offset <= offset < msix.table_offset + msix.table_size:
                o = offset - msix.table_offset
                return bytes(d.msix_table[o : o + count]).ljust(count, b"\0")
            if index == msix.pba_bar and msix.pba_offset <= offset < msix.pba_offset + msix.pba_size:
                return self._pba_bytes()[offset - msix.pba_offset :][:count].ljust(count, b"\0")
        backing = d.backing[index]
        if backing is not None and backing.memory is not None and (
            bar.read_fn is None or backing.in_mmap_area(offset, count)
        ):
            return bytes(backing.memory[offset : offset + count])
        if bar.read_fn is None:
            return bytes(count)
        if bar.register_size:
            return self._register_read(bar, offset, count)
        if count in (1, 2, 4, 8) and offset % count == 0:
            return self._read_fn(bar, offset, count)
        return b"".join(self._read_fn(bar, off, size) for off, size in _split(offset, count))

    def _read_fn(self, bar: Bar, offset: int, size: int) -> bytes:
        """One call of the device's reader, checked: a value that does not fit the access is a
        device bug, and silently cutting it off would hide it."""
        assert bar.read_fn is not None
        value = bar.read_fn(self.device, offset, size)
        if type(value) is not int or not 0 <= value < 1 << (8 * size):
            fn = getattr(bar.read_fn, "__qualname__", bar.read_fn)
            shown = f"{value:#x}" if isinstance(value, int) else repr(value)
            raise ValueError(f"{fn} returned {shown} for a {size}-byte read at {offset:#x}: return an "
                             f"int from 0 to {(1 << (8 * size)) - 1:#x}")
        return value.to_bytes(size, "little")

    def _bar_write(self, index: int, offset: int, data: bytes) -> None:
        d = self.device
        count = len(data)
        bar = self._bar(index, offset, count)
        msix = d.msix
        if msix is not None:
            if index == msix.table_bar and msix.table_offset <= offset < msix.table_offset + msix.table_size:
                self._msix_table_write(offset - msix.table_offset, data)
                return
            if index == msix.pba_bar and msix.pba_offset <= offset < msix.pba_offset + msix.pba_size:
                return  # the PBA is read-only
        backing = d.backing[index]
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
            bar.write_fn(d, offset, count, int.from_bytes(data, "little"))
            return
        pos = 0
        for off, size in _split(offset, count):
            bar.write_fn(d, off, size, int.from_bytes(data[pos : pos + size], "little"))
            pos += size

    def _register_read(self, bar: Bar, offset: int, count: int) -> bytes:
        size = bar.register_size
        assert size and bar.read_fn is not None
        first = offset - offset % size
        buf = b"".join(self._read_fn(bar, reg, size) for reg in range(first, offset + count, size))
        return buf[offset - first : offset - first + count]

    def _register_write(self, bar: Bar, offset: int, data: bytes) -> None:
        d = self.device
        size = bar.register_size
        assert size and bar.write_fn is not None
        end = offset + len(data)
        for reg in range(offset - offset % size, end, size):
            lo, hi = max(reg, offset), min(reg + size, end)
            part = data[lo - offset : hi - offset]
            if hi - lo == size:
                bar.write_fn(d, reg, size, int.from_bytes(part, "little"))
                continue
            current = bytearray(self._read_fn(bar, reg, size) if bar.read_fn else bytes(size))
            current[lo - reg : hi - reg] = part
            bar.write_fn(d, reg, size, int.from_bytes(current, "little"))

    # -- MSI-X table (for clients that, unlike QEMU, do not emulate it) ---------------------

    def _msix_in_mmap(self, bar: Bar) -> bool:
        msix = self.device.msix
        assert msix is not None
        lo, hi = msix.table_offset, msix.table_offset + msix.table_size
        return any(o < hi and lo < o + n for o, n in bar.mmap_areas)

    def _msix_table_write(self, offset: int, data: bytes) -> None:
        d = self.device
        table = d.msix_table
        end = min(offset + len(data), len(table))
        table[offset:end] = data[: end - offset]
        first, last = offset // 16, (end - 1) // 16
        line = d.irqs.lines[IrqIndex.MSIX]
        for vec in range(first, last + 1):
            masked = bool(table[vec * 16 + 12] & 1)
            was = line.masked[vec]
            line.masked[vec] = masked
            if was and not masked and line.pending[vec]:
                line.pending[vec] = False
                d.irqs.signal(IrqIndex.MSIX, vec)

    def _pba_bytes(self) -> bytes:
        msix = self.device.msix
        assert msix is not None
        bits = self.device.irqs.pending_bits(IrqIndex.MSIX)
        value = sum(1 << i for i, p in enumerate(bits) if p)
        return value.to_bytes(msix.pba_size, "little")


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
