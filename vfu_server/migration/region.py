"""Legacy (v1) VFIO migration region, sans-IO, driving the same controller.

Region layout (all little-endian)::

    0x0000 +----------------------+ struct vfio_device_migration_info
           | u32 device_state     | RW  b0 RUNNING, b1 SAVING, b2 RESUMING
    0x0004 | u32 reserved         | reads 0, writes ignored
    0x0008 | u64 pending_bytes    | RO  read starts a save iteration
    0x0010 | u64 data_offset      | RO  read stages the next chunk (save)
    0x0018 | u64 data_size        | RW  save: chunk size; resume: write commits
    0x0020 +----------------------+ vfu-server format registers (documented
           | u32 vfu_magic "VFUF" | RO  extension present / version)
    0x0024 | u32 format_count     | RO
    0x0028 | u32 format_index     | RW  which format the readout below shows
    0x002C | u32 ext_version = 1  | RO
    0x0030 | u8  format_uuid[16]  | RO  formats[format_index].uuid
    0x0040 | u16 major            | RO
    0x0042 | u16 minor_min        | RO
    0x0044 | u16 minor_max        | RO
    0x0046 | u8  kind, u8 flags   | RO  kind 0 standard / 1 opaque; flags b0 selected, b1 default
    0x0048 | u32 selected_format  | RW  outgoing format index; 0xFFFFFFFF = default
    0x004C | u32 selected_minor   | RW  0xFFFF = highest supported
    0x0050 | u32 expected_format  | RW  incoming pin index; 0xFFFFFFFF = any
    0x0054 | u32 last_errno       | RO  errno of the last refused access, 0 = none
    0x0058 | ... reserved ...     | reads 0, writes ignored
    0x1000 +----------------------+ data window (DATA_OFFSET), window_size bytes
           |  staged chunk        |
           +----------------------+

v1 device_state values map onto v2 states (STOP, RUNNING, STOP_COPY=SAVING,
PRE_COPY=SAVING|RUNNING, RESUMING, ERROR=SAVING|RESUMING); a v1 transition is
checked against the vfio-user v1 table and then requested from the v2 machine,
so the device sees the same single arcs as with v2.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from .errors import MigrationError
from .fsm import V1_DEVICE_STATE_MASK, MigState, v1_check_transition, v1_to_v2, v2_to_v1

if TYPE_CHECKING:
    # Not at run time: a device's region 9 answers REGION_INFO with REGION_SIZE before its
    # controller (and the formats, sessions and state classes behind it) is ever loaded.
    from .controller import MigrationController

__all__ = ["DATA_OFFSET", "REGION_SIZE", "REGION_SUBTYPE", "REGION_TYPE", "MigrationRegion"]

REGION_TYPE = 3  # VFIO_REGION_TYPE_MIGRATION_DEPRECATED
REGION_SUBTYPE = 1  # VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED
VFU_MAGIC = 0x46554656  # "VFUF" little-endian
EXT_VERSION = 1
DATA_OFFSET = 0x1000
DEFAULT_WINDOW = 0x10000
#: the size of a region with the default window
REGION_SIZE = DATA_OFFSET + DEFAULT_WINDOW
NONE32 = 0xFFFFFFFF

R_DEVICE_STATE, R_PENDING, R_DATA_OFFSET, R_DATA_SIZE = 0x00, 0x08, 0x10, 0x18
R_MAGIC, R_FMT_COUNT, R_FMT_INDEX, R_EXT_VERSION = 0x20, 0x24, 0x28, 0x2C
R_FMT_UUID, R_FMT_MAJOR, R_FMT_MINOR_MIN, R_FMT_MINOR_MAX, R_FMT_KIND = 0x30, 0x40, 0x42, 0x44, 0x46
R_SELECTED, R_SELECTED_MINOR, R_EXPECTED, R_LAST_ERRNO = 0x48, 0x4C, 0x50, 0x54


class MigrationRegion:
    """Handles reads and writes at offsets of the v1 migration region."""

    def __init__(self, ctl: MigrationController, window_size: int = DEFAULT_WINDOW) -> None:
        self.ctl = ctl
        self.window = bytearray(window_size)
        self.size = DATA_OFFSET + window_size
        self.data_size = 0
        self.format_index = 0
        self.last_errno = 0

    # ------------------------------------------------------------- registers
    def _device_state(self) -> int:
        return v2_to_v1(self.ctl.state)

    def _header(self) -> bytes:
        # Loaded with self.ctl already; at the top it would load the controller with the size.
        from .controller import FMT_FLAG_DEFAULT, FMT_FLAG_SELECTED, FMT_KIND

        fmts = list(self.ctl.formats)
        f = fmts[self.format_index] if self.format_index < len(fmts) else None
        regs = bytearray(DATA_OFFSET)
        struct.pack_into("<IIQQQ", regs, 0, self._device_state(), 0,
                         self.ctl.pending_bytes, DATA_OFFSET, self.data_size)
        struct.pack_into("<IIII", regs, R_MAGIC, VFU_MAGIC, len(fmts), self.format_index,
                         EXT_VERSION)
        if f is not None:
            flags = (FMT_FLAG_SELECTED if f is self.ctl.selected else 0) | (
                FMT_FLAG_DEFAULT if f is self.ctl.formats.default else 0)
            struct.pack_into("<16sHHHBB", regs, R_FMT_UUID, f.uuid.bytes, f.major,
                             f.minor_min, f.minor_max, FMT_KIND[f.kind], flags)
        sel = fmts.index(self.ctl.selected)
        minor = 0xFFFF if self.ctl.selected_minor is None else self.ctl.selected_minor
        exp = NONE32 if self.ctl.expected is None else fmts.index(self.ctl.expected)
        struct.pack_into("<IIII", regs, R_SELECTED, sel, minor, exp, self.last_errno)
        return bytes(regs)

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise MigrationError(errno.EINVAL, f"access {offset:#x}+{count} outside the region")

    def _fail(self, exc: MigrationError) -> MigrationError:
        self.last_errno = exc.errno
        return exc

    # ------------------------------------------------------------------ read
    def read(self, offset: int, count: int) -> bytes:
        self._check(offset, count)
        try:
            if offset >= DATA_OFFSET:
                o = offset - DATA_OFFSET
                return bytes(self.window[o:o + count])
            if offset == R_DATA_OFFSET and self.ctl.state in (MigState.STOP_COPY,
                                                              MigState.PRE_COPY):
                self._stage()
            return self._header()[offset:offset + count]
        except MigrationError as exc:
            raise self._fail(exc) from None

    def _stage(self) -> None:
        # Reading data_offset asks the device to put the next chunk in the window.
        chunk = self.ctl.read_data(len(self.window))
        self.window[:len(chunk)] = chunk
        self.data_size = len(chunk)

    # ----------------------------------------------------------------- write
    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        try:
            if offset >= DATA_OFFSET:
                o = offset - DATA_OFFSET
                self.window[o:o + len(data)] = data
                return
            self._write_reg(offset, bytes(data))
        except MigrationError as exc:
            raise self._fail(exc) from None

    def _write_reg(self, offset: int, data: bytes) -> None:
        def u32() -> int:
            if len(data) != 4:
                raise MigrationError(errno.EINVAL, f"register {offset:#x} needs a 4-byte write")
            return struct.unpack("<I", data)[0]

        if offset == R_DEVICE_STATE:
            self._set_device_state(u32())
        elif offset == R_DATA_SIZE:
            if len(data) != 8:
                raise MigrationError(errno.EINVAL, "data_size needs an 8-byte write")
            size = struct.unpack("<Q", data)[0]
            if self.ctl.state is not MigState.RESUMING:
                raise MigrationError(errno.EINVAL, "data_size written outside RESUMING")
            if size > len(self.window):
                raise MigrationError(errno.EINVAL, f"data_size {size} exceeds the window")
            self.data_size = size
            self.ctl.write_data(bytes(self.window[:size]))
        elif offset == R_FMT_INDEX:
            idx = u32()
            if idx >= len(self.ctl.formats):
                raise MigrationError(errno.EINVAL, f"format_index {idx} out of range")
            self.format_index = idx
        elif offset == R_SELECTED:
            idx = u32()
            fmts = list(self.ctl.formats)
            if idx != NONE32 and idx >= len(fmts):
                raise MigrationError(errno.EINVAL, f"selected_format {idx} out of range")
            self.ctl.select_outgoing(None if idx == NONE32 else fmts[idx].uuid)
        elif offset == R_SELECTED_MINOR:
            minor = u32()
            self.ctl.select_outgoing(self.ctl.selected.uuid,
                                     None if minor in (0xFFFF, NONE32) else minor)
        elif offset == R_EXPECTED:
            idx = u32()
            fmts = list(self.ctl.formats)
            if idx != NONE32 and idx >= len(fmts):
                raise MigrationError(errno.EINVAL, f"expected_format {idx} out of range")
            self.ctl.expect_incoming(None if idx == NONE32 else fmts[idx].uuid)
        # Everything else (reserved, read-only registers) ignores writes.

    def _set_device_state(self, value: int) -> None:
        cur = self._device_state()
        new = (cur & ~V1_DEVICE_STATE_MASK) | (value & V1_DEVICE_STATE_MASK)
        target = v1_to_v2(new)
        if target is MigState.ERROR:
            raise MigrationError(errno.EINVAL, "ERROR cannot be requested")
        v1_check_transition(cur, new)
        self.data_size = 0
        self.ctl.set_state(target)
