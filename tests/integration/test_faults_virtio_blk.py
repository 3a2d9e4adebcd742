"""virtio-blk fault rules and power loss through real server processes (docs/faults.md)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from test_virtio_blk import hdr, status, write_req

from vfu_server.client import Client, GuestRam
from vfu_server.faults import FaultControl
from vfu_server.testing.process import running_server
from vfu_server.testing.virtio import (
    NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    DriverQueue,
    Request,
    init_device,
)

SECTOR = 512
DISK = 1 << 20
T_IN, T_OUT, T_FLUSH = 0, 1, 4
F_FLUSH = 1 << 9
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    return path


@asynccontextmanager
async def blk_session(image: Path, ctl: str, *args: str) -> AsyncIterator[tuple]:
    """A virtio-blk server on ``image`` with a control socket, driven up to DRIVER_OK."""
    async with running_server("virtio-blk", "--backing", str(image), "--control-socket", ctl, *args) as srv, \
            await Client.connect(srv.socket_path) as client, FaultControl(ctl) as fc:
        ram = GuestRam(32 << 20)
        await client.dma_map(ram)
        dev, (q,) = await init_device(client, ram, VIRTIO_F_EVENT_IDX | F_FLUSH, slot_size=16384)
        yield client, ram, dev, q, fc


def read_req(q: DriverQueue, sector: int, nbytes: int = SECTOR) -> Request:
    return q.add([hdr(T_IN, sector)], [nbytes, 1])


async def run(q: DriverQueue, *reqs: Request) -> list[int]:
    await q.kick()
    await q.wait_used(len(reqs))
    return [status(r) for r in reqs]


async def test_status_lba_and_op_matches(image: Path, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    original = image.read_bytes()
    async with blk_session(image, ctl, "--fault", "op=read,lba=16-17,status=ioerr") as (_, _, _, q, fc):
        ok_before, hit, overlap, ok_after, write = (read_req(q, 15), read_req(q, 16), read_req(q, 12, 4096),
                                                    read_req(q, 18), write_req(q, 16, b"w" * SECTOR))
        assert await run(q, ok_before, hit, overlap, ok_after, write) == [S_OK, S_IOERR, S_IOERR, S_OK, S_OK]
        assert ok_before.data(0) == original[15 * SECTOR : 16 * SECTOR]
        assert (await fc.fired()) == {1: 2}
        await fc.remove(1)
        await fc.add("op=flush,status=unsupp")
        assert await run(q, q.add([hdr(T_FLUSH)], [1]), read_req(q, 16)) == [S_UNSUPP, S_OK]
        bad = await fc.request({"cmd": "fault-add", "rule": "op=read,fatal"})
        assert not bad["ok"] and "cannot do 'fatal'" in bad["reason"]
        bad = await fc.request({"cmd": "fault-add", "rule": "ns=1,hang"})
        assert not bad["ok"] and "cannot match on 'ns'" in bad["reason"]


async def test_hang_release_delay_and_reset(image: Path, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    original = image.read_bytes()
    async with blk_session(image, ctl) as (client, ram, dev, q, fc):
        rid = await fc.add("op=read,lba=3,hang")
        held, other = read_req(q, 3), read_req(q, 4)
        await q.kick()
        assert await q.wait_used() == [other]
        await fc.remove(rid)
        assert await q.wait_used() == [held] and status(held) == S_OK
        assert held.data(0) == original[3 * SECTOR : 4 * SECTOR]

        await fc.add("op=read,lba=5,delay=3s")
        slow, fast = read_req(q, 5), read_req(q, 6)
        await q.kick()
        assert await q.wait_used() == [fast]
        assert await q.wait_used(timeout=30) == [slow] and status(slow) == S_OK
        await fc.remove("all")

        await fc.add("op=read,lba=7,hang")
        read_req(q, 7)
        await q.kick()
        await dev.reset()  # the held request is dropped, the reset completes
        dev, (q,) = await init_device(client, ram, VIRTIO_F_EVENT_IDX | F_FLUSH, slot_size=16384)
        await fc.remove("all")
        await fc.add("op=write,count=1,reset")
        write_req(q, 0, b"x" * SECTOR)
        await q.kick()
        with trio.fail_after(10):
            while not await dev.status() & NEEDS_RESET:
                await trio.sleep(0.01)
        dev, (q,) = await init_device(client, ram, VIRTIO_F_EVENT_IDX | F_FLUSH, slot_size=16384)
        r = read_req(q, 0)
        assert await run(q, r) == [S_OK] and r.data(0) == original[:SECTOR]


async def test_corrupt_and_torn(image: Path, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    original = image.read_bytes()
    async with blk_session(image, ctl) as (_, _, _, q, fc):
        await fc.add("op=read,corrupt=3,seed=9")
        r = read_req(q, 0, 4096)
        assert await run(q, r) == [S_OK]
        assert sum(bin(a ^ b).count("1") for a, b in zip(r.data(0), original[:4096], strict=True)) == 3
        await fc.remove("all")
        await fc.add("op=write,torn=1024")
        data = os.urandom(4096)
        assert await run(q, write_req(q, 40, data)) == [S_IOERR]
        stored = image.read_bytes()[40 * SECTOR : 40 * SECTOR + 4096]
        assert stored[:1024] == data[:1024] and stored[1024:] == original[40 * SECTOR + 1024 : 48 * SECTOR]


async def test_power_cut_keeps_flushed_loses_the_rest(image: Path, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    original = image.read_bytes()
    async with blk_session(image, ctl, "--volatile-cache") as (client, ram, dev, q, fc):
        durable, volatile = os.urandom(4096), os.urandom(4096)
        assert await run(q, write_req(q, 0, durable), q.add([hdr(T_FLUSH)], [1])) == [S_OK, S_OK]
        assert await run(q, write_req(q, 8, volatile)) == [S_OK]
        r = read_req(q, 8, 4096)
        assert await run(q, r) == [S_OK] and r.data(0) == volatile
        assert image.read_bytes()[8 * SECTOR : 16 * SECTOR] == original[8 * SECTOR : 16 * SECTOR]
        cut = await fc.power_cut()
        assert cut["lost_bytes"] == 4096
        assert await dev.status() & NEEDS_RESET
        dev, (q,) = await init_device(client, ram, VIRTIO_F_EVENT_IDX | F_FLUSH, slot_size=16384)
        a, b = read_req(q, 0, 4096), read_req(q, 8, 4096)
        assert await run(q, a, b) == [S_OK, S_OK]
        assert a.data(0) == durable and b.data(0) == original[8 * SECTOR : 16 * SECTOR]
