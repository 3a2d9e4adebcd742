"""NVMe queues: wrap-around and phase tags, many queues, queue-management status codes,
shadow doorbells, INTx fallback, controller reset/shutdown with I/O in flight, SIGTERM."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from devices.nvme.constants import Status
from vfu_server.client import Client, GuestRam
from vfu_server.protocol.constants import IrqIndex, IrqSetFlags
from vfu_server.testing.nvme import (
    ADMIN_CREATE_CQ,
    ADMIN_CREATE_SQ,
    ADMIN_DELETE_CQ,
    ADMIN_DELETE_SQ,
    ADMIN_IDENTIFY,
    IO_READ,
    IO_WRITE,
    REG_CC,
    NvmeTestDriver,
    SubmissionEntry,
    nvme_session,
)
from vfu_server.testing.process import running_server


async def test_wrap_around_phase_and_sq_head() -> None:
    async with nvme_session("--size", "1M") as (drv, _):
        q = await drv.create_io_queue_pair(1, entries=4)
        buf = drv.buffer(512)
        for i in range(50):
            c = await drv.io(q, IO_READ, slba=i, nlb=0, buf=buf, length=512)
            assert c.ok and c.sqid == 1
            assert c.sqhd == (i + 1) % 4  # SQ head reported in every completion
        assert q.phase == (1 if (50 // 4) % 2 == 0 else 0)
        # the admin queue (32 entries) wraps too
        for _ in range(70):
            await drv.identify(1)


async def test_queue_depth_32_overlaps_and_completes() -> None:
    async with nvme_session("--size", "8M") as (drv, _):
        q = await drv.create_io_queue_pair(1, entries=64)
        bufs = []
        cids = []
        for i in range(32):
            buf = drv.buffer(4096)
            drv.ram.write(buf, bytes([i]) * 4096)
            bufs.append(buf)
            p1, p2 = drv.prps(buf, 4096)
            cids.append(await drv.submit(q, SubmissionEntry(IO_WRITE, nsid=1, prp1=p1, prp2=p2, cdw10=i * 8,
                                                            cdw12=7), ring=False))
        await drv.ring_sq(1, q.sq_tail)
        for cid in cids:
            assert (await drv.wait(q, cid)).ok
        for i in range(32):
            assert await drv.read(q, i * 8, 4096) == bytes([i]) * 4096


async def test_many_queues() -> None:
    async with nvme_session("--size", "4M", "--max-queues", "16", msix_vectors=17) as (drv, _):
        nsq, ncq = await drv.set_num_queues(64)
        assert (nsq, ncq) == (16, 16)
        queues = [await drv.create_io_queue_pair(qid, entries=8, vector=qid) for qid in range(1, 17)]
        for q in queues:
            await drv.write(q, q.qid * 8, bytes([q.qid]) * 4096)
        for q in reversed(queues):
            assert await drv.read(q, q.qid * 8, 4096) == bytes([q.qid]) * 4096
        c = await drv.admin(ADMIN_CREATE_CQ, prp1=drv.buffer(4096), cdw10=7 << 16 | 17, cdw11=3)
        assert c.code == Status.INVALID_QUEUE_IDENTIFIER
        for q in queues[8:]:
            await drv.delete_io_queue_pair(q.qid)
        await drv.write(queues[0], 0, b"x" * 512)


async def test_queue_management_status_codes() -> None:
    async with nvme_session("--size", "1M", "--max-queue-entries", "256") as (drv, _):
        mem = drv.buffer(256 * 64)

        async def create_cq(qid: int, size: int, cdw11: int = 3, prp1: int = mem) -> int:
            return (await drv.admin(ADMIN_CREATE_CQ, prp1=prp1, cdw10=(size - 1) << 16 | qid, cdw11=cdw11)).code

        async def create_sq(qid: int, size: int, cqid: int, pc: int = 1, prp1: int = mem) -> int:
            return (await drv.admin(ADMIN_CREATE_SQ, prp1=prp1, cdw10=(size - 1) << 16 | qid,
                                    cdw11=cqid << 16 | pc)).code

        assert await create_cq(0, 8) == Status.INVALID_QUEUE_IDENTIFIER
        assert await create_cq(1, 1) == Status.INVALID_QUEUE_SIZE
        assert await create_cq(1, 257) == Status.INVALID_QUEUE_SIZE
        assert await create_cq(1, 8, cdw11=100 << 16 | 3) == Status.INVALID_INTERRUPT_VECTOR
        assert await create_cq(1, 8, cdw11=2) == Status.INVALID_FIELD  # not physically contiguous
        assert await create_cq(1, 8, prp1=mem + 64) == Status.INVALID_PRP_OFFSET
        assert await create_cq(1, 8, prp1=1 << 40) == Status.INVALID_FIELD  # not mapped
        assert await create_cq(1, 256) == Status.SUCCESS
        assert await create_cq(1, 8) == Status.INVALID_QUEUE_IDENTIFIER  # exists
        sq_mem = drv.buffer(256 * 64)
        assert await create_sq(1, 8, cqid=2, prp1=sq_mem) == Status.COMPLETION_QUEUE_INVALID
        assert await create_sq(1, 8, cqid=0, prp1=sq_mem) == Status.COMPLETION_QUEUE_INVALID
        assert await create_sq(1, 8, cqid=1, pc=0, prp1=sq_mem) == Status.INVALID_FIELD
        assert await create_sq(1, 8, cqid=1, prp1=sq_mem) == Status.SUCCESS
        assert await create_sq(2, 8, cqid=1, prp1=drv.buffer(4096)) == Status.SUCCESS  # two SQs, one CQ
        assert (await drv.admin(ADMIN_DELETE_CQ, cdw10=1)).code == Status.INVALID_QUEUE_DELETION
        assert (await drv.admin(ADMIN_DELETE_SQ, cdw10=0)).code == Status.INVALID_QUEUE_IDENTIFIER
        assert (await drv.admin(ADMIN_DELETE_SQ, cdw10=5)).code == Status.INVALID_QUEUE_IDENTIFIER
        assert (await drv.admin(ADMIN_DELETE_SQ, cdw10=1)).ok
        assert (await drv.admin(ADMIN_DELETE_SQ, cdw10=2)).ok
        assert (await drv.admin(ADMIN_DELETE_CQ, cdw10=1)).ok
        assert (await drv.admin(ADMIN_DELETE_CQ, cdw10=1)).code == Status.INVALID_QUEUE_IDENTIFIER
        assert (await drv.admin(ADMIN_DELETE_CQ, cdw10=0)).code == Status.INVALID_QUEUE_IDENTIFIER


async def test_shadow_doorbells_and_event_index() -> None:
    # Without polling: the controller asks for a doorbell every time its SQ runs dry.
    async with nvme_session("--size", "4M", "--poll-us", "0") as (drv, _):
        await drv.enable_shadow_doorbells()
        q = await drv.create_io_queue_pair(1, entries=16)
        before = drv.mmio_doorbells
        for i in range(40):
            await drv.write(q, i, bytes([i]) * 512)
        for i in range(40):
            assert await drv.read(q, i, 512) == bytes([i]) * 512
        # 80 commands: every SQ tail crosses the event index (the controller was idle), but CQ
        # head updates go to the shadow only: far fewer MMIO writes than 2 per command.
        assert drv.mmio_doorbells - before < 120
        # The event index follows the SQ tail the controller consumed.
        assert drv.ram.read32(drv.shadow_ei + 8) == q.sq_tail
        # A batch submitted with only the shadow updated is picked up once one MMIO write
        # wakes the controller.
        cids = []
        for i in range(8):
            buf = drv.buffer(512)
            cids.append(await drv.submit(q, SubmissionEntry(IO_READ, nsid=1, prp1=buf, cdw10=i), ring=False))
            drv._shadow_update(2, q.sq_tail)
        await drv.client.write32(0, 0x1008, q.sq_tail, posted=True)
        for cid in cids:
            assert (await drv.wait(q, cid)).ok
        # The admin queue keeps working with MMIO doorbells (Linux never shadows it).
        await drv.identify(1)


@pytest.mark.parametrize("fastio", ["1", "0"], ids=["C path", "Python path"])
async def test_cq_head_goes_to_the_shadow_only(fastio: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller reads the shadow CQ head whenever it needs room, so it keeps the CQ
    event index out of the host's way: no MMIO CQ doorbell per lap of the queue."""
    monkeypatch.setenv("VFU_FASTIO", fastio)
    async with nvme_session("--size", "4M", "--poll-us", "0") as (drv, _):
        await drv.enable_shadow_doorbells()
        q = await drv.create_io_queue_pair(1, entries=16)
        await drv.write(q, 0, bytes([7]) * 512)  # the first head update crosses index 0
        before = drv.cq_doorbells
        for i in range(80):  # five laps
            assert await drv.read(q, 0, 512) == bytes([7]) * 512, i
        assert drv.cq_doorbells - before <= 1
        # Room is still found: a full queue's worth submitted at once completes.
        cids = [await drv.submit(q, SubmissionEntry(IO_READ, nsid=1, prp1=drv.buffer(512), cdw10=i), ring=False)
                for i in range(15)]
        await drv.ring_sq(q.qid, q.sq_tail)
        for cid in cids:
            assert (await drv.wait(q, cid)).ok


