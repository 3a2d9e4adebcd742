"""Migration support for a :class:`~vfu_server.pci.device.PciDevice`.

A device becomes migratable by declaring ``migration_formats`` (a
:class:`~vfu_server.migration.FormatSet`) and implementing ``save_state``/``load_state``. This
module connects that to the wire:

* vfio-user v2: DEVICE_FEATURE MIGRATION / MIG_DEVICE_STATE (through
  :class:`~vfu_server.migration.MigrationController`), MIG_DATA_READ/WRITE, and DMA dirty
  logging (features 6, 7, 8) fed by every writable view the device takes of guest memory;
* the legacy v1 migration region at index 9 (type 3, subtype 1);
* the generic PCI parts of every device's state (profile, config, MSI-X table, INTx level).

Before the device leaves a running state it is *quiesced* (``await device.quiesce()``: in-flight
DMA drained), so the state a format captures never contains half-done work.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from ..migration import MigrationController, MigrationError, MigrationRegion, MigState
from ..migration.fsm import MigrationFeature
from ..migration.generic import IntxState, MsixState, MsixVector, PciConfigState, PciProfile
from ..protocol.constants import (
    REGION_SUBTYPE_MIGRATION,
    REGION_TYPE_MIGRATION,
    Feature,
    RegionFlags,
)
from ..protocol.errors import VfioUserError
from ..protocol.messages import DeviceFeature, RegionInfo, TypeCap
from .capabilities import PciExpress, PowerManagement
from .config import COMMAND, INTERRUPT_LINE, ROM

if TYPE_CHECKING:
    from .device import PciDevice

RUNNING_STATES = {MigState.RUNNING, MigState.PRE_COPY, MigState.RUNNING_P2P, MigState.PRE_COPY_P2P}
_LOG_CONTROL = struct.Struct("<QII")  # page_size, num_ranges, reserved; ranges follow
_RANGE = struct.Struct("<QQ")
_LOG_REPORT = struct.Struct("<QQQ")  # iova, length, page_size; the bitmap follows in the reply
MAX_LOG_RANGES = 1024
MAX_BITMAP = 256 << 20


class DirtyLog:
    """Pages of guest memory the device wrote while logging was on (DMA_LOGGING_*)."""

    def __init__(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        self.page_size = page_size
        self.shift = page_size.bit_length() - 1
        self.ranges = sorted(ranges)
        self.pages: set[int] = set()

    def mark(self, iova: int, length: int) -> None:
        if length <= 0:
            return
        first = iova >> self.shift
        last = (iova + length - 1) >> self.shift
        self.pages.update(range(first, last + 1))

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """The bitmap of ``[iova, iova + length)`` at ``page_size`` granularity; reported bits
        are cleared, as the kernel's REPORT does."""
        if page_size < self.page_size or page_size & (page_size - 1):
            raise VfioUserError(f"DMA_LOGGING_REPORT page size {page_size} < logging page size", errno.EINVAL)
        npages = (length + page_size - 1) // page_size
        if (npages + 7) // 8 > MAX_BITMAP:
            raise VfioUserError("DMA_LOGGING_REPORT bitmap too large", errno.E2BIG)
        bitmap = bytearray(((npages + 63) // 64) * 8)
        ratio = page_size >> self.shift
        base = iova >> self.shift
        hit = [p for p in self.pages if base <= p < base + npages * ratio]
        for p in hit:
            bit = (p - base) // ratio
            bitmap[bit >> 3] |= 1 << (bit & 7)
        self.pages.difference_update(hit)
        return bytes(bitmap)


class _RegionAdapter:
    """Region 9: the v1 migration region, as a device-specific region."""

    def __init__(self, owner: DeviceMigration) -> None:
        self.owner = owner
        self.region = MigrationRegion(owner.controller)

    def info(self, index: int) -> RegionInfo:
        return RegionInfo(index, RegionFlags.READ | RegionFlags.WRITE, self.region.size, 0,
                          (TypeCap(REGION_TYPE_MIGRATION, REGION_SUBTYPE_MIGRATION),))

    def read(self, offset: int, count: int) -> bytes:
        try:
            return self.region.read(offset, count)
        except MigrationError as exc:
            raise VfioUserError(exc.reason, exc.errno) from None

    def write(self, offset: int, data: bytes) -> Any:
        if offset == 0 and len(data) >= 4:
            return self._write_state(offset, data)
        try:
            self.region.write(offset, data)
        except MigrationError as exc:
            raise VfioUserError(exc.reason, exc.errno) from None
        return None

    async def _write_state(self, offset: int, data: bytes) -> None:
        from ..migration.fsm import v1_to_v2

        value = int.from_bytes(data[:4], "little")
        try:
            target = v1_to_v2(value)
        except MigrationError:
            target = None
        if target is not None and target not in RUNNING_STATES:
            await self.owner.quiesce()
        try:
            self.region.write(offset, data)
        except MigrationError as exc:
            raise VfioUserError(exc.reason, exc.errno) from None
        finally:
            self.owner.sync_running()


class DeviceMigration:
    """The migration side of one device instance."""

    def __init__(self, device: PciDevice, formats: Any, *, pre_copy: bool = True) -> None:
        self.device = device
        features = MigrationFeature.STOP_COPY | (MigrationFeature.PRE_COPY if pre_copy else 0)
        self.controller = MigrationController(device, formats, features=features)  # type: ignore[arg-type]
        self.region = _RegionAdapter(self)
        self.dirty: DirtyLog | None = None
        self._quiesced = False

    @property
    def state(self) -> MigState:
        return self.controller.state

    @property
    def running(self) -> bool:
        return self.controller.state in RUNNING_STATES

    async def quiesce(self) -> None:
        if not self._quiesced:
            await self.device.quiesce()
            self._quiesced = True

    def sync_running(self) -> None:
        """After a transition: a device back in a running state may start new work."""
        if self.running and self._quiesced:
            self._quiesced = False
            self.device.resume()

    # -- DEVICE_FEATURE ----------------------------------------------------------------------

    async def feature(self, req: DeviceFeature) -> bytes:
        index = req.index
        if index in (Feature.DMA_LOGGING_START, Feature.DMA_LOGGING_STOP, Feature.DMA_LOGGING_REPORT):
            return self._dma_logging(req)
        if index == Feature.MIG_DEVICE_STATE and req.is_set and not req.is_probe and len(req.data) >= 4:
            target = int.from_bytes(req.data[:4], "little")
            if target not in RUNNING_STATES and self.running:
                await self.quiesce()
        try:
            return self.controller.device_feature(req.flags, req.data)
        except MigrationError as exc:
            code = errno.ENOTTY if "not supported" in exc.reason and index not in (1, 2, 0xF100, 0xF101, 0xF102) else exc.errno
            raise VfioUserError(exc.reason, code) from None
        finally:
            self.sync_running()

    def _dma_logging(self, req: DeviceFeature) -> bytes:
        dma = self.device.dma
        if req.index == Feature.DMA_LOGGING_START:
            if not req.is_set or req.is_get:
                raise VfioUserError("DMA_LOGGING_START is a SET feature", errno.EINVAL)
            if req.is_probe:
                return b""
            if len(req.data) < _LOG_CONTROL.size:
                raise VfioUserError("DMA_LOGGING_START payload too short", errno.EINVAL)
            page_size, n, _ = _LOG_CONTROL.unpack_from(req.data)
            if page_size < 4096 or page_size & (page_size - 1):
                raise VfioUserError(f"DMA logging page size {page_size} is not a power of two >= 4096", errno.EINVAL)
            if n > MAX_LOG_RANGES or len(req.data) < _LOG_CONTROL.size + n * _RANGE.size:
                raise VfioUserError("DMA_LOGGING_START ranges malformed", errno.EINVAL)
            if self.dirty is not None:
                raise VfioUserError("DMA logging already started", errno.EBUSY)
            ranges = [_RANGE.unpack_from(req.data, _LOG_CONTROL.size + i * _RANGE.size) for i in range(n)]
            self.dirty = DirtyLog(page_size, ranges)
            dma.dirty_hook = self.dirty.mark
            return req.data
        if req.index == Feature.DMA_LOGGING_STOP:
            if not req.is_set:
                raise VfioUserError("DMA_LOGGING_STOP is a SET feature", errno.EINVAL)
            if req.is_probe:
                return b""
            self.dirty = None
            dma.dirty_hook = None
            return b""
        if not req.is_get:
            raise VfioUserError("DMA_LOGGING_REPORT is a GET feature", errno.EINVAL)
        if req.is_probe:
            return b""
        if self.dirty is None:
            raise VfioUserError("DMA logging is not started", errno.EINVAL)
        if len(req.data) < _LOG_REPORT.size:
            raise VfioUserError("DMA_LOGGING_REPORT payload too short", errno.EINVAL)
        iova, length, page_size = _LOG_REPORT.unpack_from(req.data)
        return req.data[: _LOG_REPORT.size] + self.dirty.report(iova, length, page_size)

    def client_gone(self) -> None:
        self.dirty = None
        self.device.dma.dirty_hook = None


# -- the generic PCI part of every device's state -----------------------------------------------


def pci_profile(device: PciDevice, device_abi: bytes = b"", backend_hash: bytes = bytes(32)) -> PciProfile:
    ident = type(device).identity
    sizes = tuple(b.size if b else 0 for b in device.bars)
    flags = tuple(b.kind.type_bits() if b else 0 for b in device.bars)
    caps = bytes(x for c in device.caps for x in (c.cap_id & 0xFF, (c.offset or 0) & 0xFF) if not c.extended)
    msix = device.msix
    return PciProfile(
        vendor_id=ident.vendor_id, device_id=ident.device_id,
        subsys_vendor_id=ident.subsystem_vendor_id, subsys_id=ident.subsystem_id,
        class_code=ident.class_code, revision=ident.revision,
        bar_sizes=sizes, bar_flags=flags,
        msix_vectors=msix.vectors if msix else 0,
        msix_table_bir=msix.table_bar if msix else 0, msix_table_offset=msix.table_offset if msix else 0,
        msix_pba_bir=msix.pba_bar if msix else 0, msix_pba_offset=msix.pba_offset if msix else 0,
        capabilities=caps, backend_hash=backend_hash, device_abi=device_abi,
    )


def pci_state(device: PciDevice) -> dict[str, Any]:
    """``pci``, ``msix`` and ``intx`` of the state dataclasses, read from the device."""
    cfg = device.config
    d = cfg.data
    u16 = lambda off: int.from_bytes(d[off : off + 2], "little")  # noqa: E731
    u32 = lambda off: int.from_bytes(d[off : off + 4], "little")  # noqa: E731
    pm = cfg.find(PowerManagement)
    pcie = cfg.find(PciExpress)
    msix = device.msix
    pci = PciConfigState(
        command=u16(COMMAND), cache_line_size=d[0x0C], latency_timer=d[0x0D],
        interrupt_line=d[INTERRUPT_LINE],
        pm_control=u16(pm.offset + 4) if pm and pm.offset else 0,
        bars=tuple(u32(0x10 + 4 * i) for i in range(6)), rom_bar=u32(ROM),
        pcie_devctl=u16(pcie.offset + 8) if pcie and pcie.offset else 0,
        pcie_devctl2=u16(pcie.offset + 0x28) if pcie and pcie.offset else 0,
        pcie_lnkctl=u16(pcie.offset + 0x10) if pcie and pcie.offset else 0,
        msix_control=u16(msix.offset + 2) if msix and msix.offset else 0,
    )
    vectors = []
    table = device.msix_table
    for i in range(msix.vectors if msix else 0):
        addr, data, ctrl = struct.unpack_from("<QII", table, i * 16)
        vectors.append(MsixVector(addr, data, ctrl))
    pba = b""
    if msix:
        bits = device.irqs.pending_bits(2)  # type: ignore[arg-type]
        pba = bytes(
            sum(1 << b for b in range(8) if i * 8 + b < len(bits) and bits[i * 8 + b])
            for i in range((msix.vectors + 7) // 8)
        )
    return {"pci": pci, "msix": MsixState(tuple(vectors), pba), "intx": IntxState(int(device.irqs.intx_asserted))}


def load_pci_state(device: PciDevice, pci: PciConfigState, msix: MsixState, intx: IntxState) -> None:
    """Apply the generic PCI part of a validated state (the destination was reset first)."""
    cfg = device.config
    d = cfg.data

    def put(off: int, size: int, value: int) -> None:
        d[off : off + size] = value.to_bytes(size, "little")

    put(COMMAND, 2, pci.command & 0x0547)
    d[0x0C], d[0x0D], d[INTERRUPT_LINE] = pci.cache_line_size, pci.latency_timer, pci.interrupt_line
    for i, bar in enumerate(pci.bars):
        mask = int.from_bytes(cfg.wmask[0x10 + 4 * i : 0x14 + 4 * i], "little")
        base = int.from_bytes(cfg.initial[0x10 + 4 * i : 0x14 + 4 * i], "little")
        put(0x10 + 4 * i, 4, (base & ~mask) | (bar & mask))
    rom_mask = int.from_bytes(cfg.wmask[ROM : ROM + 4], "little")
    put(ROM, 4, pci.rom_bar & rom_mask)
    pm = cfg.find(PowerManagement)
    if pm and pm.offset:
        put(pm.offset + 4, 2, (int.from_bytes(d[pm.offset + 4 : pm.offset + 6], "little") & ~0x0103) | (pci.pm_control & 0x0103))
    pcie = cfg.find(PciExpress)
    if pcie and pcie.offset:
        for off, value in ((8, pci.pcie_devctl), (0x28, pci.pcie_devctl2), (0x10, pci.pcie_lnkctl)):
            mask = int.from_bytes(cfg.wmask[pcie.offset + off : pcie.offset + off + 2], "little")
            old = int.from_bytes(d[pcie.offset + off : pcie.offset + off + 2], "little")
            put(pcie.offset + off, 2, (old & ~mask) | (value & mask))
    if device.msix and device.msix.offset:
        old = int.from_bytes(d[device.msix.offset + 2 : device.msix.offset + 4], "little")
        put(device.msix.offset + 2, 2, (old & 0x3FFF) | (pci.msix_control & 0xC000))
        for i, vec in enumerate(msix.vectors[: device.msix.vectors]):
            struct.pack_into("<QII", device.msix_table, i * 16, vec.addr, vec.data, vec.ctrl)
        line = device.irqs.lines[2]  # type: ignore[index]
        for i in range(device.msix.vectors):
            byte = msix.pba[i // 8] if i // 8 < len(msix.pba) else 0
            # Mask bits stay with the client: QEMU emulates the table and never writes ours,
            # so only the pending bits are device state.
            line.pending[i] = bool(byte >> (i % 8) & 1)
    device.irqs.intx_asserted = bool(intx.level)
    cfg.set_interrupt_status(bool(intx.level))
