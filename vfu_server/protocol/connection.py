"""The per-connection protocol rules as a sans-IO state machine (h11's ``Connection`` shape).

:class:`ServerConnection` knows what a vfio-user server must do with the messages of one client
and nothing about sockets, tasks or devices: bytes and fds go in (:meth:`receive_data`),
messages come out (:meth:`next_event`), and the answer to a request becomes the bytes to send
(:meth:`respond`, :meth:`refuse`) or nothing for NO_REPLY. The trio layer
(``vfu_server/server.py``) moves the bytes and fds and runs the device's handlers; a test drives
this class with bytes alone.

States and what moves between them (:data:`TRANSITIONS`)::

    AWAITING_VERSION --session--> SERVING
    AWAITING_VERSION, SERVING --eof--> CLOSED
    AWAITING_VERSION, SERVING --broken--> ERROR

What a state admits is data too (:meth:`check_request`): before the session only VERSION is
served (anything else: EINVAL), in it everything the dispatch table has but VERSION (VERSION
again: EINVAL), a command nobody handles is ENOSYS in every state, and CLOSED/ERROR admit
nothing (a :class:`ProtocolError`).

Replies are batched (:class:`Outbox`): the replies of one received batch go out in one send,
except that a reply carrying fds goes alone (QEMU takes fds only with the header of the
message they belong to) and a command in :data:`FLUSH_BEFORE` first flushes what is batched
(its handler may wait, and the client must not wait meanwhile for replies already made).

Requests of our own (DMA_READ/DMA_WRITE to the client) take ids from :class:`RequestIds`
(0x8000-0xFFFF for the server, so that they never look like an echo of a client's id in a
trace), and a reply is routed by id to whatever waits for it.

:class:`ClientConnection` is the same machine in the client role (:class:`PeerConnection`
holds what both share): it accepts the server's VERSION reply, numbers every request itself,
answers the server's DMA_READ/DMA_WRITE by the same NO_REPLY and errno rules, and treats a
reply that matches none of its requests as a broken stream.

Hot path: the server tests a state's admitted commands with one set lookup
(:attr:`ServerConnection.admitted`) and answers a request with one call (:meth:`respond`
encodes the reply and batches it); nothing here allocates an event object per message (the
event is the decoded :class:`Message` itself). A REGION_READ round trip costs what it did
before this module existed (docs/performance.md).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import errno
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .codec import Message, MessageDecoder, check_fd_marks, command_name, encode
from .constants import Command, MsgFlags
from .errors import ProtocolError, VfioUserError
from .messages import Version
from .negotiation import ServerOffer, Session, accept_server_reply


class State(enum.Enum):
    AWAITING_VERSION = "awaiting-version"
    SERVING = "serving"
    CLOSED = "closed"
    ERROR = "error"


#: (state, what happened) -> next state; anything else is a bug of the caller's.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.AWAITING_VERSION, "session"): State.SERVING,
    (State.AWAITING_VERSION, "eof"): State.CLOSED,
    (State.SERVING, "eof"): State.CLOSED,
    (State.AWAITING_VERSION, "broken"): State.ERROR,
    (State.SERVING, "broken"): State.ERROR,
    # Closing an already closed or broken connection changes nothing.
    (State.CLOSED, "eof"): State.CLOSED,
    (State.ERROR, "eof"): State.ERROR,
    (State.CLOSED, "broken"): State.CLOSED,
    (State.ERROR, "broken"): State.ERROR,
}

#: Commands whose handlers may wait (not on the MMIO hot path): the replies batched before
#: them are sent first, so the client does not wait for them while the handler does.
FLUSH_BEFORE: frozenset[int] = frozenset(
    int(c) for c in (Command.DEVICE_RESET, Command.DEVICE_FEATURE, Command.MIG_DATA_READ, Command.MIG_DATA_WRITE))

#: What a handler's successful result may be: a payload, a payload with fds to send, or None
#: (an empty reply).
Result = tuple[bytes, list[int]] | bytes | bytearray | None
#: Sends due now, in order (bytes, and the fds to attach to them); None when there are none.
Due = list[tuple[bytes | bytearray, list[int]]] | None

_NO_REPLY = int(MsgFlags.NO_REPLY)

_VERSION = int(Command.VERSION)

#: The server's own request ids: the upper half, so a trace tells them from the client's.
SERVER_FIRST_ID = 0x8000
SERVER_ID_COUNT = 0x8000

T = TypeVar("T")


class RequestIds(Generic[T]):
    """Ids of our requests that wait for a reply, each with whatever waits for it (a token the
    transport chooses). Ids run from ``first`` through ``first + count - 1`` and wrap; an id
    stays taken until its reply (or :meth:`drain`), also when its requester gave up, so that a
    late reply finds no other request."""

    __slots__ = ("count", "first", "in_flight", "next_id")

    def __init__(self, first: int = 0, count: int = 0x10000, next_id: int | None = None) -> None:
        if not (first >= 0 and count > 0 and first + count <= 0x10000):
            raise ValueError(f"ids {first:#x}+{count:#x} outside 16 bits")
        self.first = first
        self.count = count
        self.next_id = first if next_id is None else next_id
        if not first <= self.next_id < first + count:
            raise ValueError(f"next id {self.next_id:#x} outside {first:#x}..{first + count - 1:#x}")
        self.in_flight: dict[int, T | None] = {}

    def __len__(self) -> int:
        return len(self.in_flight)

    def __contains__(self, msg_id: int) -> bool:
        return msg_id in self.in_flight

    def _after(self, msg_id: int) -> int:
        return self.first + (msg_id + 1 - self.first) % self.count

    def allocate(self, token: T | None = None) -> int:
        """The next free id, now taken by ``token``. EBUSY when every id waits for a reply."""
        in_flight = self.in_flight
        if len(in_flight) >= self.count:
            raise VfioUserError("every request id is waiting for a reply", errno.EBUSY)
        msg_id = self.next_id
        while msg_id in in_flight:  # still taken by a request whose requester gave up
            msg_id = self._after(msg_id)
        self.next_id = self._after(msg_id)
        in_flight[msg_id] = token
        return msg_id

    def allocate_posted(self) -> int:
        """An id for a request that wants no reply (NO_REPLY): free now, and not kept."""
        msg_id = self.allocate()
        del self.in_flight[msg_id]
        return msg_id

    def claim(self, msg_id: int, token: T | None = None) -> None:
        """Take a given id (a caller that numbers its requests itself)."""
        if msg_id in self.in_flight:
            raise ValueError(f"a request with id {msg_id} is already waiting")
        self.in_flight[msg_id] = token

    def complete(self, reply: Message) -> tuple[bool, T | None]:
        """A reply came: ``(True, token)`` when one of our requests waits for its id (the id is
        free again), ``(False, None)`` when none does (the caller drops it or the stream)."""
        in_flight = self.in_flight
        if reply.id not in in_flight:
            return False, None
        return True, in_flight.pop(reply.id)

    def drain(self) -> list[T | None]:
        """The connection is gone: every id is free, here are the waiting tokens."""
        tokens = list(self.in_flight.values())
        self.in_flight = {}
        return tokens


class Outbox:
    """Replies batched for one send, and the rule for what must go out before what.
    :meth:`ServerConnection.respond` batches into :attr:`data`."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = bytearray()

    def before(self, command: int) -> bytearray | None:
        """What must be sent before the request ``command`` is handled, if anything."""
        if command in FLUSH_BEFORE and self.data:
            return self.take()
        return None

    def alone(self, data: bytes, fds: list[int]) -> Due:
        """A reply with fds: the batch so far goes first, then the reply by itself."""
        if self.data:
            return [(self.take(), []), (data, fds)]
        return [(data, fds)]

    def take(self) -> bytearray | None:
        """The batched replies, now or never; None when there are none. The caller owns the
        buffer (handed over, not copied: this runs once per received batch)."""
        data = self.data
        if not data:
            return None
        self.data = bytearray()
        return data


