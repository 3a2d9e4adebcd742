"""Fault injection meets live handover (docs/faults.md, "Held commands, migration and live
handover" and "Power loss"): what a volatile cache holds moves with the device (written back to
the backing during the quiesce), and a command a rule holds completes instead of stalling the
handover. Real server processes, the project's NVMe test driver, no VM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from vfu_server.client import Client, GuestRam
from vfu_server.faults import FaultControl
from vfu_server.testing.handover import hand_over
from vfu_server.testing.nvme import IO_READ, NvmeTestDriver, SubmissionEntry
from vfu_server.testing.process import running_server

DISK = 16 << 20


@pytest.mark.parametrize("ram", [False, True], ids=["file", "ram"])
async def test_a_handover_keeps_what_the_volatile_cache_holds(tmp_path: Path, ram: bool) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(DISK))
    backing = ("--size", "16M") if ram else ("--backing", str(image))
    ctl = str(tmp_path / "ctl")
    data = os.urandom(16384)
    with trio.fail_after(120), GuestRam(48 << 20) as gram:
        async with running_server("nvme", "--control-socket", ctl, "--volatile-cache", *backing) as srv, \
                await Client.connect(srv.socket_path) as client:
            drv = NvmeTestDriver(client, gram)
            await drv.start()
            q = await drv.create_io_queue_pair(1, entries=32)
            await drv.write(q, 64, data)  # completed, never flushed: in the cache only
            if not ram:
                assert image.read_bytes()[64 * 512 : 64 * 512 + len(data)] == bytes(len(data))
            succ = await hand_over(srv, ctl, "--volatile-cache", *backing)
            try:
                assert await drv.read(q, 64, len(data)) == data, "the successor reads the guest's write"
                if not ram:
                    assert image.read_bytes()[64 * 512 : 64 * 512 + len(data)] == data, "written back"
                # The successor's cache started empty: a power cut now loses nothing written before.
                async with FaultControl(ctl) as fc:
                    assert (await fc.power_cut())["lost_bytes"] == 0
                await drv.disable()
                await drv.enable()
                q = await drv.create_io_queue_pair(1, entries=32)
                assert await drv.read(q, 64, len(data)) == data
            finally:
                await succ.terminate()


async def test_a_command_a_hang_rule_holds_completes_at_a_handover(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    with trio.fail_after(120), GuestRam(48 << 20) as gram:
        async with running_server("nvme", "--size", "16M", "--control-socket", ctl,
                                  "--fault", "op=read,lba=8,hang") as srv, \
                await Client.connect(srv.socket_path) as client:
            drv = NvmeTestDriver(client, gram)
            await drv.start()
            q = await drv.create_io_queue_pair(1, entries=32)
            await drv.write(q, 8, b"h" * 512)
            buf = drv.buffer(512)
            prp1, prp2 = drv.prps(buf, 512)
            cid = await drv.submit(q, SubmissionEntry(IO_READ, nsid=1, cdw10=8, cdw12=0, prp1=prp1, prp2=prp2))
            with trio.move_on_after(0.3):
                await drv.wait(q, cid)
                raise AssertionError("the hang rule let the read complete")
            succ = await hand_over(srv, ctl, "--size", "16M")
            try:
                done = await drv.wait(q, cid, timeout=10)
                assert done.ok and gram.read(buf, 512) == b"h" * 512, "released by the quiesce, done once"
                async with FaultControl(ctl) as fc:
                    assert (await fc.list())["rules"] == [], "rules are the server's: not handed over"
                assert await drv.read(q, 8, 512) == b"h" * 512
            finally:
                await succ.terminate()


@pytest.mark.parametrize("ram", [False, True], ids=["file", "ram"])
async def test_virtio_blk_hands_over_its_cache_and_a_hung_request(tmp_path: Path, ram: bool) -> None:
    import struct

    from vfu_devices.virtio.blk import T_IN, T_OUT
    from vfu_server.testing.virtio import init_device

    def hdr(rtype: int, sector: int) -> bytes:
        return struct.pack("<IIQ", rtype, 0, sector)

    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(DISK))
    backing = ("--size", "16M") if ram else ("--backing", str(image))
    ctl = str(tmp_path / "ctl")
    data = os.urandom(8192)
    with trio.fail_after(120), GuestRam(64 << 20) as gram:
        async with running_server("virtio-blk", "--control-socket", ctl, "--volatile-cache",
                                  "--fault", "op=read,lba=200,hang", *backing) as srv, \
                await Client.connect(srv.socket_path) as client:
            await client.dma_map(gram)
            _dev, (q,) = await init_device(client, gram, queues=(0,), size=128, slot_size=16384)
            q.add([hdr(T_OUT, 64), data], [1])
            await q.kick()
            (w,) = await q.wait_used(1, timeout=10)
            assert w.data(len(w.inbufs) - 1)[0] == 0
            if not ram:
                assert image.read_bytes()[64 * 512 : 64 * 512 + len(data)] == bytes(len(data)), "cached"
            held = q.add([hdr(T_IN, 200)], [512, 1])
            await q.kick()
            with trio.move_on_after(0.3):
                await q.wait_used(1)
                raise AssertionError("the hang rule let the read complete")
            succ = await hand_over(srv, ctl, "--volatile-cache", *backing)
            try:
                (got,) = await q.wait_used(1, timeout=10)
                assert got.head == held.head and got.data(1)[0] == 0, "released by the quiesce"
                q.add([hdr(T_IN, 64)], [len(data), 1])
                await q.kick()
                (r,) = await q.wait_used(1, timeout=10)
                assert r.data(0) == data, "the successor reads the guest's write"
                if not ram:
                    assert image.read_bytes()[64 * 512 : 64 * 512 + len(data)] == data, "written back"
            finally:
                await succ.terminate()
