"""The device guide's edu device (docs/examples/edu.py), tested without a VM: registers,
interrupts (MSI and INTx), DMA and migration. docs/device-guide.md shows this file."""

from pathlib import Path

import trio

from vfu_server.client import Client, GuestRam
from vfu_server.migration import driver as migrate
from vfu_server.protocol.constants import IrqIndex
from vfu_server.testing import migration_pair, running_server

EDU = f"{Path(__file__).parents[2] / 'docs' / 'examples' / 'edu.py'}:Edu"
BUFFER = 0x40000


async def test_registers():
    async with running_server(EDU) as server, await Client.connect(server.socket_path) as dev:
        assert await dev.config_read(0x00) == 0x11E8_1234
        assert await dev.read32(0, 0x00) == 0x010000ED
        await dev.write32(0, 0x04, 0x12345678)
        assert await dev.read32(0, 0x04) == 0xEDCBA987  # liveness: inverted
        await dev.write32(0, 0x08, 10)
        assert await dev.read32(0, 0x08) == 3628800  # 10!
        assert await dev.read(0, 0x00, 2) == 0xFFFF  # only 4-byte accesses below 0x80


async def test_msi_interrupt_and_acknowledge():
    async with running_server(EDU) as server, await Client.connect(server.socket_path) as dev:
        found = await dev.enumerate(configure_msi=True)
        assert found.interrupt_kind == "msi"
        (irq,) = found.interrupts
        await dev.write32(0, 0x60, 0x42)  # raise
        with trio.fail_after(10):
            await irq.wait()
        assert await dev.read32(0, 0x24) == 0x42
        await dev.write32(0, 0x64, 0x42)  # acknowledge
        assert await dev.read32(0, 0x24) == 0


async def test_intx_stays_asserted_until_acknowledged():
    async with running_server(EDU) as server, await Client.connect(server.socket_path) as dev:
        await dev.enumerate()
        (intx,) = await dev.enable_irqs(IrqIndex.INTX, 1)
        await dev.write32(0, 0x20, 0x80)  # interrupt when the factorial is done
        await dev.write32(0, 0x08, 5)
        with trio.fail_after(10):
            await intx.wait()
        assert await dev.config_read(0x06, 1) & 0x08, "INTx asserted (Interrupt Status)"
        await dev.write32(0, 0x64, 0x01)
        assert not await dev.config_read(0x06, 1) & 0x08


async def _dma(dev: Client, src: int, dst: int, count: int, cmd: int) -> None:
    await dev.write(0, 0x80, src, 8)
    await dev.write(0, 0x88, dst, 8)
    await dev.write(0, 0x90, count, 8)
    await dev.write(0, 0x98, cmd, 8)
    assert not await dev.read(0, 0x98, 8) & 1, "the transfer is done"


async def test_dma_through_the_buffer():
    async with running_server(EDU) as server, await Client.connect(server.socket_path) as dev:
        found = await dev.enumerate(enable_bus_mastering=True, configure_msi=True)
        with GuestRam(1 << 20) as ram:
            await dev.dma_map(ram)
            ram.write(0x1000, b"edu says hello")
            await _dma(dev, 0x1000, BUFFER, 14, 0x1)  # RAM -> device
            await _dma(dev, BUFFER, 0x2000, 14, 0x3 | 0x4)  # device -> RAM, interrupt 0x100
            with trio.fail_after(10):
                await found.interrupts[0].wait()
            assert ram.read(0x2000, 14) == b"edu says hello"
            assert await dev.read32(0, 0x24) == 0x100


async def test_dma_without_bus_mastering_is_dropped_and_logged():
    async with running_server(EDU) as server, await Client.connect(server.socket_path) as dev:
        await dev.enumerate()  # memory decoding only
        with GuestRam(1 << 20) as ram:
            await dev.dma_map(ram)
            ram.write(0x1000, b"secret")
            await _dma(dev, BUFFER, 0x1000, 6, 0x3)
            assert ram.read(0x1000, 6) == b"secret"
    assert "DMA to RAM dropped: the driver has not enabled bus mastering" in server.stderr()


async def test_migration_needs_no_code():
    async with migration_pair(EDU, ram_size=1 << 20) as (src, dst, ram):
        await src.enable_bus_master()
        ram.write(0x1000, b"carried over")
        await _dma(src, 0x1000, BUFFER, 12, 0x1)
        await src.write32(0, 0x04, 7)
        await migrate.migrate(src, dst)
        assert await dst.read32(0, 0x04) == ~7 & 0xFFFFFFFF
        await dst.enable_bus_master()
        await _dma(dst, BUFFER, 0x3000, 12, 0x3)
        assert ram.read(0x3000, 12) == b"carried over"
