"""QEMU's ``edu`` teaching device (QEMU's docs/specs/edu.rst) as a vfio-user device.

BAR0, 1 MiB of MMIO; 32-bit registers below 0x80, 32- or 64-bit ones from 0x80::

    0x00 RO identification 0x010000ed      0x04 RW liveness: reads back inverted
    0x08 RW factorial: write n, read n!    0x20 RW status: 0x01 computing (RO), 0x80 irq when done
    0x24 RO interrupt status               0x60 WO raise interrupt (ORed into 0x24)
    0x64 WO acknowledge interrupt (cleared from 0x24)
    0x80 DMA source   0x88 DMA destination   0x90 DMA count
    0x98 DMA command: 0x01 start, 0x02 direction (0: RAM to device, 1: device to RAM),
                      0x04 raise interrupt 0x100 when done

The device's 4 KiB buffer is at DMA address 0x40000. Interrupts are INTx (level: high while the
interrupt status is not 0) or MSI once the driver enables it.
"""

import argparse
from dataclasses import dataclass

from vfu_server import DmaError, MemoryBar, Msi, PciDevice, PciExpress, PciIdentity

BUFFER, BUFFER_SIZE = 0x40000, 4096
STATUS_COMPUTING, STATUS_IRQ_FACT = 0x01, 0x80
DMA_START, DMA_TO_RAM, DMA_IRQ = 0x01, 0x02, 0x04


@dataclass
class EduState:
    liveness: int = 0
    factorial: int = 0
    status: int = 0
    irq_status: int = 0
    dma_src: int = 0
    dma_dst: int = 0
    dma_count: int = 0
    dma_cmd: int = 0
    buffer: bytes = bytes(BUFFER_SIZE)


class Edu(PciDevice):
    """QEMU's edu device: factorial, interrupts and a DMA engine with a 4 KiB buffer."""

    cli_name = "edu"
    identity = PciIdentity(vendor_id=0x1234, device_id=0x11E8, class_code=0x00FF00, revision=0x10)
    bar0 = MemoryBar(1 << 20)
    capabilities = (Msi(vectors=1), PciExpress())
    state: EduState
    migration_state = ("state",)  # all it takes to migrate (an opaque format of EduState)

    def __init__(self, dma_mask: int = (1 << 28) - 1) -> None:
        super().__init__()
        self.dma_mask = dma_mask
        self.state = EduState()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dma-mask", type=lambda text: int(text, 0), default=(1 << 28) - 1,
                            help="DMA address bits the device drives (default 28 bits)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Edu":
        return cls(dma_mask=args.dma_mask)

    @bar0.reader
    def read(self, offset: int, size: int) -> int:
        s = self.state
        if size != 4 and (offset < 0x80 or size != 8):
            return (1 << (8 * size)) - 1  # edu answers other accesses with all ones
        value = {0x00: 0x010000ED, 0x04: ~s.liveness & 0xFFFFFFFF, 0x08: s.factorial,
                 0x20: s.status, 0x24: s.irq_status, 0x80: s.dma_src, 0x88: s.dma_dst,
                 0x90: s.dma_count, 0x98: s.dma_cmd}.get(offset, 0)
        return value & ((1 << (8 * size)) - 1)

    @bar0.writer
    def write(self, offset: int, size: int, value: int) -> None:
        s = self.state
        if size != 4 and (offset < 0x80 or size != 8):
            return
        if offset == 0x04:
            s.liveness = value
        elif offset == 0x08 and not s.status & STATUS_COMPUTING:
            s.factorial = _factorial(value)
            if s.status & STATUS_IRQ_FACT:
                self.raise_irq(STATUS_COMPUTING)
        elif offset == 0x20:
            s.status = (s.status & STATUS_COMPUTING) | (value & STATUS_IRQ_FACT)
        elif offset == 0x60:
            self.raise_irq(value)
        elif offset == 0x64:
            s.irq_status &= ~value
            if not s.irq_status:
                self.set_intx(False)
        elif offset in (0x80, 0x88, 0x90):
            setattr(s, {0x80: "dma_src", 0x88: "dma_dst", 0x90: "dma_count"}[offset], value)
        elif offset == 0x98 and value & DMA_START:
            s.dma_cmd = value
            self.dma_transfer()

    def raise_irq(self, bits: int) -> None:
        self.state.irq_status |= bits
        self.interrupt(0)  # MSI if the driver enabled it, else INTx (held until acknowledged)

    def dma_transfer(self) -> None:
        s = self.state
        to_ram = bool(s.dma_cmd & DMA_TO_RAM)
        ram, dev = (s.dma_dst, s.dma_src) if to_ram else (s.dma_src, s.dma_dst)
        at = dev - BUFFER
        try:
            if not 0 <= at <= at + s.dma_count <= BUFFER_SIZE:
                raise DmaError(f"{dev:#x}+{s.dma_count:#x} is outside the buffer")
            if not self.bus_master:
                raise DmaError("the driver has not enabled bus mastering")
            if to_ram:
                self.dma.write(ram & self.dma_mask, s.buffer[at : at + s.dma_count])
            else:
                data = self.dma.read(ram & self.dma_mask, s.dma_count)
                s.buffer = s.buffer[:at] + data + s.buffer[at + len(data) :]
        except DmaError as exc:
            self.log.warning("DMA %s dropped: %s", "to RAM" if to_ram else "from RAM", exc)
        s.dma_cmd &= ~DMA_START
        if s.dma_cmd & DMA_IRQ:
            self.raise_irq(0x100)

    def reset(self) -> None:
        self.state = EduState()


def _factorial(n: int) -> int:
    """n! in 32 bits, as edu computes it; from 34! on the low 32 bits are all zero."""
    result = 1
    for i in range(2, min(n, 34) + 1):
        result = result * i & 0xFFFFFFFF
    return result if n < 34 else 0
