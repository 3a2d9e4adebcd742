"""The device side of split virtqueues against hand-built and generated guest rings."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfu_devices.virtio.queue import QueueState, SplitQueue, VirtqueueError
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



_WATCHER = r"""
import mmap, os, sys
fd, used_idx, shared, cpu = (int(a) for a in sys.argv[1:5])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
ram = memoryview(mmap.mmap(fd, 0, flags=mmap.MAP_SHARED))
idx = ram[used_idx : used_idx + 2].cast("H")
ready, stop = ram[shared : shared + 2].cast("H"), ram[shared + 2 : shared + 4].cast("H")
observed = ram[shared + 4 : shared + 8].cast("I")  # index changes seen: proof we ran alongside
seen = ram[shared + 8 : shared + 10].cast("H")  # the last index seen: the device stays near it
ready[0] = 1
last = changes = backwards = 0
while True:
    done = stop[0]
    now = idx[0]
    if now != last:
        if (now - last) & 0xFFFF > 0x8000:  # the device never takes an index back
            backwards += 1
            if backwards <= 3:
                print(f"used idx {last:#06x} -> {now:#06x}", flush=True)
        else:
            last = seen[0] = now
            changes += 1
            observed[0] = changes
    if done:
        break
print(f"changes {changes} backwards {backwards} final {last:#06x}", flush=True)
"""


def test_used_index_store_is_never_seen_half_done() -> None:
    """A driver in another process polls used->idx while the device publishes completions.

    struct.pack_into("<H") zeroes the field and then stores it a byte at a time; a driver
    that read the index right then saw 0, reaped the slots after its last index as completions
    and found stale heads ("device returned head N that is not outstanding" in bench.devices).
    The index must change with one store: the watcher may never see it go backwards.

    Bounded by counts, not time: the device completes until the watcher has seen 20000 index
    changes (so the two really ran side by side) or 200000 completions were published."""
    import subprocess
    import sys
    import time

    fd = os.memfd_create("test-ram")
    os.ftruncate(fd, RAM)
    mem = GuestMemory()
    region = mem.add(BASE, RAM, DmaMapFlags.READ | DmaMapFlags.WRITE, os.dup(fd))
    assert region.view is not None
    ram = region.view
    q = queue(mem)
    put_desc(ram, 0, DATA, 4, 2)
    shared = DATA + 0x100 - BASE
    cpus = sorted(os.sched_getaffinity(0))
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(fd), str(USED - BASE + 2), str(shared),
         str(cpus[1] if len(cpus) > 1 else -1)], pass_fds=[fd], stdout=subprocess.PIPE, text=True)
    mask = os.sched_getaffinity(0)
    try:
        os.close(fd)
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})
        deadline = time.monotonic() + 30
        while not ram[shared] and watcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ram[shared], "watcher did not start"
        observed = ram[shared + 4 : shared + 8].cast("I")
        seen = ram[shared + 8 : shared + 10].cast("H")
        n = 0
        while n < 200_000 and observed[0] < 20_000:
            # A watcher that did not run for a while (a loaded host) must not find the index
            # moved by half its range or more: that reads as going backwards. Stay within a
            # quarter of the range of what it last saw.
            while (n - seen[0]) & 0xFFFF > 0x4000 and watcher.poll() is None:
                time.sleep(0.0005)
            make_avail(ram, [0], start=n)
            n += 1
            c = q.pop()
            assert c is not None
            q.push(c, 4)
            q.flush()
        struct.pack_into("<H", ram, shared + 2, 1)
        out, _ = watcher.communicate(timeout=30)
    finally:
        os.sched_setaffinity(0, mask)
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0
    assert f" backwards 0 final {n & 0xFFFF:#06x}" in out.splitlines()[-1], out


def test_unpop_gives_chains_back_and_waits_beyond_them() -> None:
    """For a request that needs more chains than are there (virtio-net mergeable receive
    buffers): the chains go back, and the kick is asked for beyond them."""
    mem, ram = guest()
    q = queue(mem, event_idx=True)
    for i in range(3):
        put_desc(ram, i, DATA + 0x100 * i, 0x100, 2)
    make_avail(ram, [0, 1, 2])
    got = [q.pop(), q.pop(), q.pop()]
    assert [c.head for c in got if c] == [0, 1, 2] and q.pop() is None
    q.unpop(3)
    assert q.inflight == 0 and q.idle.is_set() and q.state.next_avail == 0
    # three are there, not enough: sleep until a fourth comes
    assert q.enable_notification(beyond=3) is False
    assert struct.unpack_from("<H", ram, USED - BASE + 4 + 8 * SIZE)[0] == 3  # avail_event
    assert q.enable_notification(beyond=2) is True
    assert [c.head for c in (q.pop(), q.pop()) if c] == [0, 1]  # popped again, in order
    with pytest.raises(ValueError, match="cannot give back 3"):
        q.unpop(3)


def test_driver_behind_reads_used_event() -> None:
    """used_event (the avail ring's last field) is where the driver re-armed interrupts: what
    it had consumed. Two or more behind our used index means unread used elements."""
    mem, ram = guest()
    q = queue(mem, event_idx=True)
    used_event = AVAIL - BASE + 4 + 2 * SIZE
    q.state.next_used = 5
    struct.pack_into("<H", ram, used_event, 5)
    assert not q.driver_behind()
    struct.pack_into("<H", ram, used_event, 4)
    assert not q.driver_behind()  # one: a driver may submit before it re-arms
    struct.pack_into("<H", ram, used_event, 3)
    assert q.driver_behind()
    # Ahead of us (a driver that asks to be told only later, like virtio-net's TX): unknown.
    struct.pack_into("<H", ram, used_event, 9)
    assert not q.driver_behind()
    # 0: what Linux writes while its interrupts are off, not a position.
    struct.pack_into("<H", ram, used_event, 0)
    assert not q.driver_behind()
    # Across the 16-bit wrap.
    q.state.next_used = 2
    struct.pack_into("<H", ram, used_event, 0xFFFF)
    assert q.driver_behind()


def test_driver_behind_is_unknown_without_event_idx() -> None:
    mem, ram = guest()
    q = queue(mem, event_idx=False)
    q.state.next_used = 5
    struct.pack_into("<H", ram, AVAIL - BASE + 4 + 2 * SIZE, 3)  # not a used_event without EVENT_IDX
    assert not q.driver_behind()
