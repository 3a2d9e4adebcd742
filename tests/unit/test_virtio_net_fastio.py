"""virtio-net's C transmit path (VirtioNet.complete_fast) against the Python path, differentially.

The same ring and guest memory are handed to C and, from the same starting point, to Python
(SplitQueue.pop + VirtioNet.process), each sending into one end of a SOCK_SEQPACKET pair, which
keeps frame boundaries as a TAP does. Whatever C completes, Python must complete too, with the
same frame sent, the same used element and the same counters; whatever C leaves, it must
leave untouched and unsent. Chains come from hypothesis: a valid frame over one to eight
readable descriptors (direct or in an indirect table), then zero to two mutations.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vfu_devices.fastio import load_module
from vfu_devices.virtio.net import (
    HDR_LEN,
    MAX_TX_FRAME,
    MAX_TX_LINGER_US,
    TX_BULK_FRAME,
    TX_LINGER_NS,
    TX_STREAM_NS,
    VirtioNet,
    _NetFast,
)
from vfu_devices.virtio.netbackend import NetBackend
from vfu_devices.virtio.queue import QueueState, SplitQueue, VirtqueueError
from vfu_server.testing.memory import map_guest_ram
from vfu_server.transport.timer import PreciseTimer

PAGE = 4096
RAM = 1 << 20
RO_BASE, RO_SIZE = 0x200000, 64 * 1024
SIZE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
DATA = 0x10000
NEXT, WRITE, INDIRECT = 1, 2, 4
RO_DATA = os.urandom(RO_SIZE)

module = load_module()
pytestmark = pytest.mark.skipif(module is None, reason="the C helper could not be built here")


class PairBackend(NetBackend):
    """One end of a socket pair standing in for the TAP: what Python sends, C may writev."""

    def __init__(self, fd: int, vnet_hdr: bool) -> None:
        super().__init__()
        self.fd = fd
        self.vnet_hdr = vnet_hdr

    async def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError:
            pass

    def fast_tx_fd(self) -> int | None:
        return self.fd

    def describe(self) -> str:
        return "pair"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def device(fd: int, vnet_hdr: bool) -> VirtioNet:
    dev = VirtioNet(PairBackend(fd, vnet_hdr))
    # The linger's wait on trio's clock, so that a MockClock drives it (the device's own
    # timerfd runs on the kernel's: test_the_linger_waits_on_a_timerfd)
    dev._tx_pause = lambda index: trio.sleep(dev.tx_linger_ns / 1e9)  # type: ignore[method-assign]
    map_guest_ram(dev.dma, 0, RAM)
    map_guest_ram(dev.dma, RO_BASE, RO_SIZE, writable=False, data=RO_DATA)  # the same for C and Python
    return dev


MUTATIONS = ["writable", "zero-len", "short", "long", "unmapped", "read-only", "indirect", "indirect-nested"]


@st.composite
def frames(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], bool, bool]:
    """(descriptors as (addr, len, flags, next), in an indirect table?, valid as drawn?)."""
    total = draw(st.integers(HDR_LEN + 14, HDR_LEN + 9000))
    nseg = draw(st.integers(1, 8))
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=nseg - 1, max_size=nseg - 1, unique=True)))
    lens = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    starts = draw(st.lists(st.integers(DATA, RAM - 9000), min_size=nseg, max_size=nseg))
    descs = [[a, n, 0] for a, n in zip(starts, lens, strict=True)]
    indirect = draw(st.booleans())
    for m in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        i = draw(st.integers(0, len(descs) - 1))
        if m == "writable":
            descs[i][2] |= WRITE
        elif m == "zero-len":
            descs.insert(i, [DATA, 0, 0])  # adds nothing: still valid
        elif m == "short":
            descs = [[DATA, draw(st.integers(1, HDR_LEN + 13)), 0]]
        elif m == "long":
            descs.append([0x40000, HDR_LEN + MAX_TX_FRAME + 1 - sum(d[1] for d in descs), 0])
        elif m == "unmapped":
            descs[i][0] = draw(st.sampled_from([RAM - 8, RAM, 1 << 40]))
        elif m == "read-only":
            descs[i][0] = RO_BASE + draw(st.integers(0, RO_SIZE - 9000))  # reading it is fine
        elif m == "indirect":
            indirect = not indirect
        elif m == "indirect-nested":
            descs[i][2] |= INDIRECT
    total = sum(n for _, n, _ in descs)
    valid = HDR_LEN + 14 <= total <= HDR_LEN + MAX_TX_FRAME and all(
        not f & (WRITE | INDIRECT) and (not n or a + n <= RAM or (a >= RO_BASE and a + n <= RO_BASE + RO_SIZE))
        for a, n, f in descs)
    chain = [(a, n, f | (NEXT if i + 1 < len(descs) else 0), i + 1) for i, (a, n, f) in enumerate(descs)]
    return chain, indirect, valid


def place(dev: VirtioNet, chain: list[tuple[int, int, int, int]], indirect: bool, next_avail: int,
          outside: bool = False) -> SplitQueue:
    dma = dev.dma
    head = next_avail % SIZE
    if indirect:
        table = 0x8000
        dma.write(table, b"".join(struct.pack("<QIHH", a, n, f, 200 if outside else nx) for a, n, f, nx in chain))
        dma.write(DESC + 16 * head, struct.pack("<QIHH", table, 16 * len(chain), INDIRECT, 0))
    else:
        slots = [(head + i) % SIZE for i in range(len(chain))]
        for i, (a, n, f, nx) in enumerate(chain):
            nxt = 200 if outside else slots[nx] if nx < len(chain) else 0
            dma.write(DESC + 16 * slots[i], struct.pack("<QIHH", a, n, f, nxt))
    dma.write(AVAIL + 4 + 2 * head, struct.pack("<H", head))
    dma.write(AVAIL, struct.pack("<HH", 0, (next_avail + 1) & 0xFFFF))
    dma.write(USED, struct.pack("<HH", 0, next_avail))
    state = QueueState(max_size=256, size=SIZE, ready=True, desc_table=DESC, avail_ring=AVAIL, used_ring=USED,
                       next_avail=next_avail, next_used=next_avail)
    return SplitQueue(1, state, dma)


def received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=frames(), vnet_hdr=st.booleans(), next_avail=st.sampled_from([0, 5, 15, 0xFFFF]),
       outside=st.integers(0, 9))
def test_c_sends_only_what_python_sends(pair: tuple[socket.socket, socket.socket], case: tuple, vnet_hdr: bool,
                                        next_avail: int, outside: int) -> None:
    chain, indirect, valid = case
    outside_next = outside == 0 and len(chain) > 1  # a next index outside the table
    a, b = pair
    dev = device(a.fileno(), vnet_hdr)
    q = place(dev, chain, indirect, next_avail, outside_next)
    before = dev.dma.read(0, RAM)
    fast = _NetFast(module, dev.dma)
    done = fast.tx(q, a.fileno(), 0 if vnet_hdr else HDR_LEN, dev.queue_stats(1))
    sent_c = received(b)
    if not done:
        event("C left it")
        assert q.state.next_avail == next_avail and q.pending_elsewhere == 0
        assert sent_c == [] and dev.dma.read(0, RAM) == before
        if valid and not outside_next:
            pytest.fail(f"C left a valid frame (stop {fast.stop_reason})")
        return
    event("C sent it")
    assert valid and not outside_next
    assert q.state.next_avail == (next_avail + 1) & 0xFFFF and q.pending_elsewhere == 1
    used_c = dev.dma.read(USED + 4 + 8 * (next_avail % SIZE), 8)
    counted_c = dev.queue_stats(1).c.ops[1], dev.queue_stats(1).c.bytes[1]
    assert (fast.run_frames, fast.run_bytes) == counted_c  # the run's own, as counted

    # Python, from the same start
    py = device(a.fileno(), vnet_hdr)
    py.dma.write(0, before)
    q = place(py, chain, indirect, next_avail, outside_next)
    try:
        chain_py = q.pop()
    except VirtqueueError as exc:
        pytest.fail(f"C sent a chain Python refuses: {exc}")
    assert chain_py is not None
    written = trio.run(py.process, q, chain_py)
    q.push(chain_py, written)
    q.flush()
    sent_py = received(b)
    assert sent_c == sent_py and len(sent_c) == 1
    assert used_c == py.dma.read(USED + 4 + 8 * (next_avail % SIZE), 8) == struct.pack("<II", chain_py.head, 0)
    py_stats = py.queue_stats(1)
    assert counted_c == (py_stats.ops[1], py_stats.bytes[1]) == (1, sum(n for _, n, _, _ in chain) - HDR_LEN)


def test_a_full_socket_leaves_the_frame_to_python(pair: tuple[socket.socket, socket.socket]) -> None:
    """EAGAIN: nothing consumed, so that Python waits for room and sends it then."""
    a, _ = pair
    a.setblocking(False)
    while True:  # fill the pair
        try:
            a.send(bytes(4096))
        except BlockingIOError:
            break
    dev = device(a.fileno(), True)
    q = place(dev, [(DATA, 1000, 0, 1)], False, 0)
    fast = _NetFast(module, dev.dma)
    assert fast.tx(q, a.fileno(), 0, dev.queue_stats(1)) == 0
    assert q.state.next_avail == 0 and fast.ctx.err == 11  # EAGAIN


# -- receive -------------------------------------------------------------------------------

RX_BUFS = 0x40000  # receive buffers from here on, 4 KiB apart
MAC = bytes.fromhex("525400abcdef")
RX_MUTATIONS = ["readable", "unmapped", "read-only", "indirect", "zero-len"]
RX_SIZE, RX_CHAINS = 32, 8  # a chain's descriptors (up to 3) at 4 * its number


@st.composite
def receptions(draw: st.DrawFn) -> dict:
    """A packet as the backend reads it, the device's receive settings and the receive ring's
    chains: (buffers as (addr, len, flags) lists, in an indirect table?)."""
    vnet_hdr = draw(st.booleans())
    mergeable = vnet_hdr and draw(st.booleans())
    dst = draw(st.sampled_from([MAC, MAC, MAC, b"\xff" * 6, bytes.fromhex("01005e000001"),
                                bytes.fromhex("525400000001")]))
    flen = draw(st.integers(14, 300) | st.integers(14, 3000) | st.integers(1, 13) | st.just(1518))  # not 0: end of file
    frame = (dst + os.urandom(max(0, flen - 6)))[:flen]
    packet = (os.urandom(HDR_LEN) if vnet_hdr else b"") + frame
    chains = []
    # Buffers apart, or one after another as Linux carves mergeable buffers out of a page (a
    # chain's iovecs must not run into the next chain's).
    adjacent = draw(st.booleans())
    at = RX_BUFS
    for c in range(draw(st.integers(1, RX_CHAINS))):
        lens = draw(st.lists(st.integers(1, 2048), min_size=1, max_size=3))
        descs = []
        for i, n in enumerate(lens):
            descs.append([at if adjacent else RX_BUFS + 0x1000 * (4 * c + i), n, WRITE])
            at += n
        chains.append((descs, draw(st.booleans())))
    for m in draw(st.lists(st.sampled_from(RX_MUTATIONS), max_size=1)):  # one chain, sometimes
        descs = chains[draw(st.integers(0, len(chains) - 1))][0]
        i = draw(st.integers(0, len(descs) - 1))
        if m == "readable":
            descs[i][2] &= ~WRITE
        elif m == "unmapped":
            descs[i][0] = RAM - 8
        elif m == "read-only":
            descs[i][0] = RO_BASE + 0x1000 * i
        elif m == "indirect":
            descs[i][2] |= INDIRECT
        else:
            descs[i][1] = 0
    return {"vnet_hdr": vnet_hdr, "mergeable": mergeable, "guest_csum": draw(st.booleans()),
            "promisc": draw(st.booleans()), "limit": draw(st.sampled_from([1518, 65540])), "packet": packet,
            "chains": chains}


def place_rx(dev: VirtioNet, chains: list, next_avail: int) -> SplitQueue:
    """The chains made available in receiveq0 from next_avail on (descriptor slots 4 apart)."""
    dma = dev.dma
    for k, (descs, indirect) in enumerate(chains):
        head = 4 * k
        flat = [(a, n, f | (NEXT if i + 1 < len(descs) else 0), i + 1) for i, (a, n, f) in enumerate(descs)]
        if indirect:
            table = 0x8000 + 0x100 * k
            dma.write(table, b"".join(struct.pack("<QIHH", a, n, f, nx) for a, n, f, nx in flat))
            dma.write(DESC + 16 * head, struct.pack("<QIHH", table, 16 * len(flat), INDIRECT, 0))
        else:
            for i, (a, n, f, nx) in enumerate(flat):
                dma.write(DESC + 16 * (head + i), struct.pack("<QIHH", a, n, f, head + nx if nx < len(flat) else 0))
        dma.write(AVAIL + 4 + 2 * ((next_avail + k) % RX_SIZE), struct.pack("<H", head))
    dma.write(AVAIL, struct.pack("<HH", 0, (next_avail + len(chains)) & 0xFFFF))
    dma.write(USED, struct.pack("<HH", 0, next_avail))
    state = QueueState(max_size=256, size=RX_SIZE, ready=True, desc_table=DESC, avail_ring=AVAIL, used_ring=USED,
                       next_avail=next_avail, next_used=next_avail)
    return SplitQueue(0, state, dma)


def rx_device(fd: int, case: dict) -> VirtioNet:
    dev = device(fd, case["vnet_hdr"])
    dev._mergeable, dev._guest_csum, dev._rx_limit = case["mergeable"], case["guest_csum"], case["limit"]
    dev.promisc, dev.mac = case["promisc"], MAC
    return dev


def run_rx(fast: _NetFast, dev: VirtioNet, q: SplitQueue, fd: int) -> int:
    fast.set_receive(dev._hdr, dev._rx_limit, dev._guest_csum, dev._mergeable, dev.promisc, dev.mac)
    return fast.rx(q, fd, dev._hdr, dev.queue_stats(0))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=receptions(), next_avail=st.sampled_from([0, 3, 0xFFFE]))
def test_c_places_only_what_python_places(pair: tuple[socket.socket, socket.socket], case: dict,
                                          next_avail: int) -> None:
    a, b = pair
    packet = case["packet"]
    a.send(packet)
    dev = rx_device(b.fileno(), case)
    q = place_rx(dev, case["chains"], next_avail)
    before = dev.dma.read(0, RAM)
    fast = _NetFast(module, dev.dma)
    used = run_rx(fast, dev, q, b.fileno())
    if fast.held is not None:
        event("C left it")
        assert used == 0 and fast.held == packet
        assert q.state.next_avail == next_avail and q.pending_elsewhere == 0 and dev.dma.read(0, RAM) == before
        return
    event(f"C placed it in {used} buffers")
    assert used and q.pending_elsewhere == used and dev._wanted(packet, dev._hdr)
    assert q.flush() is True  # the first publication always interrupts
    after_c = dev.dma.read(0, RAM)
    counted_c = dev.queue_stats(0).c.ops[0], dev.queue_stats(0).c.bytes[0]
    assert (fast.run_frames, fast.run_bytes) == counted_c  # the run's own, as counted

    py = rx_device(b.fileno(), case)
    py.dma.write(0, before)
    q = place_rx(py, case["chains"], next_avail)
    if case["mergeable"]:
        trio.run(py._receive_merged, q, packet)
    else:
        trio.run(py._receive_whole, q, packet, py._hdr)
    q.flush()
    assert py.dma.read(0, RAM) == after_c
    assert q.state.next_avail == (next_avail + used) & 0xFFFF
    stats = py.queue_stats(0)
    assert counted_c == (stats.ops[0], stats.bytes[0]) == (1, len(packet) - py._hdr)


def test_a_burst_is_placed_in_one_run(pair: tuple[socket.socket, socket.socket]) -> None:
    """Packets queued on the fd go in one call, until it has no more (EAGAIN)."""
    a, b = pair
    case = {"vnet_hdr": False, "mergeable": False, "guest_csum": False, "promisc": True, "limit": 1518}
    frames = [MAC + os.urandom(100 + i) for i in range(5)]
    for f in frames:
        a.send(f)
    dev = rx_device(b.fileno(), case)
    q = place_rx(dev, [([[RX_BUFS + 0x1000 * i, 2048, WRITE]], False) for i in range(6)], 0)
    fast = _NetFast(module, dev.dma)
    assert run_rx(fast, dev, q, b.fileno()) == 5 and fast.held is None and fast.stop_reason == 0
    assert (fast.run_frames, fast.run_bytes) == (5, sum(map(len, frames)))
    run_rx(fast, dev, q, b.fileno())  # nothing more on the fd: the next run counts nothing
    assert (fast.run_frames, fast.run_bytes) == (0, 0)
    q.flush()
    for i, f in enumerate(frames):
        head, n = struct.unpack("<II", dev.dma.read(USED + 4 + 8 * i, 8))
        assert (head, n) == (4 * i, HDR_LEN + len(f))
        assert dev.dma.read(RX_BUFS + 0x1000 * i, n) == struct.pack("<10xH", 1) + f


def test_too_few_buffers_leave_the_packet_to_python(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    case = {"vnet_hdr": True, "mergeable": True, "guest_csum": True, "promisc": True, "limit": 65540}
    packet = bytes(HDR_LEN) + MAC + os.urandom(5000)
    a.send(packet)
    dev = rx_device(b.fileno(), case)
    q = place_rx(dev, [([[RX_BUFS + 0x1000 * i, 1536, WRITE]], False) for i in range(2)], 0)
    fast = _NetFast(module, dev.dma)
    assert run_rx(fast, dev, q, b.fileno()) == 0 and fast.held == packet and q.state.next_avail == 0


# -- a transmit kick served in the connection's task (VirtioNet.queue_kicked) ---------------------

KICK_SIZE = 8  # ring entries; batches wrap it


def kick_queue(dev: VirtioNet, next_avail: int) -> SplitQueue:
    state = QueueState(max_size=256, size=KICK_SIZE, ready=True, desc_table=DESC, avail_ring=AVAIL,
                       used_ring=USED, next_avail=next_avail, next_used=next_avail, event_idx_enabled=True)
    dev.dma.write(AVAIL, struct.pack("<HH", 0, next_avail))
    dev.dma.write(USED, struct.pack("<HH", 0, next_avail) + bytes(8 * KICK_SIZE + 2))
    return SplitQueue(1, state, dev.dma)


def make_available(dev: VirtioNet, q: SplitQueue, frames: list[tuple[int, bool]], serial: int) -> None:
    """Frames of ``n`` bytes (header included) after the driver's avail index, one descriptor
    each; ``python_only``: an indirect chain that ends in a writable descriptor, which C leaves
    to Python (Python sends the readable part)."""
    (idx,) = struct.unpack("<H", dev.dma.read(AVAIL + 2, 2))
    for k, (n, python_only) in enumerate(frames):
        slot = (idx + k) % KICK_SIZE
        addr = DATA + 0x4000 * slot
        dev.dma.write(addr, bytes([serial & 0xFF, k]) * (n // 2) + b"\x5a" * (n % 2))
        if python_only:
            table = 0x8000 + 0x40 * slot
            dev.dma.write(table, struct.pack("<QIHHQIHH", addr, n, NEXT, 1, addr + n, 1, WRITE, 0))
            dev.dma.write(DESC + 16 * slot, struct.pack("<QIHH", table, 32, INDIRECT, 0))
        else:
            dev.dma.write(DESC + 16 * slot, struct.pack("<QIHH", addr, n, 0, 0))
        dev.dma.write(AVAIL + 4 + 2 * slot, struct.pack("<H", slot))
    # used_event: an interrupt once anything of this batch is used (the driver's napi waits)
    dev.dma.write(AVAIL + 4 + 2 * KICK_SIZE, struct.pack("<H", idx))
    dev.dma.write(AVAIL + 2, struct.pack("<H", (idx + len(frames)) & 0xFFFF))


#: the time between two batches of kicks(): within TX_STREAM_NS of the one or two before
BATCH_STEP = 0.002


#: the stream threshold the kick tests run with (the device's is 256 KiB): a few batches
STREAM_BYTES = 12_000


def _bulk_bytes(run: list[tuple[int, bool]]) -> int:
    """What C counts of a run it sends, if the run is a bulk transfer's (more than
    TX_BULK_FRAME bytes a frame), else 0."""
    sizes = [n - HDR_LEN for n, _ in run]
    return sum(sizes) if sizes and sum(sizes) > len(sizes) * TX_BULK_FRAME else 0


def c_runs(batch: list[tuple[int, bool]]) -> list[list[tuple[int, bool]]]:
    """The frames C sends in one go each: the runs between frames for Python."""
    return [list(g) for python_only, g in itertools.groupby(batch, key=lambda f: f[1]) if not python_only]


def lingers(batches: list[list[tuple[int, bool]]], i: int) -> bool:
    """Whether batch ``i`` of kicks() waits from its kick (VirtioNet._linger): what C sends
    from the kick (up to the first frame for Python) is a bulk transfer's, and with it the
    stream has sent more than STREAM_BYTES, each bulk run within TX_STREAM_NS of the one
    before (batches are BATCH_STEP apart; the model of VirtioNet._note_bulk)."""
    last, streamed = None, 0
    for j in range(i + 1):
        runs = c_runs(batches[j])
        if j == i:
            first = list(itertools.takewhile(lambda f: not f[1], batches[i]))
            runs = [first] if first else []
        for run in runs:
            if nbytes := _bulk_bytes(run):
                now = j * BATCH_STEP
                near = last is not None and now - last <= TX_STREAM_NS / 1e9 + 1e-12
                streamed = streamed + nbytes if near else nbytes
                last = now
        if j == i:
            return bool(runs) and _bulk_bytes(runs[0]) > 0 and streamed > STREAM_BYTES
    return False


async def kicks(dev: VirtioNet, q: SplitQueue, batches: list[list[tuple[int, bool]]], inline: bool,
                peer: socket.socket) -> tuple[list[bytes], bytes, int, int]:
    """The transmit loop parked, then per batch: the driver adds it and kicks, the loop runs
    (and lingers) until everything waits again. Returns what the TAP saw, the used ring with
    avail_event, the loop's wake-ups and the interrupts signalled. Runs on a MockClock that
    jumps when every task sleeps."""
    wakeups = 0
    ring = q.doorbell.ring
    signals: list[int] = []
    signal = dev._signal

    def counted() -> None:
        nonlocal wakeups
        wakeups += 1
        ring()

    def counted_signal(vector: int, isr: int) -> None:
        signals.append(vector)
        signal(vector, isr)

    q.doorbell.ring = counted  # type: ignore[method-assign]
    dev._signal = counted_signal  # type: ignore[method-assign]
    sent: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev._tx_loop, q)
        await trio.sleep(1)
        for serial, batch in enumerate(batches):
            lingering = lingers(batches, serial)
            assert q.doorbell.parked
            make_available(dev, q, batch, serial)
            if inline:
                used_before, signalled = dev.dma.read(USED, 4), len(signals)
                dev.queue_kicked(q)
                # C sent its part of the batch before anything else ran; small frames are
                # published and signalled right away, a bulk transfer's wait for the loop
                now = received(peer)
                assert len(now) == len(list(itertools.takewhile(lambda f: not f[1], batch)))
                if lingering:
                    assert dev.dma.read(USED, 4) == used_before and len(signals) == signalled
                elif batch and not batch[0][1]:
                    assert dev.dma.read(USED, 4) != used_before  # published from the kick
                sent += now
            else:
                q.doorbell.ring()
            await trio.sleep(BATCH_STEP)  # the loop's pass and any linger
            sent += received(peer)
        nursery.cancel_scope.cancel()
    return sent, dev.dma.read(USED, 4 + 8 * KICK_SIZE + 2), wakeups, len(signals)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.tuples(st.integers(HDR_LEN + 14, 5000), st.booleans()), max_size=KICK_SIZE),
                        min_size=1, max_size=6),
       vnet_hdr=st.booleans(), next_avail=st.sampled_from([0, 5, 0xFFFE]))
def test_a_kick_sends_what_the_woken_loop_sends(pair: tuple[socket.socket, socket.socket],
                                                 batches: list[list[tuple[int, bool]]], vnet_hdr: bool,
                                                 next_avail: int) -> None:
    """Kicks served in the connection's task (C right away, the loop woken only for what C
    leaves or to linger) against kicks that wake the loop: the same frames in the same order,
    the same used ring, avail_event and counters, one interrupt per batch; the loop is woken
    only for batches with a frame for Python (or none at all) and bulk ones."""
    a, b = pair
    results = []
    for inline in (True, False):
        dev = device(a.fileno(), vnet_hdr)
        dev._fast = _NetFast(module, dev.dma)
        dev.tx_stream_bytes = STREAM_BYTES
        q = kick_queue(dev, next_avail)
        results.append((*trio.run(kicks, dev, q, batches, inline, b, clock=trio.testing.MockClock(autojump_threshold=0)),
                        dev.queue_stats(1).snapshot(), q.state.next_avail))
    (sent_i, used_i, wake_i, irq_i, stats_i, avail_i), (sent_t, used_t, wake_t, irq_t, stats_t, avail_t) = results
    assert sent_i == sent_t and len(sent_i) == sum(map(len, batches))
    assert irq_i == irq_t == sum(1 for batch in batches if batch), "one interrupt per batch the driver waits for"
    assert used_i == used_t and avail_i == avail_t == (next_avail + len(sent_t)) & 0xFFFF
    assert stats_i == stats_t
    assert wake_t == len(batches)
    assert wake_i == sum(1 for i, batch in enumerate(batches)
                         if not batch or any(python_only for _, python_only in batch) or lingers(batches, i))


def transmitting_device(fd: int) -> tuple[VirtioNet, SplitQueue]:
    """A device with the C paths and a transmit queue set up for kicks (offloads on)."""
    dev = device(fd, True)
    dev._fast = _NetFast(module, dev.dma)
    return dev, kick_queue(dev, 0)


def used_idx(dev: VirtioNet) -> int:
    return struct.unpack("<HH", dev.dma.read(USED, 4))[1]


def avail_event(dev: VirtioNet) -> int:
    return struct.unpack("<H", dev.dma.read(USED + 4 + 8 * KICK_SIZE, 2))[0]


@asynccontextmanager
async def tx_loop_running(dev: VirtioNet, q: SplitQueue) -> AsyncIterator[None]:
    """The queue's transmit loop, started and parked; cancelled when the block ends."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev._tx_loop, q)
        await trio.testing.wait_all_tasks_blocked()
        yield
        nursery.cancel_scope.cancel()


