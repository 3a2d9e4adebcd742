"""FileBackend specifics: creation and size rules, holes, persistence, the thread paths."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_server.block import BackendSpecError, BlockIOError, FileBackend
from vfu_server.block import file as file_mod

MiB = 1 << 20


def pattern(n: int, seed: int = 3) -> bytes:
    # Period 251 (prime) so that neither block nor page shifts map the data onto itself.
    cycle = bytes((i * 13 + seed) % 251 for i in range(251))
    return (cycle * (n // 251 + 1))[:n]


async def read(b: FileBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await b.readv(offset, [memoryview(buf)])
    return bytes(buf)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def test_missing_file_is_created_sparse(tmp_path: Path) -> None:
    path = tmp_path / "new.raw"
    async with FileBackend(path, size=64 * MiB) as b:
        assert b.size == 64 * MiB
        assert b.describe() == {
            "kind": "file",
            "path": str(path),
            "size": 64 * MiB,
            "read_only": False,
        }
    assert path.stat().st_size == 64 * MiB
    assert allocated(path) == 0


async def test_missing_file_without_size_or_create_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.raw"
    with pytest.raises(BlockIOError, match="give --size") as info:
        FileBackend(path)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BlockIOError):
        FileBackend(path, size=MiB, create=False)
    with pytest.raises(BlockIOError):
        FileBackend(path, size=MiB, read_only=True)
    assert not path.exists()


async def test_existing_file_size_rules(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(8192))
    async with FileBackend(path) as b:  # no size: the file's length
        assert b.size == 8192
    async with FileBackend(path, size=4096) as b:  # smaller: a prefix, file untouched
        assert b.size == 4096
        assert await read(b, 0, 4096) == pattern(8192)[:4096]
    assert path.stat().st_size == 8192
    with pytest.raises(BackendSpecError, match="smaller than --size"):
        FileBackend(path, size=16384)  # larger: refused, not silently grown
    assert path.stat().st_size == 8192


async def test_empty_file_and_directory_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.raw").touch()
    with pytest.raises(BackendSpecError, match="empty"):
        FileBackend(tmp_path / "empty.raw")
    with pytest.raises((BackendSpecError, BlockIOError)):
        FileBackend(tmp_path, read_only=True)
    with pytest.raises((BackendSpecError, BlockIOError)):
        FileBackend(tmp_path)


async def test_unreadable_file_raises_block_error_not_oserror(tmp_path: Path) -> None:
    path = tmp_path / "nope.raw"
    path.write_bytes(bytes(4096))
    with pytest.raises(BlockIOError) as info:
        FileBackend(path / "child")  # ENOTDIR, an OSError other than ENOENT
    assert info.value.errno in (errno.ENOTDIR, errno.ENOENT)


async def test_data_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    async with FileBackend(path, size=4 * MiB) as b:
        await b.writev(MiB + 123, [memoryview(pattern(10000))])
        await b.writev(0, [memoryview(b"boot" * 128)], fua=True)
    async with FileBackend(path, read_only=True) as b:
        assert b.size == 4 * MiB
        assert await read(b, MiB + 123, 10000) == pattern(10000)
        assert await read(b, 0, 512) == b"boot" * 128


async def test_discard_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    async with FileBackend(path, size=8 * MiB) as b:
        await b.writev(0, [memoryview(pattern(4 * MiB))])
        await b.flush()
        before = allocated(path)
        assert before >= 4 * MiB
        await b.discard(MiB, 2 * MiB)
        assert allocated(path) <= before - 2 * MiB
        assert await read(b, MiB, 2 * MiB) == bytes(2 * MiB)
        assert await read(b, 0, MiB) == pattern(4 * MiB)[:MiB]
        assert path.stat().st_size == 8 * MiB  # KEEP_SIZE


async def test_write_zeroes_keeps_or_releases_allocation(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    async with FileBackend(path, size=8 * MiB) as b:
        await b.writev(0, [memoryview(pattern(4 * MiB))])
        await b.flush()
        before = allocated(path)
        await b.write_zeroes(0, MiB)  # no unmap: stays allocated (ZERO_RANGE on ext4/xfs)
        assert allocated(path) >= before - 64 * 1024
        await b.write_zeroes(2 * MiB, MiB, may_unmap=True)
        assert allocated(path) <= before - MiB
        data = await read(b, 0, 4 * MiB)
        expect = bytearray(pattern(4 * MiB))
        expect[0:MiB] = bytes(MiB)
        expect[2 * MiB : 3 * MiB] = bytes(MiB)
        assert data == expect


async def test_zeroing_falls_back_to_writes(tmp_path: Path) -> None:
    # A filesystem or device without fallocate modes must still return zeroes.
    async with FileBackend(tmp_path / "disk.raw", size=MiB) as b:
        b._can_punch = False
        b._can_zero_range = False
        await b.writev(0, [memoryview(pattern(MiB))])
        await b.discard(1000, 300000)
        await b.write_zeroes(500000, 1000)
        data = await read(b, 0, MiB)
        expect = bytearray(pattern(MiB))
        expect[1000:301000] = bytes(300000)
        expect[500000:501000] = bytes(1000)
        assert data == expect


@pytest.mark.parametrize("inline_max", [0, file_mod.INLINE_MAX])
async def test_inline_and_thread_paths_agree(tmp_path: Path, inline_max: int) -> None:
    async with FileBackend(tmp_path / "disk.raw", size=8 * MiB, inline_max=inline_max) as b:
        for size in (512, 4096, 300 * 1024, 3 * MiB):
            data = pattern(size, seed=size & 0xFF)
            await b.writev(4096, [memoryview(data)])
            assert await read(b, 4096, size) == data
        b._nowait_reads = False  # as on kernels without RWF_NOWAIT
        assert await read(b, 4096, 4096) == pattern(3 * MiB, seed=(3 * MiB) & 0xFF)[:4096]


async def test_more_iovecs_than_iov_max(tmp_path: Path) -> None:
    n = file_mod._IOV_MAX + 500
    async with FileBackend(tmp_path / "disk.raw", size=4 * MiB) as b:
        data = pattern(n * 512)
        await b.writev(0, [memoryview(data)[i * 512 : (i + 1) * 512] for i in range(n)])
        bufs = [bytearray(512) for _ in range(n)]
        await b.readv(0, [memoryview(x) for x in bufs])
        assert b"".join(bufs) == data


async def test_fua_without_rwf_dsync(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    async with FileBackend(path, size=MiB) as b:
        b._dsync_writes = False  # the write + fdatasync fallback
        await b.writev(512, [memoryview(b"f" * 512)], fua=True)
    assert path.read_bytes()[512:1024] == b"f" * 512


async def test_reads_past_eof_of_shrunk_file_are_zero(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    async with FileBackend(path, size=MiB) as b:
        await b.writev(0, [memoryview(pattern(MiB))])
        os.truncate(path, 4096)  # someone else shrinks the image under us
        assert await read(b, 0, 8192) == pattern(4096) + bytes(4096)
        b._nowait_reads = False
        assert await read(b, 2048, 8192) == pattern(4096)[2048:] + bytes(6144)


async def test_aclose_waits_for_worker_threads(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    data = pattern(16 * MiB)
    b = FileBackend(path, size=16 * MiB, inline_max=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.writev, 0, [memoryview(data)])
        while not b._threads:  # let the write reach its worker thread
            await trio.sleep(0)
        await b.aclose()
    assert path.read_bytes() == data


async def test_io_errors_become_block_io_errors(tmp_path: Path) -> None:
    async with FileBackend(tmp_path / "disk.raw", size=MiB) as b:
        real_fd = b._fd
        assert real_fd is not None
        ro_fd = os.open(tmp_path / "disk.raw", os.O_RDONLY)
        b._fd = ro_fd  # writes now fail with EBADF inside pwritev
        try:
            with pytest.raises(BlockIOError) as info:
                await b.writev(0, [memoryview(b"z" * 512)])
            assert info.value.errno == errno.EBADF
            with pytest.raises(BlockIOError):
                await b.writev(0, [memoryview(b"z" * 512)], fua=True)
        finally:
            b._fd = real_fd
            os.close(ro_fd)


# -- flush: one fdatasync thread, concurrent flushes share an fdatasync ------------------------


_REAL_FDATASYNC = os.fdatasync


class SyncLog:
    """Wraps os.fdatasync (the real one runs) to record when each call began and ended, on
    one sequence shared with the test's own events."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: set[int] | None = None) -> None:
        self.seq = 0
        self.calls: list[tuple[int, int]] = []  # (began, ended)
        self.fail = fail or set()  # call numbers that fail with EIO (after syncing)
        real = _REAL_FDATASYNC  # not what an earlier example's monkeypatch left

        def fdatasync(fd: int) -> None:
            began = self.tick()
            real(fd)
            self.calls.append((began, self.tick()))
            if len(self.calls) in self.fail:
                raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(file_mod.os, "fdatasync", fdatasync)
        monkeypatch.setattr(file_mod, "_new_syncer", file_mod._Syncer)  # the C thread calls libc's

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def covered(self, asked: int, answered: int) -> bool:
        """Some fdatasync began after ``asked`` and ended before ``answered``."""
        return any(asked < began and ended < answered for began, ended in self.calls)


