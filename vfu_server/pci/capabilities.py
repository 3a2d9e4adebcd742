"""PCI capabilities, declared as objects and laid out into config space by :class:`ConfigSpace`.

Each capability owns a byte range of config space: its initial bytes, a write mask (bits the
driver may change), a write-1-to-clear mask, and optional hooks for registers with behaviour.
The two-byte header (ID, next pointer) of standard capabilities and the four-byte header of
extended capabilities are filled in by the layout, like the base class in cocotbext-pcie.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .device import PciDevice


class Capability:
    """A standard capability (config space 0x40-0xff)."""

    cap_id: int = 0
    extended = False
    #: where to place it; None lets the layout choose
    offset: int | None = None

    def __init__(self) -> None:
        self.device: PciDevice | None = None

    @property
    def size(self) -> int:
        return len(self.initial())

    def initial(self) -> bytes:
        """The capability's bytes, header included (header bytes are overwritten by the layout)."""
        raise NotImplementedError

    def write_mask(self) -> bytes:
        return bytes(self.size)

    def w1c_mask(self) -> bytes:
        return bytes(self.size)

    def read(self, offset: int, size: int) -> int | None:
        """Override to compute a register on read; ``offset`` is relative to the capability."""
        return None

    def written(self, offset: int, size: int, value: int, old: int) -> None:
        """Called after a write inside this capability was stored (``offset`` relative)."""

    def reset(self) -> None:
        """Called on device reset, after config space returned to its initial bytes."""

    def reg8(self, offset: int) -> int:
        """One byte of the capability's live registers (cheaper than :meth:`regs` on hot paths:
        interrupt delivery asks for MSI-X enable at every signal)."""
        assert self.device is not None and self.offset is not None
        return self.device.config.data[self.offset + offset]

    def regs(self) -> memoryview:
        """The capability's live bytes in config space."""
        assert self.device is not None and self.offset is not None
        # A memoryview, not a bytearray slice (which would be a copy that writes do not reach).
        return memoryview(self.device.config.data)[self.offset : self.offset + self.size]


class ExtendedCapability(Capability):
    """An extended capability (config space 0x100-0xfff, PCI Express only)."""

    extended = True
    version = 1


def _mask(size: int, fields: dict[int, bytes]) -> bytes:
    out = bytearray(size)
    for off, value in fields.items():
        out[off : off + len(value)] = value
    return bytes(out)


class PowerManagement(Capability):
    """PCI Power Management, version 3::

        0x00 | PMC (15:11 PME support, 3 D1/D2 none, 2:0 version=3) | next | id=0x01 |
        0x04 | data | bridge ext | PMCSR (15 PME status, 8 PME enable, 3 No_Soft_Reset, 1:0 D-state) |

    The device stays in D0 after reset (QEMU reads PMCSR before every reset and forces D0).
    """

    cap_id = 0x01

    def initial(self) -> bytes:
        return struct.pack("<BBHHBB", 0x01, 0, 0x0003, 0x0008, 0, 0)

    def write_mask(self) -> bytes:
        return _mask(8, {4: struct.pack("<H", 0x0103)})

    def w1c_mask(self) -> bytes:
        return _mask(8, {4: struct.pack("<H", 0x8000)})

    @property
    def power_state(self) -> int:
        return self.reg8(4) & 3


class Msi(Capability):
    """MSI with 64-bit addresses and optional per-vector masking::

        0x00 | control (8 per-vector mask, 7 64-bit, 6:4 MME, 3:1 MMC, 0 enable) | next | id=0x05 |
        0x04 | message address low |
        0x08 | message address high |
        0x0c | (reserved) | message data |
        0x10 | mask bits |   (only with per_vector_mask)
        0x14 | pending bits |

    QEMU emulates this capability itself; the server only provides the initial flags.
    """

    cap_id = 0x05

    def __init__(self, vectors: int = 1, per_vector_mask: bool = False) -> None:
        super().__init__()
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI vectors must be a power of two up to 32")
        self.vectors = vectors
        self.per_vector_mask = per_vector_mask

    def initial(self) -> bytes:
        mmc = self.vectors.bit_length() - 1
        control = 0x80 | (mmc << 1) | (0x100 if self.per_vector_mask else 0)
        size = 0x18 if self.per_vector_mask else 0x10
        return _mask(size, {0: bytes([0x05, 0]), 2: struct.pack("<H", control)})

    def write_mask(self) -> bytes:
        size = 0x18 if self.per_vector_mask else 0x10
        fields = {2: struct.pack("<H", 0x0071), 4: b"\xfc\xff\xff\xff", 8: b"\xff" * 4, 12: b"\xff\xff"}
        if self.per_vector_mask:
            fields[0x10] = struct.pack("<I", (1 << self.vectors) - 1 if self.vectors < 32 else 0xFFFFFFFF)
        return _mask(size, fields)

    @property
    def enabled(self) -> bool:
        return bool(self.reg8(2) & 1)


