"""Migration support for a :class:`~vfu_server.pci.device.PciDevice`.

A device becomes migratable by declaring ``migration_formats`` (a
:class:`~vfu_server.migration.FormatSet`, or the ``"module:NAME"`` of one) and implementing
``save_state``/``load_state``. This module connects that to the wire:

* vfio-user v2: DEVICE_FEATURE MIGRATION / MIG_DEVICE_STATE (through
  :class:`~vfu_server.migration.MigrationController`), MIG_DATA_READ/WRITE, and DMA dirty
  logging (features 6, 7, 8) fed by every writable view the device takes of guest memory;
* the legacy v1 migration region at index 9 (type 3, subtype 1).

The generic PCI parts of every device's state are in :mod:`.migration_state`.

The controller, with the formats, sessions and state classes behind it, is built when a client
first uses migration (a MIG feature, MIG_DATA, the region's registers, the control socket), not
when the device is: most servers never migrate, and that import is a sixth of an NVMe server's
start-up. Until then the device is RUNNING, which is where a new controller starts.

Before the device leaves a running state it is *quiesced* (``await device.quiesce()``: in-flight
DMA drained), so the state a format captures never contains half-done work.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from ..migration.errors import MigrationError
from ..migration.fsm import MigrationFeature, MigState
from ..migration.region import REGION_SIZE, MigrationRegion
from ..protocol.constants import (
    REGION_SUBTYPE_MIGRATION,
    REGION_TYPE_MIGRATION,
    Feature,
    RegionFlags,
)
from ..protocol.errors import ReplyTooLarge, VfioUserError
from ..protocol.messages import DeviceFeature, RegionInfo, TypeCap

if TYPE_CHECKING:
    from ..migration.controller import MigrationController
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
        self._region: MigrationRegion | None = None

    @property
    def region(self) -> MigrationRegion:
        if self._region is None:
            self._region = MigrationRegion(self.owner.controller)
        return self._region

    def info(self, index: int) -> RegionInfo:
        return RegionInfo(index, RegionFlags.READ | RegionFlags.WRITE, REGION_SIZE, 0,
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

    def __init__(self, device: PciDevice, *, pre_copy: bool = True) -> None:
        self.device = device
        self.features = MigrationFeature.STOP_COPY | (MigrationFeature.PRE_COPY if pre_copy else 0)
        self._controller: MigrationController | None = None
        self.region = _RegionAdapter(self)
        self.dirty: DirtyLog | None = None
        self._quiesced = False

    @property
    def controller(self) -> MigrationController:
        """The device's migration controller, built (with its formats) on first use."""
        if self._controller is None:
            from ..migration.controller import MigrationController

            formats = type(self.device).get_migration_formats()
            assert formats is not None
            self._controller = MigrationController(self.device, formats, features=self.features)  # type: ignore[arg-type]
        return self._controller

    @property
    def state(self) -> MigState:
        return MigState.RUNNING if self._controller is None else self._controller.state

    def reset(self) -> None:
        """Device reset: drop migration sessions and return to RUNNING."""
        if self._controller is not None:
            self._controller.reset()
        self.sync_running()

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

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
            code = errno.ENOTTY if "not supported" in exc.reason and index not in (1, 2, 0xF100, 0xF101, 0xF102, 0xF103) else exc.errno
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
        if page_size and not page_size & (page_size - 1):
            # Checked before the report, which clears what it reports: a reply too large for the
            # client's buffer goes back without the bitmap, and the client asks again for it.
            needed = 8 + _LOG_REPORT.size + ((length + page_size - 1) // page_size + 63) // 64 * 8
            if req.argsz < needed:
                raise ReplyTooLarge(f"DMA_LOGGING_REPORT needs argsz {needed}", needed)
        return req.data[: _LOG_REPORT.size] + self.dirty.report(iova, length, page_size)

    def client_gone(self) -> None:
        self.dirty = None
        self.device.dma.dirty_hook = None