def stream_in_progress(dev: VirtioNet, q: SplitQueue) -> None:
    """As if a stream had just sent its first 256 KiB on the queue: its next bulk kick waits."""
    dev._tx_bulk_at[q.index] = (trio.current_time(), dev.tx_stream_bytes)


def test_only_a_streams_completions_wait(pair: tuple[socket.socket, socket.socket]) -> None:
    """A large write (a response) is published from its kicks, also when it leaves in two
    passes; once the passes, each within TX_STREAM_NS of the one before, have sent more than
    tx_stream_bytes, they are a stream's and wait; after a pause longer than TX_STREAM_NS
    the count starts again."""
    a, b = pair
    dev, q = transmitting_device(a.fileno())
    dev.tx_stream_bytes = 20_000
    clock = trio.testing.MockClock()

    async def main() -> None:
        async with tx_loop_running(dev, q):
            for serial in range(2):  # one response in two passes: 18,000 bytes
                make_available(dev, q, [(HDR_LEN + 9000, False)], serial)
                dev.queue_kicked(q)
                assert len(received(b)) == 1 and used_idx(dev) == serial + 1  # at once
                clock.jump(TX_STREAM_NS / 2e9)
            make_available(dev, q, [(HDR_LEN + 9000, False)], 2)  # 27,000: a stream
            dev.queue_kicked(q)
            assert len(received(b)) == 1 and used_idx(dev) == 2  # it waits
            await trio.testing.wait_all_tasks_blocked()
            clock.jump(TX_LINGER_NS / 1e9)
            await trio.testing.wait_all_tasks_blocked()
            assert used_idx(dev) == 3 and q.doorbell.parked
            clock.jump(2 * TX_STREAM_NS / 1e9)
            make_available(dev, q, [(HDR_LEN + 9000, False)], 3)
            dev.queue_kicked(q)
            assert len(received(b)) == 1 and used_idx(dev) == 4  # after a pause: at once again

    trio.run(main, clock=clock)


