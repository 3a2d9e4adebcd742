"""virtio-net through the vfio-user client: socket peers (no privileges) and TAP in a netns."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from vfu_server.client import Client, GuestRam
from vfu_server.testing.process import running_server
from vfu_server.testing.virtio import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    DriverQueue,
    VirtioDriver,
    init_device,
)

HDR = bytes(12)
F_MAC, F_STATUS, F_CTRL_VQ, F_CTRL_RX, F_MQ, F_CTRL_MAC_ADDR = 1 << 5, 1 << 16, 1 << 17, 1 << 18, 1 << 22, 1 << 23
ALL = VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | F_MAC | F_STATUS | F_CTRL_VQ | F_CTRL_RX | F_MQ | F_CTRL_MAC_ADDR
GUEST_MAC = bytes.fromhex("525400123456")
F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_HOST_TSO4, F_MRG_RXBUF = 1 << 0, 1 << 1, 1 << 7, 1 << 11, 1 << 15
OFFLOADS = F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_HOST_TSO4 | 1 << 8 | 1 << 9 | 1 << 12 | 1 << 13
REPO = Path(__file__).resolve().parents[2]


def frame(dst: bytes, src: bytes, n: int, size: int = 200) -> bytes:
    body = struct.pack("<I", n) + os.urandom(size - 4)
    return dst + src + b"\x88\xb5" + body  # local experimental ethertype


def fill_rx(q: DriverQueue, count: int) -> None:
    for _ in range(count):
        q.add(in_sizes=[12 + 1518])


async def ctrl(q: DriverQueue, cls: int, cmd: int, data: bytes) -> int:
    req = q.add([bytes([cls, cmd]) + data], [1])
    await q.kick()
    await q.wait_used()
    return req.data(0)[0]


async def setup_net(client: Client, pairs: int = 1, *, features: int = ALL,
                    slot_size: int = 2048) -> tuple[VirtioDriver, list[DriverQueue]]:
    ram = GuestRam(64 << 20)
    await client.dma_map(ram)
    return await init_device(client, ram, features, queues=range(2 * pairs + 1), slot_size=slot_size)


@asynccontextmanager
async def peer_device(tmp_path: Path, *args: str) -> AsyncIterator[tuple[Any, Client, Any, Any]]:
    """A virtio-net server whose peer is the test's own SOCK_SEQPACKET listener: (server,
    client, connected peer socket, listener). Closing the listener keeps the device from
    connecting again."""
    path = str(tmp_path / "peer.sock")
    lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await lsock.bind(path)
        lsock.listen(1)
        async with running_server("virtio-net", "--peer", path, *args) as srv, \
                await Client.connect(srv.socket_path) as client:
            with trio.fail_after(10):
                peer, _ = await lsock.accept()
            try:
                yield srv, client, peer, lsock
            finally:
                peer.close()
    finally:
        lsock.close()


async def send_as_one_burst(srv: Any, peer: Any, frames: list[bytes]) -> None:
    """The frames wait in the socket while the server is stopped: it finds them all at once."""
    os.kill(srv.process.pid, signal.SIGSTOP)
    try:
        for f in frames:
            await peer.send(f)
    finally:
        os.kill(srv.process.pid, signal.SIGCONT)


async def test_socket_peer_frames_both_ways(tmp_path: Path) -> None:
    async with peer_device(tmp_path, "--mac", "52:54:00:12:34:56") as (_srv, client, peer, lsock):
        dev, (rx, tx, cq) = await setup_net(client)
        assert await dev.config_read(0, 4) | await dev.config_read(4, 2) << 32 == int.from_bytes(GUEST_MAC, "little")
        with trio.fail_after(5):
            while not await dev.config_read(6, 2) & 1:  # link up
                await trio.sleep(0.01)
        assert await dev.config_read(8, 2) == 1  # max_virtqueue_pairs
        assert await dev.device_features() & OFFLOADS == 0  # a socket peer moves bare frames
        assert await ctrl(cq, 0, 0, b"\x00") == 0  # promiscuous off
        assert await ctrl(cq, 4, 0, struct.pack("<H", 2)) == 1  # more pairs than exist
        # guest -> peer, many frames through a 256-entry ring
        sent = [frame(b"\x02" * 6, GUEST_MAC, i) for i in range(300)]
        got: list[bytes] = []

        async def collect() -> None:
            while len(got) < len(sent):
                got.append(await peer.recv(65536))

        async with trio.open_nursery() as n:
            n.start_soon(collect)
            for i in range(0, len(sent), 50):
                for f in sent[i : i + 50]:
                    tx.add([HDR + f])
                await tx.kick()
                await tx.wait_used(50)
        assert got == sent
        # peer -> guest: filtered by MAC; more frames than receive buffers (no loss)
        incoming = [frame(GUEST_MAC, b"\x02" * 6, i) for i in range(200)]
        noise = frame(b"\x02\x00\x00\x00\x00\x09", b"\x02" * 6, 999)
        fill_rx(rx, 64)
        await rx.kick()
        received: list[bytes] = []
        async with trio.open_nursery() as n:

            async def send_all() -> None:
                for i, f in enumerate(incoming):
                    await peer.send(f)
                    if i == 10:
                        await peer.send(noise)

            n.start_soon(send_all)
            with trio.fail_after(20):
                while len(received) < len(incoming):
                    for req in await rx.wait_used(1):
                        data = req.data(0)[: req.written]
                        assert data[:12] == bytes(10) + b"\x01\x00"  # num_buffers = 1
                        received.append(data[12:])
                    fill_rx(rx, len(rx.free))
                    await rx.kick()
        assert received == incoming  # no loss, no duplicates, in order, noise filtered
        lsock.close()  # else the device reconnects at once
        peer.close()
        with trio.fail_after(5):
            while await dev.config_read(6, 2) & 1:  # peer left: link down
                await trio.sleep(0.01)


async def test_frames_right_after_driver_ok_wait_for_the_receive_pump(tmp_path: Path) -> None:
    """Frames that arrive once the driver is ready but before the device's receive task has
    run are held, not dropped (they were dropped, 'send is None', in most second and later
    runs of test_virtio_migration's net test). Each round resets the device, so its receive
    task starts anew while the frames are already on their way."""
    async with peer_device(tmp_path) as (_srv, client, peer, _):
        ram = GuestRam(64 << 20)
        await client.dma_map(ram)
        for round_ in range(6):
            _dev, (rx, _tx) = await init_device(client, ram, F_MAC | F_STATUS, queues=(0, 1), slot_size=2048)
            fill_rx(rx, 24)
            incoming = [frame(GUEST_MAC, b"\x02\x00\x00\x00\x00\x07", 100 * round_ + i) for i in range(20)]
            kick = rx.kick(force=True)
            for f in incoming:
                await peer.send(f)
            await kick
            done: list = []
            with trio.fail_after(10):
                while len(done) < 20:
                    done += await rx.wait_used(1)
            assert [req.data(0)[12 : req.written] for req in done] == incoming, f"round {round_}"


async def test_received_burst_gets_one_interrupt(tmp_path: Path) -> None:
    """Frames already queued at the backend reach the guest as one batch: one used-index
    update and one interrupt, not one per frame (without EVENT_IDX each update interrupts)."""
    async with peer_device(tmp_path) as (srv, client, peer, _):
        dev, (rx, _tx, _cq) = await setup_net(client, features=F_MAC | F_STATUS | F_CTRL_VQ)
        fill_rx(rx, 32)
        await rx.kick()
        irq = dev.vectors[rx.vector]
        await trio.sleep(0.2)  # the kick's pass is over: nothing more to signal
        irq.count()
        incoming = [frame(b"\x02" * 6, b"\x02\x00\x00\x00\x00\x07", i) for i in range(16)]
        await send_as_one_burst(srv, peer, incoming)
        done: list = []
        with trio.fail_after(10):
            while len(done) < 16:  # reaped by looking, so that the eventfd keeps its count
                await trio.sleep(0.01)
                done += rx.reap()
        assert [req.data(0)[12 : req.written] for req in done] == incoming
        n_irq = irq.count()
        assert n_irq <= 2  # one per frame before bursts


async def test_a_burst_over_two_receive_queues_reaches_both(tmp_path: Path) -> None:
    """Frames of one burst steered to different receive queues are all published, each queue
    with its own used-index update: none waits for a later frame to the same queue."""
    async with peer_device(tmp_path, "--queue-pairs", "2") as (srv, client, peer, _):
        _, qs = await setup_net(client, pairs=2)
        assert await ctrl(qs[4], 4, 0, struct.pack("<H", 2)) == 0
        rx = (qs[0], qs[2])
        for q in rx:
            fill_rx(q, 16)
            await q.kick()
        await trio.sleep(0.2)  # both kicks' passes are over

        # The device steers by a CRC of the addresses: pick sources for both queues, and end
        # the burst with one for receiveq0, so that receiveq1's frames come first.
        def queue_of(src: bytes) -> int:
            return zlib.crc32(GUEST_MAC + src) % 2

        sources = [bytes([2, 0, 0, 0, 0, i]) for i in range(1, 64)]
        to_q1 = [s for s in sources if queue_of(s) == 1][:3]
        to_q0 = [s for s in sources if queue_of(s) == 0][:3]
        incoming = [frame(GUEST_MAC, src, i) for i, src in enumerate(to_q1 + to_q0)]
        await send_as_one_burst(srv, peer, incoming)
        got: list[list[bytes]] = [[], []]
        with trio.fail_after(10):
            while sum(map(len, got)) < len(incoming):
                await trio.sleep(0.01)
                for i, q in enumerate(rx):
                    got[i] += [r.data(0)[12 : r.written] for r in q.reap()]
        assert got == [incoming[3:], incoming[:3]]


@pytest.mark.parametrize("poll_us", ["1000000", "0"])
async def test_transmit_polling(tmp_path: Path, poll_us: str) -> None:
    """``--poll-us``: a transmit queue that ran dry is watched for a while, and a driver that
    sends again within the window needs no kick; without it every frame kicks."""
    async with peer_device(tmp_path, "--poll-us", poll_us) as (_srv, client, peer, _):
        # Without EVENT_IDX only the polling device's VIRTQ_USED_F_NO_NOTIFY spares a kick, so
        # the count does not depend on how fast the device went back to sleep.
        _dev, (_rx, tx, _cq) = await setup_net(client, features=ALL & ~VIRTIO_F_EVENT_IDX)
        frames = [frame(b"\x02" * 6, GUEST_MAC, i) for i in range(80)]
        for f in frames[:40]:  # the window doubles from 16 us to past this client's turn-around
            tx.add([HDR + f])
            await tx.kick()
            await tx.wait_used()
        before = tx.kicks
        for f in frames[40:]:
            tx.add([HDR + f])
            await tx.kick()
            await tx.wait_used()
        with trio.fail_after(10):
            got = [await peer.recv(65536) for _ in frames]
        assert got == frames
        if poll_us == "0":
            assert tx.kicks - before == 40
        else:
            assert tx.kicks - before < 10  # a poll that timed out on a hiccup of this machine kicks


async def test_two_devices_linked(tmp_path: Path) -> None:
    path = str(tmp_path / "link.sock")
    async with running_server("virtio-net", "--peer", path, "--listen", "--queue-pairs", "2") as a, \
            running_server("virtio-net", "--peer", path, "--mac", "52:54:00:12:34:56") as b, \
            await Client.connect(a.socket_path) as ca, await Client.connect(b.socket_path) as cb:
        deva, qa = await setup_net(ca, pairs=2)
        _, qb = await setup_net(cb)
        assert await deva.config_read(8, 2) == 2
        assert await ctrl(qa[4], 4, 0, struct.pack("<H", 2)) == 0
        fill_rx(qb[0], 32)
        await qb[0].kick()
        frames = [frame(GUEST_MAC, b"\x02" * 6, i, 1000) for i in range(20)]
        for f in frames:
            qa[3].add([HDR, f])  # transmitq1, header in its own descriptor
        await qa[3].kick()
        got = [r.data(0)[12 : r.written] for r in await qb[0].wait_used(20)]
        assert got == frames
        # and back: B's frames reach one of A's two receive queues
        for q in (qa[0], qa[2]):
            fill_rx(q, 16)
            await q.kick()
        back = [frame(b"\xff" * 6, GUEST_MAC, i) for i in range(10)]
        for f in back:
            qb[1].add([HDR + f])
        await qb[1].kick()
        seen: list[bytes] = []
        with trio.fail_after(10):
            while len(seen) < 10:
                for q in (qa[0], qa[2]):
                    seen += [r.data(0)[12 : r.written] for r in q.reap()]
                await trio.sleep(0.01)
        assert sorted(seen) == sorted(back)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def ones_complement_sum(data: bytes) -> int:
    """The 16-bit one's complement sum of ``data`` (RFC 1071), folded, not yet inverted."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum(data: bytes) -> int:
    return ~ones_complement_sum(data) & 0xFFFF


def icmp_echo(src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, seq: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0, src_ip, dst_ip)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + icmp


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                                reason="TAP in a netns needs root and iproute2")


