"""Live handover through the project's client, no VM: real server processes, real sockets.

A predecessor serves a client with I/O in flight; a successor (``vfu-server DEVICE --take-over
CTL``) takes over; every command completes exactly once and the data is what was written.
Refusals and failures (another namespace size or MAC, a format the predecessor cannot produce,
a damaged stream, a successor killed half-way or hanging) leave the predecessor serving.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.client import Client, GuestRam
from vfu_server.faults import FaultControl
from vfu_server.handover import HandoverRefused, Successor
from vfu_server.testing.handover import ServerStartFailed, hand_over, start_successor
from vfu_server.testing.nvme import IO_READ, IO_WRITE, NvmeTestDriver, QueuePair, SubmissionEntry
from vfu_server.testing.process import ServerProcess, running_server, spawn_server
from vfu_server.testing.virtio import DriverQueue

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_CQE = struct.Struct("<IIHHHH")
BLOCK = 4096  # one command's data: 8 LBAs of 512 bytes
BLOCKS = 3000  # of the 16 MiB disks


def pattern(seq: int) -> bytes:
    head = struct.pack("<Q", seq) * 8
    return (head * (BLOCK // len(head)))[:BLOCK]


# -- NVMe at queue depth 32 ------------------------------------------------------------------------


class ExactlyOnce:
    """Keeps ``depth`` NVMe commands in flight on one queue: writes of a distinct pattern to a
    fresh 4 KiB block each, and reads of blocks whose write completed (checked on completion).
    A completion for a command that is not outstanding (a second one) fails at once."""

    def __init__(self, drv: NvmeTestDriver, q: QueuePair, depth: int = 32) -> None:
        self.drv, self.q, self.depth = drv, q, depth
        self.buffers = [drv.buffer(BLOCK) for _ in range(depth + 1)]
        self.free = list(range(len(self.buffers)))
        self.inflight: dict[int, tuple[str, int, int]] = {}  # cid -> (kind, seq/block, buffer)
        self.written: list[int] = []  # blocks whose write completed
        self.next_block = 0
        self.completed = 0
        self.submitted = 0

    async def submit_one(self) -> None:
        drv, q = self.drv, self.q
        buf_index = self.free.pop()
        buf = self.buffers[buf_index]
        if self.written and self.submitted % 3 == 2:
            block = self.written[(self.submitted * 7) % len(self.written)]
            kind, opcode = "read", IO_READ
            drv.ram.write(buf, bytes(BLOCK))
        else:
            block = self.next_block % BLOCKS  # a long run rewrites the disk (same pattern)
            self.next_block += 1
            kind, opcode = "write", IO_WRITE
            drv.ram.write(buf, pattern(block))
        prp1, prp2 = drv.prps(buf, BLOCK)
        entry = SubmissionEntry(opcode, nsid=1, prp1=prp1, prp2=prp2, cdw10=block * 8, cdw12=7)
        cid = await drv.submit(q, entry, ring=False)
        self.inflight[cid] = (kind, block, buf_index)
        self.submitted += 1

    def reap(self) -> int:
        drv, q = self.drv, self.q
        n = 0
        while True:
            _dw0, _dw1, _sqhd, sqid, cid, st = _CQE.unpack(drv.ram.read(q.cq_base + 16 * q.cq_head, 16))
            if st & 1 != q.phase:
                return n
            assert sqid == q.qid, f"completion for SQ {sqid}"
            assert cid in self.inflight, f"completion for cid {cid}, which is not outstanding (completed twice?)"
            assert st >> 1 == 0, f"cid {cid} failed with status {st >> 1:#x}"
            kind, block, buf_index = self.inflight.pop(cid)
            q.outstanding.discard(cid)
            if kind == "write":
                self.written.append(block)
            else:
                got = drv.ram.read(self.buffers[buf_index], BLOCK)
                assert got == pattern(block), f"read of block {block} returned other data"
            self.free.append(buf_index)
            self.completed += 1
            n += 1
            q.cq_head += 1
            if q.cq_head == q.entries:
                q.cq_head, q.phase = 0, q.phase ^ 1

    async def run(self, total: int, until: trio.Event | None = None) -> None:
        """At least ``total`` commands, and on until ``until`` is set."""
        drv, q = self.drv, self.q
        irq = drv.vectors[q.vector]
        while self.completed < total or (until is not None and not until.is_set()) or self.inflight:
            new = 0
            while len(self.inflight) < self.depth and (
                    self.submitted < total or (until is not None and not until.is_set())):
                await self.submit_one()
                new += 1
            if new:
                await drv.ring_sq(q.qid, q.sq_tail)
            if self.reap():
                await drv.ring_cq(q.qid, q.cq_head)
                continue
            with trio.move_on_after(0.05):
                await irq.wait()

    async def verify_all(self) -> None:
        """Every block written holds its pattern (read back one at a time)."""
        for block in range(min(self.next_block, BLOCKS)):
            data = await self.drv.read(self.q, block * 8, BLOCK)
            assert data == pattern(block), f"block {block} lost its data"


@asynccontextmanager
async def nvme_with_control(*args: str) -> AsyncIterator[tuple[ServerProcess, str, NvmeTestDriver, QueuePair]]:
    ctl = os.path.join(tempfile.mkdtemp(prefix="vfu-ho-"), "ctl")
    with GuestRam(48 << 20) as ram:
        async with running_server("nvme", "--control-socket", ctl, *args) as srv, \
                await Client.connect(srv.socket_path) as client:
            drv = NvmeTestDriver(client, ram)
            try:
                await drv.start()
                q = await drv.create_io_queue_pair(1, entries=64)
                yield srv, ctl, drv, q
            except BaseException as exc:
                exc.add_note(f"--- predecessor stderr ---\n{srv.stderr()[-3000:]}")
                raise


async def handovers_during_io(load: Callable[[trio.Event], Awaitable[None]], predecessor: ServerProcess, ctl: str,
                              successors: list[tuple[str, ...]], delay: float,
                              env: dict[str, str] | None = None) -> list[ServerProcess]:
    """Run ``load`` while handing over, ``delay`` s after it started, to each successor in
    turn; ``load`` keeps its queue full until the event it gets is set (after the last)."""
    done: list[ServerProcess] = []
    finished = trio.Event()

    async def handovers() -> None:
        current = predecessor
        for args in successors:
            await trio.sleep(delay)
            try:
                current = await hand_over(current, ctl, *args, env=env)
            except BaseException as exc:
                exc.add_note(f"--- predecessor stderr ---\n{current.stderr()[-3000:]}")
                raise
            done.append(current)
        await trio.sleep(delay)
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handovers)
        await load(finished)
    return done


def nvme_handover_example(delay: float, poll_us: str, fmt: str, file_backed: bool) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="vfu-ho-") as d:
            backing = ("--backing", os.path.join(d, "disk.img"), "--size", "16M") if file_backed else ("--size", "16M")
            with trio.fail_after(240):
                async with nvme_with_control(*backing) as (srv, ctl, drv, q):
                    io = ExactlyOnce(drv, q)
                    b_args = (*backing, "--poll-us", poll_us, *(("--migration-format", fmt) if fmt else ()))
                    c_args = (*backing, "--poll-us", "1000") + (("--backing-io", "uring") if file_backed else ())
                    succ = await handovers_during_io(lambda until: io.run(200, until), srv, ctl, [b_args, c_args], delay)
                    try:
                        assert not io.inflight
                        await io.verify_all()
                        # Every one but the last exited 0 by itself (hand_over checks it).
                        assert succ[-1].process.returncode is None
                        assert "Traceback" not in succ[0].stderr() + succ[1].stderr() + srv.stderr()
                    finally:
                        for s in succ:
                            await s.terminate()

    trio.run(main)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(delay=st.floats(0.0, 0.25), poll_us=st.sampled_from(["0", "200", "1000"]),
       fmt=st.sampled_from(["", "opaque", "standard"]), file_backed=st.booleans())
def test_nvme_handover_at_qd32_completes_every_command_exactly_once(delay: float, poll_us: str, fmt: str,
                                                                    file_backed: bool) -> None:
    # A -> B -> C with the same command, while 32 commands are in flight.
    nvme_handover_example(delay, poll_us, fmt, file_backed)


# -- virtio-blk at queue depth 32 -------------------------------------------------------------------


T_IN, T_OUT = 0, 1


def blk_hdr(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def virtio_blk_example(delay: float, fastio: str, ram: bool) -> None:
    from vfu_server.testing.virtio import init_device

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="vfu-ho-") as d:
            ctl = os.path.join(d, "ctl")
            backing = ("--size", "16M") if ram else ("--backing", os.path.join(d, "disk.img"), "--size", "16M")
            with trio.fail_after(240), GuestRam(64 << 20) as gram:
                async with running_server("virtio-blk", "--control-socket", ctl, *backing) as srv, \
                        await Client.connect(srv.socket_path) as client:
                    await client.dma_map(gram)
                    _dev, (q,) = await init_device(client, gram, queues=(0,), size=128, slot_size=8192)
                    written: list[int] = []
                    next_block = 0
                    inflight: dict[int, tuple[str, int]] = {}
                    done = 0
                    total = 200

                    async def load(until: trio.Event) -> None:
                        nonlocal next_block, done
                        while done < total or not until.is_set() or inflight:
                            new = 0
                            while len(inflight) < 32 and (done + len(inflight) < total or not until.is_set()):
                                if written and (done + len(inflight)) % 3 == 2:
                                    block = written[(done * 7) % len(written)]
                                    req = q.add([blk_hdr(T_IN, block * 8)], [BLOCK, 1])
                                    inflight[req.head] = ("read", block)
                                else:
                                    block = next_block % BLOCKS
                                    next_block += 1
                                    req = q.add([blk_hdr(T_OUT, block * 8), pattern(block)], [1])
                                    inflight[req.head] = ("write", block)
                                new += 1
                            if new:
                                await q.kick()
                            # reap() fails on a head returned twice (not outstanding).
                            for req in await q.wait_used(1, timeout=60):
                                kind, block = inflight.pop(req.head)
                                status = req.data(len(req.inbufs) - 1)[0]
                                assert status == 0, f"{kind} of block {block}: status {status}"
                                if kind == "write":
                                    written.append(block)
                                else:
                                    assert req.data(0) == pattern(block), f"read of block {block}: other data"
                                done += 1

                    env = {"VFU_FASTIO": fastio}
                    succ = await handovers_during_io(load, srv, ctl, [backing, backing], delay, env=env)
                    try:
                        for block in range(min(next_block, BLOCKS)):
                            q.add([blk_hdr(T_IN, block * 8)], [BLOCK, 1])
                            await q.kick()
                            (got,) = await q.wait_used(1)
                            assert got.data(0) == pattern(block), f"block {block} lost its data"
                    finally:
                        for s in succ:
                            await s.terminate()

    trio.run(main)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(delay=st.floats(0.0, 0.25), fastio=st.sampled_from(["0", "1"]), ram=st.booleans())
def test_virtio_blk_handover_at_qd32_completes_every_request_exactly_once(delay: float, fastio: str,
                                                                          ram: bool) -> None:
    virtio_blk_example(delay, fastio, ram)


# -- refusals and failures: the predecessor keeps serving --------------------------------------------


async def still_serving(io: ExactlyOnce, more: int = 64) -> None:
    await io.run(io.completed + more)
    assert not io.inflight
    await io.verify_all()


async def refused(device: str, ctl: str, *args: str) -> str:
    with pytest.raises(ServerStartFailed) as info:
        await start_successor(device, ctl, *args)
    assert info.value.returncode not in (0, None), info.value.stderr
    last = info.value.stderr.strip().splitlines()[-1]
    assert last.startswith("vfu-server: handover refused: "), info.value.stderr
    return last


async def test_a_successor_with_another_namespace_size_is_refused() -> None:
    with trio.fail_after(120):
        async with nvme_with_control("--size", "16M") as (srv, ctl, drv, q):
            io = ExactlyOnce(drv, q)
            await io.run(64)
            reason = await refused("nvme", ctl, "--size", "32M")
            assert "profile differs" in reason and "size_bytes" in reason, reason
            assert srv.process.returncode is None
            await still_serving(io)


async def test_a_successor_with_another_mac_is_refused(tmp_path: Path) -> None:
    from test_virtio_net import GUEST_MAC, fill_rx, frame, setup_net

    ctl = str(tmp_path / "ctl")
    path = str(tmp_path / "peer.sock")
    lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await lsock.bind(path)
    lsock.listen(1)
    with trio.fail_after(120):
        async with running_server("virtio-net", "--peer", path, "--mac", "52:54:00:00:00:01",
                                  "--control-socket", ctl) as srv, await Client.connect(srv.socket_path) as client:
            peer, _ = await lsock.accept()
            _dev, (rx, _tx, _ctrl) = await setup_net(client)
            fill_rx(rx, 8)
            await rx.kick()
            reason = await refused("virtio-net", ctl, "--peer", path, "--mac", "52:54:00:00:00:02")
            assert "profile differs" in reason, reason
            # The predecessor still delivers frames both ways.
            f = frame(GUEST_MAC, b"\x02" * 6, 7)
            await peer.send(f)
            (got,) = await rx.wait_used(1)
            assert got.data(0)[12 : 12 + len(f)] == f
            peer.close()
    lsock.close()


class InsistsOnANewFormat(Successor):
    """A successor of a newer build: it loads a format the predecessor does not know, and
    insists on it."""

    def hello(self, device):  # type: ignore[no-untyped-def]
        hello = super().hello(device)
        new = {"uuid": "0f0e0d0c-0b0a-4908-8706-050403020100", "name": "example/std/9", "kind": "standard",
               "minor_min": 0, "minor_max": 3}
        hello["formats"].append(new)
        hello["insist"] = {"uuid": new["uuid"], "name": new["name"], "minor": None}
        return hello


async def test_a_format_the_predecessor_cannot_produce_is_refused(tmp_path: Path) -> None:
    from vfu_devices.example import DmaCopyEngine

    ctl = str(tmp_path / "ctl")
    with trio.fail_after(60):
        async with running_server("example", "--control-socket", ctl) as srv, \
                await Client.connect(srv.socket_path) as client:
            await client.write32(0, 4, 0x1234)  # SCRATCH
            with pytest.raises(HandoverRefused, match=r"example/std/9.*not one this server produces"):
                await InsistsOnANewFormat(ctl, timeout=2).take_over(DmaCopyEngine(), None)  # type: ignore[arg-type]
            assert await client.read32(0, 4) == 0x1234
            await client.write32(0, 4, 0x5678)
            assert await client.read32(0, 4) == 0x5678


@asynccontextmanager
async def misbehaving(mode: str, device: str, ctl: str, *args: str) -> AsyncIterator[trio.Process]:
    """tests/integration/handover_successors.py MODE DEVICE --take-over CTL: once it printed
    ``received`` (everything arrived) the caller decides its fate."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(HERE / "handover_successors.py"), mode, device, "--take-over", ctl, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                await stream.aclose()


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        line += chunk
    return line


