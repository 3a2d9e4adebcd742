"""Raw image files (and block devices) as block backends.

Where the I/O runs
------------------
Small requests are done *inline* on the trio thread, large ones and anything that may wait for
the disk go to a worker thread.  Measured on the development VM (Linux 6.18, ext4, 2 vCPUs,
warm page cache, per request, see the report in the commit history):

=========  ===========  ===================
size       inline       trio.to_thread hop
=========  ===========  ===================
4 KiB      2.5-7 us     ~160 us
64 KiB     14-28 us     ~175 us
1 MiB      ~180-340 us  ~380-530 us
4 MiB      ~0.8-1.0 ms  ~1.1-1.4 ms
=========  ===========  ===================

So a thread hop costs ~25x a cached 4 KiB read, and more than the copy itself at every size.
Inline is only wrong when the syscall would block: a read that misses the page cache (a disk
round trip stalls every queue of the device) or a copy so large it hogs the loop.  The limit,
``inline_max``, is 1280 KiB: the largest request Linux sends by default (``max_sectors_kb``).
It was 256 KiB until 2026-12; then every 1 MiB request, the size of a sequential stream, paid
a thread hop and the devices' C paths could not take it (docs/performance.md, issue 18).  Reads therefore try ``preadv(..., RWF_NOWAIT)`` inline,
which fails with EAGAIN instead of waiting for the disk, and only then fall back to a thread.
Buffered writes cannot use RWF_NOWAIT on ext4 (EOPNOTSUPP), so writes up to ``inline_max`` are
done inline (they land in the page cache) and larger ones go to a thread.  Everything that
waits for the disk by definition -- fdatasync, FUA writes, fallocate -- always uses a thread;
a flush uses one of the backend's own (:class:`_Syncer`), a cheaper hand-off than
``trio.to_thread``, and concurrent flushes share one fdatasync.

Size rules
----------
* The file does not exist: created sparse with ``size`` bytes if ``create`` and a size are
  given (and not read-only); otherwise an error.
* The file exists and no size is given: its current length is the device size.
* The file exists and is *smaller* than ``size``: refused.  Silently growing a user's image
  (e.g. after a typo in --size) is a surprise; ``truncate -s`` is an explicit alternative.
* The file exists and is *larger* than ``size``: only the first ``size`` bytes are exposed.
  Nothing is modified, which makes this harmless, and it lets a device export a prefix.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .base import BlockBackend, PendingFlush, byte_views, iov_length, iov_slice
from .errors import BackendSpecError, BlockIOError

__all__ = ["FileBackend"]

log = logging.getLogger(__name__)

# Above this many bytes the event loop is better off handing the copy to a worker: it would be
# held for more than ~0.4 ms (table above). Linux's default max_sectors_kb, so that no request a
# guest sends by default pays a thread hop on a page-cache hit.
INLINE_MAX = 1280 * 1024

# Two flushes asked within this long of each other turn write-behind on for this long after the
# second (``write_behind_until``): the devices' C write paths then start each write's write-back
# at once, and the FLUSH that follows finds its data on the way to the disk. A 4 KiB
# write+fdatasync with 300 us between them: fdatasync 170-176 -> 75-81 us on the development VM,
# for 17 us of sync_file_range per write (docs/performance.md, "Tenth session"). A guest that
# writes without flushing gets none of it: page-cache writes stay as cheap as they were.
WRITE_BEHIND_NS = 5_000_000

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)
try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):
    _IOV_MAX = 1024
if _IOV_MAX <= 0:
    _IOV_MAX = 1024

# errnos meaning "this kernel/filesystem cannot do that flag or mode": fall back, remember.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}

_ZERO_CHUNK = 1 << 20
_ZEROES = bytes(_ZERO_CHUNK)


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    # os.posix_fallocate has no mode argument, so punch-hole/zero-range need libc directly.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode; raises OSError (ENOSYS if libc lacks it)."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate unavailable")
    while True:
        if _fallocate(fd, mode, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _zero_views(views: Sequence[memoryview]) -> None:
    for mv in views:
        pos = 0
        while pos < mv.nbytes:
            n = min(_ZERO_CHUNK, mv.nbytes - pos)
            mv[pos : pos + n] = _ZEROES[:n] if n != _ZERO_CHUNK else _ZEROES
            pos += n


class _Syncer:
    """A thread of its own that does nothing but ``fdatasync(2)`` for the event loop.

    A flush is the one request that always waits for the disk. Through ``trio.to_thread`` it
    cost 46-67 us of CPU and 60-250 us of hand-off on the development VM on top of the
    fdatasync itself (a file on tmpfs: nothing to write); a parked thread woken through an
    eventfd and answering through another that the loop waits on costs 15 us of CPU and
    15-50 us (docs/performance.md, "Ninth session"). One fdatasync at a time (the backend
    starts one only when none runs); the thread is started on first use, so under
    ``--sandbox`` it inherits the confinement of the thread that starts it.

    This is the Python thread; :class:`_CSyncer` is the same thread in C, which
    :func:`_new_syncer` prefers.
    """

    def __init__(self) -> None:
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._go = os.eventfd(0, os.EFD_CLOEXEC)
        self._fd = -1
        self._error: OSError | None = None
        try:
            self._start()
        except BaseException:
            os.close(self._go)
            os.close(self._efd)
            raise

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vfu-fdatasync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            os.eventfd_read(self._go)
            fd = self._fd
            if fd < 0:
                return
            try:
                os.fdatasync(fd)
                self._error = None
            except OSError as exc:
                self._error = exc
            os.eventfd_write(self._efd, 1)

    def _ask(self, fd: int) -> None:
        self._fd = fd

    def _answer(self) -> None:
        if self._error is not None:
            raise self._error

    def start(self, fd: int) -> None:
        """Wake the thread for one ``fdatasync(fd)``; :meth:`wait` for its answer before the
        next start (the thread uses ``fd`` until it answers)."""
        self._ask(fd)
        os.eventfd_write(self._go, 1)

    async def wait(self) -> None:
        """The started fdatasync's answer; raises its OSError. Not cancellable, as a
        ``trio.to_thread`` hop."""
        with trio.CancelScope(shield=True):
            await trio.lowlevel.wait_readable(self._efd)
        os.eventfd_read(self._efd)
        self._answer()

    async def fdatasync(self, fd: int) -> None:
        """``os.fdatasync(fd)`` in the thread; raises its OSError."""
        self.start(fd)
        await self.wait()

    def _stop(self) -> None:
        self._fd = -1
        os.eventfd_write(self._go, 1)
        self._thread.join(5)

    def close(self) -> None:
        """End the thread (not while :meth:`fdatasync` runs)."""
        self._stop()
        os.close(self._go)
        os.close(self._efd)


class _CSyncer(_Syncer):
    """:class:`_Syncer` with the thread in C (:mod:`._syncer_build`): a Python thread needs the
    GIL to answer, which a polling event loop hardly leaves it (docs/performance.md, "Tenth
    session"). Raises OSError when the helper is not built or the thread cannot start."""

    def _start(self) -> None:
        from ._syncer_build import HELPER

        # Never the compiler in the middle of a flush: ./run builds the helper ahead.
        mod = HELPER.load(build=False)
        if mod is None:
            raise OSError(errno.ENOENT, "the fdatasync helper is not built")
        self._lib = mod.lib
        self._state = mod.ffi.new("struct vfu_syncer *")
        rc = self._lib.vfu_syncer_start(self._state, self._go, self._efd)
        if rc:
            raise OSError(rc, f"pthread_create: {os.strerror(rc)}")

    def _ask(self, fd: int) -> None:
        self._state.fd = fd

    def _answer(self) -> None:
        err = self._state.error
        if err:
            raise OSError(err, os.strerror(err))

    def _stop(self) -> None:
        self._lib.vfu_syncer_stop(self._state)


def _load_syncer_helper() -> None:
    """Import the C fdatasync thread's helper if it is built (nothing otherwise): the thread
    itself starts at the first flush, when a confined server may no longer read the cache."""
    from ._syncer_build import HELPER

    try:
        HELPER.load(build=False)
    except OSError as exc:
        log.debug("fdatasync helper not loaded: %s", exc)


def _new_syncer() -> _Syncer:
    """The C thread when it can be had, else the Python one."""
    try:
        return _CSyncer()
    except OSError as exc:
        log.debug("fdatasync thread in Python: %s", exc)
        return _Syncer()


class FileBackend(BlockBackend):
    """A raw image file or block device accessed with preadv/pwritev into guest memory.

    See the module docstring for the size rules and the inline-versus-thread policy.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        read_only: bool = False,
        create: bool = True,
        block_size: int = 512,
        inline_max: int = INLINE_MAX,
    ) -> None:
        if block_size not in (512, 4096):
            raise ValueError(f"block_size must be 512 or 4096, not {block_size}")
        if size is not None and size <= 0:
            raise BackendSpecError(f"size must be positive, not {size}")
        self.path = os.path.abspath(os.fspath(path))
        self.read_only = read_only
        self.block_size = block_size
        self._inline_max = inline_max
        self._nowait_reads = bool(_RWF_NOWAIT)
        self._dsync_writes = bool(_RWF_DSYNC)
        self._can_punch = True
        self._can_zero_range = True
        self._threads = 0
        self._drained: trio.Event | None = None
        self._fd: int | None = None
        self._syncer: _Syncer | None = None
        # flushes asked for, and the count that had been asked for when the last fdatasync
        # that completed began: one fdatasync answers every flush asked for before it began
        self._flushes_asked = 0
        self._flushes_done = 0
        #: the running fdatasync (at most one): the ask count when it began, and set when it ended
        self._sync_upto: int | None = None
        self._sync_ended = trio.Event()
        #: a task waits for the running fdatasync's answer (the others wait for _sync_ended)
        self._sync_reaped = False
        #: monotonic ns of the last flush asked for (see WRITE_BEHIND_NS)
        self._last_flush_ns = -WRITE_BEHIND_NS
        #: a failed fdatasync's error, from then on every flush's: Linux reports a writeback error
        #: once per open file, so a later fdatasync may return 0 for writes that are lost (QEMU's
        #: file driver likewise fails every flush once its page cache is inconsistent)
        self._flush_failed: BlockIOError | None = None

        fd = self._open(size, create)
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise BackendSpecError(f"{self.path}: not a regular file or block device")
            # lseek, not st_size: st_size is 0 for block devices.
            actual = os.lseek(fd, 0, os.SEEK_END)
            if size is None:
                if actual == 0:
                    raise BackendSpecError(f"{self.path}: file is empty; give --size to grow it")
                size = actual
            elif size > actual:
                raise BackendSpecError(
                    f"{self.path}: file is {actual} bytes, smaller than --size {size}; "
                    f"grow it first (truncate -s {size}) or omit --size"
                )
        except OSError as exc:
            os.close(fd)
            raise BlockIOError.from_oserror(exc, f"cannot inspect {self.path}") from None
        except BaseException:
            os.close(fd)
            raise
        self.size = size
        self._fd = fd
        if not read_only:
            _load_syncer_helper()  # now, before --sandbox confines the server and its file reads

    def _open(self, size: int | None, create: bool) -> int:
        flags = os.O_CLOEXEC | (os.O_RDONLY if self.read_only else os.O_RDWR)
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            if not create or self.read_only or size is None:
                why = "give --size to create it" if size is None else "not creating it"
                raise BlockIOError(errno.ENOENT, f"{self.path}: no such file ({why})") from None
        except OSError as exc:
            raise BlockIOError.from_oserror(exc, f"cannot open {self.path}") from None
        try:
            # O_EXCL: if someone created it meanwhile, don't truncate their file.
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise BlockIOError.from_oserror(exc, f"cannot create {self.path}") from None
        try:
            os.ftruncate(fd, size)  # sparse: no blocks allocated until written
        except OSError as exc:
            os.close(fd)
            os.unlink(self.path)
            raise BlockIOError.from_oserror(exc, f"cannot size {self.path}") from None
        return fd

    # -- plumbing ---------------------------------------------------------------------------

    def _live_fd(self) -> int:
        if self._fd is None:
            raise BlockIOError(errno.EBADF, f"{self.path}: backend is closed")
        return self._fd

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Counted so that aclose() never closes (and the kernel never reuses) an fd that a
        # worker is still using.  to_thread is not abandoned on cancel, so the count is exact.
        self._threads += 1
        try:
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            self._threads -= 1
            if self._threads == 0 and self._drained is not None:
                self._drained.set()

    # -- synchronous primitives (run inline or in a worker) ----------------------------------

    @staticmethod
    def _preadv_all(fd: int, views: list[memoryview], offset: int) -> None:
        while views:
            try:
                n = os.preadv(fd, views[:_IOV_MAX], offset)
            except InterruptedError:
                continue
            except OSError as exc:
                raise BlockIOError.from_oserror(exc, f"read at offset {offset}") from None
            if n == 0:
                # Past EOF: the file shrank behind our back; like a hole, it reads as zeroes.
                _zero_views(views)
                return
            offset += n
            views = iov_slice(views, n)

    @staticmethod
    def _pwritev_all(fd: int, views: list[memoryview], offset: int, flags: int = 0) -> None:
        while views:
            try:
                n = os.pwritev(fd, views[:_IOV_MAX], offset, flags)
            except InterruptedError:
                continue
            except OSError as exc:
                raise BlockIOError.from_oserror(exc, f"write at offset {offset}") from None
            if n == 0:
                raise BlockIOError(errno.EIO, f"write at offset {offset} made no progress")
            offset += n
            views = iov_slice(views, n)

    def _read_nowait(self, fd: int, views: list[memoryview], offset: int, total: int) -> int:
        """Try to read from the page cache without blocking; returns the bytes done."""
        try:
            n = os.preadv(fd, views[:_IOV_MAX], offset, _RWF_NOWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._nowait_reads = False
                return 0
            raise BlockIOError.from_oserror(exc, f"read at offset {offset}") from None
        if n == 0:
            _zero_views(views)  # at EOF, see _preadv_all
            return total
        return n

    @staticmethod
    def _write_zero_bytes(fd: int, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            FileBackend._pwritev_all(fd, [memoryview(_ZEROES)[:n]], offset)
            offset += n

    def _punch_or_zero(self, fd: int, offset: int, length: int, unmap: bool) -> None:
        # Runs in a worker.  The capability flags are only ever cleared, so a racing
        # worker at worst makes one redundant unsupported syscall.
        if unmap and self._can_punch:
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                # EINVAL: e.g. a range a block device cannot punch; zero it by hand instead.
                if exc.errno not in _UNSUPPORTED and exc.errno != errno.EINVAL:
                    raise BlockIOError.from_oserror(exc, f"punch hole at {offset}") from None
                if exc.errno in _UNSUPPORTED:
                    self._can_punch = False
        if not unmap and self._can_zero_range:
            try:
                fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED and exc.errno != errno.EINVAL:
                    raise BlockIOError.from_oserror(exc, f"zero range at {offset}") from None
                if exc.errno in _UNSUPPORTED:
                    self._can_zero_range = False
        self._write_zero_bytes(fd, offset, length)

    def _write_fua(self, fd: int, views: list[memoryview], offset: int) -> None:
        if self._dsync_writes:
            try:
                self._pwritev_all(fd, views, offset, _RWF_DSYNC)
                return
            except BlockIOError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._dsync_writes = False
        self._pwritev_all(fd, views, offset)
        self._fdatasync(fd)

    @staticmethod
    def _fdatasync(fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise BlockIOError.from_oserror(exc, "fdatasync") from None

    # -- BlockBackend ------------------------------------------------------------------------

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = byte_views(bufs)
        total = iov_length(views)
        self._check_range(offset, total)
        # Checkpoint first: cancellation then means "not performed", and a stream of cached
        # reads still lets other tasks run.  The fd is fetched after it, so an aclose() that
        # ran meanwhile is noticed instead of touching a closed (or reused) descriptor.
        await trio.lowlevel.checkpoint()
        fd = self._live_fd()
        if total == 0:
            return
        done = 0
        if self._nowait_reads and total <= self._inline_max:
            done = self._read_nowait(fd, views, offset, total)
        if done < total:
            await self._in_thread(self._preadv_all, fd, iov_slice(views, done), offset + done)

    # -- synchronous fast paths (a device's queue loop calls these before spawning a task) --------

    def fast_io(self) -> tuple[int, int, int] | None:
        """For a device's C fast path that does this backend's inline I/O itself: (fd for
        reads, fd for writes, largest inline transfer), with -1 for a direction it must leave
        to :meth:`readv_nowait`/:meth:`writev_nowait` (no RWF_NOWAIT here, read-only). None
        when closed. The reads must use ``RWF_NOWAIT``; neither may be FUA."""
        fd = self._fd
        if fd is None:
            return None
        return (fd if self._nowait_reads else -1, -1 if self.read_only else fd, self._inline_max)

    def readv_nowait(self, offset: int, bufs: Sequence[memoryview]) -> bool:
        """Do :meth:`readv` now if it cannot block: an inline-sized read that the page cache
        holds entirely.  False: nothing is promised about ``bufs``, call :meth:`readv`.
        Raises what :meth:`readv` raises for a bad range or a closed backend."""
        views = byte_views(bufs)
        total = iov_length(views)
        self._check_range(offset, total)
        fd = self._live_fd()
        if total == 0:
            return True
        if not self._nowait_reads or total > self._inline_max:
            return False
        return self._read_nowait(fd, views, offset, total) == total

    def writev_nowait(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> bool:
        """Do :meth:`writev` now when it would be done inline anyway (a buffered write of at
        most ``inline_max`` bytes).  False: call :meth:`writev`."""
        views = byte_views(bufs)
        total = iov_length(views)
        self._check_range(offset, total)
        self._check_writable()
        fd = self._live_fd()
        if total == 0:
            return True
        if fua or total > self._inline_max:
            return False
        self._pwritev_all(fd, views, offset)
        return True

    async def writev(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        views = byte_views(bufs)
        total = iov_length(views)
        self._check_range(offset, total)
        self._check_writable()
        await trio.lowlevel.checkpoint()
        fd = self._live_fd()
        if total == 0:
            return
        if fua:
            await self._in_thread(self._write_fua, fd, views, offset)
        elif total <= self._inline_max:
            self._pwritev_all(fd, views, offset)
        else:
            await self._in_thread(self._pwritev_all, fd, views, offset)

    async def flush(self) -> None:
        await self.begin_flush().wait()

    def begin_flush(self) -> PendingFlush:
        """Ask for a flush now; its fdatasync starts at once unless one is running (then the
        next one, started when that ends, answers it and every flush asked meanwhile)."""
        if self.read_only:
            return PendingFlush(trio.lowlevel.checkpoint)
        now = time.monotonic_ns()
        if now - self._last_flush_ns < WRITE_BEHIND_NS:
            self.write_behind_until = now + WRITE_BEHIND_NS
        self._last_flush_ns = now
        self._flushes_asked += 1
        ticket = self._flushes_asked
        if self._sync_upto is None and self._flush_failed is None and self._fd is not None:
            try:
                self._start_sync(self._fd)
            except BlockIOError:
                pass  # the device's fetch path must not fail: _flushed() meets it again
        return PendingFlush(lambda: self._flushed(ticket))

    def _start_sync(self, fd: int) -> None:
        if self._syncer is None:
            try:
                self._syncer = _new_syncer()
            except (OSError, RuntimeError) as exc:  # no fd or thread left (EMFILE, EAGAIN)
                raise BlockIOError(getattr(exc, "errno", None) or errno.EAGAIN,
                                   f"cannot start the fdatasync thread: {exc}") from None
        self._sync_upto = self._flushes_asked
        self._sync_ended = trio.Event()
        self._threads += 1  # aclose() waits for it, as for a worker thread
        self._syncer.start(fd)

    async def _flushed(self, ticket: int) -> None:
        """Until an fdatasync that began after flush ``ticket`` was asked for has ended."""
        waited = False
        while True:
            if self._flushes_done >= ticket:
                if not waited:
                    await trio.lowlevel.checkpoint()
                return
            if self._flush_failed is not None:
                raise self._flush_failed
            if self._sync_upto is None:
                self._start_sync(self._live_fd())
            if self._sync_reaped:
                await self._sync_ended.wait()
            else:
                await self._reap_sync()
            waited = True

    async def _reap_sync(self) -> None:
        """Wait for the running fdatasync's answer and record it (one task at a time)."""
        assert self._syncer is not None and self._sync_upto is not None
        self._sync_reaped = True
        try:
            await self._syncer.wait()
        except OSError as exc:
            self._flush_failed = BlockIOError.from_oserror(exc, "fdatasync")
        else:
            self._flushes_done = self._sync_upto
        finally:
            self._sync_upto = None
            self._sync_reaped = False
            self._sync_ended.set()
            self._threads -= 1
            if self._threads == 0 and self._drained is not None:
                self._drained.set()

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, may_unmap=True)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check_range(offset, length)
        self._check_writable()
        fd = self._live_fd()
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        await self._in_thread(self._punch_or_zero, fd, offset, length, may_unmap)

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._sync_upto is not None and not self._sync_reaped:
                # begun by a flush command that was dropped before it awaited it
                await self._reap_sync()
            if self._threads:
                self._drained = trio.Event()
                with trio.CancelScope(shield=True):
                    await self._drained.wait()
            if not self.read_only:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._fdatasync, fd)
        finally:
            os.close(fd)
            syncer, self._syncer = self._syncer, None
            if syncer is not None:
                syncer.close()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "file",
            "path": self.path,
            "size": self.size,
            "read_only": self.read_only,
        }