@dataclass
class ConnectionState:
    """Everything of a connection's protocol state that outlives its process (a live handover
    sends it to the successor): plain data."""

    state: State = State.AWAITING_VERSION
    session: Session | None = None
    next_id: int = SERVER_FIRST_ID
    in_flight: list[int] = field(default_factory=list)
    unread: bytes = b""
    #: ``(end, fds)``: the fds came with the read that ended ``end`` bytes into ``unread``
    unread_fds: list[tuple[int, list[int]]] = field(default_factory=list)

    def to_dict(self) -> tuple[dict[str, Any], list[int]]:
        """The JSON object of docs/handover.md's ``session`` message, and its fds in order."""
        obj = {
            "session": dataclasses.asdict(self.session) if self.session is not None else None,
            "next_id": self.next_id,
            "unread": base64.b64encode(self.unread).decode("ascii"),
            "unread_fds": [[end, len(fds)] for end, fds in self.unread_fds],
        }
        if self.in_flight:
            obj["in_flight"] = list(self.in_flight)
        return obj, [fd for _, fds in self.unread_fds for fd in fds]

    @classmethod
    def from_dict(cls, obj: dict[str, Any], fds: list[int]) -> ConnectionState:
        """The inverse of :meth:`to_dict`. Raises :class:`ProtocolError` (the fds are then not
        closed: they are the caller's)."""
        try:
            raw_session = obj.get("session")
            session = Session(**raw_session) if raw_session is not None else None
            next_id = int(obj.get("next_id", SERVER_FIRST_ID))
            unread = base64.b64decode(obj.get("unread", ""), validate=True)
            marks: list[tuple[int, list[int]]] = []
            pos = 0
            for end, n in obj.get("unread_fds", []):
                if int(n) < 0:
                    raise ValueError(f"negative fd count {n}")
                marks.append((int(end), fds[pos : pos + int(n)]))
                pos += int(n)
            in_flight = [int(i) for i in obj.get("in_flight", [])]
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad connection state: {exc}") from None
        if pos != len(fds):
            raise ProtocolError(f"{len(fds)} unread fds, their marks count {pos}")
        if not SERVER_FIRST_ID <= next_id < SERVER_FIRST_ID + SERVER_ID_COUNT:
            raise ProtocolError(f"next_id {next_id:#x} outside the server's ids")
        # Checked here, while a handover can still roll back, not when the connection is
        # rebuilt after the commit (the decoder and the id table would refuse them there).
        try:
            check_fd_marks(marks, len(unread))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if len(set(in_flight)) != len(in_flight) or not all(
                SERVER_FIRST_ID <= i < SERVER_FIRST_ID + SERVER_ID_COUNT for i in in_flight):
            raise ProtocolError(f"in-flight request ids {in_flight} repeat or lie outside the server's ids")
        state = State.SERVING if session is not None else State.AWAITING_VERSION
        return cls(state, session, next_id, in_flight, unread, marks)