async def test_cq_head_rings_with_intx() -> None:
    """With INTx the level drops only when the controller sees the host consumed everything,
    so with shadow doorbells it asks for an MMIO CQ doorbell at every head update."""
    async with nvme_session("--size", "4M", "--poll-us", "0", msix_vectors=0) as (drv, _):
        await drv.enable_shadow_doorbells()
        q = await drv.create_io_queue_pair(1, entries=16)
        await drv.write(q, 0, bytes([5]) * 512)
        before = drv.cq_doorbells
        for _ in range(40):
            assert await drv.read(q, 0, 512) == bytes([5]) * 512
        assert drv.cq_doorbells - before >= 38  # each read's head update, a wrap or two aside


async def test_shadow_doorbell_polling() -> None:
    """A queue depth 1 stream: once the adaptive window has grown past the driver's
    turn-around, the controller polls the shadow tail and the driver stops ringing."""
    async with nvme_session("--size", "4M", "--poll-us", "1000000") as (drv, _):
        await drv.enable_shadow_doorbells()
        q = await drv.create_io_queue_pair(1, entries=16)
        for i in range(40):  # 16 us doubling to past this client's turn-around
            await drv.write(q, i % 8, bytes([i]) * 512)
        before = drv.mmio_doorbells
        for i in range(40):
            assert await drv.read(q, i % 8, 512) == bytes([32 + i % 8]) * 512
        # Each read rings the CQ head only into the shadow, and its SQ tail finds the event
        # index one behind it (polling): an MMIO write only when the tail laps the index, or
        # when a poll timed out (the window adapts to this client's usual turn-around; a
        # hiccup of this machine can exceed it). Without polling every read rings.
        assert drv.mmio_doorbells - before < 10
        # A submission that only updates the shadow is picked up by the polling controller
        # (right after a completion it is well inside the window; should the poll have timed
        # out, the event index says so and the doorbell is rung, as a driver must).
        buf = drv.buffer(512)
        cid = await drv.submit(q, SubmissionEntry(IO_READ, nsid=1, prp1=buf, cdw10=3), ring=False)
        if drv._shadow_update(2, q.sq_tail):
            await drv.client.write32(0, 0x1008, q.sq_tail, posted=True)
        assert (await drv.wait(q, cid)).ok
        assert drv.ram.read(buf, 512) == bytes([35]) * 512


