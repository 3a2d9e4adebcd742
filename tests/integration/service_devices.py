"""Devices for the service tests (systemd watchdog)."""

import time

from vfu_server import MemoryBar, PciDevice, PciIdentity


class Stuck(PciDevice):
    """A write to BAR0 never returns: it holds the event loop, as a device bug could."""

    identity = PciIdentity(vendor_id=0x1234, device_id=0xBAD3)
    bar0 = MemoryBar(0x1000, register_size=4)

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        while True:
            time.sleep(1)
