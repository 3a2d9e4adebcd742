"""Migration of virtio-blk, virtio-net and virtio-rng between two real server processes.

The test is the VMM: both servers see one GuestRam, the driver side (vfu_server.testing.virtio)
keeps the guest's rings in it, and after the switch-over the test points the driver at the
destination and hands it the interrupt eventfds again, as a VMM would.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_virtio_net import ones_complement_sum

from vfu_server.client import Client, GuestRam
from vfu_server.migration import driver as mg
from vfu_server.migration.fsm import MigState
from vfu_server.protocol.constants import IrqIndex
from vfu_server.protocol.errors import RemoteError
from vfu_server.testing import migration_pair, running_server
from vfu_server.testing.fuzz import mutate_stream, server_processes
from vfu_server.testing.virtio import (
    DRIVER_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    DriverQueue,
    Request,
    VirtioDriver,
    init_device,
)

SECTOR = 512
DISK = 4 << 20
T_IN, T_OUT, T_GET_ID = 0, 1, 8
F_FLUSH = 1 << 9
BLK_FEATURES = VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | F_FLUSH
BLK_STD = "ab98460e-85fd-568f-a280-3d7778c1fe09"
NET_STD = "84e4334b-be2e-5a28-90a9-647d5cd08be2"
FORMATS = ["opaque", "standard"]


async def switch_over(dev: VirtioDriver, dst: Client) -> None:
    """After the destination runs: the driver talks to it, and it gets the eventfds."""
    dev.client = dst
    await dst.set_irq_fds(IrqIndex.MSIX, [e.fd for e in dev.vectors])  # lent: the source owns them


# -- virtio-blk ---------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    return path


def _hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


class BlkGuest:
    """Writes of unique data to distinct sectors; every request must complete exactly once."""

    def __init__(self, q: DriverQueue) -> None:
        self.q = q
        self.expected: dict[int, bytes] = {}
        self.submitted: list[Request] = []
        self.done: list[Request] = []
        self.next_sector = 0

    def write(self, nsectors: int = 16) -> Request:
        data = os.urandom(nsectors * SECTOR)
        sector = self.next_sector
        self.next_sector += nsectors
        self.expected[sector] = data
        req = self.q.add([_hdr(T_OUT, sector), data], [1])
        self.submitted.append(req)
        return req

    async def burst(self, n: int, kick: bool = True) -> None:
        for _ in range(n):
            if len(self.q.free) < 3:
                self.done += self.q.reap()
                if len(self.q.free) < 3:
                    break
            self.write()
        if kick:
            await self.q.kick(force=True)

    async def finish(self) -> None:
        outstanding = len(self.submitted) - len(self.done)
        if outstanding:
            self.done += await self.q.wait_used(outstanding, timeout=20)

    def check(self, image: Path) -> None:
        assert len(self.done) == len(self.submitted)
        assert {id(r) for r in self.done} == {id(r) for r in self.submitted}, "lost or repeated"
        assert all(r.data(0)[0] == 0 and r.written == 1 for r in self.done)
        assert self.q.used_idx() == len(self.submitted) & 0xFFFF
        disk = image.read_bytes()
        for sector, data in self.expected.items():
            assert disk[sector * SECTOR : sector * SECTOR + len(data)] == data, sector


@pytest.fixture
async def blk_pair(image):
    async with migration_pair("virtio-blk", ("--backing", str(image), "--serial", "disk-7"),
                              ("--backing", str(image))) as pair:
        yield pair


@pytest.mark.parametrize("fmt", FORMATS)
async def test_blk_migrates_with_io_in_flight(blk_pair, image, fmt):
    src, dst, ram = blk_pair
    dev, (q,) = await init_device(src, ram, BLK_FEATURES, size=128, slot_size=16384)
    guest = BlkGuest(q)
    await guest.burst(20)
    in_flight_at_switch = 0

    async def guest_keeps_writing() -> None:
        nonlocal in_flight_at_switch
        for _ in range(5):
            await guest.burst(8)
            await trio.sleep(0.005)
        await guest.burst(30)  # kicked: the source must finish them before STOP_COPY
        # Made available but not kicked: in flight for the guest, not yet taken by the source
        # (the device finishes requests fast enough that kicked ones rarely stay in flight).
        await guest.burst(10, kick=False)
        guest.done += q.reap()
        in_flight_at_switch = len(guest.submitted) - len(guest.done)

    stats = await mg.migrate(src, dst, fmt=fmt, while_precopy=guest_keeps_writing)
    assert stats.format_uuid == BLK_STD if fmt == "standard" else stats.format.startswith("opaque/")
    assert in_flight_at_switch > 0
    assert await mg.get_state(src) == MigState.STOP
    assert await mg.get_state(dst) == MigState.RUNNING
    await switch_over(dev, dst)
    # The guest goes on with the destination: more writes, then a read of what it wrote.
    await guest.burst(40)
    await guest.finish()
    guest.check(image)
    r = q.add([_hdr(T_IN, 0)], [16 * SECTOR, 1])
    ident = q.add([_hdr(T_GET_ID)], [20, 1])
    await q.kick(force=True)
    await q.wait_used(2)
    assert r.data(0) == guest.expected[0] and r.data(1) == b"\0"
    assert ident.data(0).rstrip(b"\0") == b"disk-7", "the serial the guest saw moves with the device"
    assert await dev.status() & DRIVER_OK


async def test_blk_standard_into_differently_configured_destination(image, tmp_path):
    """Another path to the same storage, and no --serial on the destination: both are fine."""
    link = tmp_path / "same-disk.raw"
    link.symlink_to(image)
    async with (
        running_server("virtio-blk", "--backing", str(image)) as a,
        running_server("virtio-blk", "--backing", str(link), "--serial", "other") as b,
        running_server("virtio-blk", "--size", str(2 * DISK)) as c,
        running_server("virtio-blk", "--size", str(DISK)) as d,
        await Client.connect(a.socket_path) as src,
        await Client.connect(b.socket_path) as dst,
        await Client.connect(c.socket_path) as bigger,
        await Client.connect(d.socket_path) as ram_disk,
    ):
        ram = GuestRam(32 << 20)
        for cl in (src, dst, bigger, ram_disk):
            await cl.dma_map(ram)
        dev, (q,) = await init_device(src, ram, BLK_FEATURES, slot_size=16384)
        guest = BlkGuest(q)
        await guest.burst(10)
        await guest.finish()
        stream = await mg.save(src, fmt="standard", resume=False)
        # A disk of another capacity is another device: refused, destination untouched.
        with pytest.raises(RemoteError) as info:
            await mg.load(bigger, stream)
        assert info.value.errno == errno.EINVAL
        assert await mg.get_state(bigger) == MigState.RUNNING
        # A RAM disk of the same capacity is the same device as far as the guest can tell.
        await mg.load(ram_disk, stream, run=False)
        assert await mg.get_state(ram_disk) == MigState.STOP
        await mg.load(dst, stream)
        await switch_over(dev, dst)
        await guest.burst(10)
        await guest.finish()
        guest.check(image)


async def test_blk_opaque_into_destination_expecting_standard_is_refused(blk_pair):
    src, dst, ram = blk_pair
    await init_device(src, ram, BLK_FEATURES)
    stream = await mg.save(src, fmt="opaque")
    await mg.select_format(dst, "standard", incoming=True)
    with pytest.raises(RemoteError) as info:
        await mg.load(dst, stream)
    assert info.value.errno == errno.EINVAL
    await _assert_clean(dst)


async def _assert_clean(dst: Client) -> None:
    """Refused: the destination runs, is reset (status 0) and still answers."""
    assert await mg.get_state(dst) == MigState.RUNNING
    assert await dst.config_read(0, 2) == 0x1AF4
    ram = GuestRam(1 << 20)
    drv = await VirtioDriver.attach(dst, ram, msix=False)
    assert await drv.status() == 0


@pytest.mark.parametrize("damage", ["uuid", "checksum", "truncated", "empty-tail", "garbage", "profile"])
async def test_blk_bad_streams_are_refused_cleanly(blk_pair, damage):
    src, dst, ram = blk_pair
    await init_device(src, ram, BLK_FEATURES)
    stream = bytearray(await mg.save(src, fmt="standard"))
    if damage == "uuid":
        stream[16] ^= 0xFF
    elif damage == "checksum":
        stream[-9] ^= 0x01
    elif damage == "truncated":
        del stream[len(stream) // 2 :]
    elif damage == "empty-tail":
        del stream[-4:]
    elif damage == "profile":
        stream[64 + 16 + 2] ^= 0x01  # PROFILE.device_id of the first envelope
    else:
        stream[:] = b"\x00" * 64 + b"junk"
    with pytest.raises(RemoteError) as info:
        await mg.load(dst, bytes(stream))
    assert info.value.errno in (errno.EINVAL, errno.EBADMSG, errno.EPROTO)
    await _assert_clean(dst)


async def test_blk_v1_region_save_and_load(blk_pair, image):
    src, dst, ram = blk_pair
    dev, (q,) = await init_device(src, ram, BLK_FEATURES, slot_size=16384)
    guest = BlkGuest(q)
    await guest.burst(12)
    stream = await mg.region_save(src, resume=False)  # quiesces: the burst drains first
    assert stream[:8] == b"DEVSTATE"
    await mg.region_load(dst, stream)
    assert await mg.region_get_state(dst) == mg.V1_RUNNING
    await switch_over(dev, dst)
    await guest.burst(12)
    await guest.finish()
    guest.check(image)


async def test_blk_formats_listed(blk_pair):
    src, _, _ = blk_pair
    formats = {f["name"]: f for f in await mg.list_formats(src)}
    assert set(formats) == {"opaque/vfu-virtio-blk", "virtio-blk/std/1"}
    assert formats["virtio-blk/std/1"]["uuid"] == BLK_STD
    assert formats["opaque/vfu-virtio-blk"]["default"]


# -- virtio-net (socket backend; each server has its own connection to the test peer) ----------

HDR = bytes(12)
F_MAC, F_STATUS = 1 << 5, 1 << 16
NET_FEATURES = VIRTIO_F_EVENT_IDX | F_MAC | F_STATUS
MAC = "52:54:00:12:34:56"
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = b"\x02" * 6


def _frame(dst: bytes, src: bytes, seq: int) -> bytes:
    return dst + src + b"\x88\xb5" + struct.pack("<I", seq) + os.urandom(60)


async def _peer_listener(path: str) -> trio.socket.SocketType:
    lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await lsock.bind(path)
    lsock.listen(1)
    return lsock


@pytest.fixture
async def net_pair(tmp_path):
    paths = [str(tmp_path / "peer-src.sock"), str(tmp_path / "peer-dst.sock")]
    listeners = [await _peer_listener(p) for p in paths]
    async with migration_pair("virtio-net", ("--peer", paths[0], "--mac", MAC),
                              ("--peer", paths[1], "--mac", MAC)) as (src, dst, ram):
        with trio.fail_after(10):
            peers = [(await lst.accept())[0] for lst in listeners]
        yield src, dst, ram, peers
        for sock in (*peers, *listeners):
            sock.close()


async def _received(rx: DriverQueue, count: int, timeout: float = 10) -> list[int]:
    seqs = []
    with trio.fail_after(timeout):
        while len(seqs) < count:
            for req in await rx.wait_used(1):
                data = req.data(0)[: req.written]
                assert data[12:18] == GUEST_MAC
                seqs.append(struct.unpack_from("<I", data, 12 + 14)[0])
    return seqs


@pytest.mark.parametrize("fmt", FORMATS)
async def test_net_no_frame_lost_or_duplicated(net_pair, fmt):
    src, dst, ram, (peer_src, peer_dst) = net_pair
    dev, (rx, tx) = await init_device(src, ram, NET_FEATURES, queues=(0, 1), slot_size=2048)
    with trio.fail_after(5):
        while not await dev.config_read(6, 2) & 1:  # link up
            await trio.sleep(0.01)
    for _ in range(48):
        rx.add(in_sizes=[12 + 1518])
    await rx.kick(force=True)
    seen: list[int] = []
    tx_seq = 0

    async def send(n: int) -> None:
        nonlocal tx_seq
        for _ in range(n):
            tx.add([HDR + _frame(PEER_MAC, GUEST_MAC, tx_seq)])
            tx_seq += 1
        await tx.kick(force=True)

    async def peer_counts(sock: trio.socket.SocketType) -> None:
        while True:
            f = await sock.recv(65536)
            if not f:
                return
            seen.append(struct.unpack_from("<I", f, 14)[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_counts, peer_src)
        nursery.start_soon(peer_counts, peer_dst)
        await send(40)
        for i in range(20):  # peer -> guest before the migration
            await peer_src.send(_frame(GUEST_MAC, PEER_MAC, 1000 + i))
        rx_seqs = await _received(rx, 20)

        async def guest_keeps_sending() -> None:
            for _ in range(4):
                await send(10)
                await trio.sleep(0.002)
            await send(40)  # in flight at the switch-over

        await mg.migrate(src, dst, fmt=fmt, while_precopy=guest_keeps_sending)
        await switch_over(dev, dst)
        assert await dev.config_read(6, 2) & 1, "the destination's own backend has a link"
        await send(40)
        with trio.fail_after(10):
            while len(seen) < tx_seq:
                await trio.sleep(0.01)
        # peer -> guest after the migration: the destination uses the receive buffers the
        # guest posted before it (the source used 20 of them)
        for i in range(20, 40):
            await peer_dst.send(_frame(GUEST_MAC, PEER_MAC, 1000 + i))
        rx_seqs += await _received(rx, 20)
        await trio.sleep(0.1)  # a duplicate would show up now
        nursery.cancel_scope.cancel()
    assert sorted(seen) == list(range(tx_seq)), "each transmitted frame reaches the peer once"
    assert rx_seqs == list(range(1000, 1040))
    done = tx.reap()
    assert tx.used_idx() == tx_seq and not tx.outstanding, done


F_GUEST_CSUM, F_GUEST_TSO4 = 1 << 1, 1 << 7
SOL_PACKET, PACKET_VNET_HDR = 263, 15  # linux/socket.h, if_packet.h: a virtio_net_hdr before each frame
HOST_MAC = b"\x02\x00\x00\x00\x00\x09"


def _tcp_gso_frame(payload: bytes, mss: int) -> bytes:
    """A virtio_net_hdr (NEEDS_CSUM, GSO TCPv4) and one TCP segment larger than the MTU, as a
    host stack hands it to a device that does TSO: the checksum field holds the pseudo-header
    sum, the segment is cut into ``mss``-sized pieces by whoever lacks the offload."""
    src, dst = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - ones_complement_sum(ip)) + ip[12:]
    pseudo = ones_complement_sum(src + dst + struct.pack("!BBH", 0, 6, 20 + len(payload)))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 1, 5 << 4, 0x18, 65535, pseudo, 0)
    vnet = struct.pack("<BBHHHH", 1, 1, 54, mss, 34, 16)
    return vnet + GUEST_MAC + HOST_MAC + b"\x08\x00" + ip + tcp + payload


async def _host_sends_gso(ifname: str, rx: DriverQueue, payload: bytes) -> list[tuple[int, int]]:
    """The host side of the TAP sends one 4 KB TCP segment with GSO; returns (GSO type,
    frame length) of what the guest received from it: one whole frame when the TAP was given
    the guest's TSO offload, MTU-sized pieces when it was not."""
    subprocess.run(["ip", "link", "set", ifname, "up"], check=True, capture_output=True)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((ifname, 0))
        sock.send(_tcp_gso_frame(payload, 1000))
    finally:
        sock.close()
    got: list[tuple[int, int]] = []
    received = 0
    with trio.fail_after(10):
        while received < len(payload):
            for req in await rx.wait_used(1):
                data = req.data(0)[: req.written]
                if data[12 + 6 : 12 + 12] != HOST_MAC:
                    continue  # the kernel's own chatter on a link that just came up
                got.append((data[1], len(data) - 12))
                received += len(data) - 12 - 54
    return got


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="TAP devices need root and /dev/net/tun")


