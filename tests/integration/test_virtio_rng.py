"""virtio-rng and the virtio-pci transport, through the vfio-user client (no VM)."""

from __future__ import annotations

import trio

from vfu_server.client import Client, GuestRam
from vfu_server.testing.process import running_server
from vfu_server.testing.virtio import (
    FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDriver,
    init_device,
)


async def test_identity_and_capabilities() -> None:
    async with running_server("virtio-rng") as srv, await Client.connect(srv.socket_path) as client:
        assert await client.config_read(0, 2) == 0x1AF4
        assert await client.config_read(2, 2) == 0x1044
        assert await client.config_read(8, 1) == 1  # revision 1: modern
        assert await client.config_read(0x2C, 2) == 0x1AF4
        ram = GuestRam(4 << 20)
        await client.dma_map(ram)
        dev = await VirtioDriver.attach(client, ram)
        assert {1, 2, 3, 5} <= set(dev.caps)
        features = await dev.device_features()
        assert features & VIRTIO_F_VERSION_1
        assert features & VIRTIO_F_EVENT_IDX and features & VIRTIO_F_INDIRECT_DESC


async def test_random_bytes() -> None:
    async with running_server("virtio-rng") as srv, await Client.connect(srv.socket_path) as client:
        ram = GuestRam(8 << 20)
        await client.dma_map(ram)
        _, (q,) = await init_device(client, ram, VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC)
        reqs = [q.add(in_sizes=[64]), q.add(in_sizes=[16, 48], indirect=True)]
        await q.kick()
        done = await q.wait_used(2)
        assert {r.head for r in done} == {r.head for r in reqs}
        blobs = [r.all_data() for r in done]
        assert all(r.written == 64 for r in done)
        assert blobs[0] != blobs[1] and b"\xa5" * 8 not in b"".join(blobs)


async def test_refuses_features_without_version_1() -> None:
    async with running_server("virtio-rng") as srv, await Client.connect(srv.socket_path) as client:
        ram = GuestRam(4 << 20)
        await client.dma_map(ram)
        dev = await VirtioDriver.attach(client, ram)
        await dev.reset()
        await dev.set_status(3)
        await dev.common_write(0x08, 0)
        await dev.common_write(0x0C, 0)
        await dev.common_write(0x08, 1)
        await dev.common_write(0x0C, 0)
        await dev.set_status(3 | FEATURES_OK)
        assert not await dev.status() & FEATURES_OK


async def test_intx_fallback_and_isr() -> None:
    async with running_server("virtio-rng") as srv, await Client.connect(srv.socket_path) as client:
        ram = GuestRam(4 << 20)
        await client.dma_map(ram)
        dev = await VirtioDriver.attach(client, ram, msix=False)
        intx = (await client.enable_irqs(0, 1))[0]
        await dev.negotiate()
        q = await dev.setup_queue(0)
        await dev.driver_ok()
        q.add(in_sizes=[32])
        await q.kick()
        with trio.fail_after(5):
            await intx.wait()
        assert len(q.reap()) == 1
        assert await dev.read_isr() == 1
        assert await dev.read_isr() == 0  # reading cleared it