async def test_no_polling_while_the_driver_falls_behind() -> None:
    """A busy driver submits while earlier completions are still unread: the controller stops
    polling (the event index asks for every doorbell again), and every command completes. When
    the driver waits for each completion again, polling comes back."""
    async with nvme_session("--size", "4M", "--poll-us", "1000000") as (drv, _):
        await drv.enable_shadow_doorbells()
        q = await drv.create_io_queue_pair(1, entries=64)
        for i in range(40):  # queue depth 1: the window grows, polling takes over
            await drv.write(q, i % 8, bytes([i]) * 512)
        buf = drv.buffer(512)

        async def posted(count: int) -> None:
            with trio.fail_after(10):
                while drv.posted(q) < count:
                    await trio.sleep(0.001)

        for i in range(2):
            await drv.submit(q, SubmissionEntry(IO_READ, nsid=1, prp1=buf, cdw10=i))
            await posted(i + 1)
        rung = []
        for i in range(2, 30):
            before = drv.mmio_doorbells
            await drv.submit(q, SubmissionEntry(IO_READ, nsid=1, prp1=buf, cdw10=i % 8))
            await posted(3)
            await trio.sleep(0.01)  # the controller asks for the next doorbell after it posted
            rung.append(drv.mmio_doorbells - before)
            assert await drv.reap(q, limit=1) == 1  # the oldest completion only: two stay unread
        await drv.reap(q)
        assert not q.outstanding and all(c.ok for c in q.done.values())
        assert rung[-10:] == [1] * 10, rung  # not polling: each submission rings
        for i in range(20):
            await drv.read(q, i % 8, 512)
        before = drv.mmio_doorbells
        for i in range(20):
            assert await drv.read(q, i % 8, 512) == bytes([32 + i % 8]) * 512
        assert drv.mmio_doorbells - before < 10  # polling again (see test_shadow_doorbell_polling)


