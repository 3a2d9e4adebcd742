"""virtio-blk's C fast path (VirtioBlk.complete_fast) against the Python path, differentially.

The same ring, guest memory and disk are handed to C and, from the same starting point, to
Python (SplitQueue.pop + VirtioBlk.process_nowait). Whatever C completes, Python must complete
too, with status OK, the same bytes in guest memory and on disk and the same used element;
whatever C leaves, it must leave untouched. Chains come from hypothesis: a valid IN or OUT
request, then zero to two mutations (descriptor flags, lengths, order, indirect tables,
unmapped or read-only buffers, sectors past the end, other request types).
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vfu_devices.fastio import load_module
from vfu_devices.virtio.blk import T_GET_ID, T_IN, T_OUT, VirtioBlk, _BlkFastPath
from vfu_devices.virtio.queue import QueueState, SplitQueue, VirtqueueError
from vfu_server.block import FileBackend
from vfu_server.testing.memory import map_guest_ram

PAGE = 4096
RAM = 1 << 20
RO_BASE, RO_SIZE = 0x200000, 64 * 1024
DISK = 1 << 20
SIZE = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
DATA = 0x10000
NEXT, WRITE, INDIRECT = 1, 2, 4

module = load_module()
pytestmark = pytest.mark.skipif(module is None, reason="the C helper could not be built here")


@pytest.fixture
def blk(tmp_path: Path) -> VirtioBlk:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    dev = VirtioBlk(FileBackend(path), poll_us=0)
    map_guest_ram(dev.dma, 0, RAM)
    map_guest_ram(dev.dma, RO_BASE, RO_SIZE, writable=False)
    return dev


MUTATIONS = ["type", "header-len", "readable-after-writable", "status-read-only", "header-writable", "status-len", "status-readable", "data-unaligned",
             "sector", "zero-len", "order", "unmapped", "read-only", "indirect", "indirect-nested",
             "huge"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], bool, int, int]:
    """(descriptors as (addr, len, flags, next), put them in an indirect table?, type, sector)."""
    rtype = draw(st.sampled_from([T_IN, T_OUT]))
    nseg = draw(st.integers(1, 4))
    lens = [512 * draw(st.integers(1, 8)) for _ in range(nseg)]
    sector = draw(st.integers(0, DISK // 512 - sum(lens) // 512))
    pages = draw(st.lists(st.integers(DATA // PAGE, RAM // PAGE - 3), min_size=nseg + 2, max_size=nseg + 2))
    hdr_addr = pages[0] * PAGE
    status_addr = pages[1] * PAGE + draw(st.integers(0, PAGE - 1))
    data = [(pages[2 + i] * PAGE, n) for i, n in enumerate(lens)]
    dflag = WRITE if rtype == T_IN else 0
    descs = [[hdr_addr, 16, 0], *[[a, n, dflag] for a, n in data], [status_addr, 1, WRITE]]
    indirect = draw(st.booleans())
    for m in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2) | st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=1)):
        if m == "type":
            rtype = draw(st.sampled_from([T_GET_ID, 4, 11, 99]))
        elif m == "header-len":
            descs[0][1] = draw(st.sampled_from([8, 15, 17, 528]))
        elif m == "header-writable":
            descs[0][2] |= WRITE
        elif m == "status-len":
            descs[-1][1] = draw(st.sampled_from([2, 513]))
        elif m == "status-readable":
            descs[-1][2] &= ~WRITE
        elif m == "data-unaligned":
            descs[1][1] = max(1, descs[1][1] + draw(st.sampled_from([1, 100, -256])))  # after zero-len too
        elif m == "sector":
            sector = draw(st.sampled_from([DISK // 512, DISK // 512 - 1, 1 << 60, (1 << 64) - 1]))
        elif m == "zero-len":
            descs[1][1] = 0
        elif m == "order" and len(descs) > 3:
            descs[1], descs[2] = descs[2], descs[1]
            descs[1][2] ^= WRITE
        elif m == "unmapped":
            descs[draw(st.integers(0, len(descs) - 1))][0] = draw(st.sampled_from([RAM - 8, RAM, 1 << 40]))
        elif m == "read-only":
            descs[draw(st.integers(0, len(descs) - 1))][0] = RO_BASE + PAGE * draw(st.integers(0, 8))
        elif m == "indirect":
            indirect = not indirect
        elif m == "indirect-nested":
            descs[1][2] |= INDIRECT
        elif m == "readable-after-writable" and len(descs) > 3:
            descs[-2][2] ^= WRITE  # IN: a readable data descriptor after a writable one
        elif m == "status-read-only":
            descs[-1][0] = RO_BASE + draw(st.integers(0, RO_SIZE - 1))
        elif m == "huge":
            descs[1][1] = 512 * 1024
    chain = [(a, n, f | (NEXT if i + 1 < len(descs) else 0), i + 1) for i, (a, n, f) in enumerate(descs)]
    if draw(st.integers(0, 19)) == 0:
        a, n, f, _ = chain[0]
        chain[0] = (a, n, f, 200)  # a next index outside the table
    return chain, indirect, rtype, sector


def place(dev: VirtioBlk, chain: list[tuple[int, int, int, int]], indirect: bool, rtype: int, sector: int,
          next_avail: int, size: int = SIZE) -> SplitQueue:
    dma = dev.dma
    hdr_addr = chain[0][0]
    if hdr_addr + 16 <= RAM:
        dma.write(hdr_addr, struct.pack("<IIQ", rtype, 0, sector))
    head = next_avail % size  # any free slot of the table
    if indirect:
        table = 0x8000
        dma.write(table, b"".join(struct.pack("<QIHH", a, n, f, nx) for a, n, f, nx in chain))
        dma.write(DESC + 16 * head, struct.pack("<QIHH", table, 16 * len(chain), INDIRECT, 0))
    else:
        slots = [(head + i) % size for i in range(len(chain))]
        for i, (a, n, f, nx) in enumerate(chain):
            nxt = slots[nx] if nx < len(chain) else nx if nx >= size else 0
            dma.write(DESC + 16 * slots[i], struct.pack("<QIHH", a, n, f, nxt))
    dma.write(AVAIL + 4 + 2 * (next_avail % size), struct.pack("<H", head))
    dma.write(AVAIL, struct.pack("<HH", 0, (next_avail + 1) & 0xFFFF))  # flags, idx
    dma.write(USED, struct.pack("<HH", 0, next_avail))  # flags, idx: nothing used yet
    state = QueueState(max_size=256, size=size, ready=True, desc_table=DESC, avail_ring=AVAIL, used_ring=USED,
                       next_avail=next_avail, next_used=next_avail)
    return SplitQueue(0, state, dma)


def snapshot(dev: VirtioBlk) -> tuple[bytes, bytes, bytes]:
    assert dev.backend is not None
    return dev.dma.read(0, RAM), dev.dma.read(RO_BASE, RO_SIZE), os.pread(dev.backend.fast_io()[0], DISK, 0)


def restore(dev: VirtioBlk, snap: tuple[bytes, bytes, bytes]) -> None:
    """Back to a snapshot (the read-only map is never written by either path)."""
    assert dev.backend is not None
    dev.dma.write(0, snap[0])
    os.pwrite(dev.backend.fast_io()[1], snap[2], 0)


def run_c(blk: VirtioBlk, case: tuple, next_avail: int, size: int,
          write_behind: bool = False) -> tuple[SplitQueue, _BlkFastPath, int, tuple, tuple]:
    """The chain placed and handed to C: (queue, fast path, completed, memory and disk before
    and after). ``write_behind``: as while the guest flushes often (the write-back of what C
    wrote starts after the run, which must change nothing but the page cache's state)."""
    chain, indirect, rtype, sector = case
    q = place(blk, chain, indirect, rtype, sector, next_avail, size)
    before = snapshot(blk)
    assert blk.backend is not None
    fast = _BlkFastPath(module, blk.dma)
    until = time.monotonic_ns() + 10**10 if write_behind else 0
    done = fast.run(q, blk.backend.fast_io(), blk.backend.size, write_behind_until=until)
    if fast.write_behind.pending:
        fast.write_behind.start()
    return q, fast, done, before, snapshot(blk)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=requests(), next_avail=st.sampled_from([0, 5, 15, 0xFFFF, 0xFFF3]), write_behind=st.booleans())