flush_plans = st.lists(st.lists(st.sampled_from(["write", "flush", "early", "pause"]), min_size=1, max_size=6),
                       min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(plans=flush_plans, fail=st.sets(st.integers(1, 6), max_size=2))
def test_every_flush_waits_for_an_fdatasync_begun_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          plans: list[list[str]], fail: set[int]) -> None:
    """Tasks write and flush concurrently (``flush()``, or ``begin_flush()`` awaited later): a
    flush that succeeds returns only after an
    fdatasync that began after it was asked for (so after every write completed before it)
    ended; one that fails raises BlockIOError with the errno, and the backend goes on."""
    log = SyncLog(monkeypatch, fail)
    path = tmp_path / "flush.raw"
    if path.exists():
        path.unlink()

    async def main() -> None:
        async with FileBackend(path, size=MiB) as b:

            async def task(plan: list[str], n: int) -> None:
                for step in plan:
                    if step == "write":
                        await b.writev(n * 4096, [memoryview(pattern(4096, n))])
                    elif step == "pause":
                        await trio.sleep(0)
                    else:
                        asked = log.tick()
                        try:
                            if step == "early":  # asked now, awaited after other tasks ran
                                pending = b.begin_flush()
                                await trio.sleep(0)
                                await pending.wait()
                            else:
                                await b.flush()
                        except BlockIOError as exc:
                            assert exc.errno == errno.EIO
                            continue
                        assert log.covered(asked, log.tick()), (asked, log.calls)

            async with trio.open_nursery() as nursery:
                for n, plan in enumerate(plans):
                    nursery.start_soon(task, plan, n)
            failed = any(n in fail for n in range(1, len(log.calls) + 1))
            log.fail = set()
            await b.writev(0, [memoryview(pattern(4096))])  # still serving after failures
            if failed:  # a flush after a failed fdatasync fails too (its writes may be lost)
                with pytest.raises(BlockIOError):
                    await b.flush()
            else:
                await b.flush()
        flushes = sum(p.count("flush") + p.count("early") for p in plans)
        assert len(log.calls) <= flushes + 2  # never more than one per flush (+1 final, +1 aclose)

    trio.run(main)
    assert not [t for t in threading.enumerate() if t.name == "vfu-fdatasync"], "aclose ends the thread"


