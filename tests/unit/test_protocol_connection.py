"""The connection's protocol rules as a sans-IO state machine (vfu_server.protocol.connection),
driven with bytes alone: no socket, no trio, no device."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.protocol.codec import HEADER, Message, MessageDecoder, encode
from vfu_server.protocol.connection import (
    FLUSH_BEFORE,
    SERVER_FIRST_ID,
    TRANSITIONS,
    ConnectionState,
    Due,
    RequestIds,
    ServerConnection,
    State,
)
from vfu_server.protocol.constants import Command, MsgFlags
from vfu_server.protocol.errors import ProtocolError, VfioUserError
from vfu_server.protocol.negotiation import ServerOffer, client_offer

MAX = 4096
Sends = list[tuple[bytes, list[int]]]


def echo(msg: Message) -> bytes:
    return bytes(msg.payload)


def failing(msg: Message) -> bytes:
    raise VfioUserError("no such register", errno.EFAULT)


def buggy(msg: Message) -> bytes:
    raise ZeroDivisionError("device bug")


def with_fd(msg: Message) -> tuple[bytes, list[int]]:
    r, w = os.pipe()
    os.close(w)
    return b"fd", [r]


HANDLERS: dict[int, Callable[[Message], object]] = {
    Command.REGION_READ: echo,
    Command.REGION_WRITE: echo,
    Command.DEVICE_RESET: echo,
    Command.DMA_UNMAP: failing,
    Command.DEVICE_GET_INFO: buggy,
    Command.DEVICE_GET_REGION_INFO: with_fd,
}


def new() -> ServerConnection:
    return ServerConnection(ServerOffer(), HANDLERS, MAX)


def serve(core: ServerConnection, data: bytes, answers: list[tuple[Message, bool]] | None = None,
          sends: Sends | None = None) -> Sends:
    """What the trio layer does with one received batch, minus the I/O: every complete request
    handled in order, the sends in the order they would go out (``answers``: each request,
    and whether a reply was made for it; ``sends``: where to put the sends, also when the
    stream breaks)."""
    core.receive_data(data)
    sends = [] if sends is None else sends
    outbox = core.outbox
    try:
        while (msg := core.next_event()) is not None:
            try:
                if msg.is_reply:
                    core.reply_received(msg)
                    continue
                first = outbox.before(msg.command)
                if first is not None:
                    sends.append((first, []))
                batched = len(outbox.data)
                due: Due = None
                refused = core.check_request(msg)
                if refused is not None:
                    core.refuse(msg, refused)
                else:
                    try:
                        if msg.command == Command.VERSION:
                            result: object = core.negotiate(msg)[0]
                        else:
                            result = HANDLERS[msg.command](msg)
                        due = core.respond(msg, result)  # type: ignore[arg-type]
                    except Exception as exc:
                        core.refuse(msg, exc)
                if answers is not None:
                    answers.append((msg, due is not None or len(outbox.data) > batched))
                if due:
                    sends += due
            finally:
                msg.close_fds()
    finally:
        # The replies made before a broken stream still go out (the channel hands out the
        # messages before garbage first, and the error only on the next receive).
        rest = outbox.take()
        if rest is not None:
            sends.append((rest, []))
    return sends


def replies(sends: Sends | list[tuple[bytes | bytearray, list[int]]]) -> list[Message]:
    dec = MessageDecoder(1 << 20)
    for data, fds in sends:
        dec.feed(data, fds)
    return list(dec)


def version(msg_id: int = 0) -> bytes:
    return encode(msg_id, Command.VERSION, client_offer().pack())


def read(msg_id: int, no_reply: bool = False) -> bytes:
    return encode(msg_id, Command.REGION_READ, bytes(16), no_reply=no_reply)


def started() -> ServerConnection:
    core = new()
    (reply,) = replies(serve(core, version()))
    assert not reply.is_error and core.state is State.SERVING
    return core


def test_version_must_come_first() -> None:
    core = new()
    (early,) = replies(serve(core, read(1)))
    assert early.is_reply and early.is_error and early.error == errno.EINVAL and early.id == 1
    assert core.state is State.AWAITING_VERSION and core.session is None
    (ver, later) = replies(serve(core, version(2) + read(3)))
    assert ver.id == 2 and not ver.is_error and ver.command == Command.VERSION
    assert later.id == 3 and not later.is_error and bytes(later.payload) == bytes(16)
    assert core.state is State.SERVING and core.session is not None


def test_a_second_version_is_refused_and_the_session_stays() -> None:
    core = started()
    session = core.session
    (again,) = replies(serve(core, version(9)))
    assert again.is_error and again.error == errno.EINVAL
    assert core.session is session and core.state is State.SERVING
    with pytest.raises(VfioUserError):
        core.negotiate(Message(10, Command.VERSION, 0, 0, client_offer().pack()))


def test_a_bad_version_payload_is_an_error_reply_not_a_session() -> None:
    core = new()
    (reply,) = replies(serve(core, encode(1, Command.VERSION, b"\x02\x00")))
    assert reply.is_error and core.state is State.AWAITING_VERSION


def test_no_reply_means_no_reply_on_success_and_on_error() -> None:
    core = started()
    sends = serve(core, read(1, no_reply=True)
                  + encode(2, Command.DMA_UNMAP, bytes(24), no_reply=True)
                  + encode(3, Command.DEVICE_GET_INFO, bytes(16), no_reply=True)
                  + encode(4, Command.REGION_WRITE, bytes(20), no_reply=True))
    assert sends == []


def test_errors_carry_the_handlers_errno_and_device_bugs_are_eio() -> None:
    core = started()
    got = replies(serve(core, encode(1, Command.DMA_UNMAP, bytes(24)) + encode(2, Command.DEVICE_GET_INFO, bytes(16))))
    assert [(r.id, r.is_error, r.error, bytes(r.payload)) for r in got] == [
        (1, True, errno.EFAULT, b""), (2, True, errno.EIO, b"")]
    core.refuse(Message(3, Command.DMA_MAP, 0, 0, b""), VfioUserError("x", 0))
    assert core.outbox.take() == encode(3, Command.DMA_MAP, reply=True, error=errno.EINVAL)
    with pytest.raises(ProtocolError):
        core.refuse(Message(4, Command.DMA_MAP, 0, 0, b""), ProtocolError("stream broken"))
    assert core.outbox.take() is None


@pytest.mark.parametrize("ready", [False, True])
def test_an_unsupported_command_is_enosys_in_every_state(ready: bool) -> None:
    core = started() if ready else new()
    (reply,) = replies(serve(core, encode(5, 999) + encode(6, Command.DMA_READ)))[:1]
    assert reply.id == 5 and reply.is_error and reply.error == errno.ENOSYS


def test_replies_are_batched_and_the_flush_rules_hold() -> None:
    core = started()
    assert Command.DEVICE_RESET in FLUSH_BEFORE and Command.REGION_READ not in FLUSH_BEFORE
    sends = serve(core, read(1) + read(2) + encode(3, Command.DEVICE_GET_REGION_INFO, bytes(32))
                  + read(4) + encode(5, Command.DEVICE_RESET) + read(6) + read(7, no_reply=True) + read(8))
    # [1 2] go out before the reply with an fd, which goes alone; [4] before the command that
    # may wait; [5 6 8] at the end of the batch.
    assert [[m.id for m in replies([s])] for s in sends] == [[1, 2], [3], [4], [5, 6, 8]]
    assert [len(fds) for _, fds in sends] == [0, 1, 0, 0]
    for _, fds in sends:
        for fd in fds:
            os.close(fd)
    assert core.outbox.take() is None


def test_a_flush_before_command_with_nothing_batched_sends_nothing_first() -> None:
    core = started()
    assert core.outbox.before(Command.DEVICE_RESET) is None
    assert [[m.id for m in replies([s])] for s in serve(core, encode(1, Command.DEVICE_RESET))] == [[1]]


def test_server_request_ids_wrap_within_the_upper_half_and_skip_taken_ones() -> None:
    core = started()
    core.requests.next_id = 0xFFFE
    ids = [core.send_request(Command.DMA_READ, b"", token=i)[0] for i in range(3)]
    assert ids == [0xFFFE, 0xFFFF, SERVER_FIRST_ID]
    core.requests.claim(SERVER_FIRST_ID + 1, "taken")
    msg_id, data = core.send_request(Command.DMA_WRITE, b"xy", token="w")
    assert msg_id == SERVER_FIRST_ID + 2
    assert HEADER.unpack_from(data) == (msg_id, Command.DMA_WRITE, 18, int(MsgFlags.REQUEST), 0)


def test_replies_are_routed_by_id_and_an_unmatched_one_is_reported() -> None:
    core = started()
    a, _ = core.send_request(Command.DMA_READ, b"", token="a")
    b, _ = core.send_request(Command.DMA_READ, b"", token="b")
    assert core.reply_received(Message(b, Command.DMA_READ, 1, 0, b"")) == (True, "b")
    assert core.reply_received(Message(b, Command.DMA_READ, 1, 0, b"")) == (False, None), "a second reply"
    assert core.reply_received(Message(0x1234, Command.DMA_READ, 1, 0, b"")) == (False, None)
    assert len(core.requests) == 1 and a in core.requests
    # A reply in a batch of requests reaches its request and is never answered.
    sends = serve(core, read(1) + encode(a, Command.DMA_READ, bytes(16), reply=True) + read(2))
    assert [m.id for m in replies(sends)] == [1, 2] and len(core.requests) == 0


def test_every_id_waiting_is_ebusy() -> None:
    ids: RequestIds[None] = RequestIds(SERVER_FIRST_ID, 4)
    for _ in range(4):
        ids.allocate()
    with pytest.raises(VfioUserError) as err:
        ids.allocate()
    assert err.value.errno == errno.EBUSY
    assert ids.drain() == [None] * 4 and ids.allocate() == SERVER_FIRST_ID


def test_eof_inside_a_message_and_data_after_the_end_are_protocol_errors() -> None:
    core = started()
    core.receive_data(read(1)[:10])
    with pytest.raises(ProtocolError):
        core.receive_data(b"")
    assert core.state is State.ERROR
    with pytest.raises(ProtocolError) as err:
        core.receive_data(b"more")
    assert err.value.errno == errno.EPIPE
    clean = started()
    clean.receive_data(b"")
    assert clean.state is State.CLOSED
    with pytest.raises(ProtocolError):
        clean.check_request(Message(1, Command.REGION_READ, 0, 0, bytes(16)))


def test_a_broken_header_leaves_the_connection_in_error_for_good() -> None:
    core = started()
    core.receive_data(HEADER.pack(1, Command.REGION_READ, 8, 0, 0))
    with pytest.raises(ProtocolError) as first:
        core.next_event()
    with pytest.raises(ProtocolError) as second:
        core.next_event()
    assert core.state is State.ERROR and second.value is first.value


def test_every_transition_leads_to_a_state_and_the_table_is_closed() -> None:
    for (state, what), target in TRANSITIONS.items():
        assert isinstance(state, State) and isinstance(target, State) and what in {"session", "eof", "broken"}
    core = started()
    with pytest.raises(RuntimeError):
        core.start_session(core.session)  # type: ignore[arg-type]


def test_the_state_round_trips_as_plain_data_with_its_fds() -> None:
    core = started()
    core.requests.next_id = 0x9000
    core.send_request(Command.DMA_READ, b"")
    r, w = os.pipe()
    os.close(w)
    partial = encode(7, Command.DMA_MAP, bytes(32))
    core.receive_data(partial[:20], [r])
    state = core.snapshot()
    obj, fds = state.to_dict()
    assert set(obj) == {"session", "next_id", "unread", "unread_fds", "in_flight"}
    assert obj["next_id"] == 0x9001 and obj["in_flight"] == [0x9000] and fds == [r]
    back = ConnectionState.from_dict(obj, fds)
    assert back == state
    successor = ServerConnection(ServerOffer(), HANDLERS, MAX, back)
    assert successor.state is State.SERVING and successor.session == core.session
    successor.receive_data(partial[20:])
    msg = successor.next_event()
    assert msg is not None and msg.id == 7 and msg.fds == [r]
    # The request the other process made is answered here without breaking anything.
    assert successor.reply_received(Message(0x9000, Command.DMA_READ, 1, 0, b"")) == (True, None)
    msg.close_fds()
    core.decoder.close()


@pytest.mark.parametrize("obj, fds", [
    ({"session": {"major": 0}}, []),
    ({"session": None, "unread": "not base64!"}, []),
    ({"session": None, "next_id": 5}, []),
    ({"session": None, "unread": "", "unread_fds": [[0, 2]]}, [100]),
    ({"session": None, "unread": "", "unread_fds": [[0, -1]]}, []),
    ({"session": None, "unread": "AAAA", "unread_fds": [[4, 1]]}, [100]),  # 3 bytes: end 4 is past them
    ({"session": None, "in_flight": [0x8001, 0x8001]}, []),
    ({"session": None, "in_flight": [5]}, []),
])
def test_bad_state_is_a_protocol_error(obj: dict, fds: list[int]) -> None:
    with pytest.raises(ProtocolError):
        ConnectionState.from_dict(obj, fds)


def test_a_state_without_a_session_waits_for_version() -> None:
    obj, fds = ConnectionState().to_dict()
    assert obj == {"session": None, "next_id": SERVER_FIRST_ID, "unread": "", "unread_fds": []}
    core = ServerConnection(ServerOffer(), HANDLERS, MAX, ConnectionState.from_dict(obj, fds))
    assert core.state is State.AWAITING_VERSION


# -- arbitrary input --------------------------------------------------------------------------

_commands = st.sampled_from([*HANDLERS, Command.VERSION, Command.DMA_READ, 0, 999])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Well-formed messages with arbitrary commands, flags and payloads, with garbage mixed in
    sometimes, and the cut points of the reads."""
    data = b""
    if draw(st.booleans()):
        data += version()
    for i in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 9)) == 0:
            data += draw(st.binary(max_size=40))
        else:
            flags = draw(st.sampled_from([0, 1, 0x10, 0x11, 0x20, 0x30, 2]))
            payload = draw(st.binary(max_size=40))
            data += HEADER.pack(i + 1, draw(_commands), 16 + len(payload), flags, draw(st.integers(0, 3))) + payload
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return data, cuts


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_arbitrary_fragmented_streams_raise_only_protocol_errors_and_honour_no_reply(
        stream: tuple[bytes, list[int]]) -> None:
    data, cuts = stream
    core = new()
    answers: list[tuple[Message, bool]] = []
    sent: Sends = []
    try:
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            if a < b:
                serve(core, data[a:b], answers, sent)
    except ProtocolError as exc:
        assert isinstance(exc.errno, int) and exc.errno > 0
        assert core.state is State.ERROR
        with pytest.raises(ProtocolError):
            core.next_event()
    else:
        assert core.state in (State.AWAITING_VERSION, State.SERVING)
    for msg, replied in answers:
        assert replied != msg.no_reply, f"{'a' if replied else 'no'} reply to {msg.describe()}"
    # What goes out is exactly the replies made, in order, nothing more.
    out = replies(sent)
    assert [(m.id, m.command) for m in out] == [(m.id, m.command) for m, replied in answers if replied]
    assert all(m.is_reply for m in out)
    for _, fds in sent:
        for fd in fds:
            os.close(fd)