class PeerConnection:
    """What both ends of a connection do alike, without I/O: the states, decoding what comes
    in, answering the peer's requests (NO_REPLY, errnos, batching), and ids for our own."""

    def __init__(self, max_message: int, requests: RequestIds[Any]) -> None:
        self.decoder = MessageDecoder(max_message)
        self.outbox = Outbox()
        self.state = State.AWAITING_VERSION
        self.session: Session | None = None
        self.requests = requests
        #: the ProtocolError that broke the stream (state ERROR)
        self.error: ProtocolError | None = None

    # -- the state machine ---------------------------------------------------------------------

    def _transition(self, what: str) -> None:
        try:
            self.state = TRANSITIONS[self.state, what]
        except KeyError:
            raise RuntimeError(f"no transition from {self.state.value} on {what!r}") from None
        self._state_changed()

    def _state_changed(self) -> None:
        """A subclass's view of the new state (e.g. what it admits)."""

    def start_session(self, session: Session) -> None:
        """The session is agreed: by VERSION, or taken over with the connection."""
        self._transition("session")
        self.session = session

    def closed(self) -> None:
        """The peer went away (EOF), or we closed the connection."""
        self._transition("eof")

    def broken(self, exc: ProtocolError) -> ProtocolError:
        """The stream cannot go on (bad header, a reply nobody asked for, ...): ERROR."""
        if self.state is not State.ERROR:
            self.error = exc
        self._transition("broken")
        return exc

    # -- receiving -----------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview, fds: Iterable[int] = ()) -> None:
        """Bytes read from the socket and the fds that came with that read. ``b""`` is EOF."""
        if self.state is State.CLOSED or self.state is State.ERROR:
            raise ProtocolError(f"data on a {self.state.value} connection", errno.EPIPE)
        if not data:
            buffered = self.decoder.buffered
            if buffered:
                raise self.broken(ProtocolError(f"EOF inside a message ({buffered} bytes pending)"))
            self.closed()
            return
        self.decoder.feed(data, list(fds))

    def next_event(self) -> Message | None:
        """The next complete message (a request, or a reply to one of ours: see
        :meth:`reply_received`), or None until more data comes. A broken stream raises
        :class:`ProtocolError` and the connection is in ERROR from then on."""
        if self.state is State.ERROR:
            assert self.error is not None
            raise self.error
        try:
            return self.decoder.next_message()
        except ProtocolError as exc:
            raise self.broken(exc) from None

    # -- answering -----------------------------------------------------------------------------

    def respond(self, msg: Message, result: Result) -> Due:
        """Answer ``msg`` with a handler's result: nothing for NO_REPLY, else its reply goes
        into the outbox, or, with fds, is due now (:meth:`Outbox.alone`). Returns the sends
        due now, or None. One call per message: this is the hot path's."""
        if msg.flags & _NO_REPLY:  # a plain int test
            return None
        if result is None:
            self.outbox.data += encode(msg.id, msg.command, reply=True)
            return None
        if type(result) is tuple:
            payload, fds = result
            data = encode(msg.id, msg.command, payload, reply=True)
            if fds:
                return self.outbox.alone(data, fds)
            self.outbox.data += data
            return None
        self.outbox.data += encode(msg.id, msg.command, result, reply=True)
        return None

    def refuse(self, msg: Message, exc: BaseException) -> None:
        """Answer ``msg`` that failed with ``exc``: an error reply into the outbox, with the
        errno of :meth:`error_errno`, or nothing for NO_REPLY (the client did not ask)."""
        error = self.error_errno(exc)
        if not msg.flags & _NO_REPLY:
            self.outbox.data += encode(msg.id, msg.command, reply=True, error=error)

    @staticmethod
    def error_errno(exc: BaseException) -> int:
        """The errno a failed request is answered with: a :class:`VfioUserError`'s own, and
        EIO for anything else (a device bug: the peer learns only that it failed). A
        :class:`ProtocolError` is re-raised: the stream itself is broken and no reply can fix
        that."""
        if isinstance(exc, ProtocolError):
            raise exc
        if isinstance(exc, VfioUserError):
            return exc.errno or errno.EINVAL
        return errno.EIO

    # -- requests of our own -------------------------------------------------------------------

    def send_request(self, command: int, payload: bytes, token: Any = None) -> tuple[int, bytes]:
        """A request to the client: its id (taken until the reply) and its bytes."""
        msg_id = self.requests.allocate(token)
        return msg_id, encode(msg_id, command, payload)


