"""The core server as a separate process (``vfu-server example``) driven over a real socket."""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct

import pytest
import trio
from server_helpers import (
    CTRL,
    DST_HI,
    DST_LO,
    IRQ_COUNT,
    LEN,
    MAGIC,
    MAGIC_VALUE,
    SCRATCH,
    SRC_HI,
    SRC_LO,
    STATUS,
    RawConn,
)

from vfu_server.client import Client, EventFd, GuestRam
from vfu_server.protocol import messages as m
from vfu_server.protocol.codec import encode
from vfu_server.protocol.constants import (
    Command,
    DeviceFlags,
    DmaMapFlags,
    IrqIndex,
    IrqInfoFlags,
    PciRegion,
    RegionFlags,
)
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import running_server

TIMEOUT = 30


@pytest.fixture
async def server():
    async with running_server("example") as srv:
        yield srv
        assert srv.process.returncode is None, srv.stderr()


async def remote_errno(coro) -> int:
    with pytest.raises(RemoteError) as exc:
        await coro
    return exc.value.errno


async def start_copy(c: Client, src: int, dst: int, length: int, *, posted: bool = False) -> None:
    for reg, value in ((SRC_LO, src & 0xFFFFFFFF), (SRC_HI, src >> 32), (DST_LO, dst & 0xFFFFFFFF),
                       (DST_HI, dst >> 32), (LEN, length), (CTRL, 1)):
        await c.write32(0, reg, value, posted=posted)


# --------------------------------------------------------------------------------------------
# negotiation and device info