async def test_a_corrupted_stream_is_refused_and_the_predecessor_resumes() -> None:
    with trio.fail_after(120):
        async with nvme_with_control("--size", "16M") as (srv, ctl, drv, q):
            io = ExactlyOnce(drv, q)

            async def attempt() -> None:
                await trio.sleep(0.05)
                async with misbehaving("corrupt", "nvme", ctl, "--size", "16M") as proc:
                    await proc.wait()
                    err = (await proc.stderr.receive_some(65536)).decode()
                    assert proc.returncode == 1, err
                    assert "vfu-server: handover refused:" in err, err

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt)
                await io.run(300)
            assert srv.process.returncode is None
            await still_serving(io)


@pytest.mark.parametrize("mode", ["stall", "vanish"])
async def test_a_successor_killed_half_way_leaves_the_predecessor_serving(mode: str) -> None:
    # stall: SIGKILL once it holds every fd; vanish: it dies by itself (os._exit) at that point.
    with trio.fail_after(120):
        async with nvme_with_control("--size", "16M") as (srv, ctl, drv, q):
            io = ExactlyOnce(drv, q)

            async def attempt() -> None:
                await trio.sleep(0.05)
                async with misbehaving(mode, "nvme", ctl, "--size", "16M") as proc:
                    assert await read_line(proc.stdout) == b"received\n"
                    if mode == "stall":
                        proc.send_signal(signal.SIGKILL)
                    await proc.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt)
                await io.run(300)
            assert srv.process.returncode is None
            await still_serving(io)
            # And a proper successor can take over afterwards.
            succ = await hand_over(srv, ctl, "--size", "16M")
            try:
                await still_serving(io)
            finally:
                await succ.terminate()


