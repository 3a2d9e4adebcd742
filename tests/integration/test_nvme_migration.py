"""Migration of the NVMe controller between two real server processes that share guest RAM and
the backing file, the test acting as the VMM and the guest driver: I/O in flight across the
switch-over (every command completes exactly once, data verified in the shared file), both
formats, held-back completions of a full CQ, another backend on the destination, refusals
(format pin, profile mismatch, damaged streams), the v1 region, and mutated streams."""

from __future__ import annotations

import collections
import errno
import hashlib
import os

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_devices.nvme.migration_format import NVME_FORMATS, NVME_OPAQUE, NVME_STANDARD
from vfu_server.client import Client, GuestRam
from vfu_server.migration import driver as mg
from vfu_server.migration.fsm import MigState
from vfu_server.protocol.constants import IrqIndex
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import migration_pair, running_server
from vfu_server.testing.fuzz import mutate_stream, server_processes
from vfu_server.testing.nvme import (
    ADMIN_CREATE_CQ,
    ADMIN_CREATE_SQ,
    IO_FLUSH,
    IO_READ,
    IO_WRITE,
    REG_CC,
    REG_CSTS,
    NvmeTestDriver,
    QueuePair,
    SubmissionEntry,
)

SIZE = 16 << 20
BLOCK = 512
READ_AREA = 1024  # LBAs 0..1023 hold a known pattern; writes go above
VECTORS = 8


