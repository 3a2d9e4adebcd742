"""The C fast path of NVMe Read/Write (devices/nvme/fastio.py) against the Python rules.

Every command C completes must be one the Python path completes with status Success, with the
same data moved and the same completion entry; every command it does not accept must be left
untouched (head, CQ, guest memory, file) for Python. Commands come from hypothesis, biased
towards the edges: PRP offsets, PRP lists, ranges at the end of the namespace, unmapped or
read-only guest memory, flags Python refuses.
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
from vfu_devices.nvme.command import Command
from vfu_devices.nvme.controller import NvmeController
from vfu_devices.nvme.errors import NvmeError
from vfu_devices.nvme.fastio import FastIo
from vfu_devices.nvme.namespace import Namespace
from vfu_devices.nvme.state import CompletionQueueState, SubmissionQueueState
from vfu_server.block import FileBackend
from vfu_server.protocol.errors import DmaError
from vfu_server.testing.memory import map_guest_ram

PAGE = 4096
RAM = 1 << 20  # guest RAM at IOVA 0, writable
RO_BASE, RO_SIZE = 0x200000, 64 * 1024  # a read-only map above a hole
DISK = 1 << 20
SQ_BASE, CQ_BASE = 0x1000, 0x3000
SQ_SIZE = CQ_SIZE = 16

module = load_module()
pytestmark = pytest.mark.skipif(module is None, reason="the C helper could not be built here")


@pytest.fixture
def ctrl(tmp_path: Path) -> NvmeController:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    backend = FileBackend(path)
    c = NvmeController([backend], poll_us=0)
    c.namespaces = {1: Namespace(c.state.namespaces[0], backend)}
    map_guest_ram(c.dma, 0, RAM)
    map_guest_ram(c.dma, RO_BASE, RO_SIZE, writable=False)
    return c


def queues(head: int = 0) -> tuple[SubmissionQueueState, CompletionQueueState]:
    return (SubmissionQueueState(1, SQ_BASE, SQ_SIZE, cqid=1, head=head, tail=head),
            CompletionQueueState(1, CQ_BASE, CQ_SIZE, vector=0))


def submit(ctrl: NvmeController, sq: SubmissionQueueState, cmd: Command) -> None:
    ctrl.dma.write(sq.base + 64 * sq.tail, cmd.encode())
    sq.tail = (sq.tail + 1) % sq.size


def snapshot(ctrl: NvmeController) -> tuple[bytes, bytes, bytes]:
    backend = ctrl.namespaces[1].backend
    return (ctrl.dma.read(0, RAM), ctrl.dma.read(RO_BASE, RO_SIZE),
            os.pread(backend.fast_io()[0], DISK, 0))


def guest(snap: tuple[bytes, bytes, bytes], addr: int, n: int) -> bytes:
    return snap[0][addr : addr + n] if addr < RAM else snap[1][addr - RO_BASE : addr - RO_BASE + n]


def python_verdict(ctrl: NvmeController, cmd: Command) -> tuple[int, list[tuple[int, int]]] | None:
    """(file offset, guest segments) if the Python path completes ``cmd`` with Success."""
    if cmd.opcode not in (0x01, 0x02) or cmd.flags & 3:
        return None
    try:
        ns, offset, length = ctrl.io._rw_range(cmd)
        segs = cmd.segments(ctrl.dma, length, ctrl.page_size, to_host=cmd.opcode == 0x02)
        for addr, n in segs:
            ctrl.dma.views(addr, n, write=cmd.opcode == 0x02)
    except (NvmeError, DmaError):
        return None
    if cmd.opcode == 0x01 and (cmd.cdw12 & 1 << 30 or ns.backend.read_only):
        return None  # FUA goes through a task; not an error, but not inline either
    return offset, segs


DATA = 0x10000  # data buffers and PRP lists live above the rings
DATA_PAGES = st.integers(DATA // PAGE, RAM // PAGE - 1).map(lambda p: p * PAGE)
MUTATIONS = ["opcode", "fuse", "psdt", "nsid", "range", "prinfo", "fua", "prp1-offset", "prp2-offset",
             "entry-offset", "entry-unmapped", "entry-read-only", "prp1-read-only", "list-chained",
             "list-unmapped", "prp1-hole"]


@st.composite
def commands(draw: st.DrawFn) -> tuple[Command, list[int], int]:
    """A Read or Write the Python path completes, then zero to two mutations of it; also
    the PRP list to place at PRP2 and where to place it (0: nowhere)."""
    opcode = draw(st.sampled_from([0x02, 0x01]))
    blocks = DISK // 512
    nlb = draw(st.sampled_from([1, 8, 9, 16, 64, 255, 256, 257, 300, 1024, 1025]) | st.integers(1, 256))  # MDTS: 1024
    slba = draw(st.integers(0, blocks - nlb))
    length = nlb * 512
    prp1 = draw(DATA_PAGES) + draw(st.sampled_from([0, 0, 512, 4092]) | st.integers(0, PAGE // 4 - 1).map(lambda d: 4 * d))
    first = min(length, PAGE - prp1 % PAGE)
    pages_needed = -(-(length - first) // PAGE)
    contiguous = draw(st.booleans())
    start = draw(DATA_PAGES)
    entries = [(start + i * PAGE) % RAM if contiguous else draw(DATA_PAGES) for i in range(pages_needed)]
    entries = [max(e, DATA) for e in entries]
    prp2, list_at = 0, 0
    if pages_needed == 1:
        prp2 = entries[0]
    elif pages_needed > 1:
        room = PAGE - 8 * pages_needed
        list_at = draw(DATA_PAGES) + 8 * draw(st.integers(0, room // 8))
        prp2 = list_at
    flags, nsid, cdw12 = 0, 1, nlb - 1
    mutations = st.sampled_from(MUTATIONS)
    for mutation in draw(st.lists(mutations, max_size=2) | st.lists(mutations, min_size=1, max_size=1)):
        if mutation == "opcode":
            opcode = draw(st.sampled_from([0x00, 0x05, 0x08, 0x09, 0x80]))
        elif mutation == "fuse":
            flags |= draw(st.sampled_from([1, 2]))
        elif mutation == "psdt":
            flags |= draw(st.sampled_from([0x40, 0x80]))
        elif mutation == "nsid":
            nsid = draw(st.sampled_from([0, 2, 0xFFFFFFFF]))
        elif mutation == "range":
            slba = draw(st.sampled_from([blocks - nlb + 1, blocks, 1 << 40, (1 << 64) - 1]))
        elif mutation == "prinfo":
            cdw12 |= draw(st.sampled_from([1, 2, 8, 15])) << 26
        elif mutation == "fua":
            cdw12 |= 1 << 30
        elif mutation == "prp1-offset":
            prp1 += draw(st.sampled_from([1, 2, 3]))
        elif mutation == "prp2-offset" and prp2:
            prp2 += draw(st.sampled_from([4, 512, 8])) if pages_needed == 1 else draw(st.sampled_from([1, 4]))
            list_at = prp2 if pages_needed > 1 else 0
        elif mutation == "entry-offset" and entries:
            i = draw(st.integers(0, len(entries) - 1))
            entries[i] += draw(st.sampled_from([8, 512, 4088]))
            prp2 = entries[0] if pages_needed == 1 else prp2
        elif mutation == "entry-unmapped" and entries:
            i = draw(st.integers(0, len(entries) - 1))
            entries[i] = draw(st.sampled_from([RAM, RO_BASE - PAGE, 1 << 40]))
            prp2 = entries[0] if pages_needed == 1 else prp2
        elif mutation == "entry-read-only" and entries:
            i = draw(st.integers(0, len(entries) - 1))
            entries[i] = RO_BASE + PAGE * draw(st.integers(0, RO_SIZE // PAGE - 1))
            prp2 = entries[0] if pages_needed == 1 else prp2
        elif mutation == "prp1-read-only":
            prp1 = RO_BASE + (prp1 % PAGE) + PAGE * draw(st.integers(0, RO_SIZE // PAGE - 2))
        elif mutation == "prp1-hole":
            prp1 = draw(st.sampled_from([RAM - 8, RAM, RO_BASE - 8, 1 << 40]))
        elif mutation == "list-chained" and pages_needed > 2:
            prp2 = list_at = (list_at & ~(PAGE - 1)) + PAGE - 8 * draw(st.integers(1, pages_needed - 1))
        elif mutation == "list-unmapped" and pages_needed > 1:
            prp2, list_at = draw(st.sampled_from([RAM - 8, RO_BASE - 16, 1 << 40])), 0
    cmd = Command(opcode, flags, draw(st.integers(0, 0xFFFF)), nsid, 0, prp1, prp2,
                  slba & 0xFFFFFFFF, (slba >> 32) & 0xFFFFFFFF, cdw12, 0, 0, 0, bytes(16))
    return cmd, entries if pages_needed > 1 else [], list_at


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=commands(), head=st.integers(0, SQ_SIZE - 1), write_behind=st.booleans())
def test_c_accepts_only_what_python_completes(ctrl: NvmeController, case: tuple[Command, list[int], int],
                                              head: int, write_behind: bool) -> None:
    """``write_behind``: as while the guest flushes often; the write-back started after the run
    changes nothing C or Python is seen to do."""
    cmd, entries, list_at = case
    for ns in ctrl.namespaces.values():
        ns.backend.write_behind_until = time.monotonic_ns() + 10**10 if write_behind else 0
    if list_at and entries and list_at + 8 * len(entries) <= RAM:
        ctrl.dma.write(list_at, struct.pack(f"<{len(entries)}Q", *entries))
    fast = FastIo(ctrl, module)
    sq, cq = queues(head)
    submit(ctrl, sq, cmd)
    expected = python_verdict(ctrl, cmd)
    before = snapshot(ctrl)
    smart = ctrl.state.smart
    counters = (smart.bytes_read, smart.bytes_written, smart.host_read_commands, smart.host_write_commands)
    done = fast.run(sq, cq)
    noted = fast.write_behind.pending
    if noted:
        fast.write_behind.start()
    event(f"C {'completed' if done else 'left it'}, Python {'completes' if expected else 'does not'}")
    after = snapshot(ctrl)
    if not done:
        assert sq.head == head and cq.tail == 0 and cq.phase == 1
        assert after == before, "a command left to Python changed memory or the file"
        return
    assert expected is not None, f"C completed a command Python would not: {cmd}"
    offset, segs = expected
    length = sum(n for _, n in segs)
    assert done == 1 and sq.head == (head + 1) % SQ_SIZE
    if cmd.opcode == 0x02:
        # The file's bytes land in the segments in order (a later one wins where they overlap).
        ram, pos = bytearray(before[0]), offset
        for a, n in segs:
            ram[a : a + n] = before[2][pos : pos + n]
            pos += n
        ram[CQ_BASE : CQ_BASE + 16] = after[0][CQ_BASE : CQ_BASE + 16]
        assert after[0] == bytes(ram) and after[1:] == before[1:]
        assert smart.bytes_read - counters[0] == length and smart.host_read_commands - counters[2] == 1
    else:
        data = b"".join(guest(before, a, n) for a, n in segs)
        assert after[2][offset : offset + length] == data
        assert noted == write_behind, "a write C did is noted for write-behind exactly while asked"
        assert smart.bytes_written - counters[1] == length and smart.host_write_commands - counters[3] == 1
    dw0, dw1, sqhd, sqid, cid, status = struct.unpack("<IIHHHH", ctrl.dma.read(CQ_BASE, 16))
    assert (dw0, dw1, sqhd, sqid, cid, status) == (0, 0, sq.head, 1, cmd.cid, 1)  # phase 1, Success
    assert cq.tail == 1


def rw(opcode: int, cid: int, slba: int, nlb: int, prp1: int, prp2: int = 0, cdw12: int = 0) -> Command:
    return Command(opcode, 0, cid, 1, 0, prp1, prp2, slba, 0, (nlb - 1) | cdw12, 0, 0, 0, bytes(16))


def test_a_run_stops_at_the_first_entry_for_python_and_wraps_the_cq(ctrl: NvmeController) -> None:
    fast = FastIo(ctrl, module)
    sq, cq = queues()
    cq.head, cq.tail = 1, 14  # room for two: entries 14 and 15, then the CQ is full
    for i in range(3):
        submit(ctrl, sq, rw(0x02, 100 + i, i * 8, 8, 0x10000 + i * PAGE))
    assert fast.run(sq, cq) == 2
    assert fast.stop_reason == module.lib.VFU_STOP_CQ_FULL
    assert (sq.head, cq.tail, cq.phase) == (2, 0, 0)  # wrapped: the phase flipped
    cq.head = 3  # the host consumed two more
    submit(ctrl, sq, rw(0x02, 200, 0, 8, 0x10001))  # misaligned PRP1: Python's to refuse
    assert fast.run(sq, cq) == 1  # the third read, then the bad one stops the run
    assert fast.stop_reason == module.lib.VFU_STOP_DATA and sq.head == 3 and cq.tail == 1
    _, _, _, _, cid, status = struct.unpack("<IIHHHH", ctrl.dma.read(CQ_BASE, 16))
    assert (cid, status) == (102, 0)  # phase 0 after the wrap


def test_prp_list_and_merged_iovecs(ctrl: NvmeController) -> None:
    fast = FastIo(ctrl, module)
    sq, cq = queues()
    pages = [0x20000, 0x21000, 0x40000, 0x41000, 0x42000]  # two contiguous runs
    ctrl.dma.write(0x30000, struct.pack("<4Q", *pages[1:]))
    submit(ctrl, sq, rw(0x02, 1, 64, 40, pages[0], 0x30000))  # 20 KiB: PRP1 + a list of 4
    assert fast.run(sq, cq) == 1
    disk = os.pread(ctrl.namespaces[1].backend.fast_io()[0], 5 * PAGE, 64 * 512)
    assert b"".join(ctrl.dma.read(p, PAGE) for p in pages) == disk


def test_nothing_while_dirty_pages_are_logged_or_for_other_backends(ctrl: NvmeController) -> None:
    sq, cq = queues()
    submit(ctrl, sq, rw(0x02, 1, 0, 8, 0x10000))
    ctrl.state.cqs[1], ctrl.state.sqs[1] = cq, sq
    from vfu_devices.nvme.queues import CqRuntime

    ctrl.cq_rt[1] = CqRuntime(1)
    ctrl.fastio = FastIo(ctrl, module)
    ctrl.dma.dirty_hook = lambda iova, length: None
    assert ctrl._run_fast(sq) == 0 and sq.head == 0
    ctrl.dma.dirty_hook = None
    assert ctrl._run_fast(sq) == 1
    # A closed backend offers no fd: everything is left to Python (which reports the error).
    submit(ctrl, sq, rw(0x02, 2, 0, 8, 0x10000))
    ctrl.namespaces[1].backend._fd, fd = None, ctrl.namespaces[1].backend._fd
    try:
        assert ctrl._run_fast(sq) == 0
    finally:
        ctrl.namespaces[1].backend._fd = fd


def test_unmapped_region_is_forgotten(ctrl: NvmeController) -> None:
    fast = FastIo(ctrl, module)
    sq, cq = queues()
    submit(ctrl, sq, rw(0x02, 1, 0, 8, RO_BASE - PAGE + PAGE))  # into the read-only map: refused
    assert fast.run(sq, cq) == 0
    ctrl.dma.remove(RO_BASE, RO_SIZE)
    map_guest_ram(ctrl.dma, RO_BASE, RO_SIZE)
    assert fast.run(sq, cq) == 1  # the new, writable map is seen
    ctrl.dma.remove(RO_BASE, RO_SIZE)  # and a removed one is not touched again
    submit(ctrl, sq, rw(0x02, 2, 0, 8, RO_BASE))
    assert fast.run(sq, cq) == 0 and fast.stop_reason == module.lib.VFU_STOP_DATA

