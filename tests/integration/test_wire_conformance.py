"""DEVICE_FEATURE, MIG_DATA_READ and MIG_DATA_WRITE as QEMU's docs/interop/vfio-user.rst defines
them (issue 17, points 1-4, 6, 8 and 10), checked twice: with raw messages on a socket to a
real ``vfu-server example`` process, and through the project's client.

Each test quotes the sentence of the spec it pins.
"""

from __future__ import annotations

import errno
import struct
import sys

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import RawConn

from vfu_server.client import Client, GuestRam
from vfu_server.migration import driver as mg
from vfu_server.migration.fsm import MigState
from vfu_server.protocol import messages as m
from vfu_server.protocol.constants import Command, Feature, FeatureFlags
from vfu_server.protocol.negotiation import client_offer
from vfu_server.testing import running_server
from vfu_server.testing.fuzz import server_processes

TIMEOUT = 30
GET, SET, PROBE = FeatureFlags.GET, FeatureFlags.SET, FeatureFlags.PROBE
STATE = struct.Struct("<Ii")


@pytest.fixture
async def server():
    async with running_server("example") as srv:
        yield srv
        assert srv.process.returncode is None, srv.stderr()


@pytest.fixture
async def raw(server):
    conn = await RawConn.connect(server.socket_path)
    await conn.negotiate()
    yield conn
    conn.close()


class Ids:
    def __init__(self) -> None:
        self.n = 100

    def __call__(self) -> int:
        self.n += 1
        return self.n


async def feature(conn: RawConn, ids: Ids, payload: bytes):
    return await conn.request(ids(), Command.DEVICE_FEATURE, payload)


async def set_state(conn: RawConn, ids: Ids, state: MigState, data_fd: int = -1) -> None:
    reply = await feature(conn, ids, struct.pack("<II", 16, Feature.MIG_DEVICE_STATE | SET) + STATE.pack(state, data_fd))
    assert not reply.is_error, reply.error


# --------------------------------------------------------------------------------------------
# points 1 and 6: DEVICE_FEATURE replies


async def test_set_and_probe_replies_echo_the_request(raw) -> None:
    """Spec, DEVICE_FEATURE Reply: "The reply payload must be the same as the request payload
    for setting or probing a feature." DMA_LOGGING_STOP with its 16-byte control (24 bytes in
    all, as libvfio-user's client sends it) comes back as those 24 bytes, not 8."""
    ids = Ids()
    with trio.fail_after(TIMEOUT):
        control = struct.pack("<QII", 4096, 1, 0) + struct.pack("<QQ", 0, 1 << 20)
        start = struct.pack("<II", 8 + len(control), Feature.DMA_LOGGING_START | SET) + control
        reply = await feature(raw, ids, start)
        assert not reply.is_error and bytes(reply.payload) == start
        stop = struct.pack("<II", 24, Feature.DMA_LOGGING_STOP | SET) + control[:16]
        reply = await feature(raw, ids, stop)
        assert not reply.is_error and len(reply.payload) == 24 and bytes(reply.payload) == stop
        for index in (Feature.MIGRATION, Feature.DMA_LOGGING_START, Feature.MIG_FORMATS):
            probe = struct.pack("<II", 8, index | PROBE | (SET if index == Feature.DMA_LOGGING_START else GET))
            reply = await feature(raw, ids, probe)
            assert not reply.is_error and bytes(reply.payload) == probe
        # MIG_DEVICE_STATE SET: the request's own data_fd comes back, not one of ours.
        state = struct.pack("<II", 16, Feature.MIG_DEVICE_STATE | SET) + STATE.pack(MigState.STOP, 0)
        reply = await feature(raw, ids, state)
        assert bytes(reply.payload) == state
        await set_state(raw, ids, MigState.RUNNING)


async def test_set_whose_argsz_cannot_hold_the_echo_is_refused(raw) -> None:
    """Spec, Message sizes: argsz "defines the maximum expected reply payload size"; a SET reply
    is the request again, so an argsz below the request's size is EINVAL, and the server goes on."""
    ids = Ids()
    with trio.fail_after(TIMEOUT):
        short = struct.pack("<II", 8, Feature.MIG_DEVICE_STATE | SET) + STATE.pack(MigState.STOP, -1)
        reply = await feature(raw, ids, short)
        assert reply.is_error and reply.error == errno.EINVAL
        get = struct.pack("<II", 16, Feature.MIG_DEVICE_STATE | GET)
        reply = await feature(raw, ids, get)
        assert STATE.unpack_from(reply.payload, 8)[0] == MigState.RUNNING


