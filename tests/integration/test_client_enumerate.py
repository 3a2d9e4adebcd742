"""``Client.enumerate``: BAR discovery, bus mastering and interrupt set-up, as firmware and a
driver's probe do them, against real server processes."""

import trio

from vfu_server.client import Client, GuestRam
from vfu_server.testing import running_server

MSI = "tests.integration.enumerate_devices:MsiDevice"
INTX = "tests.integration.enumerate_devices:IntxDevice"


async def test_enumerate_an_msix_device_and_use_it():
    async with running_server("example") as server, await Client.connect(server.socket_path) as dev:
        found = await dev.enumerate(enable_bus_mastering=True, configure_msi=True)
        assert (found.vendor_id, found.device_id, found.class_code) == (0x1234, 0xFE01, 0xFF0000)
        assert sorted(found.bars) == [0, 2]
        assert all(b.size == 0x1000 and not b.io and not b.is64 for b in found.bars.values())
        assert found.bars[0].address != found.bars[2].address
        assert await dev.config_read(0x10) & ~0xF == found.bars[0].address
        assert 0x11 in found.capabilities and 0x10 in found.capabilities  # MSI-X, PCIe
        assert found.interrupt_kind == "msix" and len(found.interrupts) == 4
        assert await dev.config_read(0x04, 2) & 0x6 == 0x6  # memory space and bus master on
        with GuestRam(1 << 20) as ram:
            await dev.dma_map(ram)
            ram.write(0x1000, b"enumerated")
            for offset, value in ((0x08, 0x1000), (0x10, 0x2000), (0x18, 10), (0x1C, 1)):
                await dev.write32(0, offset, value)
            with trio.fail_after(10):
                await found.interrupts[0].wait()
            assert ram.read(0x2000, 10) == b"enumerated"


async def test_enumerate_sizes_64_bit_and_io_bars_and_configures_msi():
    async with running_server(MSI) as server, await Client.connect(server.socket_path) as dev:
        assert await dev.read32(0, 0) == 0, "no bus master before enumeration"
        found = await dev.enumerate(enable_bus_mastering=True, configure_msi=True, vectors=2)
        assert (found.subsystem_vendor_id, found.subsystem_id, found.revision) == (0x1AF4, 7, 2)
        bar0, bar2 = found.bars[0], found.bars[2]
        assert (bar0.size, bar0.is64, bar0.prefetchable, bar0.io) == (0x4000, True, True, False)
        assert bar0.address >= 1 << 32 and bar0.address % 0x4000 == 0
        assert await dev.config_read(0x14) == bar0.address >> 32
        assert (bar2.size, bar2.io) == (0x100, True)
        assert await dev.config_read(0x04, 2) & 0x7 == 0x7  # I/O, memory, bus master
        assert await dev.read32(0, 0) == 1, "the device sees Bus Master Enable"
        assert found.interrupt_kind == "msi" and len(found.interrupts) == 2
        msi = found.capabilities[0x05]
        assert (await dev.config_read(msi + 2, 2) >> 4) & 7 == 1  # two vectors enabled
        await dev.write32(0, 0, 1)
        with trio.fail_after(10):
            assert await found.interrupts[1].wait() == 1
        assert found.interrupts[0].count() == 0


async def test_enumerate_without_options_sets_up_no_interrupts_and_no_bus_mastering():
    async with running_server(MSI) as server, await Client.connect(server.socket_path) as dev:
        found = await dev.enumerate()
        assert found.interrupt_kind is None and found.interrupts == []
        assert await dev.config_read(0x04, 2) & 0x7 == 0x3


async def test_enumerate_falls_back_to_intx():
    async with running_server(INTX) as server, await Client.connect(server.socket_path) as dev:
        found = await dev.enumerate(configure_msi=True)
        assert found.interrupt_kind == "intx" and len(found.interrupts) == 1
        await dev.write32(0, 0, 0)
        with trio.fail_after(10):
            await found.interrupts[0].wait()
        assert await dev.config_read(0x06, 1) & 0x08, "Interrupt Status"
        await dev.write32(0, 4, 0)
        assert not await dev.config_read(0x06, 1) & 0x08
