"""Framing: the 16-byte header, message encoding, and a sans-IO stream decoder.

The decoder owns no socket. The transport feeds it whatever ``recvmsg`` returned (bytes and the
SCM_RIGHTS fds that came with them) and takes complete :class:`Message` objects out, in order.

Which message do received fds belong to? A sender attaches fds to the single ``sendmsg`` that
carries one whole message, so in the kernel they sit on the first skb of that message. Linux's
``unix_stream_read_generic`` stops a read right after the skb whose fds it handed out. Hence the
rule used here, which holds however the reads are sized: *the fds returned by one read belong to
the last message that starts inside that read's bytes.* It lets the transport read large
buffers (one syscall for a burst of posted writes) instead of header-then-body.

Header layout (all little-endian)::

    0  id u16        echoed in the reply
    2  command u16
    4  size u32      whole message, header included
    8  flags u32     bits 0-3 type (0 request, 1 reply), 0x10 NO_REPLY, 0x20 ERROR
    12 error u32     errno of an error reply
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .constants import HEADER_SIZE, MSG_TYPE_MASK, Command, MsgFlags
from .errors import ProtocolError

HEADER = struct.Struct("<HHIII")

# Plain ints for the hot path: ``int & IntFlag`` runs enum.Flag.__and__ in Python and builds a
# flag member, about 1 us each on the development VM, several times per message.
_REQUEST = int(MsgFlags.REQUEST)
_REPLY = int(MsgFlags.REPLY)
_NO_REPLY = int(MsgFlags.NO_REPLY)
_ERROR = int(MsgFlags.ERROR)
_TYPE_MASK = int(MSG_TYPE_MASK)


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"CMD_{command}"


@dataclass(slots=True)
class Message:
    """One decoded message. ``payload`` excludes the header; ``fds`` are owned by the receiver."""

    id: int
    command: int
    flags: int
    error: int
    payload: bytes | memoryview
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & _TYPE_MASK == _REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & _NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & _ERROR)

    def close_fds(self) -> None:
        """Close every fd this message still owns (a handler takes the ones it keeps)."""
        while self.fds:
            fd = self.fds.pop()
            try:
                os.close(fd)
            except OSError:
                pass

    def describe(self) -> str:
        kind = "reply" if self.is_reply else "request"
        extra = []
        if self.no_reply:
            extra.append("no-reply")
        if self.is_error:
            extra.append(f"errno={self.error}")
        if self.fds:
            extra.append(f"fds={len(self.fds)}")
        tail = (" " + " ".join(extra)) if extra else ""
        return f"{command_name(self.command)} {kind} id={self.id} size={HEADER_SIZE + len(self.payload)}{tail}"


def encode(
    msg_id: int,
    command: int,
    payload: bytes | bytearray | memoryview = b"",
    *,
    reply: bool = False,
    no_reply: bool = False,
    error: int = 0,
) -> bytes:
    """Encode one message. An error reply is header-only with ERROR set and a non-zero errno."""
    flags = _REPLY if reply else _REQUEST
    if no_reply:
        flags |= _NO_REPLY
    if error:
        flags |= _ERROR
        payload = b""
    return HEADER.pack(msg_id & 0xFFFF, command, HEADER_SIZE + len(payload), flags, error) + bytes(payload)


def encode_header(msg_id: int, command: int, payload_len: int, flags: int, error: int = 0) -> bytes:
    return HEADER.pack(msg_id & 0xFFFF, command, HEADER_SIZE + payload_len, flags, error)


class MessageDecoder:
    """Turns a byte stream plus fds into :class:`Message` objects.

    ``max_size`` bounds a single message (header included). A header claiming more, a size below
    16 or an unknown message type is a :class:`ProtocolError`: the stream cannot be
    resynchronised, and the caller must close the connection.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0  # absolute stream offset of _buf[0]
        # (stream offset where a read ended, fds of that read), oldest first
        self._fd_marks: deque[tuple[int, list[int]]] = deque()
        self._end = 0  # absolute stream offset of the end of received data

    def feed(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> None:
        self._buf += data
        self._end += len(data)
        if fds:
            self._fd_marks.append((self._end, list(fds)))

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        msg = self.next_message()
        if msg is None:
            raise StopIteration
        return msg

    def next_message(self) -> Message | None:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        msg_id, command, size, flags, error = HEADER.unpack_from(buf)
        if size < HEADER_SIZE:
            raise ProtocolError(f"bad header: size {size} < {HEADER_SIZE}")
        if size > self.max_size:
            raise ProtocolError(f"message of {size} bytes exceeds the limit of {self.max_size}")
        if flags & _TYPE_MASK > _REPLY:  # neither request (0) nor reply (1)
            raise ProtocolError(f"bad header: unknown message type {flags & _TYPE_MASK}")
        if len(buf) < size:
            return None
        start = self._pos
        fds: list[int] = []
        marks = self._fd_marks
        # fds of a read belong to the last message starting in it: this one, if the next
        # message would start at or past the end of that read.
        while marks and marks[0][0] <= start:
            # fds of a read in which no message started: cannot be attributed; drop them.
            _, stray = marks.popleft()
            _close_all(stray)
        if marks and start + size >= marks[0][0]:
            fds = marks.popleft()[1]
        payload = bytes(buf[HEADER_SIZE:size])
        del buf[:size]
        self._pos += size
        return Message(msg_id, command, flags, error, payload, fds)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def unread(self) -> tuple[bytes, list[tuple[int, list[int]]]]:
        """Bytes received but not yet decoded (a partial message), with the fds that came
        with them as ``(end, fds)``: ``end`` counts from the first unread byte. The decoder
        keeps its own copies; a live handover sends these to the successor."""
        return bytes(self._buf), [(end - self._pos, list(fds)) for end, fds in self._fd_marks]

    def restore(self, data: bytes, marks: Sequence[tuple[int, list[int]]]) -> None:
        """Start from another decoder's :meth:`unread` state (an empty decoder only)."""
        if self._buf or self._fd_marks:
            raise ValueError("restore() into a decoder that already holds data")
        self._buf = bytearray(data)
        self._pos = 0
        self._end = len(data)
        try:
            check_fd_marks(marks, len(data))
        except ValueError:
            for _, fds in marks:
                _close_all(fds)
            raise
        for end, fds in marks:
            self._fd_marks.append((end, list(fds)))

    def close(self) -> None:
        """Close fds that were received but never handed out."""
        while self._fd_marks:
            _close_all(self._fd_marks.popleft()[1])
        self._buf.clear()


def check_fd_marks(marks: Sequence[tuple[int, Sequence[int]]], length: int) -> None:
    """ValueError unless every mark of :meth:`MessageDecoder.unread` state lies within its
    ``length`` unread bytes."""
    for end, _ in marks:
        if not 0 <= end <= length:
            raise ValueError(f"fd mark at {end} outside {length} unread bytes")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