async def test_get_reply_argsz_is_the_size_needed(raw) -> None:
    """Spec, DEVICE_FEATURE Reply: "For getting a feature's data, the data is added in the data
    section and its length is added to argsz"; Message sizes: "In a reply, the server sets argsz
    field to the size needed for a full payload size. ... This may be larger than the requested
    maximum size: in that case, the full payload is not included in the reply"."""
    ids = Ids()
    with trio.fail_after(TIMEOUT):
        # MIGRATION's data is 8 bytes: argsz 16 whatever the request offered.
        reply = await feature(raw, ids, struct.pack("<II", 4096, Feature.MIGRATION | GET))
        assert len(reply.payload) == 16 and struct.unpack_from("<I", reply.payload)[0] == 16
        # The format list does not fit in 16: argsz says how much it needs, no data.
        reply = await feature(raw, ids, struct.pack("<II", 16, Feature.MIG_FORMATS | GET))
        needed, flags = struct.unpack("<II", reply.payload)
        assert len(reply.payload) == 8 and flags == Feature.MIG_FORMATS | GET
        count = 2  # the example device: opaque and standard
        assert needed == 8 + 8 + 64 * count
        reply = await feature(raw, ids, struct.pack("<II", needed, Feature.MIG_FORMATS | GET))
        assert len(reply.payload) == needed and struct.unpack_from("<I", reply.payload)[0] == needed


async def test_dirty_report_too_large_for_argsz_keeps_the_dirty_pages(server) -> None:
    """A DMA_LOGGING_REPORT reply that does not fit goes back without the bitmap, and the report,
    which clears what it reports, has not happened: the client's retry still sees the pages."""
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            with GuestRam(1 << 20) as ram:
                await c.dma_map(ram)
                await c.enable_bus_master()
                await c.feature(Feature.DMA_LOGGING_START, set=True,
                                data=struct.pack("<QII", 4096, 1, 0) + struct.pack("<QQ", 0, 1 << 20))
                ram.write(0x1000, b"dirty")
                for reg, value in ((0x08, 0x1000), (0x0C, 0), (0x10, 0x3000), (0x14, 0), (0x18, 5), (0x1C, 1)):
                    await c.write32(0, reg, value)
                request = struct.pack("<QQQ", 0, 1 << 20, 4096)
                raw = await c.request(Command.DEVICE_FEATURE,
                                      m.DeviceFeature(Feature.DMA_LOGGING_REPORT | GET, request, argsz=8 + 24).pack())
                assert struct.unpack_from("<I", raw.payload)[0] == 8 + 24 + 256 // 64 * 8
                assert len(raw.payload) == 8
                bitmap = await c.feature(Feature.DMA_LOGGING_REPORT, get=True, data=request, argsz=8 + 24)
                assert len(bitmap) == 24 + 32 and bitmap[24] == 1 << 3  # page 3 (0x3000) is dirty


async def test_client_get_asks_again_with_the_size_needed(server) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            data = await c.feature(Feature.MIG_FORMATS, get=True, argsz=16)
            count, entry, _ = struct.unpack_from("<HHI", data)
            assert (count, entry) == (2, 64) and len(data) == 8 + 64 * count
            # Through the client too, a SET comes back as it went (point 1).
            control = struct.pack("<QII", 4096, 0, 0)
            assert await c.feature(Feature.DMA_LOGGING_START, set=True, data=control) == control
            assert await c.feature(Feature.DMA_LOGGING_STOP, set=True, data=control) == control


# --------------------------------------------------------------------------------------------
# points 2, 3, 4, 8: MIG_DATA_READ / MIG_DATA_WRITE


