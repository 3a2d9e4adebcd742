"""Requests of ours that wait for their reply, by message id (both ends use it: the client for
every request, the server for DMA_READ/DMA_WRITE to the client). Which ids and which reply
matches are the sans-IO core's rules (:class:`~vfu_server.protocol.connection.RequestIds`);
this module adds the waiting.

The connection's reader task hands each reply to the request that waits for it. A
``trio.Event`` and a slot do that for ~0.5 us; a memory channel pair per request cost ~11 us
on the development VM, a tenth of a round trip through the client.
"""

from __future__ import annotations

import trio

from ..protocol.codec import Message
from ..protocol.connection import RequestIds


class ReplyWaiter:
    """One request's wait. :meth:`wait` returns the reply, or ``None`` if the connection
    closed before it came."""

    __slots__ = ("_abandoned", "_event", "reply")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._abandoned = False
        self.reply: Message | None = None

    async def wait(self) -> Message | None:
        try:
            await self._event.wait()
        except BaseException:
            # Cancelled: nobody will take the reply, so nobody would close its fds.
            self._abandoned = True
            if self.reply is not None:
                self.reply.close_fds()
            raise
        return self.reply

    def _resolve(self, reply: Message | None) -> None:
        if self._abandoned and reply is not None:
            reply.close_fds()
        self.reply = reply
        self._event.set()


class PendingReplies:
    """Waiters by message id, on the sans-IO core's :class:`RequestIds` (which owns the ids:
    their range, wrap-around, and that an id stays taken until its reply or the close arrives,
    also when the waiting task was cancelled meanwhile, so that a late reply finds no other
    request)."""

    def __init__(self, ids: RequestIds[ReplyWaiter] | None = None) -> None:
        self.ids: RequestIds[ReplyWaiter] = ids if ids is not None else RequestIds()

    def __contains__(self, msg_id: int) -> bool:
        return msg_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def expect(self, msg_id: int) -> ReplyWaiter:
        """Wait for the reply to a request whose id the caller chose."""
        waiter = ReplyWaiter()
        self.ids.claim(msg_id, waiter)
        return waiter

    def expect_next(self) -> tuple[int, ReplyWaiter]:
        """Take the next free id for a request and wait for its reply."""
        waiter = ReplyWaiter()
        return self.ids.allocate(waiter), waiter

    def deliver(self, reply: Message) -> bool:
        """Hand ``reply`` to its request; False when none waits for its id (then the caller
        decides: drop it, or treat the stream as broken)."""
        matched, waiter = self.ids.complete(reply)
        if not matched:
            return False
        if waiter is None:  # the id was taken over from another process: nobody waits here
            reply.close_fds()
        else:
            waiter._resolve(reply)
        return True

    def close(self) -> None:
        """The connection is gone: every waiter wakes with ``None``."""
        for waiter in self.ids.drain():
            if waiter is not None:
                waiter._resolve(None)