@needs_root
@pytest.mark.parametrize("fmt", FORMATS)
async def test_net_tap_offloads_follow_the_guest_to_the_destination(fmt):
    """The destination's TAP starts without offloads; on resume it gets the ones the guest
    negotiated with the source, so a TSO segment from the host still arrives whole."""
    names = [f"vfum{os.getpid() % 100000}{end}" for end in "sd"]
    async with migration_pair("virtio-net", ("--tap", names[0], "--mac", MAC),
                              ("--tap", names[1], "--mac", MAC)) as (src, dst, ram):
        dev, (rx, _tx) = await init_device(src, ram, NET_FEATURES | F_GUEST_CSUM | F_GUEST_TSO4,
                                           queues=(0, 1), size=16, slot_size=72 << 10)
        assert dev.features & F_GUEST_TSO4
        for _ in range(16):
            rx.add(in_sizes=[12 + 65550])
        await rx.kick(force=True)
        payload = os.urandom(4000)
        assert await _host_sends_gso(names[0], rx, payload) == [(1, 4054)], "the test's frame, on the source"
        await mg.migrate(src, dst, fmt=fmt)
        await switch_over(dev, dst)
        assert await _host_sends_gso(names[1], rx, payload) == [(1, 4054)]


async def test_net_destination_with_another_mac_is_refused(net_pair, tmp_path):
    """The configured MAC is part of the profile (config space the guest read): refused."""
    src, _, ram, _ = net_pair
    await init_device(src, ram, NET_FEATURES, queues=(0, 1))
    lsock = await _peer_listener(str(tmp_path / "peer-other.sock"))
    async with (
        running_server("virtio-net", "--peer", str(tmp_path / "peer-other.sock"),
                       "--mac", "52:54:00:12:34:57") as c,
        await Client.connect(c.socket_path) as other,
    ):
        await other.dma_map(ram)
        for fmt in FORMATS:
            stream = await mg.save(src, fmt=fmt)
            with pytest.raises(RemoteError) as info:
                await mg.load(other, stream)
            assert info.value.errno == errno.EINVAL
            await _assert_clean(other)
    lsock.close()