async def test_mig_data_read_reply_and_argsz_rule(raw) -> None:
    """Spec, MIG_DATA_READ: request "*argsz* is the maximum size of the reply payload"; reply
    "*argsz* is the size of the above structure, including the size of the data" and "*size*
    ... If this is less than the requested size, there is no more migration data to read".
    The message itself is 8 + the requested size, zero-padded after the data, as libvfio-user's
    server sends it (its client reads exactly that many bytes and drops a shorter reply)."""
    ids = Ids()
    with trio.fail_after(TIMEOUT):
        await set_state(raw, ids, MigState.STOP_COPY)
        # argsz 8, as the old client sent it: refused, and the stream is untouched.
        reply = await raw.request(ids(), Command.MIG_DATA_READ, struct.pack("<II", 8, 64))
        assert reply.is_error and reply.error == errno.EINVAL
        reply = await raw.request(ids(), Command.MIG_DATA_READ, struct.pack("<II", 8 + 63, 64))
        assert reply.is_error and reply.error == errno.EINVAL
        stream = bytearray()
        reads = 0
        while True:
            reply = await raw.request(ids(), Command.MIG_DATA_READ, m.MigData.read_request(100))
            assert not reply.is_error
            argsz, size = struct.unpack_from("<II", reply.payload)
            assert argsz == 8 + size and size <= 100 and len(reply.payload) == 8 + 100
            assert not any(reply.payload[argsz:])
            stream += reply.payload[8:argsz]
            reads += 1
            if size < 100:
                break
        assert reads > 2 and stream.startswith(b"DEVSTATE")
        await set_state(raw, ids, MigState.RUNNING)


async def test_read_over_the_transfer_limit_is_refused_not_cut_short(server) -> None:
    """A reply shorter than asked ends the stream ("If this is less than the requested size,
    there is no more migration data to read"), so a read larger than the negotiated
    max_data_xfer_size is refused with EINVAL instead of being answered short."""
    ids = Ids()
    with trio.fail_after(TIMEOUT):
        conn = await RawConn.connect(server.socket_path)
        try:
            reply = await conn.request(0, Command.VERSION, client_offer(max_data_xfer_size=4096).pack())
            assert m.Version.unpack(reply.payload).capabilities["max_data_xfer_size"] == 4096
            await set_state(conn, ids, MigState.STOP_COPY)
            reply = await conn.request(ids(), Command.MIG_DATA_READ, m.MigData.read_request(4097))
            assert reply.is_error and reply.error == errno.EINVAL
            reply = await conn.request(ids(), Command.MIG_DATA_READ, m.MigData.read_request(4096))
            assert not reply.is_error and reply.payload[8:16] == b"DEVSTATE"
            await set_state(conn, ids, MigState.RUNNING)
        finally:
            conn.close()


