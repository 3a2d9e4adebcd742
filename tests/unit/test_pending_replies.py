"""Replies handed to the requests that wait for them (vfu_server.transport.pending)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from vfu_server.protocol.codec import Message
from vfu_server.protocol.constants import Command
from vfu_server.transport.pending import PendingReplies


def reply(msg_id: int) -> Message:
    return Message(msg_id, Command.REGION_READ, 1, 0, b"")


async def test_each_reply_reaches_its_own_request() -> None:
    pending = PendingReplies()
    got: dict[int, Message | None] = {}

    async def request(msg_id: int) -> None:
        got[msg_id] = await pending.expect(msg_id).wait()

    async with trio.open_nursery() as nursery:
        for msg_id in (3, 1, 2):
            nursery.start_soon(request, msg_id)
        await trio.testing.wait_all_tasks_blocked()
        assert len(pending) == 3
        for msg_id in (2, 3, 1):
            assert pending.deliver(reply(msg_id))
    assert {k: v.id for k, v in got.items() if v} == {1: 1, 2: 2, 3: 3}
    assert len(pending) == 0


async def test_unknown_and_repeated_replies_are_refused() -> None:
    pending = PendingReplies()
    pending.expect(7)
    assert not pending.deliver(reply(8))
    assert pending.deliver(reply(7))
    assert not pending.deliver(reply(7)), "a second reply to one request"
    pending.expect(7)  # the id is free again
    with pytest.raises(ValueError):
        pending.expect(7)


async def test_close_wakes_every_waiter_with_none() -> None:
    pending = PendingReplies()
    got: list[Message | None] = []

    async def request(msg_id: int) -> None:
        got.append(await pending.expect(msg_id).wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, 1)
        nursery.start_soon(request, 2)
        await trio.testing.wait_all_tasks_blocked()
        pending.close()
    assert got == [None, None] and len(pending) == 0


async def test_a_cancelled_request_keeps_its_id_until_the_reply() -> None:
    pending = PendingReplies()
    with trio.move_on_after(0.01):
        await pending.expect(5).wait()
    assert 5 in pending, "a late reply must not meet a new request with the same id"
    assert pending.deliver(reply(5))
    assert 5 not in pending


async def test_a_late_reply_to_a_cancelled_request_has_its_fds_closed() -> None:
    import os

    pending = PendingReplies()
    with trio.move_on_after(0.01):
        await pending.expect(6).wait()
    r, w = os.pipe()
    os.close(w)
    late = Message(6, Command.DMA_READ, 1, 0, b"", [r])
    assert pending.deliver(late)
    assert late.fds == []
    with pytest.raises(OSError):
        os.fstat(r)