@asynccontextmanager
async def tap_server(*args: str) -> AsyncIterator[tuple[str, str]]:
    """``virtio-net --tap vfutap0 ARGS`` inside a new network namespace: (namespace, socket)."""
    ns = f"vfu-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", ns)
    workdir = tempfile.mkdtemp(prefix="vfu-tap-")
    sock = os.path.join(workdir, "net.sock")
    proc = None
    try:
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "vfu_server", "virtio-net",
               "--socket-path", sock, "--tap", "vfutap0", *args]
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, cwd=REPO,
                                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout is not None
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        assert line.startswith(b"listening on"), line
        yield ns, sock
    finally:
        if proc is not None:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def host_side(ns: str, net: int) -> bytes:
    """Address the TAP's side in ``ns`` (10.NET.0.1, the guest 10.NET.0.2 at GUEST_MAC); its MAC."""
    _ip("-n", ns, "addr", "add", f"10.{net}.0.1/24", "dev", "vfutap0")
    _ip("-n", ns, "link", "set", "vfutap0", "up")
    _ip("-n", ns, "neigh", "add", f"10.{net}.0.2", "lladdr", GUEST_MAC.hex(":"), "dev", "vfutap0")
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "vfutap0"], check=True, capture_output=True,
                         text=True).stdout
    return bytes.fromhex(out.split("link/ether ")[1].split()[0].replace(":", ""))