async def test_net_driver_filters_move(net_pair):
    """The control-queue state (RX mode, MAC, MAC table, pairs) moves in the standard format."""
    src, dst, ram, _ = net_pair
    f_ctrl = (1 << 17) | (1 << 18) | (1 << 23)
    dev, (_rx, _tx, cq) = await init_device(src, ram, NET_FEATURES | f_ctrl, queues=(0, 1, 2))

    async def ctrl(cls: int, cmd: int, data: bytes) -> int:
        req = cq.add([bytes([cls, cmd]) + data], [1])
        await cq.kick(force=True)
        await cq.wait_used()
        return req.data(0)[0]

    assert await ctrl(0, 0, b"\x00") == 0  # promiscuous off
    assert await ctrl(1, 1, bytes.fromhex("52540000abcd")) == 0  # MAC_ADDR_SET
    table = struct.pack("<I", 1) + bytes.fromhex("020000000001") + struct.pack("<I", 0)
    assert await ctrl(1, 0, table) == 0
    await mg.migrate(src, dst, fmt="standard")
    await switch_over(dev, dst)
    mac = await dev.config_read(0, 4) | await dev.config_read(4, 2) << 32
    assert mac.to_bytes(6, "little") == bytes.fromhex("52540000abcd")
    assert await ctrl(4, 0, struct.pack("<H", 1)) == 0, "the control queue works on the destination"


