"""A device with a sparse-mmappable BAR (and the MSI-X table inside the mmapped part), for the
server integration tests of GET_REGION_INFO capability chains and fd passing."""

from vfu_server import MemoryBar, Msix, PciDevice, PciIdentity


class MmapDevice(PciDevice):
    cli_name = "mmap-test"
    identity = PciIdentity(vendor_id=0x1234, device_id=0xFE02)
    bar0 = MemoryBar(0x4000, mmap_areas=[(0x1000, 0x2000)])
    capabilities = (Msix(vectors=2, table_bar=0, table_offset=0x1000, pba_offset=0x3000),)

    @bar0.reader
    def read_regs(self, offset: int, size: int) -> int:
        return 0xAB if offset == 0 else 0

    @bar0.writer
    def write_regs(self, offset: int, size: int, value: int) -> None:
        pass