async def test_concurrent_flushes_share_an_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = SyncLog(monkeypatch)
    async with FileBackend(tmp_path / "d.raw", size=MiB) as b:
        await b.writev(0, [memoryview(pattern(4096))])
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(b.flush)
        # All eight were asked before the first fdatasync began, or at worst before the
        # second: one or two, not eight.
        assert 1 <= len(log.calls) <= 2, log.calls


async def test_a_flush_asked_during_a_failed_fdatasync_fails_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a writeback error once per open file: the fdatasync after a failed one may
    return 0 although the writes the failed one covered are lost. So every flush after a failed
    fdatasync fails with its error (as QEMU's file driver does), without syncing again; reads
    and writes go on."""
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def fdatasync(fd: int) -> None:
        calls.append("sync")
        if len(calls) == 1:
            started.set()
            release.wait(10)
            raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(file_mod.os, "fdatasync", fdatasync)
    monkeypatch.setattr(file_mod, "_new_syncer", file_mod._Syncer)
    results: dict[str, object] = {}

    async def flush(name: str) -> None:
        try:
            await b.flush()
            results[name] = "ok"
        except BlockIOError as exc:
            results[name] = exc.errno

    async with FileBackend(tmp_path / "e.raw", size=MiB) as b:
        await b.writev(0, [memoryview(pattern(4096))])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush, "first")
            await trio.to_thread.run_sync(started.wait, 10)
            nursery.start_soon(flush, "during")
            await trio.sleep(0.05)
            release.set()
        assert results == {"first": errno.EIO, "during": errno.EIO}, results
        assert calls == ["sync"], "the flush asked meanwhile did not sync again"
        await flush("after")
        assert results["after"] == errno.EIO and calls == ["sync"]
        await b.writev(4096, [memoryview(pattern(4096))])


# -- the fdatasync thread in C ----------------------------------------------------------------


def _tids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


async def _gone(tid: str) -> bool:
    """The thread ``tid`` has ended (within a second: a joined thread may stay listed for a
    moment while the kernel finishes its exit)."""
    for _ in range(100):
        if tid not in _tids():
            return True
        await trio.sleep(0.01)
    return False


def _c_syncer_built() -> None:
    from vfu_server.block._syncer_build import HELPER

    try:
        HELPER.load()
    except OSError as exc:  # no compiler: the backend keeps its Python thread
        pytest.skip(str(exc))


@pytest.mark.parametrize("kind", ["c", "python"])
async def test_both_fdatasync_threads_answer_alike(tmp_path: Path, kind: str) -> None:
    """The C thread and the Python one: success on a file, the errno of a failure (a pipe
    cannot be synced: EINVAL), several calls in a row, and close() ends the thread."""
    if kind == "c":
        _c_syncer_built()
    before = _tids()
    syncer = file_mod._CSyncer() if kind == "c" else file_mod._Syncer()
    (tid,) = _tids() - before
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    r, w = os.pipe()
    try:
        for _ in range(3):
            os.pwrite(fd, b"x" * 4096, 0)
            await syncer.fdatasync(fd)
            with pytest.raises(OSError) as info:
                await syncer.fdatasync(r)
            assert info.value.errno == errno.EINVAL
    finally:
        syncer.close()
        for f in (fd, r, w):
            os.close(f)
    assert await _gone(tid)


async def test_file_backend_flushes_through_the_c_thread(tmp_path: Path) -> None:
    _c_syncer_built()
    async with FileBackend(tmp_path / "c.raw", size=MiB) as b:
        await b.writev(0, [memoryview(pattern(4096))])
        before = _tids()
        await b.flush()
        assert type(b._syncer) is file_mod._CSyncer
        (tid,) = _tids() - before  # the flush started it
    assert await _gone(tid), "aclose ends the C thread"


async def test_without_the_helper_flushes_use_the_python_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vfu_server.block import _syncer_build

    monkeypatch.setattr(_syncer_build.HELPER, "load", lambda build=True: None)
    async with FileBackend(tmp_path / "p.raw", size=MiB) as b:
        await b.writev(0, [memoryview(pattern(4096))])
        await b.flush()
        assert type(b._syncer) is file_mod._Syncer


async def test_write_behind_is_asked_only_while_flushes_come_often(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two flushes within WRITE_BEHIND_NS of each other ask the devices' C write paths for
    write-behind until WRITE_BEHIND_NS after the second; flushes further apart do not."""
    clock = [10**12]
    monkeypatch.setattr(file_mod.time, "monotonic_ns", lambda: clock[0])
    window = file_mod.WRITE_BEHIND_NS
    async with FileBackend(tmp_path / "w.raw", size=MiB) as b:
        await b.flush()
        assert b.write_behind_until == 0, "one flush is no pattern"
        clock[0] += 2 * window
        await b.flush()
        assert b.write_behind_until == 0, "flushes further apart than the window"
        clock[0] += window // 2
        await b.flush()
        assert b.write_behind_until == clock[0] + window


async def test_a_flush_whose_thread_cannot_start_fails_as_an_io_error(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No fd or thread left for the fdatasync thread: begin_flush() (a device's fetch path)
    does not raise, the flush fails with a BlockIOError carrying the errno, and a later flush
    works once a thread can start."""
    def exhausted() -> file_mod._Syncer:
        raise OSError(errno.EMFILE, "Too many open files")

    async with FileBackend(tmp_path / "x.raw", size=MiB) as b:
        monkeypatch.setattr(file_mod, "_new_syncer", exhausted)
        pending = b.begin_flush()
        with pytest.raises(BlockIOError) as info:
            await pending.wait()
        assert info.value.errno == errno.EMFILE
        monkeypatch.undo()
        await b.flush()