# -- virtio-rng ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_rng_still_returns_data_after_migration(fmt):
    async with migration_pair("virtio-rng", ram_size=8 << 20) as (src, dst, ram):
        dev, (q,) = await init_device(src, ram, VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC)
        before = [q.add(in_sizes=[64]) for _ in range(4)]
        await q.kick(force=True)
        await q.wait_used(4)
        pending = [q.add(in_sizes=[32]) for _ in range(3)]  # available, not kicked: taken later
        stats = await mg.migrate(src, dst, fmt=fmt)
        assert stats.format == ("virtio-rng/std/1" if fmt == "standard" else "opaque/vfu-virtio-rng")
        await switch_over(dev, dst)
        after = [q.add(in_sizes=[48], indirect=True) for _ in range(2)]
        await q.kick(force=True)
        done = await q.wait_used(5)
        assert {id(r) for r in done} == {id(r) for r in pending + after}
        for r in before + pending + after:
            assert r.written == r.inbufs[0].length and r.data(0) != b"\xa5" * r.written
        assert q.used_idx() == 9


# -- mutated streams never hurt the destination --------------------------------------------------


@pytest.fixture(scope="module")
def blk_server_paths():
    """Two virtio-blk servers for the whole module (hypothesis examples reconnect to them)."""
    with server_processes("virtio-blk", "--size", "1M") as paths:
        yield paths


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_streams_never_hurt_the_destination(blk_server_paths, data):
    src_path, dst_path = blk_server_paths
    fmt = data.draw(st.sampled_from(FORMATS))

    async def one_example() -> None:
        async with await Client.connect(src_path) as src, await Client.connect(dst_path) as dst:
            ram = GuestRam(4 << 20)
            await src.dma_map(ram)
            await dst.dma_map(ram)
            await init_device(src, ram, BLK_FEATURES, size=16)
            stream = mutate_stream(data, await mg.save(src, fmt=fmt))
            with trio.fail_after(10):
                try:
                    await mg.load(dst, stream)
                except RemoteError as exc:
                    assert exc.errno in (errno.EINVAL, errno.EBADMSG, errno.EPROTO, errno.EFBIG, errno.E2BIG)
                    await _assert_clean(dst)
                assert await mg.get_state(dst) == MigState.RUNNING
                assert await dst.config_read(0, 2) == 0x1AF4

    trio.run(one_example)
