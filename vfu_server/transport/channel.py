"""A message channel over a connected trio Unix socket: framed receive with fds, one
``sendmsg`` per send."""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

import trio

from ..protocol.codec import Message, MessageDecoder
from ..protocol.errors import ProtocolError

RECV_BUFFER = 256 * 1024


class MessageChannel:
    """Owns one connected socket. Not safe for two concurrent senders (a lock serialises them)."""

    def __init__(self, sock: trio.socket.SocketType, max_message: int, max_fds: int = 16) -> None:
        self.sock = sock
        self.decoder = MessageDecoder(max_message)
        self.ancbufsize = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        self._send_lock = trio.StrictFIFOLock()
        self.closed = False

    async def receive(self) -> list[Message] | None:
        """Wait for at least one complete message. Returns ``None`` at EOF.

        Raises :class:`ProtocolError` when the stream is broken.
        """
        out: list[Message] = []
        while True:
            msg = self.decoder.next_message()
            while msg is not None:
                out.append(msg)
                msg = self.decoder.next_message()
            if out:
                return out
            try:
                data, ancdata, flags, _ = await self.sock.recvmsg(RECV_BUFFER, self.ancbufsize)
            except (ConnectionResetError, BrokenPipeError):
                return None
            fds = _collect_fds(ancdata)
            if flags & socket.MSG_CTRUNC:
                _close(fds)
                raise ProtocolError("file descriptors were truncated (peer sent too many)")
            if not data:
                _close(fds)
                if self.decoder.buffered:
                    raise ProtocolError(f"EOF inside a message ({self.decoder.buffered} bytes pending)")
                return None
            self.decoder.feed(data, fds)

    async def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send one message (or several concatenated ones) with fds attached to the first byte."""
        async with self._send_lock:
            view = memoryview(data)
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = await self.sock.sendmsg([view], anc)
            else:
                sent = await self.sock.send(view)
            while sent < len(view):
                view = view[sent:]
                sent = await self.sock.send(view)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.decoder.close()
            self.sock.close()


def _collect_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