async def test_poll_us_out_of_range_is_a_usage_error() -> None:
    proc = await trio.run_process([sys.executable, "-m", "vfu_server", "nvme", "--socket-path", "/tmp/x.sock",
                                   "--poll-us", "-1"], capture_stderr=True, check=False)
    assert proc.returncode == 2
    assert b"--poll-us must be 0..1000000" in proc.stderr


async def test_intx_fallback() -> None:
    async with running_server("nvme", "--size", "1M") as srv, await Client.connect(srv.socket_path) as client:
        drv = NvmeTestDriver(client, GuestRam(8 << 20))
        await drv.start(msix_vectors=0, enable=False)
        (intx,) = await client.enable_irqs(IrqIndex.INTX, 1)
        await drv.enable()
        buf = drv.buffer(4096)
        for _ in range(3):
            cid = await drv.submit(0, SubmissionEntry(ADMIN_IDENTIFY, prp1=buf, cdw10=1))
            with trio.fail_after(5):
                await intx.wait()
            assert await client.config_read(0x06, 2) & 0x08  # interrupt status
            assert (await drv.wait(0, cid)).ok  # consumes the CQE and rings the CQ head
            with trio.fail_after(5):
                while await client.config_read(0x06, 2) & 0x08:
                    await trio.sleep(0.01)
            await client.set_irqs(IrqIndex.INTX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
        # INTMS masks the interrupt
        await drv.write32(0x0C, 1)
        cid = await drv.submit(0, SubmissionEntry(ADMIN_IDENTIFY, prp1=buf, cdw10=1))
        await trio.sleep(0.2)
        assert intx.count() == 0
        await drv.write32(0x10, 1)
        with trio.fail_after(5):
            await intx.wait()
        assert (await drv.wait(0, cid)).ok


async def _write_burst(drv: NvmeTestDriver, qid: int, n: int, fill: int) -> list[int]:
    q = drv.queues[qid]
    cids = []
    for i in range(n):
        buf = drv.buffer(4096)
        drv.ram.write(buf, bytes([fill]) * 4096)
        p1, p2 = drv.prps(buf, 4096)
        cids.append(await drv.submit(q, SubmissionEntry(IO_WRITE, nsid=1, prp1=p1, prp2=p2, cdw10=8 * i, cdw12=7),
                                     ring=False))
    await drv.ring_sq(qid, q.sq_tail)
    return cids


async def test_reset_with_io_in_flight_then_reenable(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4 << 20))
    async with nvme_session("--backing", str(image)) as (drv, _):
        for round_ in range(3):
            await drv.create_io_queue_pair(1, entries=64)
            await _write_burst(drv, 1, 32, round_ + 1)
            await drv.disable()  # controller reset while commands are in flight
            await drv.enable()
        q = await drv.create_io_queue_pair(1, entries=64)
        assert len(await drv.read(q, 0, 4096)) == 4096


