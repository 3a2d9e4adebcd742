"""vfu-server: out-of-process PCI devices for QEMU over vfio-user, in Python.

Layers, each only using the ones above it:

* :mod:`vfu_server.protocol`: sans-IO message layouts, framing, negotiation, errors with errnos
* :mod:`vfu_server.transport`: trio Unix sockets, SCM_RIGHTS, message channels
* :mod:`vfu_server.pci`: the PCI device model (config space, BARs, capabilities, IRQs, DMA)
* :mod:`vfu_server.server`: serves one device to one client at a time
* :mod:`vfu_server.client`: a vfio-user client, to test devices without a VM
"""

from .pci import (
    Bar,
    DeviceSerialNumber,
    IoBar,
    MemoryBar,
    Msi,
    Msix,
    PciDevice,
    PciExpress,
    PciIdentity,
    PowerManagement,
    VendorSpecific,
)
from .protocol.errors import DmaError, ProtocolError, VfioUserError

__version__ = "0.1.0"

__all__ = [
    "Bar",
    "DeviceSerialNumber",
    "DmaError",
    "IoBar",
    "MemoryBar",
    "Msi",
    "Msix",
    "PciDevice",
    "PciExpress",
    "PciIdentity",
    "PowerManagement",
    "ProtocolError",
    "VendorSpecific",
    "VfioUserError",
]