@pytest.mark.parametrize("mode", ["confined", "late"])
async def test_the_successor_is_confined_before_the_pause_when_the_predecessor_says_where_its_sockets_are(
        mode: str) -> None:
    with trio.fail_after(120):
        async with nvme_with_control("--size", "16M") as (srv, ctl, drv, q):
            io = ExactlyOnce(drv, q)
            await io.run(32)
            async with FaultControl(ctl) as control:  # any control request goes through it
                info = await control.request({"cmd": "handover-info"})
                assert info == {"ok": True, "protocol": 1, "device": "nvme", "socket_path": srv.socket_path,
                                "control_path": ctl}
            async with misbehaving(mode, "nvme", ctl, "--size", "16M") as proc:
                assert await read_line(proc.stdout) == (b"confined\n" if mode == "confined" else b"not confined\n")
                assert (await read_line(proc.stdout)).startswith(b"listening on")
                assert await srv.process.wait() == 0
                await still_serving(io)
                proc.terminate()
                assert await proc.wait() == 0
                err = (await proc.stderr.receive_some(65536)).decode()
                assert "sandbox: " in err, err
            # Confined either way, it could remove both socket files when it stopped.
            assert not os.path.exists(srv.socket_path) and not os.path.exists(ctl)


async def test_a_successor_that_never_confirms_times_out_and_the_predecessor_resumes() -> None:
    with trio.fail_after(120):
        async with nvme_with_control("--size", "16M") as (srv, ctl, drv, q):
            io = ExactlyOnce(drv, q)
            await io.run(32)
            async with misbehaving("stall", "nvme", ctl, "--size", "16M", "--handover-timeout", "1") as proc:
                assert await read_line(proc.stdout) == b"received\n"
                # The predecessor gives up after 1 s without "ready" and serves again, while
                # the hung successor still holds copies of every fd.
                await still_serving(io)
                assert "timed out" in srv.stderr()
            assert srv.process.returncode is None