class ServerConnection(PeerConnection):
    """The server's side of one vfio-user connection, without I/O.

    ``supported``: the commands the dispatch table handles (VERSION is always handled here).
    ``state``: continue a connection another process served (a live handover).
    """

    def __init__(self, offer: ServerOffer, supported: Iterable[int], max_message: int,
                 state: ConnectionState | None = None) -> None:
        super().__init__(max_message, RequestIds(SERVER_FIRST_ID, SERVER_ID_COUNT))
        self.offer = offer
        self.supported = frozenset(int(c) for c in supported) | {_VERSION}
        #: the requests this state serves (the fast path is one lookup here)
        self.admitted: frozenset[int] = frozenset({_VERSION})
        if state is not None:
            self._restore(state)

    def _state_changed(self) -> None:
        self.admitted = self._admits(self.state)

    def _admits(self, state: State) -> frozenset[int]:
        if state is State.AWAITING_VERSION:
            return frozenset({_VERSION})
        if state is State.SERVING:
            return self.supported - {_VERSION}
        return frozenset()

    def check_request(self, msg: Message) -> VfioUserError | None:
        """Whether this state admits request ``msg``: None, or the error to answer it with."""
        command = msg.command
        if command in self.admitted:
            return None
        state = self.state
        if state is State.CLOSED or state is State.ERROR:
            raise ProtocolError(f"request on a {state.value} connection", errno.EPIPE)
        if command not in self.supported:
            return VfioUserError(f"unsupported command {command}", errno.ENOSYS)
        if command == _VERSION:
            return VfioUserError("VERSION sent twice", errno.EINVAL)
        return VfioUserError(f"{command_name(command)} before VERSION", errno.EINVAL)

    def negotiate(self, msg: Message) -> tuple[bytes, Version, Session]:
        """Serve VERSION: the reply payload, the client's offer and the session (started)."""
        if self.state is not State.AWAITING_VERSION:
            raise VfioUserError("VERSION sent twice", errno.EINVAL)
        request = Version.unpack(msg.payload)
        reply, session = self.offer.negotiate(request)
        self.start_session(session)
        return reply.pack(), request, session

    def reply_received(self, reply: Message) -> tuple[bool, Any]:
        """Route a reply to the request of ours with its id: ``(True, token)``, or
        ``(False, None)`` when none waits (QEMU never sends one: the caller logs and drops it,
        its fds closed)."""
        return self.requests.complete(reply)

    # -- the state as data ---------------------------------------------------------------------

    def snapshot(self) -> ConnectionState:
        """The state as plain data. The fds in ``unread_fds`` are copies' numbers: they still
        belong to the decoder."""
        unread, marks = self.decoder.unread()
        return ConnectionState(self.state, self.session, self.requests.next_id,
                               list(self.requests.in_flight), unread, marks)

    def _restore(self, state: ConnectionState) -> None:
        self.decoder.restore(state.unread, state.unread_fds)
        self.requests.next_id = state.next_id
        for msg_id in state.in_flight:
            # Their requesters are gone with the other process: a late reply is taken and
            # dropped quietly rather than breaking the stream.
            self.requests.claim(msg_id, None)
        if state.session is not None:
            self.start_session(state.session)
        elif state.state is not State.AWAITING_VERSION:
            raise ValueError(f"a {state.state.value} connection cannot be continued")


class ClientConnection(PeerConnection):
    """The client's side, without I/O: VERSION's reply accepted the way QEMU 11.1 does, every
    16-bit id its own, a reply that matches no request of ours breaks the stream (a server
    never sends one), and the server's requests (DMA_READ/DMA_WRITE) answered by the same
    rules as the server answers ours."""

    def __init__(self, max_message: int) -> None:
        super().__init__(max_message, RequestIds(0, 0x10000))

    def version_accepted(self, reply: Message) -> Session:
        """The server's VERSION reply: the session (started), or :class:`VfioUserError`."""
        if self.state is not State.AWAITING_VERSION:
            raise VfioUserError(f"VERSION reply on a {self.state.value} connection", errno.EPROTO)
        session = accept_server_reply(Version.unpack(reply.payload))
        self.start_session(session)
        return session

    def post(self, command: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
        """A request that wants no reply (NO_REPLY): its bytes; its id is not kept."""
        return encode(self.requests.allocate_posted(), command, payload, no_reply=True)

    def unexpected_reply(self, reply: Message) -> ProtocolError:
        """A reply no request of ours waits for: the stream is broken (state ERROR)."""
        return self.broken(ProtocolError(f"unexpected reply id={reply.id}"))
