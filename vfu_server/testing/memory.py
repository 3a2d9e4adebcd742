"""Guest memory for in-process device tests (no client, no socket).

A device's :class:`~vfu_server.pci.dma.GuestMemory` normally fills from the client's DMA_MAP
messages; a unit test of a device's data path can map memory into it directly.
"""

from __future__ import annotations

import os

from ..client import GuestRam
from ..pci.dma import GuestMemory
from ..protocol.constants import DmaMapFlags


def map_guest_ram(dma: GuestMemory, iova: int, size: int, *, writable: bool = True,
                  data: bytes | None = None, bus_master: bool = True) -> None:
    """Map ``size`` bytes of fresh shared memory at ``iova``, filled with ``data`` (random
    bytes by default), as a client's DMA_MAP with an fd would. ``bus_master``: also set Bus
    Master Enable in the device's config space, as the driver the test stands in for would
    (without it every DMA fails)."""
    if bus_master and dma.config_image is not None:
        dma.config_image[0x04] |= 0x04
    ram = GuestRam(size)
    try:
        ram.write(0, os.urandom(size) if data is None else data)
        flags = DmaMapFlags.READ | (DmaMapFlags.WRITE if writable else 0)
        dma.add(iova, size, flags, os.dup(ram.fd))
    finally:
        ram.close()
