"""NVMe controller device (NVMe Base 1.4 over PCIe, NVM command set).

``vfu-server nvme --socket-path PATH [--backing FILE|nbd://...] [--size BYTES]``
"""

from .controller import NvmeController

__all__ = ["NvmeController"]