# -- other devices, snapshot ---------------------------------------------------------------------------


@asynccontextmanager
async def listening_peer(ctl: str, args: tuple[str, ...], path: str) -> AsyncIterator[tuple[ServerProcess, Client, trio.socket.SocketType]]:
    """A virtio-net server with ``--peer PATH --listen`` (so a successor can take the listening
    socket over) and a control socket: (server, client, the test's peer connected to it)."""
    async with running_server("virtio-net", *args, "--control-socket", ctl) as srv, \
            await Client.connect(srv.socket_path) as client:
        peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await peer.connect(path)
        yield srv, client, peer


async def until_a_probe_gets_through(peer: trio.socket.SocketType, rx: DriverQueue, *, refill: bool = False) -> None:
    """Send probe frames (sequence number 1000, which frames_received skips) until one reaches
    the receive queue, so that the device's receive path is known to run; ``refill`` posts a
    receive buffer before each probe."""
    from test_virtio_net import GUEST_MAC, fill_rx, frame

    with trio.fail_after(20):
        while True:
            if refill:
                fill_rx(rx, 1)
                await rx.kick()
            await peer.send(frame(GUEST_MAC, b"\x02" * 6, 1000))
            with trio.move_on_after(0.2):
                await rx.wait_used(1)
                return


