"""NVMe I/O commands with data checked against the backing files: read, write (FUA), flush,
write zeroes, dataset management, compare, verify; PRP lists incl. chained ones; SGLs."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest
import trio
from server_helpers import assert_uring_in_use

from vfu_devices.nvme.constants import Status
from vfu_server.testing.nvme import (
    IO_COMPARE,
    IO_DSM,
    IO_FLUSH,
    IO_READ,
    IO_VERIFY,
    IO_WRITE,
    IO_WRITE_ZEROES,
    PAGE,
    PSDT_SGL,
    SubmissionEntry,
    nvme_session,
    sgl_descriptor,
)

DISK = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    return path


@pytest.mark.parametrize("backing_io", ["sync", "uring"])
async def test_io_commands_against_backing_file(image: Path, backing_io: str) -> None:
    original = image.read_bytes()
    async with nvme_session("--backing", str(image), "--backing-io", backing_io,
                            "--log-level", "info") as (drv, server):
        if backing_io == "uring":
            assert_uring_in_use(server.stderr())
        q = await drv.create_io_queue_pair(1, entries=32)
        # write + FUA, flush
        data = os.urandom(8192)
        await drv.write(q, 10, data, fua=True)
        assert image.read_bytes()[10 * 512 : 10 * 512 + 8192] == data
        assert (await drv.io(q, IO_FLUSH)).ok
        assert (await drv.io(q, IO_FLUSH, nsid=0xFFFFFFFF)).ok
        # compare: match, mismatch
        buf = drv.buffer(8192)
        drv.ram.write(buf, data)
        assert (await drv.io(q, IO_COMPARE, slba=10, nlb=15, buf=buf, length=8192)).ok
        drv.ram.write(buf + 100, b"\xff\x00")
        c = await drv.io(q, IO_COMPARE, slba=10, nlb=15, buf=buf, length=8192)
        assert c.code == Status.COMPARE_FAILURE
        # verify: no data transfer, no MDTS limit, range checked
        assert (await drv.io(q, IO_VERIFY, slba=0, nlb=DISK // 512 - 1)).ok
        assert (await drv.io(q, IO_VERIFY, slba=DISK // 512 - 1, nlb=1)).code == Status.LBA_OUT_OF_RANGE
        # write zeroes, with and without deallocate
        assert (await drv.io(q, IO_WRITE_ZEROES, slba=100, nlb=7)).ok
        assert (await drv.io(q, IO_WRITE_ZEROES, slba=200, nlb=15, cdw12_extra=1 << 25)).ok
        assert (await drv.io(q, IO_WRITE_ZEROES, slba=DISK // 512, nlb=0)).code == Status.LBA_OUT_OF_RANGE
        # dataset management: deallocate two ranges (one empty)
        ranges = drv.buffer(48)
        drv.ram.write(ranges, struct.pack("<IIQ", 0, 16, 1000) + struct.pack("<IIQ", 0, 0, 5)
                      + struct.pack("<IIQ", 0, 8, 3000))
        assert (await drv.command(q, SubmissionEntry(IO_DSM, nsid=1, prp1=ranges, cdw10=2, cdw11=1 << 2))).ok
        drv.ram.write(ranges, struct.pack("<IIQ", 0, 16, DISK // 512 - 8))
        c = await drv.command(q, SubmissionEntry(IO_DSM, nsid=1, prp1=ranges, cdw10=0, cdw11=1 << 2))
        assert c.code == Status.LBA_OUT_OF_RANGE
        # reads see it all
        assert await drv.read(q, 100, 4096) == bytes(4096)
        assert await drv.read(q, 1000, 8192) == bytes(8192)
        assert await drv.read(q, 0, 4096) == original[:4096]
        # bad namespace, bad opcode, protection information
        assert (await drv.io(q, IO_READ, nsid=2, buf=buf, length=512)).code == Status.INVALID_NAMESPACE
        assert (await drv.io(q, IO_READ, nsid=0, buf=buf, length=512)).code == Status.INVALID_NAMESPACE
        assert (await drv.io(q, 0x7E)).code == Status.INVALID_OPCODE
        c = await drv.io(q, IO_READ, buf=buf, length=512, cdw12_extra=1 << 29)
        assert c.code == Status.INVALID_FIELD
    disk = image.read_bytes()
    assert disk[100 * 512 : 108 * 512] == bytes(4096)
    assert disk[200 * 512 : 216 * 512] == bytes(8192)
    assert disk[1000 * 512 : 1016 * 512] == bytes(8192)
    assert disk[3000 * 512 : 3008 * 512] == bytes(4096)
    assert disk[10 * 512 : 10 * 512 + 8192] == data
    assert disk[:4096] == original[:4096]


async def test_4k_lba_and_several_namespaces(tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(bytes(DISK))
    b.write_bytes(bytes(2 * DISK))
    async with nvme_session("--backing", str(a), "--backing", str(b), "--lba-size", "4096") as (drv, _):
        assert struct.unpack_from("<3I", await drv.identify(2)) == (1, 2, 0)
        ns2 = await drv.identify(0, nsid=2)
        assert struct.unpack_from("<Q", ns2)[0] == 2 * DISK // 4096 and ns2[26] == 1
        q = await drv.create_io_queue_pair(1, entries=8)
        await drv.write(q, 3, b"A" * 4096, block=4096, nsid=1)
        await drv.write(q, 3, b"B" * 8192, block=4096, nsid=2)
        assert await drv.read(q, 3, 4096, block=4096, nsid=1) == b"A" * 4096
        c = await drv.io(q, IO_READ, nsid=1, slba=DISK // 4096, nlb=0, buf=drv.buffer(4096), length=4096)
        assert c.code == Status.LBA_OUT_OF_RANGE
    assert a.read_bytes()[3 * 4096 : 4 * 4096] == b"A" * 4096
    assert b.read_bytes()[3 * 4096 : 5 * 4096] == b"B" * 8192


async def test_prp_lists_chained_and_bad() -> None:
    async with nvme_session("--size", "4M") as (drv, _):
        q = await drv.create_io_queue_pair(1, entries=8)
        data = os.urandom(64 * 1024)
        await drv.write(q, 0, data)
        # 16 data pages scattered, PRP1 with an offset, the list placed so that it must chain:
        # the first list page has room for 3 entries + a pointer to the next list.
        pages = [drv.buffer(PAGE) for _ in range(17)]
        first = pages[0] + 2048
        rest = pages[1:]
        list1 = drv.buffer(2 * PAGE) + PAGE - 4 * 8
        list2 = drv.buffer(PAGE)
        drv.ram.write(list1, struct.pack("<4Q", *rest[:3], list2))
        drv.ram.write(list2, struct.pack(f"<{len(rest) - 3}Q", *rest[3:]))
        length = 2048 + 15 * PAGE + 2048
        c = await drv.io(q, IO_READ, slba=0, nlb=length // 512 - 1, prp1=first, prp2=list1)
        assert c.ok, c
        got = drv.ram.read(first, 2048) + b"".join(drv.ram.read(p, PAGE) for p in rest[:-1]) + drv.ram.read(rest[-1], 2048)
        assert got == data[:length]
        # prp2 as a plain second page, with an offset: invalid
        c = await drv.io(q, IO_READ, slba=0, nlb=15, prp1=pages[0], prp2=pages[1] + 512)
        assert c.code == Status.INVALID_PRP_OFFSET
        # a list entry with an offset
        drv.ram.write(list2, struct.pack("<Q", rest[5] + 8))
        c = await drv.io(q, IO_READ, slba=0, nlb=length // 512 - 1, prp1=first, prp2=list1)
        assert c.code == Status.INVALID_PRP_OFFSET
        # unmapped data page, unmapped list
        c = await drv.io(q, IO_READ, slba=0, nlb=7, prp1=1 << 40)
        assert c.code == Status.DATA_TRANSFER_ERROR
        c = await drv.io(q, IO_WRITE, slba=0, nlb=31, prp1=pages[0], prp2=1 << 40)
        assert c.code == Status.DATA_TRANSFER_ERROR
        c = await drv.io(q, IO_READ, slba=0, nlb=0, prp1=pages[0] + 2)  # not dword aligned
        assert c.code == Status.INVALID_PRP_OFFSET
        assert await drv.read(q, 0, 4096) == data[:4096]  # still serving


async def test_sgls() -> None:
    async with nvme_session("--size", "4M") as (drv, _):
        q = await drv.create_io_queue_pair(1, entries=8)
        data = os.urandom(16384)
        await drv.write(q, 0, data)

        async def sgl_io(opcode: int, nlb: int, sgl1: bytes) -> int:
            entry = SubmissionEntry(opcode, nsid=1, cdw12=nlb, flags=PSDT_SGL, dptr=sgl1)
            return (await drv.command(q, entry)).code

        # single data block
        buf = drv.buffer(4096)
        assert await sgl_io(IO_READ, 7, sgl_descriptor(buf, 4096, 0)) == 0
        assert drv.ram.read(buf, 4096) == data[:4096]
        # segment -> last segment, with a bit bucket in the middle (read only)
        a, b, c_ = drv.buffer(4096), drv.buffer(4096), drv.buffer(4096)
        seg2 = drv.buffer(64)
        drv.ram.write(seg2, sgl_descriptor(b, 4096, 0) + sgl_descriptor(c_, 4096, 0))
        seg1 = drv.buffer(64)
        drv.ram.write(seg1, sgl_descriptor(a, 4096, 0) + sgl_descriptor(0, 4096, 1)
                      + sgl_descriptor(seg2, 32, 3))
        assert await sgl_io(IO_READ, 31, sgl_descriptor(seg1, 48, 2)) == 0
        assert drv.ram.read(a, 4096) == data[:4096]
        assert drv.ram.read(b, 4096) == data[8192:12288]
        assert drv.ram.read(c_, 4096) == data[12288:]
        # write through an SGL: last segment directly in the command
        src = drv.buffer(2048)
        drv.ram.write(src, b"S" * 2048)
        lst = drv.buffer(32)
        drv.ram.write(lst, sgl_descriptor(src, 1024, 0) + sgl_descriptor(src + 1024, 1024, 0))
        assert await sgl_io(IO_WRITE, 3, sgl_descriptor(lst, 32, 3)) == 0
        assert await drv.read(q, 0, 2048) == b"S" * 2048
        # malformed SGLs
        assert await sgl_io(IO_WRITE, 7, sgl_descriptor(0, 4096, 1)) == Status.SGL_DESCRIPTOR_TYPE_INVALID
        assert await sgl_io(IO_READ, 7, sgl_descriptor(buf, 2048, 0)) == Status.DATA_SGL_LENGTH_INVALID
        assert await sgl_io(IO_READ, 7, sgl_descriptor(buf, 4096, 4)) == Status.SGL_DESCRIPTOR_TYPE_INVALID
        assert await sgl_io(IO_READ, 7, sgl_descriptor(buf, 4096, 0, 1)) == Status.SGL_DESCRIPTOR_TYPE_INVALID
        assert await sgl_io(IO_READ, 7, sgl_descriptor(seg1, 40, 2)) == Status.INVALID_SGL_SEGMENT_DESCRIPTOR
        assert await sgl_io(IO_READ, 7, sgl_descriptor(1 << 40, 16, 3)) == Status.DATA_TRANSFER_ERROR
        bad = drv.buffer(32)  # a segment descriptor inside a last segment
        drv.ram.write(bad, sgl_descriptor(buf, 2048, 0) + sgl_descriptor(seg2, 32, 3))
        assert await sgl_io(IO_READ, 7, sgl_descriptor(bad, 32, 3)) == Status.INVALID_SGL_SEGMENT_DESCRIPTOR
        loop = drv.buffer(16)  # a segment that points at itself
        drv.ram.write(loop, sgl_descriptor(loop, 16, 2))
        assert await sgl_io(IO_READ, 7, sgl_descriptor(loop, 16, 2)) == Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS
        assert await sgl_io(IO_READ, 7, sgl_descriptor(1 << 40, 4096, 0)) == Status.DATA_TRANSFER_ERROR
        assert await drv.read(q, 0, 2048) == b"S" * 2048


async def test_read_only_namespace(image: Path) -> None:
    async with nvme_session("--backing", str(image), "--read-only") as (drv, _):
        q = await drv.create_io_queue_pair(1, entries=8)
        assert len(await drv.read(q, 0, 4096)) == 4096
        c = await drv.io(q, IO_WRITE, buf=drv.buffer(512), length=512)
        assert c.code == Status.NAMESPACE_WRITE_PROTECTED
        assert (await drv.io(q, IO_FLUSH)).ok


@pytest.mark.parametrize(("device", "args", "why"), [
    ("nvme", ["--size", "1M"], "--backing-io uring is for file backings, not RAM namespaces"),
    ("virtio-blk", ["--size", "1M"], "--backing-io uring is for file backings, not a RAM disk"),
    ("virtio-blk", ["--backing", "nbd://localhost/x"], "not an NBD backing"),
])
async def test_backing_io_uring_needs_a_file(device: str, args: list[str], why: str) -> None:
    proc = await trio.run_process([sys.executable, "-m", "vfu_server", device, "--socket-path", "/tmp/unused.sock",
                                   "--backing-io", "uring", *args], capture_stderr=True, check=False)
    assert proc.returncode == 2
    assert why.encode() in proc.stderr