def test_c_completes_only_what_python_completes(blk: VirtioBlk, case: tuple, next_avail: int,
                                                write_behind: bool) -> None:
    q, _fast, done, before, after_c = run_c(blk, case, next_avail, SIZE, write_behind)
    if not done:
        event("C left it")
        assert q.state.next_avail == next_avail and q.pending_elsewhere == 0
        assert after_c == before, "a request left to Python changed memory or the disk"
        return
    event("C completed it")
    assert q.state.next_avail == (next_avail + 1) & 0xFFFF and q.pending_elsewhere == 1
    same_as_python(blk, case[:4], next_avail, SIZE, before, after_c)


def same_as_python(blk: VirtioBlk, case: tuple, next_avail: int, size: int, before: tuple, after_c: tuple) -> None:
    """Python, from the same start as C (``before``), ends where C ended (``after_c``)."""
    chain, indirect, rtype, sector = case
    used_c = blk.dma.read(USED + 4 + 8 * (next_avail % size), 8)
    restore(blk, before)
    q = place(blk, chain, indirect, rtype, sector, next_avail, size)
    try:
        py_chain = q.pop()
    except VirtqueueError as exc:
        pytest.fail(f"C completed a chain Python refuses: {exc}")
    assert py_chain is not None
    written = blk.process_nowait(q, py_chain)
    assert written is not None, "C completed a request Python would not do inline"
    q.push(py_chain, written)
    q.flush()
    after_py = snapshot(blk)
    used_py = blk.dma.read(USED + 4 + 8 * (next_avail % size), 8)
    assert used_c == used_py == struct.pack("<II", py_chain.head, written)
    status_addr = chain[-1][0]
    assert blk.dma.read(status_addr, 1) == b"\0"
    # Same guest memory (but the used index, which only Python's flush published here) and disk.
    strip = slice(USED, USED + 4)
    assert after_c[0][: strip.start] + after_c[0][strip.stop :] == after_py[0][: strip.start] + after_py[0][strip.stop :]
    assert after_c[2] == after_py[2]


