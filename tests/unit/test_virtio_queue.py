"""The device side of split virtqueues against hand-built and generated guest rings."""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from devices.virtio.queue import QueueState, SplitQueue, VirtqueueError
from vfu_server.pci.dma import GuestMemory
from vfu_server.protocol.constants import DmaMapFlags

RAM = 1 << 20
BASE = 0x10000
SIZE = 16
DESC, AVAIL, USED, DATA = BASE, BASE + 0x1000, BASE + 0x2000, BASE + 0x4000


def guest() -> tuple[GuestMemory, memoryview]:
    mem = GuestMemory()
    fd = os.memfd_create("test-ram")
    os.ftruncate(fd, RAM)
    region = mem.add(BASE, RAM, DmaMapFlags.READ | DmaMapFlags.WRITE, os.dup(fd))
    os.close(fd)
    assert region.view is not None
    return mem, region.view


def queue(mem: GuestMemory, event_idx: bool = False) -> SplitQueue:
    state = QueueState(max_size=SIZE, ready=True, desc_table=DESC, avail_ring=AVAIL, used_ring=USED,
                       event_idx_enabled=event_idx)
    q = SplitQueue(0, state, mem)
    q.check_layout()
    return q


def put_desc(ram: memoryview, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int = DESC) -> None:
    struct.pack_into("<QIHH", ram, table - BASE + 16 * index, addr, length, flags, nxt)


def make_avail(ram: memoryview, heads: list[int], start: int = 0) -> None:
    for i, h in enumerate(heads):
        struct.pack_into("<H", ram, AVAIL - BASE + 4 + 2 * ((start + i) % SIZE), h)
    struct.pack_into("<H", ram, AVAIL - BASE + 2, (start + len(heads)) & 0xFFFF)


def test_chain_and_used_ring_across_16_bit_wrap() -> None:
    mem, ram = guest()
    q = queue(mem)
    q.state.next_avail = q.state.next_used = 0xFFFE
    put_desc(ram, 0, DATA, 8, 1, 1)
    put_desc(ram, 1, DATA + 8, 4, 2)
    struct.pack_into("<H", ram, USED - BASE + 2, 0xFFFE)
    make_avail(ram, [0, 0, 0, 0], start=0xFFFE)
    chains = []
    while (c := q.pop()) is not None:
        chains.append(c)
        q.push(c, 4)
    assert len(chains) == 4 and q.state.next_avail == 2
    assert chains[0].read_len == 8 and chains[0].write_len == 4
    assert q.flush() is True
    assert struct.unpack_from("<H", ram, USED - BASE + 2)[0] == 2


def test_indirect_table_and_loops() -> None:
    mem, ram = guest()
    q = queue(mem)
    table = DATA + 0x1000
    put_desc(ram, 0, DATA, 16, 1, 1, table=table)
    put_desc(ram, 1, DATA + 16, 100, 2, table=table)
    put_desc(ram, 3, table, 32, 4)
    make_avail(ram, [3])
    c = q.pop()
    assert c is not None and c.read_len == 16 and c.write_len == 100
    # a loop through next links
    put_desc(ram, 5, DATA, 8, 1, 6)
    put_desc(ram, 6, DATA, 8, 1, 5)
    make_avail(ram, [3, 5])
    try:
        q.pop()
    except VirtqueueError as exc:
        assert "longer" in str(exc)
    else:
        raise AssertionError("a looping chain was accepted")


def test_bad_avail_index_and_unmapped_buffers() -> None:
    mem, ram = guest()
    q = queue(mem)
    struct.pack_into("<H", ram, AVAIL - BASE + 2, SIZE + 1)
    try:
        q.pop()
        raise AssertionError("avail index beyond the ring accepted")
    except VirtqueueError:
        pass
    q = queue(mem)
    put_desc(ram, 0, BASE + RAM - 4, 8)  # crosses the end of guest memory
    make_avail(ram, [0])
    try:
        q.pop()
        raise AssertionError("out-of-range buffer accepted")
    except VirtqueueError:
        pass


def test_event_idx_interrupt_decision() -> None:
    mem, ram = guest()
    q = queue(mem, event_idx=True)
    put_desc(ram, 0, DATA, 8, 2)
    for i in range(4):
        make_avail(ram, [0], start=i)
        c = q.pop()
        assert c is not None
        q.push(c, 8)
        struct.pack_into("<H", ram, AVAIL - BASE + 4 + 2 * SIZE, 2)  # used_event = 2
        results = q.flush()
        # first decision always notifies; then only the step that passes index 2 -> 3
        assert results == (i in (0, 2)), i
    assert not q.enable_notification()
    assert struct.unpack_from("<H", ram, USED - BASE + 4 + 8 * SIZE)[0] == 4  # avail_event


descriptor = st.tuples(
    st.one_of(st.sampled_from([DATA, DATA + 0x100, BASE + RAM - 8, 0, BASE - 1]), st.integers(0, 2**64 - 1)),
    st.one_of(st.sampled_from([0, 1, 16, 32, 512, 0xFFFFFFFF]), st.integers(0, 2**32 - 1)),
    st.integers(0, 0xFFFF),
    st.one_of(st.integers(0, SIZE + 2), st.integers(0, 0xFFFF)),
)


@settings(max_examples=200, deadline=None)
@given(
    descs=st.lists(descriptor, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(descriptor, min_size=0, max_size=8),
    heads=st.lists(st.one_of(st.integers(0, SIZE + 2), st.integers(0, 0xFFFF)), max_size=SIZE),
    avail_idx=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
)
def test_malformed_rings_raise_or_work(descs, indirect, heads, avail_idx, event_idx) -> None:  # type: ignore[no-untyped-def]
    mem, ram = guest()
    q = queue(mem, event_idx)
    for i, d in enumerate(descs):
        put_desc(ram, i, *d)
    for i, d in enumerate(indirect):
        put_desc(ram, i, *d, table=DATA + 0x8000)
    make_avail(ram, heads)
    if avail_idx is not None:
        struct.pack_into("<H", ram, AVAIL - BASE + 2, avail_idx)
    popped = 0
    try:
        while (c := q.pop()) is not None:
            popped += 1
            assert popped <= SIZE
            assert c.read_len + c.write_len <= SIZE * 0xFFFFFFFF
            q.push(c, c.write_len & 0xFFFFFFFF)
        q.flush()
        q.enable_notification()
    except VirtqueueError:
        pass