@pytest.mark.parametrize(("came_in", "waits"), [((3, 3 * 66), True), ((2, 2 * 1500), False)])
def test_data_received_between_bulk_passes_makes_an_exchange_not_a_stream(
        pair: tuple[socket.socket, socket.socket], came_in: tuple[int, int], waits: bool) -> None:
    """Between two bulk passes of a stream, ACKs (small frames) leave it a stream and its
    completions wait; data frames make it an exchange (the guest waits for a response, then
    sends the next request, which a wait would hold without a kick), published at once."""
    a, b = pair
    dev, q = transmitting_device(a.fileno())

    async def main() -> None:
        async with tx_loop_running(dev, q):
            stream_in_progress(dev, q)
            dev._note_received(*came_in)
            make_available(dev, q, [(HDR_LEN + 9000, False)], 0)
            dev.queue_kicked(q)
            assert len(received(b)) == 1
            assert used_idx(dev) == (0 if waits else 1)

    trio.run(main, clock=trio.testing.MockClock())


def test_a_bulk_transfers_completions_wait_and_gather(pair: tuple[socket.socket, socket.socket]) -> None:
    """TSO-sized frames go to the TAP at once but are published TX_LINGER_NS later, and no
    kick is asked for meanwhile: what the driver adds in that time goes out when the wait
    ends, with one used-index update and one interrupt for all of it (a kick that comes
    anyway sends at once and wakes no one). A small frame after that is published at once."""
    a, b = pair
    dev, q = transmitting_device(a.fileno())
    signals: list[int] = []
    signal = dev._signal
    dev._signal = lambda vector, isr: (signals.append(vector), signal(vector, isr))  # type: ignore[method-assign]
    clock = trio.testing.MockClock()

    async def main() -> None:
        async with tx_loop_running(dev, q):
            stream_in_progress(dev, q)
            make_available(dev, q, [(HDR_LEN + 4000, False), (HDR_LEN + 3000, False)], 0)
            dev.queue_kicked(q)
            assert len(received(b)) == 2 and used_idx(dev) == 0
            await trio.testing.wait_all_tasks_blocked()  # the loop took up the wait
            assert not q.doorbell.parked and used_idx(dev) == 0 and avail_event(dev) == 0  # no kick asked for
            clock.jump(TX_LINGER_NS / 2e9)
            await trio.testing.wait_all_tasks_blocked()
            make_available(dev, q, [(HDR_LEN + 3000, False)], 1)  # the driver does not kick for it
            await trio.testing.wait_all_tasks_blocked()
            assert received(b) == [] and used_idx(dev) == 0
            make_available(dev, q, [(HDR_LEN + 5000, False)], 2)
            ring = q.doorbell.ring
            q.doorbell.ring = lambda: pytest.fail("the waiting loop needs no wake-up")  # type: ignore[method-assign]
            dev.queue_kicked(q)  # a kick all the same: sent at once
            q.doorbell.ring = ring  # type: ignore[method-assign]
            assert len(received(b)) == 2 and used_idx(dev) == 0 and not signals and avail_event(dev) == 0
            clock.jump(TX_LINGER_NS / 2e9)
            await trio.testing.wait_all_tasks_blocked()
            assert used_idx(dev) == 4 and len(signals) == 1 and q.doorbell.parked and avail_event(dev) == 4
            make_available(dev, q, [(HDR_LEN + 60, False)], 3)  # a small one: published at once
            dev.queue_kicked(q)
            assert len(received(b)) == 1 and used_idx(dev) == 5 and len(signals) == 2 and q.doorbell.parked
            assert avail_event(dev) == 5

    trio.run(main, clock=clock)


