"""The order in which message-DMA write-backs reach the guest (vfu_server.pci.msgdma)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vfu_server.pci.msgdma import DmaContext, WriteBacks, _Pending


def _ctx(wb: WriteBacks, name: str) -> DmaContext:
    return DmaContext(name, wb)


def test_a_tasks_data_goes_with_its_completion_and_not_before() -> None:
    wb = WriteBacks()
    io = _ctx(wb, "io")
    data = _Pending(0x1000, bytearray(4096), False, io)  # a read command's buffer, filled later
    wb.add(data)
    assert wb.take_due() == []  # not complete: nothing goes out
    data.buf[:4] = b"DATA"
    cqe = _Pending(0x9000, bytearray(16), True, io)  # the completion entry, after the data
    wb.add(cqe)
    assert wb.take_due() == [data, cqe]
    assert not wb


def test_another_tasks_unfinished_buffer_stays_behind() -> None:
    wb = WriteBacks()
    a, b = _ctx(wb, "a"), _ctx(wb, "b")
    a_data = _Pending(0x1000, bytearray(8192), False, a)
    wb.add(a_data)
    b_cqe = _Pending(0x9010, b"\1" * 16, True, b)
    wb.add(b_cqe)
    assert wb.take_due() == [b_cqe]
    assert wb.items == [a_data]
    wb.seal_owner(a)  # a's task ended: its buffers are complete
    assert wb.take_due() == [a_data]


def test_deferred_buffers_wait_for_seal_whoever_completes() -> None:
    wb = WriteBacks()
    ring, req = _ctx(wb, "queue"), _ctx(wb, "request")
    data, status = bytearray(4096), bytearray(1)
    wb.add(_Pending(0x2000, data, False, ring, deferred=True))
    wb.add(_Pending(0x3800, status, False, ring, deferred=True))
    wb.seal_owner(ring)  # the ring task's step ends: deferred buffers are not its to seal
    used = _Pending(0x4000, b"used", True, req)
    wb.add(used)
    assert wb.take_due() == [used]
    views = [memoryview(data), memoryview(status)]
    status[0] = 0
    wb.seal(views)
    assert [(p.address, len(p.buf)) for p in wb.take_due()] == [(0x2000, 4096), (0x3800, 1)]


def test_a_read_takes_the_overlapping_writes_first() -> None:
    wb = WriteBacks()
    t = _ctx(wb, "t")
    pending = _Pending(0x5000, bytearray(4096), False, t)
    wb.add(pending)
    assert wb.take_due(0x6000, 16) == []
    assert wb.take_due(0x5ff0, 32) == [pending]


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), max_size=30))
def test_due_items_keep_their_order_and_none_is_lost(plan: list[tuple[int, bool, bool]]) -> None:
    wb = WriteBacks()
    owners = [_ctx(wb, f"t{i}") for i in range(4)]
    added = []
    for i, (owner, sealed, deferred) in enumerate(plan):
        item = _Pending(i * 0x1000, bytearray(8), sealed, owners[owner], deferred=deferred and not sealed)
        wb.add(item)
        added.append(item)
    sent = wb.take_due()
    assert [added.index(x) for x in sent] == sorted(added.index(x) for x in sent)
    for owner in owners:
        wb.seal_owner(owner)
    for item in list(wb.items):
        if item.deferred:
            wb.seal([memoryview(item.buf)])
    rest = wb.take_due()
    assert sorted(map(id, sent + rest)) == sorted(map(id, added))
    assert not wb


def test_writes_that_continue_each_other_go_as_one() -> None:
    wb = WriteBacks()
    t = _ctx(wb, "t")
    for i in range(3):  # three completion entries in a row, then the used index elsewhere
        wb.add(_Pending(0x9000 + 16 * i, bytes([i]) * 16, True, t))
    wb.add(_Pending(0xA000, b"ix", True, t))
    due = wb.take_due()
    assert [(p.address, bytes(p.buf)) for p in due] == [
        (0x9000, b"\0" * 16 + b"\1" * 16 + b"\2" * 16), (0xA000, b"ix")]
