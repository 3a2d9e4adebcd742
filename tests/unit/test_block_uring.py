"""UringFileBackend: same bytes as FileBackend for every operation, batching under
concurrency, mmapped (guest-RAM-like) buffers, and the clean fallback where io_uring is
unavailable."""

from __future__ import annotations

import errno
import mmap
import os
import random
from pathlib import Path

import pytest
import trio

from vfu_server.block import BlockIOError, BlockRangeError, BlockReadOnlyError, FileBackend
from vfu_server.block import uring as uring_mod
from vfu_server.block.uring import UringFileBackend, uring_available

MiB = 1 << 20
HAVE_URING, WHY = uring_available()
needs_uring = pytest.mark.skipif(not HAVE_URING, reason=f"io_uring unavailable here: {WHY}")


def pattern(n: int, seed: int = 5) -> bytes:
    cycle = bytes((i * 29 + seed) % 251 for i in range(251))
    return (cycle * (n // 251 + 1))[:n]


async def read(b: FileBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await b.readv(offset, [memoryview(buf)])
    return bytes(buf)


@needs_uring
async def test_ring_is_active_and_file_rules_are_inherited(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    async with UringFileBackend(path, size=4 * MiB) as b:
        assert b.uring_active and b.uring_unavailable is None
        assert b.size == 4 * MiB
        assert b.describe() == FileBackend(path).describe() | {"path": str(path)}
        with pytest.raises(BlockRangeError):
            await b.readv(4 * MiB - 10, [memoryview(bytearray(20))])
    assert path.stat().st_size == 4 * MiB


@needs_uring
async def test_random_ops_match_file_backend(tmp_path: Path) -> None:
    """The same random sequence of scatter-gather writes, FUA writes, reads, flushes and
    zeroing on both backends leaves the same bytes and reads the same bytes."""
    size = 8 * MiB
    rng = random.Random(7)
    a_path, b_path = tmp_path / "file.raw", tmp_path / "uring.raw"
    async with FileBackend(a_path, size=size) as ref, UringFileBackend(b_path, size=size) as ur:
        assert ur.uring_active
        for step in range(300):
            kind = rng.choice(["write", "write", "read", "read", "fua", "flush", "zero"])
            length = rng.choice([512, 4096, 8192, 65536, 131072, 3 * 4096 + 512])
            offset = rng.randrange(0, size - length) // 512 * 512
            if kind in ("write", "fua"):
                data = pattern(length, step)
                # Split into uneven iovecs to exercise scatter-gather.
                cut = rng.randrange(1, length)
                for be in (ref, ur):
                    await be.writev(offset, [memoryview(data)[:cut], memoryview(data)[cut:]], fua=kind == "fua")
            elif kind == "read":
                assert await read(ur, offset, length) == await read(ref, offset, length), step
            elif kind == "flush":
                await ref.flush()
                await ur.flush()
            else:
                for be in (ref, ur):
                    await be.write_zeroes(offset, length, may_unmap=rng.random() < 0.5)
    assert a_path.read_bytes() == b_path.read_bytes()


@needs_uring
async def test_concurrent_requests_are_batched_and_all_complete(tmp_path: Path) -> None:
    size = 4 * MiB
    path = tmp_path / "c.raw"
    data = pattern(size)
    path.write_bytes(data)
    submits = 0
    async with UringFileBackend(path) as b:
        real_submit = b._submit

        def counting_submit() -> None:
            nonlocal submits
            submits += 1
            real_submit()

        b._submit = counting_submit  # type: ignore[method-assign]
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            results[i] = await read(b, i * 4096, 4096)

        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(one, i * 7 % 1024)
        for i, got in results.items():
            assert got == data[i * 4096 : (i + 1) * 4096]
        assert len(results) == 64
        assert not b._ops
    # 64 requests started in one scheduler batch: far fewer io_uring_enter calls than requests.
    assert submits <= 8, submits


@needs_uring
async def test_io_goes_straight_into_shared_mmap(tmp_path: Path) -> None:
    """Guest RAM is an mmapped memfd: reads land in it and writes come from it, zero-copy."""
    path = tmp_path / "g.raw"
    data = pattern(MiB)
    path.write_bytes(data)
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * MiB)
        ram = mmap.mmap(fd, 2 * MiB, flags=mmap.MAP_SHARED)
        view = memoryview(ram)
        async with UringFileBackend(path) as b:
            await b.readv(8192, [view[4096:8192], view[65536 : 65536 + 12288]])
            assert bytes(view[4096:8192]) == data[8192:12288]
            assert bytes(view[65536 : 65536 + 12288]) == data[12288:24576]
            view[0:4096] = b"\xab" * 4096
            await b.writev(0, [view[0:4096]], fua=True)
        assert path.read_bytes()[:4096] == b"\xab" * 4096
        view.release()
        ram.close()  # no buffer export left behind
    finally:
        os.close(fd)


@needs_uring
async def test_errors_and_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.raw"
    path.write_bytes(bytes(MiB))
    async with UringFileBackend(path, read_only=True) as b:
        assert await read(b, 0, 4096) == bytes(4096)
        with pytest.raises(BlockReadOnlyError):
            await b.writev(0, [memoryview(bytes(512))])
        await b.flush()  # a no-op when read-only
    b2 = UringFileBackend(path)
    try:
        # A kernel error comes back as a negative res and becomes a BlockIOError with errno.
        res = await b2._run(b2._ring.lib.VFU_OP_READV, -1, [memoryview(bytearray(512))], 0, 0, True)  # type: ignore[union-attr]
        assert res == -errno.EBADF
    finally:
        await b2.aclose()
    with pytest.raises(BlockIOError):
        await b2.readv(0, [memoryview(bytearray(512))])  # closed


IORING_OP_OPENAT, IORING_OP_SOCKET = 18, 45


@needs_uring
async def test_the_ring_runs_only_the_operations_the_backend_uses(tmp_path: Path) -> None:
    """Seccomp does not see a ring's operations: the ring itself refuses everything else."""
    path = tmp_path / "r.raw"
    async with UringFileBackend(path, size=MiB) as b:
        ring = b._ring
        assert ring is not None
        for op in (IORING_OP_SOCKET, IORING_OP_OPENAT):
            assert await b._run(op, -1, [], 0, 0, False) == -errno.EACCES
        assert await b._run(ring.lib.VFU_OP_NOP, -1, [], 0, 0, False) == 0
        await b.writev(0, [memoryview(pattern(4096))])
        assert await read(b, 0, 4096) == pattern(4096)


@needs_uring
async def test_reads_past_eof_of_shrunk_file_are_zero(tmp_path: Path) -> None:
    path = tmp_path / "s.raw"
    path.write_bytes(pattern(MiB))
    async with UringFileBackend(path) as b:
        os.truncate(path, 4096)
        got = await read(b, 0, 8192)
        assert got[:4096] == pattern(MiB)[:4096]
        assert got[4096:] == bytes(4096)


@needs_uring
async def test_aclose_waits_for_requests_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "w.raw"
    b = UringFileBackend(path, size=16 * MiB)
    done = []

    async def writer(i: int) -> None:
        await b.writev(i * MiB, [memoryview(pattern(MiB, i))])
        done.append(i)

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(writer, i)
        await trio.sleep(0)
        n.start_soon(b.aclose)
    assert sorted(done) == list(range(8))
    assert b._ring is None
    with open(path, "rb") as f:
        for i in range(8):
            assert f.read(MiB) == pattern(MiB, i)


async def test_falls_back_to_file_backend_when_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "io_uring_setup: Operation not permitted")

    monkeypatch.setattr(uring_mod._Ring, "__init__", refuse)
    path = tmp_path / "f.raw"
    data = pattern(MiB)
    async with UringFileBackend(path, size=MiB) as b:
        assert not b.uring_active
        assert "not permitted" in (b.uring_unavailable or "")
        await b.writev(0, [memoryview(data)], fua=True)
        assert await read(b, 0, MiB) == data
        await b.flush()
    assert path.read_bytes() == data


async def test_falls_back_when_the_helper_cannot_be_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gcc() -> None:
        raise OSError(errno.ENOSYS, "cannot build _vfu_uring: no gcc")

    monkeypatch.setattr(uring_mod, "load_ring_module", no_gcc)
    ok, why = uring_available()
    assert not ok and "no gcc" in why
    async with UringFileBackend(tmp_path / "x.raw", size=MiB) as b:
        assert not b.uring_active
        await b.writev(0, [memoryview(b"x" * 512)])
        assert await read(b, 0, 512) == b"x" * 512


@needs_uring
async def test_backend_survives_a_second_trio_run(tmp_path: Path) -> None:
    # The ring task is per trio run; a backend used again in a new run starts a new one.
    path = tmp_path / "r.raw"
    path.write_bytes(pattern(MiB))
    b = UringFileBackend(path)

    async def use() -> bytes:
        return await read(b, 4096, 4096)

    got = await trio.to_thread.run_sync(lambda: trio.run(use))
    assert got == pattern(MiB)[4096:8192]
    assert await use() == pattern(MiB)[4096:8192]
    await b.aclose()