@needs_root
async def test_tap_offloads_offered_and_checked() -> None:
    async with tap_server() as (_ns, sock), await Client.connect(sock) as client:
        ram = GuestRam(16 << 20)
        await client.dma_map(ram)
        dev = await VirtioDriver.attach(client, ram)
        assert await dev.device_features() & OFFLOADS == OFFLOADS
        # TSO needs the matching checksum offload (VIRTIO 1.2 5.1.3.1): refused without it.
        with pytest.raises(AssertionError, match="refused features"):
            await dev.negotiate(F_HOST_TSO4)
        with pytest.raises(AssertionError, match="refused features"):
            await dev.negotiate(F_GUEST_TSO4)
        assert await dev.negotiate(F_CSUM | F_HOST_TSO4 | F_GUEST_CSUM | F_GUEST_TSO4) & OFFLOADS
    async with tap_server("--no-offloads") as (_ns, sock), await Client.connect(sock) as client:
        dev = await VirtioDriver.attach(client, GuestRam(16 << 20))
        assert await dev.device_features() & OFFLOADS == 0


@needs_root
async def test_tap_in_netns_ping() -> None:
    async with tap_server("--mac", "52:54:00:12:34:56") as (ns, sock):
        host_mac = host_side(ns, 77)
        async with await Client.connect(sock) as client:
            _, (rx, tx, cq) = await setup_net(client)
            assert await ctrl(cq, 0, 0, b"\x00") == 0  # promiscuous off: only our MAC + broadcast
            fill_rx(rx, 128)
            await rx.kick()
            replies: dict[int, bytes] = {}
            for seq in range(1, 21):
                payload = os.urandom(1000)
                tx.add([HDR + icmp_echo(GUEST_MAC, host_mac, bytes([10, 77, 0, 2]), bytes([10, 77, 0, 1]), seq,
                                        payload)])
                await tx.kick()
                with trio.fail_after(10):
                    while seq not in replies:
                        for r in await rx.wait_used(1):
                            f = r.data(0)[12 : r.written]
                            if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0:  # ICMP echo reply
                                # GUEST_CSUM not negotiated: flags and GSO type read zero,
                                # whatever the TAP's header said; one buffer
                                assert r.data(0)[:12] == bytes(10) + b"\x01\x00"
                                assert f[:6] == GUEST_MAC
                                assert f[42:] == payload
                                replies[struct.unpack("!H", f[40:42])[0]] = f
                        fill_rx(rx, len(rx.free))
                        await rx.kick()
            assert sorted(replies) == list(range(1, 21))