LONG_SIZE = 256  # the queue size Linux gets from the device: chains of up to 256 descriptors


@st.composite
def long_requests(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int]], bool, int, int, bool]:
    """A guest's large request: up to seg_max (254) data descriptors on scattered pages, so
    that after merging there are far more pieces than the 64 iovecs C once took; sometimes one
    thing wrong with it. The last item says whether the chain is valid as drawn."""
    rtype = draw(st.sampled_from([T_IN, T_OUT]))
    nseg = draw(st.integers(1, LONG_SIZE - 2))
    lens = [512 * draw(st.integers(1, 8)) for _ in range(nseg)]
    total = sum(lens)
    if total > DISK:  # keep it inside the 1 MiB disk
        lens = [512] * nseg
        total = 512 * nseg
    sector = draw(st.integers(0, (DISK - total) // 512))
    # Pages may repeat (a guest may read one page twice) and come in any order.
    pages = draw(st.lists(st.integers(DATA // PAGE, RAM // PAGE - 3), min_size=nseg, max_size=nseg))
    dflag = WRITE if rtype == T_IN else 0
    descs = [[0x11000, 16, 0], *[[p * PAGE, n, dflag] for p, n in zip(pages, lens, strict=True)], [0x12000, 1, WRITE]]
    valid = True
    if draw(st.integers(0, 3)) == 0:
        valid = False
        i = draw(st.integers(1, nseg))
        m = draw(st.sampled_from(["unmapped", "read-only", "unaligned", "flag"]))
        if m == "unmapped":
            descs[i][0] = draw(st.sampled_from([RAM - 8, 1 << 40]))
        elif m == "read-only":
            descs[i][0] = RO_BASE + PAGE * draw(st.integers(0, 8))
            valid = rtype == T_OUT  # reading a read-only page is fine
        elif m == "unaligned":
            descs[i][1] += 1
        else:
            descs[i][2] ^= WRITE
    indirect = draw(st.booleans()) or len(descs) > SIZE
    chain = [(a, n, f | (NEXT if i + 1 < len(descs) else 0), i + 1) for i, (a, n, f) in enumerate(descs)]
    return chain, indirect, rtype, sector, valid


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=long_requests(), next_avail=st.sampled_from([0, 0xFFFF]))
def test_long_chains_c_against_python(blk: VirtioBlk, case: tuple, next_avail: int) -> None:
    """Long chains (issue 18): C takes every valid one, however many pieces it has, and does
    exactly what Python does; with one thing wrong it leaves the chain untouched."""
    chain, valid = case[0], case[4]
    _q, fast, done, before, after_c = run_c(blk, case[:4], next_avail, LONG_SIZE)
    if not valid:
        assert done == 0 and after_c == before
        return
    assert done == 1, f"C left a valid chain of {len(chain)} descriptors (stop {fast.stop_reason})"
    event("pieces > 64" if len({a for a, _, _, _ in chain}) > 66 else "pieces <= 64")
    same_as_python(blk, case[:4], next_avail, LONG_SIZE, before, after_c)


def test_one_mebibyte_of_scattered_pages(tmp_path: Path) -> None:
    """What a guest's 1 MiB read is: 254 scattered pages in one indirect table, in C."""
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(4 << 20))
    dev = VirtioBlk(FileBackend(path), poll_us=0)
    map_guest_ram(dev.dma, 0, 4 << 20)
    pages = [0x100000 + PAGE * (2 * i) for i in reversed(range(254))]  # none contiguous
    chain = [(0x11000, 16, NEXT, 1), *[(p, PAGE, WRITE | NEXT, i + 2) for i, p in enumerate(pages)],
             (0x12000, 1, WRITE, 0)]
    q = place(dev, chain, True, T_IN, 64, 0, LONG_SIZE)
    assert dev.backend is not None
    fast = _BlkFastPath(module, dev.dma)
    assert fast.run(q, dev.backend.fast_io(), dev.backend.size) == 1, fast.stop_reason
    disk = os.pread(dev.backend.fast_io()[0], 254 * PAGE, 64 * 512)
    assert b"".join(dev.dma.read(p, PAGE) for p in pages) == disk
    q.flush()
    assert struct.unpack("<II", dev.dma.read(USED + 4, 8)) == (0, 254 * PAGE + 1)


def test_indirect_chain_and_publication(blk: VirtioBlk) -> None:
    data = [(0x20000, 4096), (0x40000, 1024)]
    chain = [(0x11000, 16, NEXT, 1), (data[0][0], 4096, WRITE | NEXT, 2), (data[1][0], 1024, WRITE | NEXT, 3),
             (0x12000, 1, WRITE, 0)]
    q = place(blk, chain, True, T_IN, 8, 0)
    assert blk.backend is not None
    fast = _BlkFastPath(module, blk.dma)
    assert fast.run(q, blk.backend.fast_io(), blk.backend.size) == 1
    disk = os.pread(blk.backend.fast_io()[0], 5120, 8 * 512)
    assert blk.dma.read(0x20000, 4096) + blk.dma.read(0x40000, 1024) == disk
    # Not visible to the driver until flush publishes the used index.
    assert struct.unpack("<H", blk.dma.read(USED + 2, 2))[0] == 0
    q.flush()
    assert struct.unpack("<H", blk.dma.read(USED + 2, 2))[0] == 1
    assert struct.unpack("<II", blk.dma.read(USED + 4, 8)) == (0, 5121)


@pytest.mark.parametrize("broken", ["next-out-of-range", "status-read-only", "readable-after-writable",
                                    "status-not-last", "indirect-too-long"])
def test_c_refuses(blk: VirtioBlk, broken: str) -> None:
    """Chains that would make C read outside the table or write read-only memory."""
    chain = [(0x11000, 16, NEXT, 1), (0x20000, 4096, WRITE | NEXT, 2), (0x21000, 512, WRITE | NEXT, 3),
             (0x12000, 1, WRITE, 0)]
    indirect = False
    if broken == "next-out-of-range":
        chain[1] = (0x20000, 4096, WRITE | NEXT, 200)
        # What a reader past the table would find there: a good status descriptor.
        blk.dma.write(DESC + 16 * 200, struct.pack("<QIHH", 0x12000, 1, WRITE, 0))
    elif broken == "status-read-only":
        chain[3] = (RO_BASE + 5, 1, WRITE, 0)
    elif broken == "readable-after-writable":
        chain[2] = (0x21000, 512, NEXT, 3)
    elif broken == "status-not-last":
        chain[3] = (0x12000, 1, WRITE | NEXT, 4)
        chain.append((0x22000, 512, WRITE, 0))
    elif broken == "indirect-too-long":
        indirect = True
        chain = chain + [(0x22000 + 512 * i, 512, WRITE | NEXT, 5 + i) for i in range(SIZE)]
    q = place(blk, chain, indirect, T_IN, 0, 0)
    before = snapshot(blk)
    assert blk.backend is not None
    fast = _BlkFastPath(module, blk.dma)
    assert fast.run(q, blk.backend.fast_io(), blk.backend.size) == 0
    assert fast.stop_reason in (module.lib.VFU_STOP_COMMAND, module.lib.VFU_STOP_DATA)
    assert snapshot(blk) == before


def test_not_while_dirty_pages_are_logged(blk: VirtioBlk) -> None:
    """While migration logs dirty pages, Python must see every write to guest memory."""
    chain = [(0x11000, 16, NEXT, 1), (0x20000, 4096, WRITE | NEXT, 2), (0x12000, 1, WRITE, 0)]
    q = place(blk, chain, False, T_IN, 0, 0)
    blk._fast = _BlkFastPath(module, blk.dma)
    blk.dma.dirty_hook = lambda iova, length: None
    assert blk.complete_fast(q) == 0 and q.state.next_avail == 0
    blk.dma.dirty_hook = None
    q.accepting = False  # quiescing
    assert blk.complete_fast(q) == 0
    q.accepting = True
    assert blk.complete_fast(q) == 1 and q.pending_elsewhere == 1


def _write_request(blk: VirtioBlk, sector: int) -> SplitQueue:
    chain = [(DATA, 16, NEXT, 1), (DATA + PAGE, 4096, NEXT, 2), (DATA + 2 * PAGE, 1, WRITE, 3)]
    return place(blk, chain, False, T_OUT, sector, 0)


@pytest.mark.parametrize("until", ["none", "expired", "running"])
def test_write_behind_notes_what_c_wrote_only_while_asked(blk: VirtioBlk, until: str) -> None:
    """While the backend asks for write-behind (a deadline in the future), a run notes the byte
    range it wrote and write_behind() starts its write-back and forgets it; with no deadline or
    an expired one nothing is noted."""
    assert blk.backend is not None
    fast = _BlkFastPath(module, blk.dma)
    deadline = {"none": 0, "expired": time.monotonic_ns() - 1, "running": time.monotonic_ns() + 10**10}[until]
    q = _write_request(blk, 8)
    assert fast.run(q, blk.backend.fast_io(), blk.backend.size, write_behind_until=deadline) == 1
    wb = fast.ctx.wb
    if until != "running":
        assert not fast.write_behind.pending and wb.fd == -1
        return
    assert fast.write_behind.pending
    assert (wb.fd, wb.lo, wb.hi) == (blk.backend.fast_io()[1], 8 * 512, 8 * 512 + 4096)
    fast.write_behind.start()
    assert not fast.write_behind.pending and wb.fd == -1
