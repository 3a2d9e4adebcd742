"""NVMe controller device (NVMe Base 1.4 over PCIe, NVM command set).

``vfu-server nvme --socket-path PATH [--backing FILE|nbd://...] [--size BYTES]``
"""

from typing import Any

__all__ = ["NvmeController"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that a submodule (the state decoder of vfu-state, the format
    # definitions) can be imported without the whole controller.
    if name == "NvmeController":
        from .controller import NvmeController

        return NvmeController
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
