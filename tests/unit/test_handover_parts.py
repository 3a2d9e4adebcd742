"""The sans-IO parts of a live handover: format choice, the fd-carrying line protocol, the
decoder's unread bytes and the IRQ table, each against what a peer could send."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from vfu_server.handover import HandoverError, Link, choose_format
from vfu_server.migration.example_format import EXAMPLE_FORMATS
from vfu_server.pci.irq import Interrupts
from vfu_server.protocol.codec import MessageDecoder, encode
from vfu_server.protocol.constants import Command, IrqIndex

OPAQUE, STANDARD = EXAMPLE_FORMATS.formats


def offer(*fmts, lo: int = 0, hi: int = 0xFFFF) -> list[dict]:
    return [{"uuid": str(f.uuid), "name": f.name, "minor_min": lo, "minor_max": hi} for f in fmts]


def test_standard_is_preferred_and_insist_wins() -> None:
    assert choose_format(EXAMPLE_FORMATS, offer(OPAQUE, STANDARD))[0] is STANDARD
    assert choose_format(EXAMPLE_FORMATS, offer(OPAQUE))[0] is OPAQUE
    fmt, _ = choose_format(EXAMPLE_FORMATS, offer(OPAQUE, STANDARD), {"uuid": str(OPAQUE.uuid)})
    assert fmt is OPAQUE


def test_no_common_format_or_minor_is_a_refusal() -> None:
    with pytest.raises(HandoverError, match="no common state format"):
        choose_format(EXAMPLE_FORMATS, [])
    with pytest.raises(HandoverError, match="not one this server produces"):
        choose_format(EXAMPLE_FORMATS, offer(STANDARD), {"uuid": "00000000-0000-4000-8000-000000000001"})
    too_new = STANDARD.minor_max + 1
    with pytest.raises(HandoverError, match="no common state format"):
        choose_format(EXAMPLE_FORMATS, offer(STANDARD, lo=too_new, hi=too_new + 3))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=12)


@settings(max_examples=300)
@given(offered=st.one_of(json_values, st.lists(st.fixed_dictionaries(
    {"uuid": st.sampled_from([str(OPAQUE.uuid), str(STANDARD.uuid), "x", ""]),
     "minor_min": st.integers(-3, 5) | st.text(max_size=3), "minor_max": st.integers(-3, 5)}))),
    insist=json_values | st.fixed_dictionaries({"uuid": st.sampled_from([str(STANDARD.uuid), "bad"]),
                                                "minor": st.none() | st.integers(-2, 4) | st.text(max_size=2)}))
def test_any_successor_offer_is_a_choice_or_a_clear_refusal(offered, insist) -> None:
    try:
        fmt, minor = choose_format(EXAMPLE_FORMATS, offered, insist)
    except HandoverError as exc:
        assert exc.errno and exc.reason and "\n" not in exc.reason
    else:
        assert fmt in EXAMPLE_FORMATS.formats and fmt.minor_min <= minor <= fmt.minor_max


async def test_lines_carry_their_fds_in_order_even_past_the_per_line_limit() -> None:
    a, b = socket.socketpair()
    left = Link(trio.socket.from_stdlib_socket(a))
    right = Link(trio.socket.from_stdlib_socket(b))
    pipes = [os.pipe() for _ in range(250)]
    try:
        async def send_both() -> None:
            await left.send({"msg": "many"}, [w for _, w in pipes])
            await left.send({"msg": "none"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_both)
            got, fds = await right.receive()
            assert got["msg"] == "many" and len(fds) == 250
            for i, fd in enumerate(fds):  # the same pipes, in order
                os.write(fd, bytes([i % 256]))
                assert os.read(pipes[i][0], 1) == bytes([i % 256])
                os.close(fd)
            got, fds = await right.receive()
            assert got["msg"] == "none" and fds == []
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        left.close()
        right.close()


@pytest.mark.parametrize("line", [b"[1]\n", b"not json\n", b'{"nfds": 3}\n', b'{"nfds": "x"}\n'])
async def test_a_bad_line_is_a_protocol_error(line: bytes) -> None:
    a, b = socket.socketpair()
    a.sendall(line)
    link = Link(trio.socket.from_stdlib_socket(b))
    with pytest.raises(HandoverError):
        await link.receive()
    a.close()
    link.close()


@settings(max_examples=200)
@given(sizes=st.lists(st.integers(0, 64), min_size=1, max_size=6), split=st.integers(0, 400))
def test_unread_bytes_restore_into_the_same_messages(sizes: list[int], split: int) -> None:
    stream = b"".join(encode(i, Command.REGION_WRITE, bytes([i]) * n) for i, n in enumerate(sizes))
    split = min(split, len(stream))
    first = MessageDecoder(1 << 16)
    first.feed(stream[:split])
    before = list(first)
    data, marks = first.unread()
    second = MessageDecoder(1 << 16)
    second.restore(data, marks)
    second.feed(stream[split:])
    after = list(second)
    assert [(m.id, m.payload) for m in before + after] == [(i, bytes([i]) * n) for i, n in enumerate(sizes)]


def test_unread_fds_keep_their_message() -> None:
    r, w = os.pipe()
    msg = encode(7, Command.DMA_MAP, bytes(32))
    first = MessageDecoder(1 << 16)
    first.feed(msg[:10], [w])  # the fd came with the first part of the message
    data, marks = first.unread()
    assert marks == [(10, [w])]
    second = MessageDecoder(1 << 16)
    second.restore(data, marks)
    second.feed(msg[10:])
    (m,) = list(second)
    assert m.id == 7 and m.fds == [w]
    os.close(r)
    os.close(w)


def test_irq_table_round_trip_and_refusal() -> None:
    src = Interrupts(intx=True, msix_vectors=4)
    fds = []
    for vec in (0, 2):
        fd = os.eventfd(0)
        src.lines[IrqIndex.MSIX].fds[vec] = fd
        fds.append(fd)
    src.lines[IrqIndex.MSIX].masked[2] = True
    src.lines[IrqIndex.MSIX].pending[2] = True
    data, out = src.export()
    assert out == fds
    dst = Interrupts(intx=True, msix_vectors=4)
    dst.adopt(data, [os.dup(fd) for fd in out])
    line = dst.lines[IrqIndex.MSIX]
    assert [fd is not None for fd in line.fds] == [True, False, True, False]
    assert line.masked[2] and line.pending[2]
    assert dst.signal(IrqIndex.MSIX, 0)
    assert os.eventfd_read(fds[0]) == 1  # the same eventfd
    dst.close()
    other = Interrupts(intx=True, msix_vectors=8)
    dup = [os.dup(fd) for fd in out]
    with pytest.raises(ValueError, match="4 vectors, this device has 8"):
        other.adopt(data, dup)
    for fd in dup:  # closed by the refusal
        with pytest.raises(OSError):
            os.fstat(fd)
    src.close()
