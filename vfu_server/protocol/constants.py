"""Numbers of the vfio-user protocol (QEMU docs/interop/vfio-user.rst and linux/vfio.h).

Everything here is plain data: enums and bit masks, no behaviour.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

HEADER_SIZE = 16
PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 0


class Command(IntEnum):
    """Message commands. 14 (legacy DIRTY_PAGES) is unused by the current spec."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MsgFlags(IntFlag):
    """Header flags. The low nibble is the message type (request 0, reply 1)."""

    REQUEST = 0x0
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


MSG_TYPE_MASK = 0xF


class DeviceFlags(IntFlag):
    RESET = 0x1
    PCI = 0x2
    CAPS = 0x80


class RegionFlags(IntFlag):
    READ = 0x1
    WRITE = 0x2
    MMAP = 0x4
    CAPS = 0x8


class RegionCapId(IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class PciRegion(IntEnum):
    """Region indices of a PCI device; 9 and up are device-specific."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8
    MIGRATION = 9


# Region TYPE capability values of the legacy (v1) migration region.
REGION_TYPE_MIGRATION = 3
REGION_SUBTYPE_MIGRATION = 1


class IrqIndex(IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqInfoFlags(IntFlag):
    EVENTFD = 0x1
    MASKABLE = 0x2
    AUTOMASKED = 0x4
    NORESIZE = 0x8


class IrqSetFlags(IntFlag):
    DATA_NONE = 0x1
    DATA_BOOL = 0x2
    DATA_EVENTFD = 0x4
    ACTION_MASK = 0x8
    ACTION_UNMASK = 0x10
    ACTION_TRIGGER = 0x20


IRQ_SET_DATA_MASK = 0x7
IRQ_SET_ACTION_MASK = 0x38


class DmaMapFlags(IntFlag):
    READ = 0x1
    WRITE = 0x2


class DmaUnmapFlags(IntFlag):
    GET_DIRTY_BITMAP = 0x1
    ALL = 0x2


class FeatureFlags(IntFlag):
    """DEVICE_FEATURE flags; the low 16 bits are the feature index."""

    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


FEATURE_INDEX_MASK = 0xFFFF


class Feature(IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9
    DMA_BUF = 11
    # vfu-server's own in-band migration-format extension (docs/migration-format.md).
    MIG_FORMATS = 0xF100
    MIG_FORMAT_SELECT = 0xF101
    MIG_PROFILE = 0xF102
    MIG_LAST_ERROR = 0xF103


class MigrationFlags(IntFlag):
    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


# Defaults the server offers in its VERSION reply.
DEFAULT_MAX_MSG_FDS = 16
DEFAULT_MAX_DATA_XFER = 1 << 20
DEFAULT_PGSIZES = 4096
DEFAULT_MAX_DMA_MAPS = 65535
# QEMU's receive buffer for the VERSION reply is its own request size (214 bytes).
MAX_VERSION_REPLY = 214
