"""vfu-server: out-of-process PCI devices for QEMU over vfio-user, in Python.

Layers, each only using the ones above it:

* :mod:`vfu_server.protocol`: sans-IO message layouts, framing, negotiation, errors with errnos
* :mod:`vfu_server.transport`: trio Unix sockets, SCM_RIGHTS, message channels
* :mod:`vfu_server.pci`: the PCI device model (config space, BARs, capabilities, IRQs, DMA)
* :mod:`vfu_server.server`: serves one device to one client at a time
* :mod:`vfu_server.client`: a vfio-user client, to test devices without a VM
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Imported on first use, so that importing a small module of the package (vfu_server.priority,
# which `vfu-server` runs before anything else) does not cost the ~130 ms the PCI model takes.
_HOME = {name: ".protocol.errors" if name in ("DmaError", "ProtocolError", "VfioUserError") else ".pci"
         for name in __all__}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
