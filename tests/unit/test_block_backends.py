"""Behaviour every local backend (File, Memory) must share; the device code relies on it."""

from __future__ import annotations

import errno
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from vfu_server.block import (
    BlockBackend,
    BlockError,
    BlockIOError,
    BlockRangeError,
    BlockReadOnlyError,
    FileBackend,
    MemoryBackend,
)

SIZE = 1 << 20


@pytest.fixture(params=["file", "memory"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlockBackend]:
    b: BlockBackend
    if request.param == "file":
        b = FileBackend(tmp_path / "disk.raw", size=SIZE)
    else:
        b = MemoryBackend(SIZE)
    async with b:
        yield b


def pattern(n: int, seed: int = 1) -> bytes:
    # Period 251 (prime) so that neither block nor page shifts map the data onto itself.
    cycle = bytes((i * 13 + seed) % 251 for i in range(251))
    return (cycle * (n // 251 + 1))[:n]


async def read(b: BlockBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await b.readv(offset, [memoryview(buf)])
    return bytes(buf)


async def test_fresh_backend_reads_zeroes(backend: BlockBackend) -> None:
    assert backend.size == SIZE
    assert backend.block_size == 512
    assert not backend.read_only
    assert await read(backend, 0, 8192) == bytes(8192)
    assert await read(backend, SIZE - 512, 512) == bytes(512)


async def test_iovecs_span_and_split_differently(backend: BlockBackend) -> None:
    data = pattern(3 * 4096 + 100)
    # Write from three uneven pieces, read back into four other uneven pieces.
    cuts = [0, 1000, 5000, len(data)]
    await backend.writev(777, [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)])
    bufs = [bytearray(n) for n in (1, 4095, 8000, len(data) - 12096)]
    await backend.readv(777, [memoryview(b) for b in bufs])
    assert b"".join(bufs) == data
    # Neighbours untouched.
    assert await read(backend, 0, 777) == bytes(777)
    assert await read(backend, 777 + len(data), 100) == bytes(100)


async def test_non_byte_memoryviews_are_accepted(backend: BlockBackend) -> None:
    # Guest memory may be handed over as views with another item format.
    src = memoryview(bytearray(pattern(4096))).cast("I")
    await backend.writev(4096, [src])
    dst = memoryview(bytearray(4096)).cast("Q")
    await backend.readv(4096, [dst])
    assert dst.tobytes() == pattern(4096)


async def test_zero_length_requests(backend: BlockBackend) -> None:
    await backend.readv(SIZE, [])
    await backend.writev(SIZE, [memoryview(b"")])
    await backend.discard(SIZE, 0)
    await backend.write_zeroes(0, 0)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (SIZE, 1), (SIZE - 511, 512), (0, SIZE + 1), (SIZE + 4096, 0)],
)
async def test_out_of_range_is_rejected(backend: BlockBackend, offset: int, length: int) -> None:
    buf = memoryview(bytearray(length))
    for op in (
        lambda: backend.readv(offset, [buf]),
        lambda: backend.writev(offset, [buf]),
        lambda: backend.discard(offset, length),
        lambda: backend.write_zeroes(offset, length),
    ):
        with pytest.raises(BlockRangeError) as info:
            await op()
        assert isinstance(info.value, BlockError)
        assert info.value.errno == errno.EINVAL


async def test_discard_and_write_zeroes_read_back_zero(backend: BlockBackend) -> None:
    data = pattern(64 * 1024)
    await backend.writev(0, [memoryview(data)])
    await backend.discard(4096, 8192)  # page aligned
    await backend.discard(20000, 3000)  # ragged
    await backend.write_zeroes(30000, 5000)
    await backend.write_zeroes(40960, 8192, may_unmap=True)
    expect = bytearray(data)
    for a, n in ((4096, 8192), (20000, 3000), (30000, 5000), (40960, 8192)):
        expect[a : a + n] = bytes(n)
    assert await read(backend, 0, len(data)) == expect


async def test_flush_and_fua(backend: BlockBackend) -> None:
    await backend.writev(0, [memoryview(b"x" * 512)], fua=True)
    await backend.flush()
    assert await read(backend, 0, 512) == b"x" * 512


async def test_many_concurrent_requests(backend: BlockBackend) -> None:
    async def one(i: int) -> None:
        data = pattern(4096, seed=i)
        await backend.writev(i * 4096, [memoryview(data)], fua=(i % 8 == 0))
        assert await read(backend, i * 4096, 4096) == data

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(one, i)


async def test_closed_backend_raises_block_error(backend: BlockBackend) -> None:
    await backend.aclose()
    await backend.aclose()  # idempotent
    with pytest.raises(BlockIOError) as info:
        await read(backend, 0, 512)
    assert info.value.errno == errno.EBADF


async def test_describe_identifies_without_data(backend: BlockBackend) -> None:
    await backend.writev(0, [memoryview(b"secret" * 100)])
    d = backend.describe()
    assert d["kind"] in ("file", "memory")
    assert d["size"] == SIZE
    assert "secret" not in repr(d)
    assert d["kind"] in repr(backend)


@pytest.mark.parametrize("kind", ["file", "memory"])
async def test_read_only_refuses_modifications(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "ro.raw"
    path.write_bytes(pattern(8192))
    b: BlockBackend = (
        FileBackend(path, read_only=True) if kind == "file" else MemoryBackend(8192, read_only=True)
    )
    async with b:
        assert b.read_only
        for op in (
            lambda: b.writev(0, [memoryview(b"y" * 512)]),
            lambda: b.discard(0, 512),
            lambda: b.write_zeroes(0, 512),
        ):
            with pytest.raises(BlockReadOnlyError) as info:
                await op()
            assert info.value.errno == errno.EROFS
        await b.flush()  # nothing to flush, but allowed
        expect = pattern(8192) if kind == "file" else bytes(8192)
        assert await read(b, 0, 8192) == expect
    if kind == "file":
        assert path.read_bytes() == pattern(8192)


def test_memory_backend_rejects_nonpositive_size() -> None:
    with pytest.raises(ValueError, match="positive"):
        MemoryBackend(0)