async def test_negotiation_and_device_info(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            s = c.session
            assert s.write_multiple and s.max_data_xfer_size == 1 << 20 and s.pgsizes == 4096
            info = await c.device_info()
            assert info.flags & DeviceFlags.PCI and info.flags & DeviceFlags.RESET
            assert info.num_regions >= 9 and info.num_irqs == 5
            sizes = {}
            for index in (0, 1, 2, 3, 4, 5, 6, 7, 8):
                ri, fd = await c.region_info(index)
                assert fd is None and ri.index == index
                sizes[index] = ri.size
            assert sizes == {0: 0x1000, 1: 0, 2: 0x1000, 3: 0, 4: 0, 5: 0, 6: 0, 7: 4096, 8: 0}
            assert (await c.region_info(7))[0].flags == RegionFlags.READ | RegionFlags.WRITE
            msix = await c.irq_info(IrqIndex.MSIX)
            assert msix.count == 4 and msix.flags & IrqInfoFlags.EVENTFD
            assert (await c.irq_info(IrqIndex.ERR)).count == 1
            assert await remote_errno(c.request(Command.DEVICE_GET_IRQ_INFO, m.IrqInfo(5).pack())) == errno.EINVAL
            beyond = m.RegionInfo.request(info.num_regions)
            assert await remote_errno(c.request(Command.DEVICE_GET_REGION_INFO, beyond)) == errno.EINVAL
            short = m.RegionInfo.request(7, argsz=16)
            assert await remote_errno(c.request(Command.DEVICE_GET_REGION_INFO, short)) == errno.EINVAL
            # GET_REGION_IO_FDS: no ioeventfds
            assert (await c.region_io_fds(0)).sub_regions == ()


async def test_version_errors_keep_the_connection(server) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await RawConn.connect(server.socket_path)
        try:
            # Anything before VERSION: EINVAL.
            reply = await conn.request(1, Command.DEVICE_GET_INFO, m.DeviceInfo().pack())
            assert reply.is_error and reply.error == errno.EINVAL
            # Major version mismatch: ENOTSUP.
            reply = await conn.request(2, Command.VERSION, m.Version(1, 0, {}).pack())
            assert reply.is_error and reply.error == errno.ENOTSUP and len(reply.payload) == 0
            # Bad JSON: EINVAL.
            reply = await conn.request(3, Command.VERSION, b"\0\0\0\0{nope\0")
            assert reply.is_error and reply.error == errno.EINVAL
            reply = await conn.request(4, Command.VERSION, b"\0\0\0\0" + b'{"capabilities":{"pgsizes":"x"}}\0')
            assert reply.is_error and reply.error == errno.EINVAL
            # Then a good one works, with a reply QEMU can receive.
            reply = await conn.negotiate()
            assert 16 + len(reply.payload) <= 214
            assert m.Version.unpack(reply.payload).capabilities["max_msg_fds"] == 16
            # A second VERSION is refused.
            reply = await conn.request(5, Command.VERSION, m.Version(0, 0, {}).pack())
            assert reply.is_error and reply.error == errno.EINVAL
            # Unknown command: ENOSYS. An error reply always has a non-zero errno.
            reply = await conn.request(6, 14, b"")
            assert reply.is_error and reply.error == errno.ENOSYS
            reply = await conn.request(7, 999, b"abc")
            assert reply.is_error and reply.error == errno.ENOSYS
            reply = await conn.request(9, Command.DEVICE_RESET)
            assert not reply.is_error and len(reply.payload) == 0  # header-only reset reply
        finally:
            conn.close()


# --------------------------------------------------------------------------------------------
# region access


async def test_config_and_bar_access(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            assert await c.config_read(0, 4) == 0xFE01_1234
            whole = await c.region_read(PciRegion.CONFIG, 0, 4096)
            assert len(whole) == 4096 and whole[:4] == struct.pack("<I", 0xFE01_1234)
            assert whole[0x34] != 0
            await c.config_write(0x10, 0xFFFFFFFF)
            assert await c.config_read(0x10) == 0xFFFFF000
            await c.config_write(0x10, 0xFE600000)
            assert await c.config_read(0x10) == 0xFE600000
            await c.config_write(0x30, 0xFFFFF800)
            assert await c.config_read(0x30) == 0  # no ROM
            await c.config_write(0x00, 0)  # read-only: accepted, ignored
            assert await c.config_read(0x00) == 0xFE01_1234

            assert await c.read32(0, MAGIC) == MAGIC_VALUE
            await c.write32(0, MAGIC, 0)  # read-only register
            assert await c.read32(0, MAGIC) == MAGIC_VALUE
            await c.write32(0, SCRATCH, 0xDEADBEEF)
            assert await c.read32(0, SCRATCH) == 0xDEADBEEF
            assert await c.read(0, SCRATCH, 2) == 0xBEEF
            # A 16-byte read is split into aligned 8-byte reads; 1- and 2-byte reads of a register.
            await c.write32(0, SRC_HI, 0)
            assert await c.region_read(0, 0, 16) == struct.pack("<IIII", MAGIC_VALUE, 0xDEADBEEF, 0, 0)
            assert await c.read(0, MAGIC + 2, 2) == MAGIC_VALUE >> 16
            assert await c.read(0, MAGIC + 3, 1) == MAGIC_VALUE >> 24
            # A 64-bit write fills two 32-bit registers.
            await c.write(0, SRC_LO, 0x1122334455667788, 8)
            assert (await c.read32(0, SRC_LO), await c.read32(0, SRC_HI)) == (0x55667788, 0x11223344)
            assert await c.read(0, SRC_LO, 8) == 0x1122334455667788

            for region, offset, count in ((0, 0x1000, 4), (0, 0xFFE, 4), (1, 0, 4), (8, 0, 4),
                                          (PciRegion.CONFIG, 4094, 4), (50, 0, 1)):
                code = await remote_errno(c.request(Command.REGION_READ, m.REGION_ACCESS.pack(offset, region, count)))
                assert code == errno.EINVAL, (region, offset)
            code = await remote_errno(c.request(Command.REGION_READ, m.REGION_ACCESS.pack(0, 7, (1 << 20) + 1)))
            assert code == errno.E2BIG
            code = await remote_errno(c.request(Command.REGION_WRITE, m.REGION_ACCESS.pack(0, 0, 8) + b"abc"))
            assert code == errno.EINVAL
            # Still in sync after all of that.
            assert await c.read32(0, SCRATCH) == 0xDEADBEEF


async def test_posted_writes_are_ordered_before_a_later_read(server) -> None:
    with trio.fail_after(120):
        async with await Client.connect(server.socket_path) as c:
            n = 10_000
            for i in range(1, n + 1):
                await c.write32(0, SCRATCH, i, posted=True)
            assert await c.read32(0, SCRATCH) == n
            # Mixed with waited writes and reads of other registers.
            for i in range(200):
                await c.write32(0, LEN, i, posted=True)
                await c.write32(0, SCRATCH, i * 3, posted=True)
                if i % 50 == 0:
                    assert await c.read32(0, LEN) == i
            assert (await c.read32(0, SCRATCH), await c.read32(0, LEN)) == (199 * 3, 199)


async def test_write_multi(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            await c.write_multi([(0, SCRATCH, struct.pack("<I", i)) for i in range(200)])
            assert await c.read32(0, SCRATCH) == 199
            await c.write_multi([(0, LEN, b"\x11\x22\x33\x44"), (0, SRC_LO, b"\x55\x66\x77\x88"),
                                 (PciRegion.CONFIG, 0x3C, b"\x0b")])
            assert await c.read32(0, LEN) == 0x44332211
            assert await c.read32(0, SRC_LO) == 0x88776655
            assert await c.config_read(0x3C, 1) == 0x0B
            # Over 200 entries: the message is refused, but posted, so no reply; the stream stays in sync.
            await c.post(Command.REGION_WRITE_MULTI, struct.pack("<Q", 201) + bytes(24 * 201))
            assert await c.read32(0, SCRATCH) == 199


# --------------------------------------------------------------------------------------------
# DMA and interrupts


async def test_dma_copy_through_shared_memory_with_msix(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            ram = GuestRam(1 << 20, base=0x1_0000_0000)
            try:
                await c.dma_map(ram)
                await c.enable_bus_master()
                vectors = await c.enable_msix(4)
                src, dst = ram.alloc(8192), ram.alloc(8192)
                data = os.urandom(8192)
                ram.write(src, data)
                await start_copy(c, src, dst, len(data))
                assert await vectors[0].wait() == 1
                assert ram.read(dst, len(data)) == data
                assert await c.read32(0, STATUS) == 1
                assert await c.read32(0, IRQ_COUNT) == 1
                assert [v.count() for v in vectors[1:]] == [0, 0, 0]

                # A copy to an unmapped address fails with a DMA error status (and still interrupts).
                await start_copy(c, src, 0x10, 16)
                await vectors[0].wait()
                assert await c.read32(0, STATUS) == 3

                # Posted register writes work too (ordering makes CTRL come last).
                ram.write(src, b"posted!!")
                await start_copy(c, src, dst + 100, 8, posted=True)
                await vectors[0].wait()
                assert ram.read(dst + 100, 8) == b"posted!!"

                # Unmap: the range is gone for the device.
                await c.dma_unmap(ram.base, ram.size)
                await start_copy(c, src, dst, 8)
                await vectors[0].wait()
                assert await c.read32(0, STATUS) == 3
                for v in vectors:
                    v.close()
            finally:
                ram.close()


async def test_dma_read_only_map_and_cross_region_copy(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            a, b = GuestRam(65536, base=0x100000), GuestRam(65536, base=0x110000)
            try:
                await c.dma_map(a)
                await c.dma_map(b, flags=DmaMapFlags.READ)  # adjacent, read-only
                await c.enable_bus_master()
                (v, *_) = await c.enable_msix(1)
                a.write(0x10FFF0, bytes(range(16)))
                # Copy from a range that spans both maps into a writable place.
                b.write(0x110000, b"\xaa" * 16)
                await start_copy(c, 0x10FFF8, 0x100000, 16)
                await v.wait()
                assert await c.read32(0, STATUS) == 1
                assert a.read(0x100000, 16) == bytes(range(8, 16)) + b"\xaa" * 8
                # Writing into the read-only map fails.
                await start_copy(c, 0x100000, 0x110000, 4)
                await v.wait()
                assert await c.read32(0, STATUS) == 3
                assert b.read(0x110000, 4) == b"\xaa" * 4
                # DMA_MAP errors.
                assert await remote_errno(c.dma_map(a)) == errno.EEXIST
                assert await remote_errno(c.dma_unmap(0x100000, 4096)) == errno.ENOENT
                await c.dma_unmap_all()
                assert await remote_errno(c.dma_unmap(0x100000, 65536)) == errno.ENOENT
                v.close()
            finally:
                a.close()
                b.close()


async def test_fd_less_dma_map_is_accepted(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            ram = GuestRam(65536)
            try:
                await c.dma_map(ram, iova=0xFFFC0000, flags=DmaMapFlags.READ, with_fd=False)
                await c.dma_map(ram, iova=0x0)
                await c.enable_bus_master()
                (v, *_) = await c.enable_msix(1)
                # The device cannot reach fd-less memory through shared memory: a DMA error.
                await start_copy(c, 0xFFFC0000, 0x0, 16)
                await v.wait()
                assert await c.read32(0, STATUS) == 3
                v.close()
            finally:
                ram.close()


async def test_msix_deassign_and_disable(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            ram = GuestRam(65536)
            try:
                await c.dma_map(ram)
                await c.enable_bus_master()
                vectors = await c.enable_msix(4)
                # De-assign vector 0 (EVENTFD|TRIGGER with no fds).
                await c.set_irqs(IrqIndex.MSIX, 0x4 | 0x20, 0, 1)
                await start_copy(c, 0, 0x100, 4)
                assert await c.read32(0, IRQ_COUNT) == 1
                assert vectors[0].count() == 0
                # Re-assign: the pending interrupt is delivered.
                fresh = (await c.enable_irqs(IrqIndex.MSIX, 1))[0]
                assert await fresh.wait() == 1
                # Disable everything.
                await c.disable_irqs(IrqIndex.MSIX)
                await start_copy(c, 0, 0x100, 4)
                assert await c.read32(0, IRQ_COUNT) == 2
                assert fresh.count() == 0
                # Bad SET_IRQS ranges are EINVAL.
                assert await remote_errno(c.set_irqs(IrqIndex.MSIX, 0x1 | 0x20, 4, 1)) == errno.EINVAL
                assert await remote_errno(c.set_irqs(IrqIndex.MSIX, 0x1 | 0x8 | 0x10, 0, 1)) == errno.EINVAL
                for e in (*vectors, fresh):
                    e.close()
            finally:
                ram.close()


async def test_reset(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            await c.write32(0, SCRATCH, 1234)
            await c.config_write(0x04, 0x0006, 2)
            await c.config_write(0x10, 0xFE600000)
            await c.reset()
            assert await c.read32(0, SCRATCH) == 0
            assert await c.config_read(0x04, 2) == 0
            assert await c.config_read(0x10) == 0
            assert await c.read32(0, MAGIC) == MAGIC_VALUE


# --------------------------------------------------------------------------------------------
# connections


async def test_disconnect_and_reconnect_keeps_device_state(server) -> None:
    with trio.fail_after(TIMEOUT):
        ram = GuestRam(65536)
        try:
            async with await Client.connect(server.socket_path) as c:
                await c.write32(0, SCRATCH, 0xC0FFEE)
                await c.dma_map(ram)
                await c.enable_bus_master()
                await c.enable_msix(1)
                # The test's own eventfd, lent (a client closes the ones it made when it closes).
                old = [EventFd()]
                await c.set_irq_fds(IrqIndex.MSIX, [old[0].fd])
                ram.write(0, b"abcd")
                await start_copy(c, 0, 0x100, 4)
                await old[0].wait()
                assert await c.read32(0, STATUS) == 1
            async with await Client.connect(server.socket_path) as c:
                assert await c.read32(0, SCRATCH) == 0xC0FFEE  # device state kept
                assert await c.config_read(0x04, 2) & 0x4  # so is config space
                # The old client's DMA maps are gone: the same copy now fails ...
                await start_copy(c, 0, 0x200, 4)
                assert await c.read32(0, STATUS) == 3
                assert ram.read(0x200, 4) == bytes(4)
                # ... and its eventfds were dropped (the interrupt stays pending, not signalled).
                assert old[0].count() == 0
                # The same IOVA can be mapped again by the new client.
                await c.dma_map(ram)
                await start_copy(c, 0, 0x200, 4)
                assert ram.read(0x200, 4) == b"abcd"
            old[0].close()
        finally:
            ram.close()


async def test_a_client_closes_the_eventfds_it_made(server) -> None:
    with trio.fail_after(TIMEOUT):
        before = set(os.listdir("/proc/self/fd"))
        async with await Client.connect(server.socket_path) as c:
            vectors = await c.enable_msix(4)
            assert len({v.fd for v in vectors}) == 4 and min(v.fd for v in vectors) >= 0
        assert [v.fd for v in vectors] == [-1] * 4
        assert set(os.listdir("/proc/self/fd")) <= before


async def test_abrupt_disconnect_mid_message(server) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await RawConn.connect(server.socket_path)
        await conn.negotiate()
        await conn.send(encode(1, Command.REGION_WRITE, m.REGION_ACCESS.pack(4, 0, 4) + b"\1\2\3\4")[:20])
        conn.close()
        async with await Client.connect(server.socket_path) as c:
            assert await c.read32(0, MAGIC) == MAGIC_VALUE


def readable_now(sock) -> bool:
    # poll, not select: select() refuses fds >= 1024
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(0))


async def test_second_client_waits_in_the_backlog(server) -> None:
    with trio.fail_after(TIMEOUT):
        first = await Client.connect(server.socket_path)
        async with first:
            await first.write32(0, SCRATCH, 1)
            second = await RawConn.connect(server.socket_path)  # queued in the listen backlog
            try:
                await second.send(encode(0, Command.VERSION, m.Version(0, 0, {}).pack()))
                # The first client keeps being served while the second one waits ...
                for i in range(50):
                    await first.write32(0, SCRATCH, i)
                    assert await first.read32(0, SCRATCH) == i
                # ... and the second one got nothing so far.
                assert not readable_now(second.sock)
                await first.write32(0, SCRATCH, 777)
            except BaseException:
                second.close()
                raise
        # First client gone: the second one is served now, and sees the device state.
        try:
            reply = await second.receive()
            assert reply is not None and reply.command == Command.VERSION and not reply.is_error
            reply = await second.request(1, Command.REGION_READ, m.REGION_ACCESS.pack(SCRATCH, 0, 4))
            assert struct.unpack_from("<I", reply.payload, 16)[0] == 777
        finally:
            second.close()


async def test_fds_with_a_request_that_takes_none_are_not_leaked(server) -> None:
    """fds sent with a message that does not use them are closed by the server (the eventfd is
    not signalled later and the server keeps working)."""
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            efd = os.eventfd(0, os.EFD_NONBLOCK)
            try:
                for _ in range(50):
                    await c.request(Command.REGION_WRITE, m.REGION_ACCESS.pack(SCRATCH, 0, 4) + b"\0\0\0\0", [efd])
                assert await c.read32(0, MAGIC) == MAGIC_VALUE
            finally:
                os.close(efd)
            # The server process has not accumulated our fds.
            fds = os.listdir(f"/proc/{server.process.pid}/fd")
            assert len(fds) < 40, fds


# --------------------------------------------------------------------------------------------
# region info with capabilities: truncation, retry, fd only with the complete reply


async def test_sparse_mmap_region_info_over_the_wire() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    with trio.fail_after(TIMEOUT):
        async with running_server("mmap_test_device:MmapDevice", env={"PYTHONPATH": here}) as srv:
            conn = await RawConn.connect(srv.socket_path)
            try:
                await conn.negotiate()
                # First try with argsz 32: fixed part only, CAPS clear, argsz = needed, no fd.
                reply = await conn.request(1, Command.DEVICE_GET_REGION_INFO, m.RegionInfo.request(0, 32))
                assert len(reply.payload) == 32 and reply.fds == []
                short = m.RegionInfo.unpack(reply.payload)
                assert not short.flags & RegionFlags.CAPS and short.cap_offset == 0
                assert short.flags & RegionFlags.MMAP and short.size == 0x4000
                needed = short.argsz
                assert needed == 32 + 8 + 8 + 16 + 8
                # Retry with the full size: the whole chain and exactly one fd.
                reply = await conn.request(2, Command.DEVICE_GET_REGION_INFO, m.RegionInfo.request(0, needed))
                assert len(reply.payload) == needed and len(reply.fds) == 1
                full = m.RegionInfo.unpack(reply.payload)
                assert full.flags & RegionFlags.CAPS and full.cap_offset == 32
                assert full.cap(m.SparseMmapCap) == m.SparseMmapCap(((0x1000, 0x2000),))
                assert full.cap(m.MsixMappableCap) is not None
                # The fd maps the BAR: writes through it are what region reads see.
                mem = mmap.mmap(reply.fds[0], 0x4000, offset=full.offset)
                reply.close_fds()
                mem[0x2000:0x2004] = b"\x11\x22\x33\x44"
                reply = await conn.request(3, Command.REGION_READ, m.REGION_ACCESS.pack(0x2000, 0, 4))
                assert reply.payload[16:] == b"\x11\x22\x33\x44"
                mem.close()
                # No fd with any other reply.
                reply = await conn.request(4, Command.DEVICE_GET_REGION_INFO, m.RegionInfo.request(7, 64))
                assert reply.fds == []
            finally:
                conn.close()