@needs_root
async def test_tap_mergeable_receive_buffers() -> None:
    """MRG_RXBUF: a frame larger than one receive buffer spreads over several, the first
    header saying how many; the driver puts them back together."""
    async with tap_server("--mac", "52:54:00:12:34:56") as (ns, sock):
        host_mac = host_side(ns, 76)
        async with await Client.connect(sock) as client:
            dev, (rx, tx, cq) = await setup_net(client, features=ALL | F_MRG_RXBUF)
            assert dev.features & F_MRG_RXBUF
            assert await ctrl(cq, 0, 0, b"\x00") == 0
            for _ in range(128):
                rx.add(in_sizes=[256])
            await rx.kick()
            payload = os.urandom(1000)
            tx.add([HDR + icmp_echo(GUEST_MAC, host_mac, bytes([10, 76, 0, 2]), bytes([10, 76, 0, 1]), 1, payload)])
            await tx.kick()
            reply = None
            pending: list = []
            with trio.fail_after(10):
                while reply is None:
                    pending += await rx.wait_used(1)
                    while pending:
                        count = struct.unpack_from("<H", pending[0].data(0), 10)[0]
                        if len(pending) < count:
                            break
                        bufs, pending = pending[:count], pending[count:]
                        data = b"".join(r.data(0)[: r.written] for r in bufs)
                        assert data[:10] == bytes(10)  # no GUEST_CSUM: flags and GSO type zero
                        f = data[12:]
                        if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0:
                            assert count == 5  # 12 + 1042 bytes in 256-byte buffers
                            reply = f
            assert reply[42:] == payload