async def test_shutdown_notification_flushes(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4 << 20))
    async with nvme_session("--backing", str(image)) as (drv, _):
        await drv.create_io_queue_pair(1, entries=64)
        cids = await _write_burst(drv, 1, 32, 0xA5)
        csts = await drv.shutdown()
        assert csts & 1 and (csts >> 2) & 3 == 2
        for cid in cids:
            assert (await drv.wait(1, cid)).ok
        assert image.read_bytes()[: 32 * 4096] == b"\xa5" * (32 * 4096)
        await drv.disable()
        assert (await drv.csts()) == 0
        await drv.enable()


async def test_sigterm_completes_in_flight_and_flushes(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4 << 20))
    async with running_server("nvme", "--backing", str(image)) as srv:
        async with await Client.connect(srv.socket_path) as client:
            drv = NvmeTestDriver(client, GuestRam(16 << 20))
            await drv.start()
            await drv.create_io_queue_pair(1, entries=64)
            cids = await _write_burst(drv, 1, 32, 0x5A)
            for cid in cids:
                assert (await drv.wait(1, cid)).ok
            assert await srv.terminate() == 0
        assert "Traceback" not in srv.stderr()
    assert image.read_bytes()[: 32 * 4096] == b"\x5a" * (32 * 4096)


async def test_client_reconnect_keeps_the_controller() -> None:
    """Spec, Client Disconnection: "all client memory regions are unmapped and cleaned up ...
    the device state should otherwise be retained" and "when a client reconnects, it will
    re-establish IRQ and client memory mappings". The next client finds the controller enabled
    with its queues and features, drives the same queue once it has mapped the memory, and can
    still start afresh by disabling the controller, as a new driver's probe does."""
    with GuestRam(8 << 20) as ram:
        async with running_server("nvme", "--size", "1M") as srv:
            async with await Client.connect(srv.socket_path) as client:
                drv = NvmeTestDriver(client, ram)
                await drv.start()
                q = await drv.create_io_queue_pair(1, entries=8)
                assert (await drv.set_feature(0x0F, 30000)).ok  # keep-alive timer
                data = os.urandom(512)
                await drv.write(q, 0, data)
                cc = await drv.read32(REG_CC)
            async with await Client.connect(srv.socket_path) as client:
                again = NvmeTestDriver(client, ram)
                assert await again.csts() & 1 and await again.read32(REG_CC) == cc
                await client.dma_map(ram)
                await client.enable_bus_master()
                again.vectors = await client.enable_msix(8)
                again.admin_q, again.queues = drv.admin_q, drv.queues
                assert await again.read(q, 0, 512) == data
                assert (await again.get_feature(0x0F)).dw0 == 30000
                await again.disable()
                await again.enable()
                assert (await again.get_feature(0x0F)).dw0 == 0
                q = await again.create_io_queue_pair(1, entries=8)
                assert await again.read(q, 0, 512) == data
            assert "Traceback" not in srv.stderr()
