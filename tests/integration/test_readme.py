"""The README's client test and migration snippet, as the README shows them (verbatim: the
docs check in tests/unit/test_docs_code.py compares them)."""

from vfu_server.client import Client, GuestRam
from vfu_server.migration import driver as migrate
from vfu_server.testing import migration_pair, running_server


async def test_copy():
    async with running_server("example") as server, await Client.connect(server.socket_path) as dev:
        found = await dev.enumerate(enable_bus_mastering=True, configure_msi=True)
        with GuestRam(1 << 20) as ram:
            await dev.dma_map(ram)
            ram.write(0x1000, b"hello")
            for offset, value in ((0x08, 0x1000), (0x10, 0x2000), (0x18, 5), (0x1C, 1)):
                await dev.write32(0, offset, value)
            await found.interrupts[0].wait()
            assert ram.read(0x2000, 5) == b"hello"


async def test_migrate():
    async with migration_pair("example") as (src_client, dst_client, ram):
        await src_client.write32(0, 0x04, 0xC0FFEE)

        async def keep_io_going() -> None:
            ram.write(0x1000, b"still running")

        stats = await migrate.migrate(src_client, dst_client, fmt="standard", while_precopy=keep_io_going)
        print(stats.total_bytes, stats.downtime, stats.dirty_pages)
        assert await dst_client.read32(0, 0x04) == 0xC0FFEE
