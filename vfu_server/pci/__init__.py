"""The PCI device model: config space, BARs, capabilities, interrupts and DMA."""

from .bar import Bar, IoBar, MemoryBar
from .capabilities import (
    Capability,
    DeviceSerialNumber,
    ExtendedCapability,
    Msi,
    Msix,
    PciExpress,
    PowerManagement,
    VendorSpecific,
    VendorSpecificExtended,
)
from .config import ConfigSpace, PciIdentity
from .device import PciDevice
from .dma import GuestMemory
from .irq import Interrupts

__all__ = [
    "Bar",
    "Capability",
    "ConfigSpace",
    "DeviceSerialNumber",
    "ExtendedCapability",
    "GuestMemory",
    "Interrupts",
    "IoBar",
    "MemoryBar",
    "Msi",
    "Msix",
    "PciDevice",
    "PciExpress",
    "PciIdentity",
    "PowerManagement",
    "VendorSpecific",
    "VendorSpecificExtended",
]