@needs_root
async def test_tap_bad_transmit_headers_are_dropped() -> None:
    """A guest's virtio-net header goes to the kernel as it is: one that asks for nonsense
    (random flags, GSO types and offsets, frames of any size) is refused there, the frame is
    lost as on a wire, and the device keeps serving."""
    rng = random.Random(7)
    async with tap_server("--mac", "52:54:00:12:34:56") as (ns, sock):
        host_mac = host_side(ns, 75)
        async with await Client.connect(sock) as client:
            _, (rx, tx, _cq) = await setup_net(client, features=ALL | OFFLOADS | F_MRG_RXBUF, slot_size=16384)
            fill_rx(rx, 128)
            await rx.kick()
            for i in range(300):
                header = bytes(rng.getrandbits(8) for _ in range(12))
                body = rng.randbytes(rng.choice([0, 1, 13, 60, 1500, 9000, 16000 - 12]))
                tx.add([header + body])
                if i % 50 == 49:
                    await tx.kick()
                    await tx.wait_used(50)
            # still serving: a ping through the same queues
            payload = os.urandom(500)
            tx.add([HDR + icmp_echo(GUEST_MAC, host_mac, bytes([10, 75, 0, 2]), bytes([10, 75, 0, 1]), 9, payload)])
            await tx.kick()
            with trio.fail_after(10):
                while True:
                    done = await rx.wait_used(1)
                    frames = [r.data(0)[12 : r.written] for r in done]
                    if any(f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0 and f[42:] == payload
                           for f in frames):
                        break
                    fill_rx(rx, len(rx.free))
                    await rx.kick()
