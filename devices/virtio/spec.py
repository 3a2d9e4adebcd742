"""Numbers from the VIRTIO 1.2/1.3 specification that the transport and the devices share."""

from __future__ import annotations

from enum import IntEnum, IntFlag

VIRTIO_VENDOR_ID = 0x1AF4
#: modern-only devices are 0x1040 + the virtio device ID
PCI_DEVICE_ID_BASE = 0x1040
NO_VECTOR = 0xFFFF


class DeviceId(IntEnum):
    NET = 1
    BLOCK = 2
    RNG = 4


class Status(IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


# Transport feature bits (device-independent).
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34

# Descriptor flags of the split ring.
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
# avail->flags / used->flags
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1


class CfgType(IntEnum):
    """``cfg_type`` of the virtio vendor-specific PCI capabilities."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


class Common(IntEnum):
    """Offsets in ``struct virtio_pci_common_cfg``."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30
    SIZE = 0x38


ISR_QUEUE = 1
ISR_CONFIG = 2


def bit(n: int) -> int:
    return 1 << n
