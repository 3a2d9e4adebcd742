"""A message channel over a connected trio Unix socket: framed receive with fds, one
``sendmsg`` per send.

Hot path: the channel calls the non-blocking stdlib socket under the trio socket directly and
only parks in :func:`trio.lowlevel.wait_readable`/``wait_writable`` when the kernel says
EAGAIN. Going through trio's socket methods cost two extra scheduler passes per round trip (the
send's yield and the send lock's yield, each an ``epoll_wait``), about a third of a REGION_READ
round trip (see docs/performance.md). Receiving goes into one preallocated buffer. Scheduling is unchanged otherwise: a receive yields once
per ``recvmsg`` exactly as trio's does, and both directions still honour cancellation first.
"""

from __future__ import annotations

import array
import fcntl
import math
import socket
import sys
import termios
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from ..protocol.codec import Message, MessageDecoder
from ..protocol.errors import ProtocolError

RECV_BUFFER = 256 * 1024


@dataclass(frozen=True, slots=True)
class UnsentRest:
    """What :meth:`MessageChannel.send_now` could not send at once."""

    view: memoryview
    #: fds still to send (when nothing went out; they go with the first byte)
    fds: Sequence[int]
    #: part went out: the channel's send lock is held for the rest by the sending task
    locked: bool


class MessageChannel:
    """Owns one connected socket. Not safe for two concurrent senders (a lock serialises them)."""

    def __init__(self, sock: trio.socket.SocketType, max_message: int, max_fds: int = 16,
                 decoder: MessageDecoder | None = None) -> None:
        self.sock = sock
        # The stdlib socket trio wraps (non-blocking); None makes every call go through trio.
        raw = getattr(sock, "_sock", None)
        self._raw: socket.socket | None = raw if isinstance(raw, socket.socket) else None
        # A connection's sans-IO core may own the decoder (its unread bytes are protocol state).
        self.decoder = decoder if decoder is not None else MessageDecoder(max_message)
        self.ancbufsize = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        self._send_lock = trio.StrictFIFOLock()
        # Receive buffer; the decoder copies out of it before the next receive.
        self._rview = memoryview(bytearray(RECV_BUFFER))
        self.closed = False
        self._broken: ProtocolError | None = None  # raised after the messages decoded before it

    async def receive(self) -> list[Message] | None:
        """Wait for at least one complete message. Returns ``None`` at EOF.

        Raises :class:`ProtocolError` when the stream is broken.
        """
        while True:
            out = self._decoded()
            if out:
                return out
            try:
                nbytes, ancdata, flags = await self._recvmsg()
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not self._feed(nbytes, ancdata, flags):
                return None

    def receive_ready(self) -> list[Message] | None:
        """The complete messages there are now, reading the socket without blocking: ``[]``
        when there are none yet, ``None`` at EOF. Raises like :meth:`receive`."""
        while True:
            out = self._decoded()
            raw = self._raw
            if out or raw is None or self.closed:
                return out
            try:
                nbytes, ancdata, flags, _ = raw.recvmsg_into([self._rview], self.ancbufsize)
            except (BlockingIOError, InterruptedError):
                return out
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not self._feed(nbytes, ancdata, flags):
                return None

    def receive_nowait(self) -> list[Message]:
        """Every complete message already received or queued in the socket now, without
        blocking and without raising (shutdown uses it: what the client sent before the signal
        still takes effect; a broken stream ends the list). What arrives meanwhile is left,
        so a client that keeps sending cannot hold shutdown up."""
        out: list[Message] = []
        try:
            out += self._decoded()
            raw = self._raw
            if raw is None or self.closed:
                return out
            queued = int.from_bytes(fcntl.ioctl(raw.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)
            while queued > 0:
                nbytes, ancdata, flags, _ = raw.recvmsg_into([self._rview[:queued]], self.ancbufsize)
                if not self._feed(nbytes, ancdata, flags):
                    break
                queued -= nbytes
                out += self._decoded()
        except (ProtocolError, OSError):
            pass
        return out

    def _decoded(self) -> list[Message]:
        """The complete messages in the decoder. When the stream breaks after some of them,
        those come first and the error on the next call (the messages before garbage count)."""
        if self._broken is not None:
            raise self._broken
        out: list[Message] = []
        try:
            msg = self.decoder.next_message()
            while msg is not None:
                out.append(msg)
                msg = self.decoder.next_message()
        except ProtocolError as exc:
            if not out:
                raise
            self._broken = exc
        return out

    def _feed(self, nbytes: int, ancdata: list[tuple[int, int, bytes]], flags: int) -> bool:
        """Hand one read to the decoder; False at EOF."""
        fds = _collect_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            _close(fds)
            raise ProtocolError("file descriptors were truncated (peer sent too many)")
        if not nbytes:
            _close(fds)
            if self.decoder.buffered:
                raise ProtocolError(f"EOF inside a message ({self.decoder.buffered} bytes pending)")
            return False
        self.decoder.feed(self._rview[:nbytes], fds)
        return True

    async def _recvmsg(self) -> tuple[int, list[tuple[int, int, bytes]], int]:
        # Into a buffer allocated once: recvmsg(256 KiB) allocates (and maps, and unmaps) a
        # fresh 256 KiB bytes object per call, which cost ~35 us -- more than the syscall.
        raw = self._raw
        bufs = [self._rview]
        if raw is None:
            nbytes, ancdata, flags, _ = await self.sock.recvmsg_into(bufs, self.ancbufsize)
            return nbytes, ancdata, flags
        # Wait first, then read: after a reply the next request is rarely there yet, so trio's
        # read-first order mostly buys an EAGAIN syscall. Waiting is a full checkpoint (it
        # honours cancellation and yields once, like trio's recvmsg); when data is already
        # queued, epoll reports it in the same scheduler pass that trio's success path spends.
        while True:
            await trio.lowlevel.wait_readable(raw)
            try:
                nbytes, ancdata, flags, _ = raw.recvmsg_into(bufs, self.ancbufsize)
            except BlockingIOError:
                continue
            return nbytes, ancdata, flags

    async def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (),
                   timeout: float | None = None) -> None:
        """Send one message (or several concatenated ones) with fds attached to the first byte.

        ``timeout`` bounds the time spent waiting for room in the socket (or for the send
        lock); when it expires, :class:`trio.TooSlowError` is raised and the stream is unusable.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        rest = self.send_now(data, fds)
        if rest is not None:
            await self.send_rest(rest, timeout)

    def send_now(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> UnsentRest | None:
        """Send what the socket takes right now, without waiting, yielding or a checkpoint
        (the server's replies use it so that handling a batch cannot be cancelled halfway).

        Returns ``None`` when everything went out. Otherwise the same task must pass the
        returned rest to :meth:`send_rest`: when part of the message went out (with its fds),
        the channel stays locked for it meanwhile, so no other message cuts into it.
        """
        view = memoryview(data)
        raw = self._raw
        if raw is None or self._send_lock.locked():
            return UnsentRest(view, fds, locked=False)  # queue up behind the message being sent
        # A Unix socket with room in its buffer takes the whole message at once: no lock, no
        # wait, no timer, no scheduler pass.
        try:
            sent = raw.sendmsg([view], _rights(fds)) if fds else raw.send(view)
        except BlockingIOError:
            return UnsentRest(view, fds, locked=False)  # nothing (and no fd) went out
        if sent == len(view):
            return None
        if not sent:
            return UnsentRest(view, fds, locked=False)
        self._send_lock.acquire_nowait()  # free: nothing awaited since locked() was checked
        return UnsentRest(view[sent:], (), locked=True)

    async def send_rest(self, rest: UnsentRest, timeout: float | None = None) -> None:
        """Finish a message :meth:`send_now` could not send whole (``timeout`` as for :meth:`send`)."""
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            if rest.locked:
                try:
                    await self._send_all(rest.view)
                finally:
                    self._send_lock.release()
            else:
                async with self._send_lock:
                    if rest.fds:
                        sent = await self.sock.sendmsg([rest.view], _rights(rest.fds))
                    else:
                        sent = await self.sock.send(rest.view)
                    await self._send_all(rest.view[sent:])
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def _send_all(self, view: memoryview) -> None:
        while len(view):
            sent = await self.sock.send(view)
            view = view[sent:]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.decoder.close()
            self.sock.close()


def _rights(fds: Sequence[int]) -> list[tuple[int, int, array.array[int]]]:
    """SCM_RIGHTS ancillary data carrying ``fds``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


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