async def test_save_with_a_small_transfer_limit_keeps_every_byte(tmp_path) -> None:
    """The case of issue 17 point 3: a client that offered 1,024 bytes saves the whole NVMe
    stream (several 1,024-byte reads; it used to keep the first limit's worth) and another server
    loads it."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    args = ("--backing", str(disk), "--size", str(1 << 20))
    with trio.fail_after(TIMEOUT):
        async with running_server("nvme", *args) as srv:
            async with await Client.connect(srv.socket_path) as big:
                full = await mg.save(big, fmt="standard")
            async with await Client.connect(srv.socket_path, max_data_xfer_size=1024) as small:
                assert small.max_transfer == 1024
                stream = await mg.save(small, fmt="standard", chunk=64 * 1024)
        assert len(stream) == len(full) > 2 * 1024
        async with running_server("nvme", *args) as other, await Client.connect(other.socket_path) as dst:
            await mg.load(dst, stream)


async def test_mig_data_write_reply_has_no_payload(raw, server) -> None:
    """Spec, MIG_DATA_WRITE Reply: "There is no reply payload for this message." """
    ids = Ids()
    with trio.fail_after(TIMEOUT):
        async with running_server("example") as src_srv, await Client.connect(src_srv.socket_path) as src:
            stream = await mg.save(src)
        await set_state(raw, ids, MigState.RESUMING)
        for pos in range(0, len(stream), 1000):
            chunk = stream[pos : pos + 1000]
            reply = await raw.request(ids(), Command.MIG_DATA_WRITE, m.MigData(len(chunk), chunk).pack())
            assert not reply.is_error and len(reply.payload) == 0
        await set_state(raw, ids, MigState.RUNNING)


# --------------------------------------------------------------------------------------------
# point 10: the destination's reason reaches the client


async def test_refusal_reason_in_band(raw) -> None:
    """A spec client sees the errno of the refused MIG_DATA_WRITE (EBADMSG: the bytes are not
    a stream); the reason itself is one DEVICE_FEATURE GET away (vendor index 0xF103)."""
    ids = Ids()
    with trio.fail_after(TIMEOUT):
        reply = await feature(raw, ids, struct.pack("<II", 8 + 8 + 1024, Feature.MIG_LAST_ERROR | GET))
        assert struct.unpack_from("<iI", reply.payload, 8) == (0, 0)
        await set_state(raw, ids, MigState.RESUMING)
        junk = b"\x00" * 64 + b"junk"
        reply = await raw.request(ids(), Command.MIG_DATA_WRITE, m.MigData(len(junk), junk).pack())
        assert reply.is_error and reply.error == errno.EBADMSG
        reply = await feature(raw, ids, struct.pack("<II", 8 + 8 + 1024, Feature.MIG_LAST_ERROR | GET))
        code, length = struct.unpack_from("<iI", reply.payload, 8)
        reason = bytes(reply.payload[16 : 16 + length]).decode()
        assert code == errno.EBADMSG and "bad magic" in reason
        assert struct.unpack_from("<I", reply.payload)[0] == 16 + length == len(reply.payload)


async def test_load_raises_the_reason_and_vfu_migrate_prints_it(server, tmp_path) -> None:
    with trio.fail_after(TIMEOUT):
        async with await Client.connect(server.socket_path) as c:
            with pytest.raises(mg.MigrationRefused) as info:
                await mg.load(c, b"\x00" * 64 + b"junk")
            assert info.value.errno == errno.EBADMSG
            assert "bad magic" in info.value.reason and "bad magic" in str(info.value)
            assert await mg.get_state(c) == MigState.RUNNING
        junk = tmp_path / "junk.bin"
        junk.write_bytes(b"\x00" * 64 + b"junk")
        proc = await trio.run_process([sys.executable, "-m", "vfu_server.migration.cli", "load", "--to",
                                       server.socket_path, str(junk)],
                                      capture_stdout=True, capture_stderr=True, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1
        assert "vfu-migrate: destination refused the stream: bad magic, not a DEVSTATE stream (EBADMSG)" in err


# --------------------------------------------------------------------------------------------
# the same rules for any argsz, size and flags a client may send


@pytest.fixture(scope="module")
def one_server_path():
    with server_processes("example", count=1) as paths:
        yield paths[0]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(reads=st.lists(st.tuples(st.integers(0, 3 * 4096), st.integers(0, 3 * 4096)), min_size=1, max_size=6),
       features=st.lists(st.tuples(st.sampled_from([1, 2, 6, 7, 8, 0xF100, 0xF101, 0xF102, 0xF103, 0x1234]),
                                   st.sampled_from([GET, SET, PROBE, PROBE | GET, PROBE | SET]),
                                   st.integers(0, 600), st.binary(max_size=48)), max_size=6))
def test_any_request_gets_a_reply_by_the_rules(one_server_path, reads, features):
    """Whatever argsz, size and flags arrive: MIG_DATA_READ is refused (EINVAL) when argsz <
    8 + size or size exceeds the negotiated limit, else its reply's argsz is 8 + the bytes in
    it, never more than asked (the message padded to 8 + size); a DEVICE_FEATURE SET/PROBE reply is the request, a GET reply's
    argsz is the size of its payload, or the payload is 8 bytes saying how much is needed; and
    the server keeps serving."""

    async def one_example() -> None:
        conn = await RawConn.connect(one_server_path)
        try:
            reply = await conn.request(0, Command.VERSION, client_offer(max_data_xfer_size=4096).pack())
            assert not reply.is_error
            ids = Ids()
            for index, op, argsz, data in features:
                if index == Feature.MIG_DEVICE_STATE and op & SET:
                    continue  # state changes are the other tests' business
                payload = struct.pack("<II", argsz, index | op) + data
                reply = await feature(conn, ids, payload)
                if reply.is_error:
                    continue
                if op & (SET | PROBE):
                    assert bytes(reply.payload) == payload
                else:
                    stated = struct.unpack_from("<I", reply.payload)[0]
                    assert stated == len(reply.payload) or (len(reply.payload) == 8 and stated > argsz)
                    assert len(reply.payload) <= max(argsz, 8)
            await set_state(conn, ids, MigState.STOP_COPY)
            for argsz, size in reads:
                reply = await conn.request(ids(), Command.MIG_DATA_READ, struct.pack("<II", argsz, size))
                if argsz < 8 + size or size > 4096:
                    assert reply.is_error and reply.error == errno.EINVAL
                    continue
                assert not reply.is_error
                stated, got = struct.unpack_from("<II", reply.payload)
                assert stated == 8 + got and got <= size and len(reply.payload) == 8 + size
                assert not any(reply.payload[stated:])
            await set_state(conn, ids, MigState.RUNNING)
        finally:
            conn.close()

    trio.run(one_example)
