"""MessageChannel over a real socketpair: sends that do not fit, and what shutdown drains."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from vfu_server.protocol.codec import encode
from vfu_server.protocol.constants import Command
from vfu_server.protocol.errors import ProtocolError
from vfu_server.transport.channel import MessageChannel


def channel_pair(sndbuf: int = 4096) -> tuple[MessageChannel, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    return MessageChannel(trio.socket.from_stdlib_socket(a), 1 << 20), b


def read_all(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += sock.recv(n - len(out))
    return out


async def test_a_message_that_does_not_fit_keeps_the_stream_for_itself() -> None:
    chan, peer = channel_pair()
    big = encode(1, Command.REGION_READ, bytes(range(256)) * 1024)  # far more than the buffers
    small = encode(2, Command.REGION_READ, b"after")
    got = bytearray()

    async def first() -> None:
        rest = chan.send_now(big)
        assert rest is not None and rest.locked and 0 < len(rest.view) < len(big), "part went out"
        await trio.sleep(0.05)  # the other sender tries meanwhile
        await chan.send_rest(rest)

    async def second() -> None:
        await trio.sleep(0.01)
        queued = chan.send_now(small)  # another sender queues behind the unfinished message
        assert queued is not None and not queued.locked and len(queued.view) == len(small)
        await chan.send_rest(queued)

    async def reader() -> None:
        while len(got) < len(big) + len(small):
            got.extend(await trio.to_thread.run_sync(peer.recv, 65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)
        await trio.sleep(0.1)
        nursery.start_soon(reader)
    assert bytes(got) == big + small
    peer.close()
    chan.close()


async def test_whole_message_goes_out_at_once_when_it_fits() -> None:
    chan, peer = channel_pair(1 << 20)
    msg = encode(3, Command.REGION_READ, b"x" * 100)
    assert chan.send_now(msg) is None
    assert read_all(peer, len(msg)) == msg
    peer.close()
    chan.close()


async def test_send_to_a_peer_that_stopped_reading_times_out() -> None:
    chan, peer = channel_pair()
    with pytest.raises(trio.TooSlowError):
        await chan.send(encode(4, Command.REGION_READ, bytes(1 << 20)), timeout=0.2)
    peer.close()
    chan.close()


async def test_receive_nowait_takes_what_is_queued_and_leaves_the_socket_usable() -> None:
    chan, peer = channel_pair(1 << 20)
    msgs = [encode(i, Command.REGION_WRITE, bytes(20), no_reply=True) for i in range(10)]
    peer.sendall(b"".join(msgs) + msgs[0][:7])  # ten whole messages and the start of one
    got = chan.receive_nowait()
    assert [m.id for m in got] == list(range(10))
    assert chan.receive_nowait() == []
    peer.sendall(msgs[0][7:])
    assert [m.id for m in await chan.receive()] == [0]
    peer.close()
    assert await chan.receive() is None
    chan.close()


GARBAGE = struct.pack("<HHIII", 9, Command.REGION_WRITE, 3, 0, 0)  # size 3: less than a header


async def test_messages_before_garbage_still_count() -> None:
    chan, peer = channel_pair(1 << 20)
    good = encode(1, Command.REGION_WRITE, bytes(20), no_reply=True)
    peer.sendall(good + GARBAGE)
    assert [m.id for m in await chan.receive()] == [1]
    with pytest.raises(ProtocolError):
        await chan.receive()
    peer.close()
    chan.close()


async def test_receive_nowait_keeps_what_came_before_garbage() -> None:
    chan, peer = channel_pair(1 << 20)
    peer.sendall(encode(1, Command.REGION_WRITE, bytes(20), no_reply=True) + GARBAGE)
    assert [m.id for m in chan.receive_nowait()] == [1]
    assert chan.receive_nowait() == []  # broken: nothing more, and no exception
    peer.close()
    chan.close()
