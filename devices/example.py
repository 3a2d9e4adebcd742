"""A DMA copy engine: the example device of the README, migration included.

BAR0 registers (32-bit)::

    0x00 MAGIC (ro) 0x56465530   0x04 SCRATCH      0x08/0x0c SRC lo/hi   0x10/0x14 DST lo/hi
    0x18 LEN                     0x1c CTRL (1 = copy LEN bytes from SRC to DST, then interrupt 0)
    0x20 STATUS (bit0 done, bit1 DMA error)        0x24 IRQ_COUNT (ro)
"""

from dataclasses import replace

from vfu_devices.example_format import EXAMPLE_FORMATS, ExampleRegs, example_device_abi
from vfu_server import (
    DmaError,
    MemoryBar,
    Msix,
    PciDevice,
    PciExpress,
    PciIdentity,
    PowerManagement,
)

MAGIC = 0x56465530
#: register offset -> (field, shift): SRC and DST are 64-bit, seen as two 32-bit halves
REGS = {0x04: ("scratch", 0), 0x08: ("src", 0), 0x0C: ("src", 32), 0x10: ("dst", 0), 0x14: ("dst", 32),
        0x18: ("len", 0), 0x1C: ("ctrl", 0), 0x20: ("status", 0), 0x24: ("irq_count", 0)}


class DmaCopyEngine(PciDevice):
    """Example device: a register file, a DMA copy engine and an MSI-X interrupt."""

    cli_name = "example"
    identity = PciIdentity(vendor_id=0x1234, device_id=0xFE01, class_code=0xFF0000, revision=1,
                           subsystem_vendor_id=0x1234, subsystem_id=0x0001)
    bar0 = MemoryBar(0x1000, register_size=4)  # callbacks see aligned 32-bit registers only
    bar2 = MemoryBar(0x1000)  # MSI-X table and PBA
    capabilities = (PowerManagement(), Msix(vectors=4, table_bar=2, pba_offset=0x800), PciExpress())
    regs: ExampleRegs
    migration_state = ("regs",)  # migrated with no code, in "opaque" and "standard" (example/std/1)
    migration_formats = EXAMPLE_FORMATS
    magic = MAGIC

    def __init__(self) -> None:
        super().__init__()
        self.regs = ExampleRegs()

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        name, shift = REGS.get(offset, ("", 0))
        return self.magic if offset == 0 else getattr(self.regs, name, 0) >> shift & 0xFFFFFFFF

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        name, shift = REGS.get(offset, ("", 0))
        if name in ("scratch", "src", "dst", "len", "ctrl"):  # the rest is read-only
            old = getattr(self.regs, name) & ~(0xFFFFFFFF << shift)
            setattr(self.regs, name, old | value << shift)
        if name == "ctrl" and value & 1:
            self.copy()

    def copy(self) -> None:
        r = self.regs
        try:
            self.dma.write(r.dst, self.dma.read(r.src, r.len))
            r.status = 1
        except DmaError as exc:
            self.log.info("copy failed: %s", exc)
            r.status = 3
        r.ctrl = 0
        r.irq_count += 1
        self.interrupt(0)

    def reset(self) -> None:
        self.regs = ExampleRegs()

    def migration_profile(self):  # the standard format's PROFILE names the register layout
        return replace(super().migration_profile(), device_abi=example_device_abi(4))