async def net_receiving(client: Client, peer: trio.socket.SocketType) -> tuple[DriverQueue, DriverQueue]:
    """The virtio-net device set up with its receive queue full and its receive path known to
    run; (receive queue, transmit queue)."""
    from test_virtio_net import fill_rx, setup_net

    _dev, (rx, tx, _ctrl) = await setup_net(client)
    fill_rx(rx, 64)
    await rx.kick()
    # Frames that come before the device's receive path runs are dropped, as a NIC without a
    # link does: wait until one gets through.
    await until_a_probe_gets_through(peer, rx)
    fill_rx(rx, len(rx.free))
    await rx.kick()
    return rx, tx


async def frames_received(rx: object, count: int, length: int, timeout: float) -> list[bytes]:
    """Up to ``count`` frames of ``length`` bytes from the receive queue, in order, within
    ``timeout`` seconds; the link probes (sequence number 1000) are left out."""
    got: list[bytes] = []
    with trio.move_on_after(timeout):
        while len(got) < count:
            for r in await rx.wait_used(1, timeout=timeout):  # type: ignore[attr-defined]
                data = r.data(0)[12 : 12 + length]
                if data[14:18] != struct.pack("<I", 1000):  # a late probe
                    got.append(data)
    return got


async def test_virtio_net_peer_handover_keeps_the_connection_and_frames(tmp_path: Path) -> None:
    from test_virtio_net import GUEST_MAC, frame

    ctl = str(tmp_path / "ctl")
    path = str(tmp_path / "peer.sock")
    args = ("--peer", path, "--mac", "52:54:00:12:34:56", "--listen")
    with trio.fail_after(120):
        async with listening_peer(ctl, args, path) as (srv, client, peer):
            rx, tx = await net_receiving(client, peer)
            sent = [frame(GUEST_MAC, b"\x02" * 6, n) for n in range(40)]
            for f in sent[:20]:
                await peer.send(f)
            succ = await hand_over(srv, ctl, *args, "--poll-us", "100")
            try:
                for f in sent[20:]:
                    await peer.send(f)
                got = await frames_received(rx, 40, len(sent[0]), 30)
                assert got == sent, (f"{len(got)} frames\n--- predecessor ---\n{srv.stderr()[-2000:]}\n"
                                     f"--- successor ---\n{succ.stderr()[-2000:]}")  # none lost or twice, in order
                # Transmit through the successor reaches the same peer connection.
                out = frame(b"\x02" * 6, GUEST_MAC, 99)
                tx.add([bytes(12) + out])
                await tx.kick()
                await tx.wait_used(1)
                with trio.fail_after(10):
                    assert await peer.recv(2048) == out
                assert os.path.exists(path), "the predecessor removed the --listen socket path"
            finally:
                await succ.terminate()
                peer.close()


async def test_virtio_net_frames_a_delay_fault_holds_back_survive_a_handover(tmp_path: Path) -> None:
    # A delayed frame lives in a task of the predecessor's, which ends with it: the received
    # one moves with the frames on their way to the guest, the transmitted one is sent at the
    # quiesce; both early rather than never.
    from test_virtio_net import GUEST_MAC, frame

    ctl = str(tmp_path / "ctl")
    path = str(tmp_path / "peer.sock")
    args = ("--peer", path, "--mac", "52:54:00:12:34:56", "--listen")
    with trio.fail_after(120):
        async with listening_peer(ctl, args, path) as (srv, client, peer):
            rx, tx = await net_receiving(client, peer)
            async with FaultControl(ctl) as fc:
                await fc.add("op=rx,count=1,delay=10m")
                await fc.add("op=tx,count=1,delay=10m")
            held_in, held_out = frame(GUEST_MAC, b"\x02" * 6, 1), frame(b"\x02" * 6, GUEST_MAC, 2)
            await peer.send(held_in)
            tx.add([bytes(12) + held_out])
            await tx.kick()
            await tx.wait_used(1)
            assert not await frames_received(rx, 1, len(held_in), 0.5), "the fault holds it back"
            with trio.move_on_after(0.5):
                await peer.recv(2048)
                pytest.fail("the delayed transmit went early")
            succ = await hand_over(srv, ctl, *args)
            try:
                with trio.fail_after(10):
                    assert await peer.recv(2048) == held_out
                assert await frames_received(rx, 1, len(held_in), 10) == [held_in]
            finally:
                await succ.terminate()
                peer.close()


