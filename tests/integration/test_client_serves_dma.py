"""The project's client answers a server's DMA_READ/DMA_WRITE in the spec's layout, from RAM it
mapped without an fd, and refuses what QEMU would refuse. The test is the server: a real Unix
socket, raw messages, whatever a hostile server might send."""

from __future__ import annotations

import errno
import os
import socket
import struct
import tempfile

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.client import Client, GuestRam
from vfu_server.protocol import messages as m
from vfu_server.protocol.codec import HEADER, Message, encode
from vfu_server.protocol.constants import Command, DmaMapFlags
from vfu_server.protocol.negotiation import ServerOffer
from vfu_server.transport.channel import MessageChannel

BASE, SIZE, RO_BASE = 0x10000, 0x4000, 0x20000
LIMIT = 4096  # the client's max_data_xfer_size


async def _next(channel: MessageChannel, pending: list[Message]) -> Message:
    while not pending:
        batch = await channel.receive()
        assert batch is not None, "client closed the connection"
        pending.extend(batch)
    return pending.pop(0)


async def _exchange(requests: list[bytes]) -> tuple[list[Message], bytes, bytes]:
    """Connect a Client, map RAM (RW at BASE, RO at RO_BASE, both without an fd), send
    ``requests`` as the server and return the client's replies and both RAM contents."""
    with tempfile.TemporaryDirectory() as tmp, GuestRam(SIZE, BASE) as ram, GuestRam(SIZE, RO_BASE) as ro:
        ram.write(BASE, bytes(range(256)) * (SIZE // 256))
        ro.write(RO_BASE, b"\xee" * SIZE)
        path = os.path.join(tmp, "s.sock")
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen(1)
        replies: list[Message] = []
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                sock, _ = await listener.accept()
                channel = MessageChannel(sock, 1 << 20, 16)
                pending: list[Message] = []
                version = await _next(channel, pending)
                reply, _ = ServerOffer().negotiate(m.Version.unpack(version.payload))
                await channel.send(encode(version.id, Command.VERSION, reply.pack(), reply=True))
                for _ in range(2):  # the two DMA_MAPs
                    msg = await _next(channel, pending)
                    assert msg.command == Command.DMA_MAP and not msg.fds
                    await channel.send(encode(msg.id, msg.command, reply=True))
                for raw in requests:
                    await channel.send(raw)
                    replies.append(await _next(channel, pending))
                channel.close()

            nursery.start_soon(serve)
            async with await Client.connect(path, max_data_xfer_size=LIMIT) as client:
                await client.dma_map(ram, with_fd=False)
                await client.dma_map(ro, flags=DmaMapFlags.READ, with_fd=False)
                with trio.fail_after(10):
                    while len(replies) < len(requests):
                        await trio.sleep(0.001)
        listener.close()
        return replies, ram.read(BASE, SIZE), ro.read(RO_BASE, SIZE)


def run(requests: list[bytes]) -> tuple[list[Message], bytes, bytes]:
    return trio.run(_exchange, requests)


def test_read_and_write_in_the_spec_layout() -> None:
    data = os.urandom(100)
    replies, ram, _ = run([
        encode(0x8000, Command.DMA_READ, struct.pack("<QQ", BASE + 8, 8)),
        encode(0x8001, Command.DMA_WRITE, struct.pack("<QQ", BASE + 0x100, len(data)) + data),
    ])
    read, write = replies
    assert read.is_reply and not read.is_error and read.id == 0x8000
    # Reply: address, count, then the data at message byte 32.
    raw = encode(read.id, read.command, read.payload, reply=True)
    assert HEADER.unpack_from(raw)[2] == 32 + 8
    assert raw[16:32] == struct.pack("<QQ", BASE + 8, 8) and raw[32:] == bytes(range(8, 16))
    # DMA_WRITE's reply echoes address and count, no data.
    assert not write.is_error and bytes(write.payload) == struct.pack("<QQ", BASE + 0x100, len(data))
    assert ram[0x100 : 0x100 + len(data)] == data


def test_refusals() -> None:
    replies, _, ro = run([
        encode(1, Command.DMA_READ, struct.pack("<QQ", BASE, LIMIT + 1)),  # over the client's limit
        encode(2, Command.DMA_WRITE, struct.pack("<QQ", RO_BASE, 4) + b"nope"),  # read-only map
        encode(3, Command.DMA_READ, struct.pack("<QQ", BASE + SIZE - 4, 8)),  # past the map
        encode(4, Command.DMA_READ, struct.pack("<QI", BASE, 8)),  # the old 28-byte layout
        encode(5, Command.DMA_WRITE, struct.pack("<QQ", BASE, 8) + b"short"),  # count != data
        encode(6, Command.DEVICE_RESET),  # not a server-to-client request
        encode(7, Command.DMA_READ, struct.pack("<QQ", BASE, 4)),  # still served afterwards
    ])
    codes = [r.error for r in replies]
    assert codes[:6] == [errno.EINVAL, errno.EPERM, errno.EFAULT, errno.EINVAL, errno.EINVAL, errno.ENOSYS]
    assert all(r.is_error for r in replies[:6]) and not replies[6].is_error
    assert ro == b"\xee" * SIZE


_requests = st.lists(
    st.tuples(st.sampled_from([Command.DMA_READ, Command.DMA_WRITE]),
              st.integers(0, 0x30000), st.integers(0, LIMIT + 16), st.booleans()),
    min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(_requests)
def test_any_request_gets_one_reply_and_only_mapped_writable_memory_changes(reqs) -> None:
    raws = []
    for i, (cmd, addr, count, consistent) in enumerate(reqs):
        data = os.urandom(count) if cmd == Command.DMA_WRITE else b""
        if not consistent:
            data += b"x"  # the count does not match the data
        raws.append(encode(0x8000 + i, cmd, struct.pack("<QQ", addr, count) + data))
    replies, ram, ro = run(raws)
    assert [r.id for r in replies] == [0x8000 + i for i in range(len(reqs))]
    expect = bytearray(bytes(range(256)) * (SIZE // 256))
    for (cmd, addr, count, consistent), raw, reply in zip(reqs, raws, replies, strict=True):
        inside = addr >= BASE and addr + count <= BASE + SIZE
        ok = inside and count <= LIMIT and consistent
        assert reply.is_error != ok, (cmd, addr, count, consistent, reply.error)
        if ok and cmd == Command.DMA_WRITE:
            expect[addr - BASE : addr - BASE + count] = raw[32:]
        if ok and cmd == Command.DMA_READ:
            assert bytes(reply.payload[16:]) == bytes(expect[addr - BASE : addr - BASE + count])
    assert ram == bytes(expect)
    assert ro == b"\xee" * SIZE