def pattern(slba: int, nblocks: int) -> bytes:
    out = bytearray()
    for lba in range(slba, slba + nblocks):
        out += hashlib.sha256(lba.to_bytes(8, "little")).digest() * (BLOCK // 32)
    return bytes(out)


@pytest.fixture
def backing(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(pattern(0, READ_AREA))
        f.truncate(SIZE)
    return path


class CountingDict(dict):
    """QueuePair.done that counts every completion stored for a CID (exactly-once checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __setitem__(self, cid, value) -> None:
        self.counts[cid] += 1
        super().__setitem__(cid, value)


@pytest.fixture
async def nvme_pair(backing):
    args = ("--backing", str(backing), "--size", str(SIZE))
    async with migration_pair("nvme", args, map_src=False) as (src, dst, ram):
        drv = NvmeTestDriver(src, ram)
        await drv.start(msix_vectors=VECTORS)
        yield drv, src, dst


async def switch_over(drv: NvmeTestDriver, dst: Client) -> None:
    """What the VMM does after the device moved: talk to the destination, re-send SET_IRQS."""
    drv.client = dst
    drv.vectors = await dst.enable_irqs(IrqIndex.MSIX, VECTORS)


class Workload:
    """Reads of the known area and writes above it, tracked per (qid, cid)."""

    def __init__(self, drv: NvmeTestDriver, queues: list[QueuePair]) -> None:
        self.drv = drv
        self.queues = queues
        self.expect: dict[tuple[int, int], tuple] = {}
        self.written: dict[int, bytes] = {}
        self.next_write = READ_AREA
        self.n = 0
        for q in queues:
            q.done = CountingDict()

    async def submit(self, *, ring: bool = True) -> None:
        q = self.queues[self.n % len(self.queues)]
        self.n += 1
        nblocks = 8
        length = nblocks * BLOCK
        buf = self.drv.buffer(length)
        p1, p2 = self.drv.prps(buf, length)
        if self.n % 2:
            slba = self.next_write
            self.next_write += nblocks
            data = os.urandom(length)
            self.drv.ram.write(buf, data)
            opcode = IO_WRITE
            self.written[slba] = data
            what = ("w", slba)
        else:
            slba = (self.n * 37) % (READ_AREA - nblocks)
            opcode = IO_READ
            what = ("r", buf, pattern(slba, nblocks))
        entry = SubmissionEntry(opcode, nsid=1, prp1=p1, prp2=p2, cdw10=slba, cdw12=nblocks - 1)
        cid = await self.drv.submit(q, entry, ring=ring)
        self.expect[(q.qid, cid)] = what

    async def finish(self) -> None:
        """Wait for every submitted command; check each completed once and correctly."""
        for (qid, cid), what in self.expect.items():
            c = await self.drv.wait(qid, cid)
            assert c.ok, (qid, cid, what[0], hex(c.status))
            if what[0] == "r":
                assert self.drv.ram.read(what[1], len(what[2])) == what[2], (qid, cid)
        for q in self.queues:
            assert q.done.counts == {cid: 1 for (qid, cid) in self.expect if qid == q.qid}, \
                f"queue {q.qid}: some command completed more than once or never"
            assert not q.outstanding and not q.done

    def check_file(self, path) -> None:
        with open(path, "rb") as f:
            for slba, data in self.written.items():
                f.seek(slba * BLOCK)
                assert f.read(len(data)) == data, f"write at LBA {slba} not in the backing file"


@pytest.mark.parametrize("fmt", ["standard", "opaque"])
async def test_migrate_with_io_in_flight(nvme_pair, backing, fmt):
    drv, src, dst = nvme_pair
    queues = [await drv.create_io_queue_pair(1, 64), await drv.create_io_queue_pair(2, 64)]
    work = Workload(drv, queues)
    for _ in range(16):
        await work.submit()
    for q in queues:
        await drv.reap(q)

    async def guest_keeps_working() -> None:
        # During pre-copy: a burst the source is busy with when it is told to stop, then
        # entries written into the SQs whose doorbell is only rung after the switch-over.
        for _ in range(48):
            await work.submit()
        for q in queues:
            await drv.reap(q)
        for _ in range(8):
            await work.submit(ring=False)

    stats = await mg.migrate(src, dst, fmt=fmt, while_precopy=guest_keeps_working)
    assert stats.format == {"standard": "nvme-ctrl/std/1", "opaque": "opaque/vfu-nvme"}[fmt]
    assert await mg.get_state(src) == MigState.STOP
    assert await mg.get_state(dst) == MigState.RUNNING
    assert stats.dirty_pages > 0, "reads and completions during pre-copy dirtied guest pages"
    await switch_over(drv, dst)
    for q in queues:
        await drv.ring_sq(q.qid, q.sq_tail)
    for _ in range(16):
        await work.submit()
    await work.finish()
    work.check_file(backing)
    # The destination is a fully working controller: admin and I/O on it.
    assert (await drv.identify(1))[4:11] == b"VFU0001"
    data = os.urandom(4096)
    await drv.write(1, 4000, data)
    assert await drv.read(2, 4000, 4096) == data


@pytest.mark.parametrize("fmt", ["standard", "opaque"])
async def test_completions_held_by_a_full_cq_migrate(nvme_pair, fmt):
    """Two SQs on one 4-entry CQ: 3 completions posted, 3 held back; all arrive once."""
    drv, src, dst = nvme_pair
    ram = drv.ram
    cq_base = ram.alloc(4 * 16, 4096)
    ram.write(cq_base, bytes(64))
    await drv.admin(ADMIN_CREATE_CQ, prp1=cq_base, cdw10=3 << 16 | 1, cdw11=1 << 16 | 2 | 1, check=True)
    qs = []
    for qid in (1, 2):
        sq_base = ram.alloc(8 * 64, 4096)
        await drv.admin(ADMIN_CREATE_SQ, prp1=sq_base, cdw10=7 << 16 | qid, cdw11=1 << 16 | 1, check=True)
        q = QueuePair(qid, 8, sq_base, cq_base, 1)
        q.done = CountingDict()
        drv.queues[qid] = q
        qs.append(q)
    cq_view = QueuePair(1, 4, 0, cq_base, 1)  # the shared CQ's head and phase, for reap()
    cids = [(q, await drv.submit(q, SubmissionEntry(IO_FLUSH, nsid=1))) for q in qs for _ in range(3)]
    with trio.fail_after(10):
        while drv.ram.read(cq_base + 2 * 16 + 14, 2)[0] & 1 != 1:
            await trio.sleep(0.01)
    await trio.sleep(0.2)  # the other three complete into the device's hold-back list
    stream = await mg.save(src, fmt=fmt, resume=False)
    _, state = NVME_FORMATS.decode(stream)
    held = {p.cqid: len(p.entries) for p in state.pending}
    assert held == {1: 3}, held
    await mg.load(dst, stream)
    await switch_over(drv, dst)
    with trio.fail_after(10):
        while any(c not in q.done for q, c in cids):
            await drv.reap(cq_view)
            await trio.sleep(0.005)
    for q, cid in cids:
        assert q.done[cid].ok
        assert q.done.counts[cid] == 1
    assert sum(len(q.done) for q in qs) == 6


@pytest.mark.parametrize("other", ["symlink", "memory"])
async def test_standard_stream_into_a_differently_configured_backend(backing, tmp_path, other):
    link = tmp_path / "same-disk-elsewhere.img"
    link.symlink_to(backing)
    dst_args = (("--backing", str(link), "--size", str(SIZE)) if other == "symlink"
                else ("--size", str(SIZE)))
    async with migration_pair("nvme", ("--backing", str(backing), "--size", str(SIZE)), dst_args,
                              ram_size=16 << 20, map_src=False) as (src, dst, ram):
        drv = NvmeTestDriver(src, ram)
        await drv.start(msix_vectors=VECTORS)
        q = await drv.create_io_queue_pair(1, 32)
        data = os.urandom(8192)
        await drv.write(q, 2048, data)
        await mg.migrate(src, dst, fmt="standard")
        await switch_over(drv, dst)
        got = await drv.read(q, 2048, 8192)
        if other == "symlink":
            assert got == data, "same storage through another path"
        fresh = os.urandom(4096)
        await drv.write(q, 3000, fresh)
        assert await drv.read(q, 3000, 4096) == fresh


async def _assert_clean(dst: Client) -> None:
    """As after reset: RUNNING, controller disabled, registers at power-on values."""
    assert await mg.get_state(dst) == MigState.RUNNING
    assert await dst.read32(0, REG_CC) == 0
    assert await dst.read32(0, REG_CSTS) == 0
    assert await dst.read32(0, 0) & 0xFFFF == 1023  # CAP.MQES: still answering


async def test_opaque_into_destination_expecting_standard_is_refused(nvme_pair):
    drv, src, dst = nvme_pair
    await drv.create_io_queue_pair(1, 16)
    stream = await mg.save(src, fmt="opaque")
    await mg.select_format(dst, "standard", incoming=True)
    with pytest.raises(RemoteError) as info:
        await mg.load(dst, stream)
    assert info.value.errno == errno.EINVAL
    await _assert_clean(dst)


@pytest.mark.parametrize("dst_args", [("--size", str(SIZE // 2)), ("--lba-size", "4096")],
                         ids=["size", "lba-size"])
@pytest.mark.parametrize("fmt", ["standard", "opaque"])
async def test_profile_mismatch_is_refused_cleanly(backing, tmp_path, dst_args, fmt):
    other = tmp_path / "other.img"
    async with migration_pair("nvme", ("--backing", str(backing), "--size", str(SIZE)),
                              ("--backing", str(other), "--size", str(SIZE), *dst_args),
                              ram_size=8 << 20, map_src=False) as (src, dst, ram):
        drv = NvmeTestDriver(src, ram)
        await drv.start(msix_vectors=VECTORS)
        await drv.create_io_queue_pair(1, 16)
        writes = 0

        async def count_writes() -> None:
            nonlocal writes
            writes += 1

        with pytest.raises(RemoteError) as info:
            await mg.migrate(src, dst, fmt=fmt, while_precopy=count_writes)
        assert info.value.errno == errno.EINVAL
        await _assert_clean(dst)
        # Refused (for the standard format on the PRE_COPY PROFILE, while the source still ran
        # its guest): migrate() takes the source back to RUNNING.
        assert await mg.get_state(src) == MigState.RUNNING
        assert await drv.read(1, 0, 4096) == pattern(0, 8), "the source carries on"


@pytest.mark.parametrize("damage", ["uuid", "checksum", "truncated", "record-length", "garbage"])
async def test_bad_streams_are_refused_cleanly(nvme_pair, damage):
    drv, src, dst = nvme_pair
    await drv.create_io_queue_pair(1, 16)
    stream = bytearray(await mg.save(src, fmt="standard"))
    if damage == "uuid":
        stream[16] ^= 0xFF
    elif damage == "checksum":
        stream[-9] ^= 0x01
    elif damage == "truncated":
        del stream[len(stream) * 2 // 3:]
    elif damage == "record-length":
        stream[len(stream) - 200] ^= 0x10
    else:
        stream[:] = b"\x00" * 64 + b"junk"
    with pytest.raises(RemoteError) as info:
        await mg.load(dst, bytes(stream))
    assert info.value.errno in (errno.EINVAL, errno.EBADMSG, errno.EPROTO)
    await _assert_clean(dst)


async def test_v1_region_save_and_load(nvme_pair, backing):
    drv, src, dst = nvme_pair
    q = await drv.create_io_queue_pair(1, 32)
    work = Workload(drv, [q])
    for _ in range(10):
        await work.submit()
    # The v1 way: the device stops when SAVING without RUNNING is written.
    await mg.region_set_state(src, mg.V1_SAVING | mg.V1_RUNNING)
    for _ in range(6):
        await work.submit()
    stream = await mg.region_save(src, resume=False)
    assert stream[16:32] == NVME_OPAQUE.uuid.bytes  # the default: opaque first
    await mg.region_load(dst, stream)
    assert await mg.region_get_state(dst) == mg.V1_RUNNING
    await switch_over(drv, dst)
    await work.finish()
    work.check_file(backing)


async def test_standard_stream_decodes_to_the_live_state(nvme_pair):
    drv, src, _ = nvme_pair
    q = await drv.create_io_queue_pair(3, 16)
    await drv.enable_shadow_doorbells()
    await drv.set_feature(0x0B, 0x100)  # async event configuration
    await drv.write(q, 10, bytes(range(256)) * 2)
    stream = await mg.save(src, fmt="standard")
    fmt, state = NVME_FORMATS.decode(stream)
    assert fmt is NVME_STANDARD
    assert [s.qid for s in state.sqs] == [0, 3] and [c.qid for c in state.cqs] == [0, 3]
    sq3 = state.sqs[1]
    assert (sq3.head, sq3.tail, sq3.size, sq3.cqid) == (1, 1, 16, 3)
    assert state.dbbuf.doorbells == drv.shadow_db
    assert state.features.async_event_config == 0x100
    assert state.smart.host_write_commands == 1
    assert state.namespaces[0].nsze == SIZE // BLOCK


# -- mutated streams against a live destination (module-scoped processes) --------------------------


@pytest.fixture(scope="module")
def nvme_streams_and_dst():
    """A rich standard and opaque stream from a real source, and a destination server with the
    same profile, started without trio so every hypothesis example can reconnect."""
    with server_processes("nvme", "--size", "4M") as paths:
        yield _capture_streams(paths[0]), paths[1]


def _capture_streams(src_path: str) -> dict[str, bytes]:
    streams = {}

    async def capture() -> None:
        async with await Client.connect(src_path) as src:
            drv = NvmeTestDriver(src, GuestRam(8 << 20))
            await drv.start(msix_vectors=4)
            q = await drv.create_io_queue_pair(1, 16)
            await drv.enable_shadow_doorbells()
            await drv.write(q, 0, bytes(4096))
            await drv.submit(0, SubmissionEntry(0x0C))  # an outstanding AER
            for fmt in ("standard", "opaque"):
                streams[fmt] = await mg.save(src, fmt=fmt)

    trio.run(capture)
    return streams


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_streams_never_hurt_the_destination(nvme_streams_and_dst, data):
    streams, dst_path = nvme_streams_and_dst
    fmt = data.draw(st.sampled_from(["standard", "opaque"]))
    stream = mutate_stream(data, streams[fmt])

    async def one_example() -> None:
        async with await Client.connect(dst_path) as dst:
            with trio.fail_after(10):
                try:
                    await mg.load(dst, stream)
                except RemoteError as exc:
                    assert exc.errno in (errno.EINVAL, errno.EBADMSG, errno.EPROTO, errno.EFBIG,
                                         errno.E2BIG)
                    await _assert_clean(dst)
                assert await dst.read32(0, 0) & 0xFFFF == 1023

    trio.run(one_example)


async def test_state_loaded_with_vfu_migrate_survives_the_loader(backing, tmp_path):
    """Issue 17 point 9: ``vfu-migrate load`` then, from a later client, ``vfu-migrate save``
    round-trips an enabled controller with queues and features. The loader's disconnect must
    not clear them (spec, Client Disconnection: "the device state should otherwise be
    retained")."""
    import sys

    args = ("--backing", str(backing), "--size", str(SIZE))
    saved, again = tmp_path / "saved.bin", tmp_path / "again.bin"

    async def vfu_migrate(*argv: str) -> None:
        proc = await trio.run_process([sys.executable, "-m", "vfu_server.migration.cli", *argv],
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()

    with trio.fail_after(60):
        async with running_server("nvme", *args) as a, running_server("nvme", *args) as b:
            with GuestRam(8 << 20) as ram:
                async with await Client.connect(a.socket_path) as client:
                    drv = NvmeTestDriver(client, ram)
                    await drv.start(msix_vectors=VECTORS)
                    await drv.create_io_queue_pair(1, 16)
                    await drv.create_io_queue_pair(2, 32, vector=2)
                    assert (await drv.set_feature(0x0F, 30000)).ok  # keep-alive timer
                    assert (await drv.set_feature(0x08, 1 << 8 | 4)).ok  # interrupt coalescing
                    saved.write_bytes(await mg.save(client, fmt="standard"))
            await vfu_migrate("load", "--to", b.socket_path, str(saved))
            await vfu_migrate("save", "--from", b.socket_path, str(again), "--format", "standard")
    _, before = NVME_FORMATS.decode(saved.read_bytes())
    _, after = NVME_FORMATS.decode(again.read_bytes())
    assert after.regs.cc & 1 and after.regs.csts & 1
    assert [q.qid for q in after.sqs] == [0, 1, 2] and [q.qid for q in after.cqs] == [0, 1, 2]
    assert after.features.keep_alive_timer == 30000
    assert (after.regs, after.sqs, after.cqs, after.features) == (before.regs, before.sqs, before.cqs,
                                                                  before.features)