@pytest.mark.parametrize("device", ["virtio-rng", "example"])
async def test_small_devices_hand_over(tmp_path: Path, device: str) -> None:
    ctl = str(tmp_path / "ctl")
    with trio.fail_after(120):
        async with running_server(device, "--control-socket", ctl) as srv, \
                await Client.connect(srv.socket_path) as client:
            if device == "example":
                await client.write32(0, 4, 0xC0FFEE)
            else:
                from vfu_server.testing.virtio import init_device

                gram = GuestRam(8 << 20)
                await client.dma_map(gram)
                _dev, (q,) = await init_device(client, gram, queues=(0,))
            succ = await hand_over(srv, ctl, "--migration-format", "opaque")
            try:
                if device == "example":
                    assert await client.read32(0, 4) == 0xC0FFEE
                else:
                    q.add(in_sizes=[64])
                    await q.kick()
                    (done,) = await q.wait_used(1)
                    assert done.written == 64
                succ2 = await hand_over(succ, ctl)  # and again, standard this time
                await succ2.terminate()
            finally:
                await succ.terminate()


async def test_handover_with_no_client_attached(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    with trio.fail_after(120), GuestRam(48 << 20) as ram:
        async with running_server("nvme", "--size", "16M", "--control-socket", ctl) as srv:
            succ = await hand_over(srv, ctl, "--size", "16M")
            try:
                async with await Client.connect(succ.socket_path) as client:
                    drv = NvmeTestDriver(client, ram)
                    await drv.start()
                    q = await drv.create_io_queue_pair(1, entries=64)
                    await ExactlyOnce(drv, q).run(64)
            finally:
                await succ.terminate()
            assert not os.path.exists(ctl)  # the successor removed it when it stopped


async def test_snapshot_of_a_live_device_while_the_client_stays(tmp_path: Path) -> None:
    out = tmp_path / "nvme.state"
    with trio.fail_after(120):
        async with nvme_with_control("--size", "16M") as (_srv, ctl, drv, q):
            io = ExactlyOnce(drv, q)
            result: dict[str, object] = {}

            async def snap() -> None:
                await trio.sleep(0.05)
                proc = await trio.run_process(
                    [sys.executable, "-m", "vfu_server.migration.cli", "save", "--control", ctl, str(out),
                     "--format", "standard"], capture_stdout=True, capture_stderr=True,
                    env={**os.environ, "PYTHONPATH": str(REPO)})
                result.update(json.loads(proc.stdout))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(snap)
                await io.run(200)
            assert result["format"]["name"] == "nvme-ctrl/std/1", result  # type: ignore[index]
            inspect = await trio.run_process([sys.executable, "-m", "vfu_server.stateinspect.cli", "inspect", str(out)],
                                             capture_stdout=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert b"nvme" in inspect.stdout.lower()
            await still_serving(io)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="TAP in a netns needs root and iproute2")
async def test_virtio_net_tap_handover_during_a_ping_stream(tmp_path: Path) -> None:
    from test_virtio_net import GUEST_MAC, HDR, fill_rx, host_side, icmp_echo, setup_net

    ns = f"wt16ho-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    ctl = str(tmp_path / "ctl")
    args = ("--tap", "vfutap0", "--mac", GUEST_MAC.hex(":"))
    inside = ("ip", "netns", "exec", ns)
    srv = succ = None
    try:
        with trio.fail_after(120):
            srv = await spawn_server("virtio-net", ("--socket-path", str(tmp_path / "net.sock"), *args,
                                                    "--control-socket", ctl), prefix=inside)
            host_mac = host_side(ns, 75)
            async with await Client.connect(srv.socket_path) as client:
                _dev, (rx, tx, _cq) = await setup_net(client)
                fill_rx(rx, 128)
                await rx.kick()
                replies: set[int] = set()
                handed, pinged = trio.Event(), trio.Event()
                sent = 0
                # Frames that come before the device's receive path runs are dropped: ping
                # (sequence numbers from 60000) until a reply gets through.
                warm = 60000
                with trio.fail_after(20):
                    while not replies:
                        warm += 1
                        tx.add([HDR + icmp_echo(GUEST_MAC, host_mac, bytes([10, 75, 0, 2]),
                                                bytes([10, 75, 0, 1]), warm, bytes(200))])
                        await tx.kick()
                        with trio.move_on_after(0.2):
                            for r in await rx.wait_used(1):
                                f = r.data(0)[12 : r.written]
                                if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0:
                                    replies.add(struct.unpack("!H", f[40:42])[0])
                        tx.reap()
                replies.clear()
                fill_rx(rx, len(rx.free))
                await rx.kick()

                async def pings() -> None:
                    # A ping every 20 ms from before the handover until 20 after it.
                    nonlocal sent
                    after = 0
                    while after < 20:
                        sent += 1
                        tx.add([HDR + icmp_echo(GUEST_MAC, host_mac, bytes([10, 75, 0, 2]),
                                                bytes([10, 75, 0, 1]), sent, sent.to_bytes(2, "big") * 100)])
                        await tx.kick()
                        tx.reap()
                        after += handed.is_set()
                        await trio.sleep(0.02)
                    pinged.set()

                async def collect() -> None:
                    while not pinged.is_set() or len(replies) < sent:
                        for r in await rx.wait_used(1, timeout=30):
                            f = r.data(0)[12 : r.written]
                            if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0:
                                seq = struct.unpack("!H", f[40:42])[0]
                                if seq > 60000:
                                    continue  # a late reply to the warm-up
                                assert seq not in replies, f"echo reply {seq} twice"
                                replies.add(seq)
                        fill_rx(rx, len(rx.free) // 2)
                        await rx.kick()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pings)
                    nursery.start_soon(collect)
                    await trio.sleep(0.4)
                    succ = await hand_over(srv, ctl, *args, "--poll-us", "50", prefix=inside)
                    handed.set()
                assert sent > 40 and replies == set(range(1, sent + 1))
    finally:
        for p in (succ, srv):
            if p is not None:
                await p.terminate()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def test_nvme_on_nbd_hands_over_with_io_in_flight() -> None:
    # The successor opens its own connection to the same export: the predecessor's acknowledged
    # writes are the NBD server's, so they read back through the new connection.
    from test_block_nbd import nbdkit

    with tempfile.TemporaryDirectory(prefix="nbd-") as d:
        nbd = nbdkit(Path(d), "memory", str(16 << 20))
        try:
            with trio.fail_after(180):
                async with nvme_with_control("--backing", nbd.uri) as (srv, ctl, drv, q):
                    io = ExactlyOnce(drv, q)
                    succ = await handovers_during_io(lambda until: io.run(200, until), srv, ctl,
                                                     [("--backing", nbd.uri, "--poll-us", "0")], 0.1)
                    try:
                        await io.verify_all()
                    finally:
                        await succ[0].terminate()
        finally:
            nbd.kill()


async def test_a_third_party_device_hands_over_the_bar_memory_its_client_mapped(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    env = {"PYTHONPATH": str(HERE)}
    with trio.fail_after(120):
        async with running_server("handover_devices:MmapExample", "--control-socket", ctl, env=env) as srv, \
                await Client.connect(srv.socket_path) as client:
            mapping, _info = await client.mmap_region(4)
            mapping[0:4] = b"old!"
            await client.write32(0, 4, 0xBEEF)
            succ = await hand_over(srv, ctl, env=env)
            try:
                # The successor serves the very memory the client still has mapped.
                assert await client.region_read(4, 0, 4) == b"old!"
                mapping[4:8] = b"new!"
                assert await client.region_read(4, 4, 4) == b"new!"
                await client.region_write(4, 8, b"back")
                assert mapping[8:12] == b"back"
                assert await client.read32(0, 4) == 0xBEEF
            finally:
                mapping.close()
                await succ.terminate()


async def test_a_device_without_migration_formats_cannot_take_over(tmp_path: Path) -> None:
    proc = await trio.run_process(
        [sys.executable, "-m", "vfu_server", "mmap_test_device:MmapDevice", "--take-over", str(tmp_path / "ctl")],
        capture_stdout=True, capture_stderr=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join((str(REPO), str(HERE)))})
    assert proc.returncode == 2
    assert b"has no migration formats" in proc.stderr


async def test_a_device_hook_that_raises_fails_the_handover_not_the_server(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    env = {"PYTHONPATH": str(HERE)}
    with trio.fail_after(120):
        async with running_server("handover_devices:BrokenExport", "--control-socket", ctl, env=env) as srv, \
                await Client.connect(srv.socket_path) as client:
            await client.write32(0, 4, 0x1111)
            with pytest.raises(ServerStartFailed) as info:
                await start_successor("handover_devices:BrokenExport", ctl, env=env)
            assert "RuntimeError: bug in handover_export" in info.value.stderr
            assert await client.read32(0, 4) == 0x1111
            await client.write32(0, 4, 0x2222)
            assert await client.read32(0, 4) == 0x2222
            assert srv.process.returncode is None


async def test_guest_ram_without_an_fd_is_still_reached_through_messages_after_a_handover(tmp_path: Path) -> None:
    # The map carries no fd: the successor gets the table entry alone and reaches the RAM with
    # DMA_READ/DMA_WRITE through the connection it took over.
    from server_helpers import CTRL, DST_HI, DST_LO, LEN, SRC_HI, SRC_LO, STATUS
    ctl = str(tmp_path / "ctl")
    with trio.fail_after(120), GuestRam(1 << 20) as ram:
        async with running_server("example", "--control-socket", ctl) as srv, \
                await Client.connect(srv.socket_path, max_data_xfer_size=4096) as client:
            await client.dma_map(ram, with_fd=False)
            await client.enable_bus_master()
            (vector, *_) = await client.enable_msix(1)

            async def copy(src: int, dst: int, data: bytes) -> None:
                ram.write(src, data)
                for reg, value in ((SRC_LO, src), (SRC_HI, 0), (DST_LO, dst), (DST_HI, 0), (LEN, len(data)), (CTRL, 1)):
                    await client.write32(0, reg, value)
                await vector.wait()
                assert await client.read32(0, STATUS) == 1  # done
                assert ram.read(dst, len(data)) == data

            await copy(0x1000, 0x40000, os.urandom(10000))
            succ = await hand_over(srv, ctl)
            try:
                before = client.dma_bytes
                await copy(0x2000, 0x60000, os.urandom(10000))
                assert client.dma_bytes == before + 20000  # through messages, no byte twice
            finally:
                await succ.terminate()


async def test_nvme_io_through_messages_in_flight_during_a_handover(tmp_path: Path) -> None:
    # Guest RAM without an fd: the commands in flight when the handover starts wait for the
    # client's DMA_READ/DMA_WRITE replies, which the predecessor still reads while it quiesces.
    ctl = str(tmp_path / "ctl")
    with trio.fail_after(180), GuestRam(48 << 20) as ram:
        async with running_server("nvme", "--size", "16M", "--control-socket", ctl) as srv, \
                await Client.connect(srv.socket_path) as client:
            await client.dma_map(ram, with_fd=False)
            drv = NvmeTestDriver(client, ram)
            await drv.start(map_ram=False)
            q = await drv.create_io_queue_pair(1, entries=64)
            io = ExactlyOnce(drv, q, depth=8)
            succ = await handovers_during_io(lambda until: io.run(64, until), srv, ctl, [("--size", "16M")], 0.1)
            try:
                assert client.dma_bytes > 0
                await still_serving(io, 16)
            finally:
                await succ[0].terminate()


async def test_a_controller_kept_for_the_next_client_is_handed_over_and_driven_by_it(tmp_path: Path) -> None:
    # The client left; the controller (enabled, with its queue) waits for the next one. A
    # handover without a client, and one that is refused, leave it waiting (not running on
    # unmapped memory); the next client drives the same queue on the successor.
    ctl = str(tmp_path / "ctl")
    with trio.fail_after(120), GuestRam(8 << 20) as ram:
        async with running_server("nvme", "--size", "1M", "--control-socket", ctl) as srv:
            async with await Client.connect(srv.socket_path) as client:
                drv = NvmeTestDriver(client, ram)
                await drv.start()
                q = await drv.create_io_queue_pair(1, entries=8)
                data = os.urandom(512)
                await drv.write(q, 0, data)
            await refused("nvme", ctl, "--size", "2M")
            succ = await hand_over(srv, ctl, "--size", "1M")
            try:
                async with await Client.connect(succ.socket_path) as client:
                    again = NvmeTestDriver(client, ram)
                    assert await again.csts() & 1
                    await client.dma_map(ram)
                    await client.enable_bus_master()
                    again.vectors = await client.enable_msix(8)
                    again.admin_q, again.queues = drv.admin_q, drv.queues
                    assert await again.read(q, 0, 512) == data
                assert "Traceback" not in srv.stderr() + succ.stderr()
                assert "fatal" not in (srv.stderr() + succ.stderr()).lower()
            finally:
                await succ.terminate()


async def test_a_successor_that_hangs_after_go_is_killed_before_the_predecessor_resumes() -> None:
    # After go the successor may serve as soon as it has acknowledged: one that neither
    # acknowledges nor closes is killed (its pid from SO_PEERCRED) before the predecessor
    # reads the client socket again, so two servers never read it.
    with trio.fail_after(120):
        async with nvme_with_control("--size", "16M") as (srv, ctl, drv, q):
            io = ExactlyOnce(drv, q)
            await io.run(32)
            async with misbehaving("noack", "nvme", ctl, "--size", "16M", "--handover-timeout", "1") as proc:
                assert await read_line(proc.stdout) == b"go\n"
                with trio.fail_after(30):
                    await proc.wait()
                assert proc.returncode == -signal.SIGKILL
            await still_serving(io)
            assert "no ack from the successor" in srv.stderr()
            assert srv.process.returncode is None


async def test_frames_waiting_for_the_guest_survive_a_failed_handover_in_order(tmp_path: Path) -> None:
    # The guest has no receive buffers: frames wait in the predecessor. A handover takes them
    # (to carry them over), the successor is killed half-way, and the rolled-back predecessor
    # still delivers every one of them, once and in order, when buffers come.
    from test_virtio_net import GUEST_MAC, fill_rx, frame, setup_net

    ctl = str(tmp_path / "ctl")
    path = str(tmp_path / "peer.sock")
    args = ("--peer", path, "--mac", "52:54:00:12:34:56", "--listen")
    with trio.fail_after(120):
        async with listening_peer(ctl, args, path) as (srv, client, peer):
            _dev, (rx, _tx, _ctrl) = await setup_net(client)
            await until_a_probe_gets_through(peer, rx, refill=True)
            sent = [frame(GUEST_MAC, b"\x02" * 6, n) for n in range(20)]
            for f in sent:
                await peer.send(f)
            await trio.sleep(0.2)  # taken from the socket, waiting for receive buffers
            async with misbehaving("stall", "virtio-net", ctl, *args) as proc:
                assert await read_line(proc.stdout) == b"received\n"
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            fill_rx(rx, 32)
            await rx.kick()
            got = await frames_received(rx, 20, len(sent[0]), 20)
            assert got == sent, f"{len(got)} frames\n{srv.stderr()[-2000:]}"
            assert srv.process.returncode is None
            peer.close()
