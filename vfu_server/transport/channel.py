"""A message channel over a connected trio Unix socket: framed receive with fds, one
``sendmsg`` per send.

Hot path: the channel calls the non-blocking stdlib socket under the trio socket directly and
only parks in :func:`trio.lowlevel.wait_readable`/``wait_writable`` when the kernel says
EAGAIN. Going through trio's socket methods cost two extra scheduler passes per round trip (the
send's yield and the send lock's yield, each an ``epoll_wait``), about a third of a REGION_READ
round trip (see docs/performance.md). Scheduling is unchanged otherwise: a receive yields once
per ``recvmsg`` exactly as trio's does, and both directions still honour cancellation first.
"""

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
        # The stdlib socket trio wraps (non-blocking); None makes every call go through trio.
        raw = getattr(sock, "_sock", None)
        self._raw: socket.socket | None = raw if isinstance(raw, socket.socket) else None
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
                data, ancdata, flags = await self._recvmsg()
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

    async def _recvmsg(self) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
        raw = self._raw
        if raw is None:
            data, ancdata, flags, _ = await self.sock.recvmsg(RECV_BUFFER, self.ancbufsize)
            return data, ancdata, flags
        # What trio's recvmsg does, minus its wrapper layers: honour cancellation, try the
        # syscall, and yield once either way (in wait_readable, or explicitly on success).
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data, ancdata, flags, _ = raw.recvmsg(RECV_BUFFER, self.ancbufsize)
        except BlockingIOError:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data, ancdata, flags
        while True:
            await trio.lowlevel.wait_readable(raw)
            try:
                data, ancdata, flags, _ = raw.recvmsg(RECV_BUFFER, self.ancbufsize)
            except BlockingIOError:
                continue
            return data, ancdata, flags

    async def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send one message (or several concatenated ones) with fds attached to the first byte."""
        raw = self._raw
        if raw is not None and not self._send_lock.locked():
            # Fast path: nobody else is sending, and a Unix socket with room in its buffer
            # takes the whole message at once, so no lock, no wait, no scheduler pass.
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data)
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = raw.sendmsg([view], anc)
                else:
                    sent = raw.send(view)
            except BlockingIOError:
                sent = 0  # nothing (and no fd) went out: the slow path below sends it all
            if sent == len(view):
                return
            if sent:
                # The fds went with the first bytes; finish the rest under the lock (free:
                # nothing awaited since locked() was checked).
                self._send_lock.acquire_nowait()
                try:
                    await self._send_rest(view[sent:])
                finally:
                    self._send_lock.release()
                return
        async with self._send_lock:
            view = memoryview(data)
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = await self.sock.sendmsg([view], anc)
            else:
                sent = await self.sock.send(view)
            await self._send_rest(view[sent:])

    async def _send_rest(self, view: memoryview) -> None:
        while len(view):
            sent = await self.sock.send(view)
            view = view[sent:]

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