def test_frames_added_during_the_wait_go_when_it_ends(pair: tuple[socket.socket, socket.socket]) -> None:
    """The driver adds a frame while a bulk transfer's completions wait, and sends no kick
    (none was asked for): the frame goes out when the wait ends."""
    a, b = pair
    dev, q = transmitting_device(a.fileno())
    clock = trio.testing.MockClock()

    async def main() -> None:
        async with tx_loop_running(dev, q):
            stream_in_progress(dev, q)
            make_available(dev, q, [(HDR_LEN + 4000, False)], 0)
            dev.queue_kicked(q)
            await trio.testing.wait_all_tasks_blocked()
            make_available(dev, q, [(HDR_LEN + 80, False)], 1)
            clock.jump(TX_LINGER_NS / 1e9)
            await trio.testing.wait_all_tasks_blocked()
            assert [len(f) for f in received(b)] == [HDR_LEN + 4000, HDR_LEN + 80]
            assert used_idx(dev) == 2 and q.doorbell.parked

    trio.run(main, clock=clock)


def test_a_kick_while_the_loop_is_not_parked_only_wakes_it(pair: tuple[socket.socket, socket.socket]) -> None:
    """A kick while the transmit loop is not asleep on its doorbell (it has not started, or
    holds a frame mid-way) must not send from the connection's task: C could overtake the
    frame the loop holds. It only rings the doorbell."""
    a, b = pair
    dev = device(a.fileno(), False)
    dev._fast = _NetFast(module, dev.dma)
    q = kick_queue(dev, 0)
    make_available(dev, q, [(64, False)], 0)
    assert not q.doorbell.parked
    dev.queue_kicked(q)
    assert received(b) == [] and q.state.next_avail == 0
    assert q.doorbell._event.is_set()


