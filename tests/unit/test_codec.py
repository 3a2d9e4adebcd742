"""The sans-IO stream decoder: framing at every split, fd attribution, broken headers, fuzzing."""

from __future__ import annotations

import array
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.protocol.codec import HEADER, Message, MessageDecoder, encode
from vfu_server.protocol.constants import Command, MsgFlags
from vfu_server.protocol.errors import ProtocolError

MAX = 4096


def stream_of(*payloads: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    out = b""
    expect = []
    for i, p in enumerate(payloads):
        out += encode(i, Command.REGION_WRITE, p, no_reply=bool(i % 2))
        expect.append((i, p))
    return out, expect


def drain(dec: MessageDecoder) -> list[Message]:
    return list(dec)


def summary(msgs: list[Message]) -> list[tuple[int, bytes]]:
    return [(msg.id, bytes(msg.payload)) for msg in msgs]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def ino(fd: int) -> int:
    return os.fstat(fd).st_ino


@pytest.fixture
def pipes():
    """Factory of fds with distinct identities (pipe read ends); closes leftovers."""
    made: list[int] = []

    def make(n: int = 1) -> list[int]:
        fds = []
        for _ in range(n):
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        made.extend(fds)
        return fds

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# framing


PAYLOADS = [b"", b"a", bytes(range(16)), b"x" * 300, b"\0" * 7]


def test_decodes_header_fields() -> None:
    dec = MessageDecoder(MAX)
    dec.feed(encode(0xBEEF, Command.DMA_MAP, b"pay", reply=True) + HEADER.pack(9, 13, 16, 0x31, 22))
    a, b = drain(dec)
    assert (a.id, a.command, a.flags, a.error, bytes(a.payload)) == (0xBEEF, 2, MsgFlags.REPLY, 0, b"pay")
    assert a.is_reply and not a.no_reply and not a.is_error
    assert (b.id, b.command, b.error, bytes(b.payload)) == (9, 13, 22, b"")
    assert b.is_reply and b.no_reply and b.is_error
    assert dec.buffered == 0


def test_every_split_point() -> None:
    data, expect = stream_of(*PAYLOADS)
    for k in range(len(data) + 1):
        dec = MessageDecoder(MAX)
        dec.feed(data[:k])
        got = drain(dec)
        dec.feed(data[k:])
        got += drain(dec)
        assert summary(got) == expect, k
        assert dec.buffered == 0


def test_every_pair_of_split_points_small_stream() -> None:
    data, expect = stream_of(b"", b"abc", b"0123456789")
    n = len(data)
    for i in range(n + 1):
        for j in range(i, n + 1):
            dec = MessageDecoder(MAX)
            got = []
            for part in (data[:i], data[i:j], data[j:]):
                dec.feed(part)
                got += drain(dec)
            assert summary(got) == expect, (i, j)


def test_one_byte_at_a_time() -> None:
    data, expect = stream_of(*PAYLOADS)
    dec = MessageDecoder(MAX)
    got = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        got += drain(dec)
        # Nothing is returned before its last byte arrived.
        assert sum(16 + len(p) for _, p in summary(got)) <= i + 1
    assert summary(got) == expect


def test_many_messages_in_one_feed() -> None:
    payloads = [struct.pack("<QII", 4 * i, 0, 4) + struct.pack("<I", i) for i in range(10_000)]
    data, expect = stream_of(*payloads)
    dec = MessageDecoder(MAX)
    dec.feed(data)
    assert summary(drain(dec)) == expect
    assert dec.next_message() is None


def test_incomplete_message_waits() -> None:
    dec = MessageDecoder(MAX)
    msg = encode(1, Command.VERSION, b"x" * 100)
    dec.feed(msg[:15])
    assert dec.next_message() is None
    dec.feed(msg[15:50])
    assert dec.next_message() is None
    assert dec.buffered == 50
    dec.feed(msg[50:])
    assert bytes(dec.next_message().payload) == b"x" * 100


def test_max_size_is_inclusive() -> None:
    dec = MessageDecoder(64)
    dec.feed(encode(1, 1, bytes(48)))
    assert len(dec.next_message().payload) == 48


# --------------------------------------------------------------------------------------------
# broken headers


@pytest.mark.parametrize("size", [0, 1, 15])
def test_size_below_header(size: int) -> None:
    dec = MessageDecoder(MAX)
    dec.feed(HEADER.pack(1, 1, size, 0, 0) + bytes(32))
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_oversize_rejected_from_the_header_alone() -> None:
    dec = MessageDecoder(MAX)
    dec.feed(HEADER.pack(1, 1, MAX + 1, 0, 0))  # no body yet: refused without waiting for it
    with pytest.raises(ProtocolError):
        dec.next_message()
    dec = MessageDecoder(MAX)
    dec.feed(HEADER.pack(1, 1, 0xFFFFFFFF, 0, 0))
    with pytest.raises(ProtocolError):
        dec.next_message()


@pytest.mark.parametrize("kind", range(2, 16))
def test_bad_message_type(kind: int) -> None:
    dec = MessageDecoder(MAX)
    dec.feed(encode(0, 1, b"ok") + HEADER.pack(1, 1, 16, kind | MsgFlags.NO_REPLY, 0))
    assert bytes(dec.next_message().payload) == b"ok"
    with pytest.raises(ProtocolError):
        dec.next_message()
    # The stream cannot resynchronise: it stays broken.
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_unknown_command_is_not_a_framing_error() -> None:
    dec = MessageDecoder(MAX)
    dec.feed(encode(1, 999, b"z"))
    assert dec.next_message().command == 999


# --------------------------------------------------------------------------------------------
# fd attribution: the fds of a read belong to the last message starting in that read


def test_fds_go_to_last_message_starting_in_the_read(pipes) -> None:
    a, b, c = (encode(i, Command.DMA_MAP, bytes(32)) for i in range(3))
    fds = pipes(2)
    dec = MessageDecoder(MAX)
    dec.feed(a + b + c, fds)
    got = drain(dec)
    assert [m.fds for m in got] == [[], [], fds]


def test_fds_go_to_a_message_that_is_still_incomplete(pipes) -> None:
    a, b = encode(0, 2, bytes(32)), encode(1, 2, bytes(32))
    (fd,) = pipes(1)
    dec = MessageDecoder(MAX)
    dec.feed(a + b[:5], [fd])  # b starts in this read
    (first,) = drain(dec)
    assert first.fds == []
    dec.feed(b[5:])
    (second,) = drain(dec)
    assert second.fds == [fd]


def test_fds_of_a_read_that_continues_a_message(pipes) -> None:
    a, b, c = encode(0, 2, bytes(32)), encode(1, 2, bytes(32)), encode(2, 2, bytes(8))
    f1, f2 = pipes(2)
    dec = MessageDecoder(MAX)
    dec.feed(a[:20], [f1])  # a starts here
    dec.feed(a[20:] + b + c[:3], [f2])  # b and c start here; c is the last
    got = drain(dec)
    assert [m.fds for m in got] == [[f1], []]
    dec.feed(c[3:])
    assert drain(dec)[0].fds == [f2]


def test_consecutive_reads_each_with_fds(pipes) -> None:
    msgs = [encode(i, 8, bytes(20)) for i in range(4)]
    f = pipes(4)
    dec = MessageDecoder(MAX)
    dec.feed(msgs[0], [f[0]])
    dec.feed(msgs[1] + msgs[2], [f[1], f[2]])
    dec.feed(msgs[3], [f[3]])
    assert [m.fds for m in drain(dec)] == [[f[0]], [], [f[1], f[2]], [f[3]]]


def test_message_ending_exactly_at_read_end_takes_the_fds(pipes) -> None:
    a, b = encode(0, 2, bytes(32)), encode(1, 2, bytes(32))
    (fd,) = pipes(1)
    dec = MessageDecoder(MAX)
    dec.feed(a, [fd])
    dec.feed(b)
    assert [m.fds for m in drain(dec)] == [[fd], []]


def test_stray_fds_are_closed_not_attributed(pipes) -> None:
    a, b = encode(0, 2, bytes(32)), encode(1, 2, bytes(32))
    (fd,) = pipes(1)
    dec = MessageDecoder(MAX)
    dec.feed(a)
    assert drain(dec)[0].fds == []
    dec.feed(b"", [fd])  # fds with no message starting in that read
    dec.feed(b)
    assert drain(dec)[0].fds == []
    assert not is_open(fd)


def test_close_releases_unclaimed_fds(pipes) -> None:
    (fd,) = pipes(1)
    dec = MessageDecoder(MAX)
    dec.feed(encode(0, 2, bytes(32))[:10], [fd])
    assert dec.next_message() is None
    dec.close()
    assert not is_open(fd)
    assert dec.buffered == 0


def test_message_close_fds(pipes) -> None:
    fds = pipes(3)
    dec = MessageDecoder(MAX)
    dec.feed(encode(0, 8, bytes(20)), fds)
    msg = dec.next_message()
    msg.close_fds()
    assert msg.fds == [] and not any(is_open(fd) for fd in fds)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 3)), min_size=1, max_size=12),
    bufsizes=st.lists(st.integers(1, 3000), min_size=1, max_size=20),
)
def test_fd_rule_matches_the_kernel(plan, bufsizes, pipes) -> None:
    """Real socketpair: every message sent with its own sendmsg and fds; whatever sizes the
    reads have, each decoded message carries exactly the fds sent with it."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received: list[int] = []
    try:
        sent = []
        for i, (size, nfds) in enumerate(plan):
            fds = pipes(nfds)
            data = encode(i, Command.DMA_MAP, bytes([i]) * size)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            assert left.sendmsg([data], anc) == len(data)
            sent.append(sorted(ino(fd) for fd in fds))
        left.close()
        dec = MessageDecoder(MAX)
        got: list[Message] = []
        k = 0
        while True:
            data, anc, flags, _ = right.recvmsg(bufsizes[k % len(bufsizes)], socket.CMSG_SPACE(64 * 4))
            k += 1
            assert not flags & socket.MSG_CTRUNC
            fds = []
            for _lvl, _typ, payload in anc:
                arr = array.array("i")
                arr.frombytes(payload)
                fds.extend(arr)
            received.extend(fds)
            if not data:
                break
            dec.feed(data, fds)
            got += drain(dec)
        assert [m.id for m in got] == list(range(len(plan)))
        assert [sorted(ino(fd) for fd in m.fds) for m in got] == sent
    finally:
        right.close()
        for fd in received:
            try:
                os.close(fd)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# fuzzing: only messages or ProtocolError


def check_stream(data: bytes, cuts: list[int], max_size: int = 512) -> None:
    """Feed ``data`` in pieces; every decoded message must re-encode to the bytes it came from,
    and the only exception allowed is ProtocolError."""
    dec = MessageDecoder(max_size)
    got: list[Message] = []
    pos = 0
    points = sorted({c % (len(data) + 1) for c in cuts} | {len(data)})
    try:
        for p in points:
            dec.feed(data[pos:p])
            pos = p
            got += drain(dec)
    except ProtocolError:
        pass
    consumed = b"".join(
        HEADER.pack(msg.id, msg.command, 16 + len(msg.payload), msg.flags, msg.error) + bytes(msg.payload)
        for msg in got
    )
    assert data.startswith(consumed)
    for msg in got:
        assert msg.flags & 0xF in (0, 1)
        assert 16 + len(msg.payload) <= max_size


@settings(max_examples=500)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    check_stream(data, cuts)


VALID = b"".join(
    [
        encode(0, Command.VERSION, b"\0\0\0\0{}\0"),
        encode(1, Command.DMA_MAP, bytes(32)),
        encode(2, Command.REGION_READ, struct.pack("<QII", 0, 7, 4)),
        encode(3, Command.REGION_WRITE, struct.pack("<QII", 4, 0, 4) + b"abcd", no_reply=True),
        encode(4, Command.DEVICE_RESET, reply=True, error=5),
    ]
)


@settings(max_examples=500)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    st.lists(st.integers(0, len(VALID)), max_size=5),
)
def test_mutated_valid_stream(mutations, cuts) -> None:
    data = bytearray(VALID)
    for pos, value in mutations:
        data[pos] = value
    check_stream(bytes(data), cuts)


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_header_size_and_flags_fuzz(size: int, flags: int) -> None:
    dec = MessageDecoder(512)
    dec.feed(HEADER.pack(1, 1, size, flags, 0) + bytes(600))
    try:
        msg = dec.next_message()
    except ProtocolError:
        assert size < 16 or size > 512 or flags & 0xF > 1
        return
    assert 16 <= size <= 512 and flags & 0xF <= 1
    assert msg is not None and len(msg.payload) == size - 16
