"""Devices for the client's enumeration tests: one per interrupt kind and BAR type."""

from vfu_server import IoBar, MemoryBar, Msi, PciDevice, PciIdentity


class MsiDevice(PciDevice):
    """A 64-bit prefetchable BAR, an I/O BAR and MSI with four vectors; writing N to register
    0 raises vector N."""

    identity = PciIdentity(vendor_id=0x1234, device_id=0xE501, class_code=0xFF0000, revision=2,
                           subsystem_vendor_id=0x1AF4, subsystem_id=0x0007)
    bar0 = MemoryBar(0x4000, is64=True, prefetchable=True, register_size=4)
    bar2 = IoBar(0x100)
    capabilities = (Msi(vectors=4),)

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        return int(self.bus_master)

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        self.interrupt(value)


class IntxDevice(PciDevice):
    """No MSI: interrupts are INTx, which the device lowers on a write to register 4."""

    identity = PciIdentity(vendor_id=0x1234, device_id=0xE502)
    bar0 = MemoryBar(0x1000, register_size=4)

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        if offset == 4:
            self.set_intx(False)
        else:
            self.interrupt(0)