class Msix(Capability):
    """MSI-X, with its table and PBA in memory BARs::

        0x00 | control (15 enable, 14 function mask, 10:0 table size - 1) | next | id=0x11 |
        0x04 | table offset (31:3) | table BIR (2:0) |
        0x08 | PBA offset (31:3)   | PBA BIR (2:0)   |

    The table has 16 bytes per vector, the PBA one bit per vector in 64-bit words. QEMU emulates
    the table and never forwards it; the device model still implements it for other clients.
    """

    cap_id = 0x11

    def __init__(self, vectors: int, table_bar: int, table_offset: int = 0, pba_bar: int | None = None,
                 pba_offset: int | None = None) -> None:
        super().__init__()
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = table_bar if pba_bar is None else pba_bar
        self.table_size = 16 * vectors
        self.pba_size = 8 * ((vectors + 63) // 64)
        if pba_offset is None:
            pba_offset = (table_offset + self.table_size + 7) & ~7
        self.pba_offset = pba_offset
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
        if self.pba_bar == self.table_bar and not (
            pba_offset >= table_offset + self.table_size or pba_offset + self.pba_size <= table_offset
        ):
            raise ValueError("MSI-X table and PBA overlap")

    def initial(self) -> bytes:
        return struct.pack(
            "<BBHII", 0x11, 0, self.vectors - 1,
            self.table_offset | self.table_bar, self.pba_offset | self.pba_bar,
        )

    def write_mask(self) -> bytes:
        return _mask(12, {2: struct.pack("<H", 0xC000)})

    @property
    def enabled(self) -> bool:
        return bool(self.reg8(3) & 0x80)

    @property
    def function_masked(self) -> bool:
        return bool(self.reg8(3) & 0x40)


class PciExpress(Capability):
    """PCI Express capability, version 2, for an endpoint (QEMU refuses other port types)::

        0x00 | PCIe caps (7:4 port type=0 endpoint, 3:0 version=2) | next | id=0x10 |
        0x04 | device capabilities (28 FLR) |
        0x08 | device status | device control |
        0x0c | link capabilities |
        0x10 | link status | link control |
        0x14..0x20 slot/root registers (unused by an endpoint)
        0x24 | device capabilities 2 |
        0x28 | device status 2 | device control 2 |
        0x2c | link capabilities 2 |
        0x30 | link status 2 | link control 2 |
    """

    cap_id = 0x10

    def __init__(self, port_type: int = 0, flr: bool = False) -> None:
        super().__init__()
        if port_type not in (0, 1, 9):
            raise ValueError("only endpoint, legacy endpoint and RC-integrated endpoints are assignable")
        self.port_type = port_type
        self.flr = flr

    def initial(self) -> bytes:
        devcap = 0x0000_0000 | (1 << 15) | (1 << 28 if self.flr else 0)  # role-based error reporting
        linkcap = (1 << 4) | 1  # x1, 2.5 GT/s
        linkstatus = (1 << 4) | 1
        return _mask(0x3C, {
            0: bytes([0x10, 0]),
            2: struct.pack("<H", 0x2 | (self.port_type << 4)),
            4: struct.pack("<I", devcap),
            8: struct.pack("<H", 0x2810),  # relaxed ordering, no-snoop, max read request 512
            0x0C: struct.pack("<I", linkcap),
            0x12: struct.pack("<H", linkstatus),
            0x2C: struct.pack("<I", 0x2),  # 2.5 GT/s supported
            0x32: struct.pack("<H", 0x1),
        })

    def write_mask(self) -> bytes:
        return _mask(0x3C, {
            8: struct.pack("<H", 0x7CFF | (0x8000 if self.flr else 0)),
            0x10: struct.pack("<H", 0x01C3),
            0x28: struct.pack("<H", 0x061F),
            0x30: struct.pack("<H", 0x0F3F),
        })

    def w1c_mask(self) -> bytes:
        return _mask(0x3C, {0x0A: struct.pack("<H", 0x000F)})

    def written(self, offset: int, size: int, value: int, old: int) -> None:
        # Initiate Function Level Reset is a self-clearing command bit.
        if self.flr and offset <= 9 < offset + size and value >> ((9 - offset) * 8) & 0x80:
            regs = self.regs()
            regs[9] &= 0x7F
            if self.device is not None:
                self.device.request_reset("function level reset")


class VendorSpecific(Capability):
    """Vendor-specific capability: ``id=0x09, next, length`` then device-defined bytes."""

    cap_id = 0x09

    def __init__(self, payload: bytes, writable: bytes | None = None) -> None:
        super().__init__()
        self.payload = bytes(payload)
        self.writable = writable

    def initial(self) -> bytes:
        size = 3 + len(self.payload)
        return bytes([0x09, 0, size]) + self.payload

    def write_mask(self) -> bytes:
        if self.writable is None:
            return bytes(self.size)
        return b"\0\0\0" + self.writable


class DeviceSerialNumber(ExtendedCapability):
    """Extended capability 0x0003: a 64-bit device serial number."""

    cap_id = 0x0003

    def __init__(self, serial: int) -> None:
        super().__init__()
        self.serial = serial

    def initial(self) -> bytes:
        return bytes(4) + struct.pack("<Q", self.serial)


class VendorSpecificExtended(ExtendedCapability):
    """Extended capability 0x000b: ``VSEC ID u16, rev u4, length u12`` then payload."""

    cap_id = 0x000B

    def __init__(self, vsec_id: int, payload: bytes, revision: int = 1) -> None:
        super().__init__()
        self.vsec_id = vsec_id
        self.payload = payload
        self.revision = revision

    def initial(self) -> bytes:
        length = 8 + len(self.payload)
        return bytes(4) + struct.pack("<I", self.vsec_id | self.revision << 16 | length << 20) + self.payload