def test_client_ids_span_16_bits_and_posted_ids_are_not_kept() -> None:
    ids: RequestIds[str] = RequestIds(0, 0x10000, next_id=0xFFFF)
    assert ids.allocate("a") == 0xFFFF and ids.allocate("b") == 0
    assert ids.allocate_posted() == 1 and 1 not in ids and len(ids) == 2
    assert ids.allocate("c") == 2
    with pytest.raises(ValueError):
        RequestIds(0x8000, 0x8001)
    with pytest.raises(ValueError):
        RequestIds(0x8000, 0x8000, next_id=5)


def test_the_client_role_shares_the_rules() -> None:
    from vfu_server.protocol.connection import ClientConnection

    server, client = new(), ClientConnection(MAX)
    _, data = client.send_request(Command.VERSION, client_offer().pack())
    (reply,) = replies(serve(server, data))
    assert client.requests.complete(reply) == (True, None)
    session = client.version_accepted(reply)
    assert client.state is State.SERVING and session.max_data_xfer_size > 0
    with pytest.raises(VfioUserError):
        client.version_accepted(reply)
    # The server's requests are answered by the same rules: NO_REPLY means nothing.
    client.respond(Message(0x8000, Command.DMA_READ, 0x10, 0, b""), b"data")
    client.refuse(Message(0x8001, Command.DMA_READ, 0x10, 0, b""), VfioUserError("no", errno.EFAULT))
    assert client.outbox.take() is None
    client.refuse(Message(0x8002, Command.DMA_WRITE, 0, 0, b""), VfioUserError("no", errno.EPERM))
    (refusal,) = replies([(client.outbox.take() or b"", [])])
    assert (refusal.id, refusal.is_error, refusal.error) == (0x8002, True, errno.EPERM)
    posted = client.post(Command.REGION_WRITE, bytes(20))
    assert HEADER.unpack_from(posted)[3] & int(MsgFlags.NO_REPLY) and len(client.requests) == 0
    with pytest.raises(ProtocolError):
        raise client.unexpected_reply(Message(77, Command.REGION_READ, 1, 0, b""))
    assert client.state is State.ERROR
