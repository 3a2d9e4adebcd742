"""A DMA copy engine: the example device of the README, in about 40 lines.

BAR0 registers (32-bit)::

    0x00 MAGIC (ro) 0x56465530   0x04 SCRATCH      0x08/0x0c SRC lo/hi   0x10/0x14 DST lo/hi
    0x18 LEN                     0x1c CTRL (1 = copy LEN bytes from SRC to DST, then MSI-X 0)
    0x20 STATUS (bit0 done, bit1 DMA error)        0x24 IRQ_COUNT (ro)
"""

from dataclasses import dataclass, replace

from vfu_server import (
    DmaError,
    MemoryBar,
    Msix,
    PciDevice,
    PciExpress,
    PciIdentity,
    PowerManagement,
)
from vfu_server.migration.example_format import (
    EXAMPLE_FORMATS,
    ExampleRegs,
    ExampleState,
    example_device_abi,
)
from vfu_server.migration.generic import PciProfile

MAGIC = 0x56465530
REGS = ["magic", "scratch", "src_lo", "src_hi", "dst_lo", "dst_hi", "length", "ctrl", "status", "irq_count"]


@dataclass
class EngineState:
    magic: int = MAGIC
    scratch: int = 0
    src_lo: int = 0
    src_hi: int = 0
    dst_lo: int = 0
    dst_hi: int = 0
    length: int = 0
    ctrl: int = 0
    status: int = 0
    irq_count: int = 0


class DmaCopyEngine(PciDevice):
    """Example device: a register file, a DMA copy engine and an MSI-X interrupt."""

    cli_name = "example"
    identity = PciIdentity(vendor_id=0x1234, device_id=0xFE01, class_code=0xFF0000, revision=1,
                           subsystem_vendor_id=0x1234, subsystem_id=0x0001)
    bar0 = MemoryBar(0x1000, register_size=4)  # callbacks see aligned 32-bit registers only
    bar2 = MemoryBar(0x1000)  # MSI-X table and PBA
    capabilities = (PowerManagement(), Msix(vectors=4, table_bar=2, pba_offset=0x800), PciExpress())
    migration_formats = EXAMPLE_FORMATS  # "opaque" and "standard" (example/std/1)

    def __init__(self) -> None:
        super().__init__()
        self.state = EngineState()

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        index = offset // 4
        return getattr(self.state, REGS[index]) if index < len(REGS) else 0

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        name = REGS[offset // 4] if offset // 4 < len(REGS) else "magic"
        if name in ("magic", "irq_count"):
            return  # read-only
        setattr(self.state, name, value)
        if name == "ctrl" and value & 1:
            self.copy()

    def copy(self) -> None:
        s = self.state
        try:
            data = self.dma.read(s.src_hi << 32 | s.src_lo, s.length)
            self.dma.write(s.dst_hi << 32 | s.dst_lo, data)
            s.status = 1
        except DmaError as exc:
            self.log.info("copy failed: %s", exc)
            s.status = 3
        s.ctrl = 0
        s.irq_count += 1
        self.interrupt(0)

    def reset(self) -> None:
        self.state = EngineState()

    # Migration: the generic PCI part comes from the base class, the registers from here.
    def migration_profile(self) -> PciProfile:
        return replace(super().migration_profile(), device_abi=example_device_abi(4))

    def save_state(self) -> ExampleState:
        s = self.state
        regs = ExampleRegs(s.scratch, s.src_hi << 32 | s.src_lo, s.dst_hi << 32 | s.dst_lo,
                           s.length, s.ctrl, s.status, s.irq_count)
        return ExampleState(profile=self.migration_profile(), regs=regs, **self.pci_state())

    def load_state(self, state: ExampleState) -> None:
        self.load_pci_state(state)
        r = state.regs
        self.state = EngineState(scratch=r.scratch, src_lo=r.src & 0xFFFFFFFF, src_hi=r.src >> 32,
                                 dst_lo=r.dst & 0xFFFFFFFF, dst_hi=r.dst >> 32, length=r.len,
                                 ctrl=r.ctrl, status=r.status, irq_count=r.irq_count)