def test_a_kick_that_fails_in_c_still_wakes_the_loop(pair: tuple[socket.socket, socket.socket],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever goes wrong while a kick is served in the connection's task, the kick is not
    lost: the loop is woken (with EVENT_IDX the driver would not kick again)."""
    a, _b = pair
    dev = device(a.fileno(), False)
    dev._fast = _NetFast(module, dev.dma)
    q = kick_queue(dev, 0)

    def broken(queue: SplitQueue) -> int:
        raise RuntimeError("injected")

    monkeypatch.setattr(dev, "complete_fast", broken)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dev._sleep_until_kicked, q)
            await trio.testing.wait_all_tasks_blocked()
            assert q.doorbell.parked
            make_available(dev, q, [(64, False)], 0)
            dev.queue_kicked(q)
            await trio.testing.wait_all_tasks_blocked()
            assert not q.doorbell.parked  # woken: the sleep returned

    trio.run(main)


def test_a_quiesce_publishes_what_a_lingering_queue_holds(pair: tuple[socket.socket, socket.socket]) -> None:
    """Migration or a handover stops the device while a bulk transfer's completions wait:
    quiescing publishes them (the state saved has them used), and the loop, when its wait
    ends, writes nothing more to the ring."""
    a, b = pair
    dev, q = transmitting_device(a.fileno())
    dev.queues = [q]
    clock = trio.testing.MockClock()

    async def main() -> None:
        async with tx_loop_running(dev, q):
            stream_in_progress(dev, q)
            make_available(dev, q, [(HDR_LEN + 4000, False), (HDR_LEN + 4000, False)], 0)
            dev.queue_kicked(q)
            await trio.testing.wait_all_tasks_blocked()
            assert len(received(b)) == 2 and q.index in dev._tx_lingering
            assert used_idx(dev) == 0
            await dev.quiesce()
            ring = dev.dma.read(USED, 4 + 8 * KICK_SIZE + 2)
            assert struct.unpack("<HH", ring[:4])[1] == 2
            make_available(dev, q, [(HDR_LEN + 4000, False)], 1)  # stopped: not taken
            clock.jump(TX_LINGER_NS / 1e9)
            await trio.testing.wait_all_tasks_blocked()
            assert q.index not in dev._tx_lingering and received(b) == []
            assert dev.dma.read(USED, 4 + 8 * KICK_SIZE + 2) == ring

    trio.run(main, clock=clock)


def test_the_linger_waits_on_a_timerfd(pair: tuple[socket.socket, socket.socket]) -> None:
    """The device's own wait is a timerfd armed for tx_linger_ns, not trio.sleep (which
    cannot wait less than a millisecond); the wait ends when the timer does, a cancelled wait
    leaves nothing armed or pending for the next, and the transmit loop closes its timer."""
    a, _ = pair
    dev = VirtioNet(PairBackend(a.fileno(), True), tx_linger_ns=MAX_TX_LINGER_US * 1000)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dev._tx_pause, 1)
            await trio.testing.wait_all_tasks_blocked()
            timer = dev._tx_timers[1]
            assert isinstance(timer, PreciseTimer)
            assert 0 < timer.remaining_ns() <= MAX_TX_LINGER_US * 1000
            nursery.cancel_scope.cancel()  # as a reset does
        assert timer.remaining_ns() == 0
        dev.tx_linger_ns = 1
        with trio.fail_after(5):
            await dev._tx_pause(1)  # a short wait after the cancelled one: it ends
        assert timer.remaining_ns() == 0
        with pytest.raises(BlockingIOError):
            os.read(timer.fd, 8)  # nothing pending for the next wait

    trio.run(main)
    dev, q = transmitting_device(a.fileno())

    async def loop_ends() -> None:
        timer = dev._tx_timers[q.index] = PreciseTimer()
        async with tx_loop_running(dev, q):
            assert timer.fd is not None  # the parked loop holds it
        assert timer.fd is None and q.index not in dev._tx_timers  # cancelled, the loop closed it

    trio.run(loop_ends)


def test_tx_linger_us_0_publishes_a_bulk_transfer_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    """``--tx-linger-us 0``: TSO-sized frames are published and signalled from the kick, and
    the next kick is asked for, as small frames are."""
    parser = argparse.ArgumentParser()
    VirtioNet.add_arguments(parser)
    assert parser.parse_args(["--peer", "/x", "--tx-linger-us", "0"]).tx_linger_us == 0
    for bad in (-1, MAX_TX_LINGER_US * 1000 + 1):
        with pytest.raises(ValueError, match="--tx-linger-us"):
            VirtioNet(PairBackend(pair[0].fileno(), True), tx_linger_ns=bad)
    a, b = pair
    dev, q = transmitting_device(a.fileno())
    dev.tx_linger_ns = 0

    async def main() -> None:
        async with tx_loop_running(dev, q):
            stream_in_progress(dev, q)
            make_available(dev, q, [(HDR_LEN + 4000, False), (HDR_LEN + 3000, False)], 0)
            dev.queue_kicked(q)
            assert len(received(b)) == 2
            assert used_idx(dev) == 2  # published from the kick
            assert avail_event(dev) == 2  # next kick asked for
            await trio.testing.wait_all_tasks_blocked()
            assert q.doorbell.parked and not dev._tx_lingering

    trio.run(main, clock=trio.testing.MockClock())
