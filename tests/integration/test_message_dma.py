"""Guest RAM mapped without an fd: every device reaches it through DMA_READ/DMA_WRITE messages
that the project's client serves (the spec's layout, chunked to the client's limit), with Bus
Master Enable respected and a server that survives a client that refuses or leaves."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from server_helpers import (
    CTRL,
    DST_HI,
    DST_LO,
    LEN,
    MAGIC,
    MAGIC_VALUE,
    SRC_HI,
    SRC_LO,
    STATUS,
    RawConn,
)

from vfu_server.client import Client, GuestRam
from vfu_server.protocol import messages as m
from vfu_server.protocol.codec import encode
from vfu_server.protocol.constants import Command, DmaMapFlags
from vfu_server.testing.nvme import SubmissionEntry, nvme_session
from vfu_server.testing.process import running_server
from vfu_server.testing.virtio import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, init_device

TIMEOUT = 60
LIMIT = 4096  # the client's max_data_xfer_size in these tests
WARNING = "guest RAM came without an fd"


@asynccontextmanager
async def ram_of(size: int, base: int = 0) -> AsyncIterator[GuestRam]:
    with GuestRam(size, base) as ram:
        yield ram


async def start_copy(c: Client, src: int, dst: int, length: int) -> None:
    for reg, value in ((SRC_LO, src & 0xFFFFFFFF), (SRC_HI, src >> 32), (DST_LO, dst & 0xFFFFFFFF),
                       (DST_HI, dst >> 32), (LEN, length), (CTRL, 1)):
        await c.write32(0, reg, value)


async def copy_and_wait(c: Client, vector, src: int, dst: int, length: int) -> int:
    await start_copy(c, src, dst, length)
    await vector.wait()
    return await c.read32(0, STATUS)


async def test_copy_through_messages_is_chunked_at_the_clients_limit() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv, \
                await Client.connect(srv.socket_path, max_data_xfer_size=LIMIT) as c, \
                ram_of(1 << 20) as ram:
            await c.dma_map(ram, with_fd=False)
            await c.enable_bus_master()
            (v, *_) = await c.enable_msix(1)
            data = os.urandom(3 * LIMIT + 100)
            ram.write(0x1000 + 7, data)
            assert await copy_and_wait(c, v, 0x1000 + 7, 0x80000 + 3, len(data)) == 1
            assert ram.read(0x80000 + 3, len(data)) == data
            # Read and written in requests of at most the limit, no byte twice.
            assert max(c.dma_sizes) == LIMIT
            assert sum(c.dma_sizes) == c.dma_bytes == 2 * len(data)
            assert sorted(set(c.dma_sizes)) == [100, LIMIT]
            # Warned once, with the way to the fast path.
            assert srv.stderr().count(WARNING) == 1
            assert "memory-backend-memfd" in srv.stderr()


async def test_copy_between_shared_and_message_memory() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv, \
                await Client.connect(srv.socket_path, max_data_xfer_size=LIMIT) as c, \
                ram_of(1 << 16, base=0x100000) as shared, ram_of(1 << 16, base=0x200000) as private:
            await c.dma_map(shared)
            await c.dma_map(private, with_fd=False)
            await c.enable_bus_master()
            (v, *_) = await c.enable_msix(1)
            data = os.urandom(5000)
            shared.write(0x100000, data)
            assert await copy_and_wait(c, v, 0x100000, 0x200010, len(data)) == 1
            assert private.read(0x200010, len(data)) == data
            assert c.dma_bytes == len(data)  # only the fd-less side went through messages
            private.write(0x208000, data[::-1])
            assert await copy_and_wait(c, v, 0x208000, 0x108000, len(data)) == 1
            assert shared.read(0x108000, len(data)) == data[::-1]


async def test_bus_master_enable_clear_refuses_every_dma() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv, \
                await Client.connect(srv.socket_path, max_data_xfer_size=LIMIT) as c, \
                ram_of(1 << 16, base=0x100000) as shared, ram_of(1 << 16, base=0x200000) as private:
            await c.dma_map(shared)
            await c.dma_map(private, with_fd=False)
            (v, *_) = await c.enable_msix(1)
            assert not await c.config_read(0x04, 2) & 0x4
            shared.write(0x100000, b"S" * 64)
            private.write(0x200000, b"P" * 64)
            for src, dst in ((0x100000, 0x100800), (0x200000, 0x200800), (0x100000, 0x200800)):
                assert await copy_and_wait(c, v, src, dst, 64) == 3  # master abort
            assert shared.read(0x100800, 64) == bytes(64)
            assert private.read(0x200800, 64) == bytes(64)
            assert c.server_requests == 0  # not even a message went out
            # Enabled: both work; cleared again: both refused again.
            await c.enable_bus_master()
            assert await copy_and_wait(c, v, 0x100000, 0x100800, 64) == 1
            assert await copy_and_wait(c, v, 0x200000, 0x200800, 64) == 1
            await c.config_write(0x04, await c.config_read(0x04, 2) & ~0x4, 2)
            before = c.server_requests
            assert await copy_and_wait(c, v, 0x200000, 0x200000 + 0x1000, 64) == 3
            assert c.server_requests == before
            assert srv.process.returncode is None


async def test_nvme_with_bus_master_clear_fails_its_dma() -> None:
    # The controller's own accesses (the admin queue) obey BME on both paths: with it clear
    # an enabled controller cannot fetch a command, and says so with CSTS.CFS.
    for with_fd in (True, False):
        with trio.fail_after(TIMEOUT):
            async with nvme_session("--size", "1M", with_fd=with_fd, enable=False) as (drv, srv):
                await drv.client.config_write(0x04, await drv.client.config_read(0x04, 2) & ~0x4, 2)
                await drv.enable()
                before = drv.client.server_requests
                await drv.submit(0, SubmissionEntry(0x06, cdw10=1, prp1=drv.buffer(4096)))  # IDENTIFY
                await drv.wait_csts(0x2, 0x2, timeout=20)  # controller fatal status
                assert drv.client.server_requests == before
                assert srv.process.returncode is None


async def test_a_client_that_refuses_dma_requests() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv, \
                await Client.connect(srv.socket_path, max_data_xfer_size=LIMIT) as c, \
                ram_of(1 << 16) as ram:
            await c.dma_map(ram, with_fd=False)
            await c.enable_bus_master()
            (v, *_) = await c.enable_msix(1)
            ram.write(0, b"x" * 100)
            c.refuse_dma = errno.EFAULT
            assert await copy_and_wait(c, v, 0, 0x1000, 100) == 3
            assert ram.read(0x1000, 100) == bytes(100)
            assert await c.read32(0, MAGIC) == MAGIC_VALUE
            c.refuse_dma = None
            assert await copy_and_wait(c, v, 0, 0x1000, 100) == 1
            assert ram.read(0x1000, 100) == b"x" * 100
            # A request past the client's limit would be refused as well (E2BIG-like EINVAL):
            # the server never sends one, whatever the length.
            assert await copy_and_wait(c, v, 0, 0x2000, 3 * LIMIT) == 1
            assert max(c.dma_sizes) <= LIMIT
            assert "Traceback" not in srv.stderr()


async def test_a_client_that_goes_away_mid_request() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as srv:
            # A raw client maps RAM without an fd, starts a copy and leaves instead of
            # answering the server's DMA_READ.
            raw = await RawConn.connect(srv.socket_path)
            await raw.negotiate()
            reply = await raw.request(1, Command.DMA_MAP, m.DmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, 0, 0, 1 << 16).pack())
            assert not reply.is_error
            await raw.request(2, Command.REGION_WRITE, m.REGION_ACCESS.pack(0x04, 7, 2) + b"\x06\x00")
            for i, (reg, value) in enumerate(((SRC_LO, 0), (DST_LO, 0x1000), (LEN, 64), (CTRL, 1))):
                await raw.send(encode(10 + i, Command.REGION_WRITE, m.REGION_ACCESS.pack(reg, 0, 4) + struct.pack("<I", value)))
            seen = []
            while True:
                msg = await raw.receive()
                assert msg is not None
                if not msg.is_reply:
                    seen.append(msg)
                    break
            (req,) = seen
            assert req.command == Command.DMA_READ and bytes(req.payload) == struct.pack("<QQ", 0, 64)
            raw.sock.close()
            # The next client is served, and the device is not wedged: the copy that lost its
            # client failed (status 3), a new one works.
            async with await Client.connect(srv.socket_path, max_data_xfer_size=LIMIT) as c, ram_of(1 << 16) as ram:
                assert await c.read32(0, MAGIC) == MAGIC_VALUE
                assert await c.read32(0, STATUS) == 3
                await c.dma_map(ram, with_fd=False)
                await c.enable_bus_master()
                (v, *_) = await c.enable_msix(1)
                ram.write(0, b"y" * 64)
                assert await copy_and_wait(c, v, 0, 0x1000, 64) == 1
                assert ram.read(0x1000, 64) == b"y" * 64
            assert srv.process.returncode is None
            assert "Traceback" not in srv.stderr()


async def test_nvme_io_through_messages(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(4 << 20))
    with trio.fail_after(TIMEOUT):
        async with nvme_session("--backing", str(image), with_fd=False, max_data_xfer_size=LIMIT) as (drv, srv):
            assert srv.stderr().count(WARNING) == 1
            q = await drv.create_io_queue_pair(1, entries=32)
            blobs = {slba: os.urandom(n) for slba, n in ((8, 512), (100, 65536), (300, 12288))}
            for slba, data in blobs.items():
                await drv.write(q, slba, data, fua=True)
            for slba, data in blobs.items():
                back = await drv.read(q, slba, len(data))
                assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
            disk = image.read_bytes()
            for slba, data in blobs.items():
                assert disk[slba * 512 : slba * 512 + len(data)] == data
            assert 0 < max(drv.client.dma_sizes) <= LIMIT
            assert srv.process.returncode is None and "Traceback" not in srv.stderr()


async def test_virtio_blk_io_through_messages(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(4 << 20))
    with trio.fail_after(TIMEOUT):
        async with running_server("virtio-blk", "--backing", str(image)) as srv, \
                await Client.connect(srv.socket_path, max_data_xfer_size=LIMIT) as client, \
                ram_of(16 << 20) as ram:
            await client.dma_map(ram, with_fd=False)
            _, (q,) = await init_device(client, ram, VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC, slot_size=16384)
            data = os.urandom(12288)
            w = q.add([struct.pack("<IIQ", 1, 0, 40), data], [1])
            await q.kick()
            await q.wait_used()
            assert w.data(0)[0] == 0
            reqs = [q.add([struct.pack("<IIQ", 0, 0, 40 + 8 * i)], [4096, 1]) for i in range(3)]
            await q.kick()
            await q.wait_used(3)
            assert b"".join(r.data(0) for r in reqs) == data
            assert all(r.data(1)[0] == 0 for r in reqs)
            assert image.read_bytes()[40 * 512 : 40 * 512 + len(data)] == data
            assert client.server_requests > 0 and max(client.dma_sizes) <= LIMIT
            assert "Traceback" not in srv.stderr()


async def test_virtio_rng_through_messages() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_server("virtio-rng") as srv, \
                await Client.connect(srv.socket_path, max_data_xfer_size=LIMIT) as client, \
                ram_of(4 << 20) as ram:
            await client.dma_map(ram, with_fd=False)
            _, (q,) = await init_device(client, ram, VIRTIO_F_EVENT_IDX, slot_size=8192)
            reqs = [q.add(in_sizes=[64]), q.add(in_sizes=[5000])]
            await q.kick()
            done = await q.wait_used(2)
            assert sorted(r.written for r in done) == [64, 5000]
            assert all(r.all_data() != bytes(len(r.all_data())) for r in reqs)
            assert "Traceback" not in srv.stderr()


async def test_virtio_net_through_messages(tmp_path: Path) -> None:
    path = str(tmp_path / "peer.sock")
    lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with lsock:
        await lsock.bind(path)
        lsock.listen(1)
        with trio.fail_after(TIMEOUT):
            async with running_server("virtio-net", "--peer", path) as srv, \
                    await Client.connect(srv.socket_path, max_data_xfer_size=LIMIT) as client, \
                    ram_of(16 << 20) as ram:
                peer, _ = await lsock.accept()
                with peer:
                    await client.dma_map(ram, with_fd=False)
                    _, (rx, tx) = await init_device(client, ram, VIRTIO_F_EVENT_IDX, queues=(0, 1), slot_size=2048)
                    mac = bytes.fromhex("525400abcdef")
                    out = [b"\xff" * 6 + mac + b"\x88\xb5" + os.urandom(100 + i) for i in range(4)]
                    for f in out:
                        tx.add([bytes(12) + f])
                    await tx.kick()
                    await tx.wait_used(4)
                    assert [await peer.recv(65536) for _ in out] == out
                    for _ in range(4):
                        rx.add(in_sizes=[12 + 1518])
                    await rx.kick()
                    incoming = [b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + os.urandom(60) for _ in range(3)]
                    for f in incoming:
                        await peer.send(f)
                    got = []
                    while len(got) < len(incoming):
                        for r in await rx.wait_used(1):
                            got.append(r.data(0)[12 : r.written])
                    assert got == incoming
                    assert "Traceback" not in srv.stderr()
