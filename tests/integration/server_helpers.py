"""Helpers for the core server integration tests: a raw vfio-user connection and the example
device's register map."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import trio

from vfu_server.protocol.codec import Message, MessageDecoder, encode
from vfu_server.protocol.constants import Command
from vfu_server.protocol.negotiation import client_offer
from vfu_server.transport.channel import MessageChannel

# devices/example.py, BAR0
MAGIC, SCRATCH, SRC_LO, SRC_HI, DST_LO, DST_HI, LEN, CTRL, STATUS, IRQ_COUNT = range(0, 0x28, 4)
MAGIC_VALUE = 0x56465530


class RawConn:
    """A vfio-user connection without the Client's conveniences: send any bytes, read replies."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.channel = MessageChannel(sock, 1 << 21, 16)
        self._queue: list[Message] = []

    @classmethod
    async def connect(cls, path: str) -> RawConn:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        await self.channel.send(data, fds)

    async def receive(self) -> Message | None:
        """The next message, or None when the server closed the connection."""
        if not self._queue:
            try:
                batch = await self.channel.receive()
            except OSError:
                return None
            if batch is None:
                return None
            self._queue.extend(batch)
        return self._queue.pop(0)

    async def request(self, msg_id: int, command: int, payload: bytes = b"", fds: Sequence[int] = ()) -> Message:
        await self.send(encode(msg_id, command, payload), fds)
        reply = await self.receive()
        assert reply is not None, "server closed the connection"
        assert reply.is_reply and reply.id == msg_id and reply.command == command
        return reply

    async def negotiate(self) -> Message:
        reply = await self.request(0, Command.VERSION, client_offer().pack())
        assert not reply.is_error
        return reply

    def close(self) -> None:
        self.channel.close()


def fresh_decoder() -> MessageDecoder:
    return MessageDecoder(1 << 21)


def assert_uring_in_use(stderr: str) -> None:
    """A server started with ``--backing-io uring --log-level info`` took the io_uring path,
    or said why it could not on this machine (where the test process cannot either)."""
    from vfu_server.block.uring import uring_available

    ok, why = uring_available()
    if ok:
        assert "I/O through io_uring" in stderr, stderr
    else:
        assert "io_uring unavailable" in stderr, (why, stderr)
