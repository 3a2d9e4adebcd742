"""A raw-file backend doing its reads, writes and flushes through io_uring.

:class:`UringFileBackend` is a :class:`~vfu_server.block.file.FileBackend` (same open and size
rules, same discard/zeroing) whose ``readv``/``writev``/``flush`` become READV/WRITEV/FSYNC
submissions pointing straight into the caller's buffers -- for a device, memoryviews of the
mmapped guest RAM (``ffi.from_buffer``, no copy). Where the I/O would block, the kernel's
io-wq workers wait for the disk instead of a Python thread.

How it runs on trio:

* One ring per backend, its completion eventfd registered (IORING_REGISTER_EVENTFD).
* A request fills an SQE and parks its task (``wait_task_rescheduled``). When the ring was idle
  the SQE is submitted at once (QD1 pays no extra scheduler pass); otherwise it is left for the
  ring task, which runs after every task of the current scheduler batch has queued its SQEs and
  submits them all with one ``io_uring_enter`` (batched submission).
* The ring task -- a trio system task -- waits with ``trio.lowlevel.wait_readable(eventfd)``,
  copies CQEs out and reschedules each waiting task with its result.
* An I/O in flight cannot be taken back (the kernel writes into guest memory), so a waiting
  request is not cancellable, as with a thread hop in FileBackend.

Fallback: the C part is compiled with cffi on first use (cached under
``~/.cache/vfu-server/uring``). Opening probes the ring (setup, eventfd registration and a NOP
round trip); if any step fails -- no compiler, no ``<linux/io_uring.h>``, seccomp,
``kernel.io_uring_disabled`` -- the backend logs one line and behaves exactly like
FileBackend. ``uring_active`` and ``uring_unavailable`` tell which one it is.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from typing import Any

import outcome
import trio

from .base import PendingFlush, byte_views, iov_length, iov_slice
from .errors import BlockIOError
from .file import _RWF_DSYNC, _UNSUPPORTED, FileBackend, _zero_views

__all__ = ["UringFileBackend", "load_ring_module", "uring_available"]

log = logging.getLogger("vfu_server.block.uring")

RING_ENTRIES = 256
_REAP_BATCH = 64

def load_ring_module() -> Any:
    """The compiled cffi module (``ffi``, ``lib``); built on first use. Raises OSError."""
    from . import _uring_build as build

    return build.HELPER.load()


class _Ring:
    """One io_uring instance plus its eventfd. Raises OSError if the kernel refuses it."""

    def __init__(self, entries: int = RING_ENTRIES) -> None:
        mod = load_ring_module()
        self.ffi, self.lib = mod.ffi, mod.lib
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ring = self.ffi.new("struct vfu_ring *")
        rc = self.lib.vfu_ring_setup(self.ring, entries, self.efd)
        if rc < 0:
            os.close(self.efd)
            raise OSError(-rc, f"io_uring_setup: {os.strerror(-rc)}")
        self.entries = self.ring.sq_entries
        self._ud = self.ffi.new("uint64_t[]", _REAP_BATCH)
        self._res = self.ffi.new("int32_t[]", _REAP_BATCH)
        try:
            self._probe()
        except OSError:
            self.close()
            raise

    def _probe(self) -> None:
        # Some sandboxes allow io_uring_setup but not io_uring_enter (or fail every op).
        rc = self.lib.vfu_ring_prep(self.ring, self.lib.VFU_OP_NOP, -1, self.ffi.NULL, 0, 0, 0, 0)
        if rc == 0:
            rc = self.lib.vfu_ring_submit(self.ring, 1)
        if rc < 0:
            raise OSError(-rc, f"io_uring_enter: {os.strerror(-rc)}")
        got = self.reap()
        if got != [(0, 0)]:
            raise OSError(errno.EIO, f"io_uring NOP probe returned {got}")
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError as exc:
            raise OSError(errno.EIO, "io_uring did not signal its eventfd") from exc

    def reap(self) -> list[tuple[int, int]]:
        out = []
        while True:
            n = self.lib.vfu_ring_reap(self.ring, self._ud, self._res, _REAP_BATCH)
            out.extend((self._ud[i], self._res[i]) for i in range(n))
            if n < _REAP_BATCH:
                return out

    def close(self) -> None:
        if self.ring is not None:
            self.lib.vfu_ring_close(self.ring)
            self.ring = None
            os.close(self.efd)


def uring_available() -> tuple[bool, str]:
    """(True, "") if a ring can be set up here, else (False, why)."""
    try:
        _Ring(4).close()
    except OSError as exc:
        return False, str(exc)
    return True, ""


class _Op:
    __slots__ = ("keep", "task")

    def __init__(self, task: Any, keep: Any) -> None:
        self.task = task
        self.keep = keep  # the iovec array and buffer handles: alive until the CQE


class UringFileBackend(FileBackend):
    """FileBackend with io_uring reads, writes and flushes; see the module docstring."""

    def __init__(self, *args: Any, ring_entries: int = RING_ENTRIES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ring: _Ring | None = None
        self.uring_unavailable: str | None = None
        try:
            self._ring = _Ring(ring_entries)
            log.info("%s: I/O through io_uring (%d entries)", self.path, ring_entries)
        except OSError as exc:
            self.uring_unavailable = str(exc)
            log.info("%s: io_uring unavailable, using preadv/pwritev: %s", self.path, exc)
        self._ops: dict[int, _Op] = {}
        self._next_ud = 1
        self._unsubmitted = 0
        self._wake: trio.CancelScope | None = None
        self._loop_token: Any = None
        self._idle: trio.Event | None = None
        self._space = trio.lowlevel.ParkingLot()

    @property
    def uring_active(self) -> bool:
        return self._ring is not None

    def fast_io(self) -> tuple[int, int, int] | None:
        return None if self._ring is not None else super().fast_io()  # I/O goes through the ring

    # -- the ring task -------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        token = trio.lowlevel.current_trio_token()
        if token is not self._loop_token:
            self._loop_token = token
            trio.lowlevel.spawn_system_task(self._ring_loop, name=f"io_uring {self.path}")

    async def _ring_loop(self) -> None:
        ring = self._ring
        try:
            while ring is self._ring and ring is not None:
                if self._unsubmitted:
                    self._submit()
                self._complete(ring.reap())
                if self._unsubmitted:
                    continue
                with trio.CancelScope() as self._wake:
                    try:
                        if self._ops:
                            await trio.lowlevel.wait_readable(ring.efd)
                        else:
                            await trio.sleep_forever()
                    except trio.ClosedResourceError:
                        return  # aclose() closed the ring
                self._wake = None
                if ring is not self._ring:
                    return
                try:
                    os.eventfd_read(ring.efd)
                except BlockingIOError:
                    pass
        except trio.Cancelled:
            raise
        except BaseException as exc:  # a system task must not crash the run
            log.exception("%s: io_uring ring task failed; failing its requests", self.path)
            self._fail_all(exc)
        finally:
            self._loop_token = None

    def _submit(self) -> None:
        assert self._ring is not None
        rc = self._ring.lib.vfu_ring_submit(self._ring.ring, 0)
        if rc < 0 and rc not in (-errno.EAGAIN, -errno.EBUSY):
            raise OSError(-rc, f"io_uring_enter: {os.strerror(-rc)}")
        # EAGAIN/EBUSY: the SQEs stay queued; the next pass retries after reaping.
        self._unsubmitted = self._ring.lib.vfu_ring_unsubmitted(self._ring.ring)

    def _complete(self, done: list[tuple[int, int]]) -> None:
        for ud, res in done:
            op = self._ops.pop(ud, None)
            if op is not None:
                trio.lowlevel.reschedule(op.task, outcome.Value(res))
        if done:
            self._space.unpark_all()
            if not self._ops and self._idle is not None:
                self._idle.set()

    def _fail_all(self, exc: BaseException) -> None:
        ops, self._ops = self._ops, {}
        for op in ops.values():
            trio.lowlevel.reschedule(op.task, outcome.Error(BlockIOError(errno.EIO, f"io_uring failed: {exc}")))
        ring, self._ring = self._ring, None
        self.uring_unavailable = f"ring task failed: {exc}"
        if ring is not None:
            # Closing the ring makes the kernel cancel (or wait for) whatever is in flight.
            trio.lowlevel.notify_closing(ring.efd)
            ring.close()

    # -- submitting one operation ----------------------------------------------------------------

    async def _run(self, op: int, fd: int, views: Sequence[memoryview], offset: int,
                   flags: int, writable: bool) -> int:
        """Queue one SQE, wait for its CQE, return ``res`` (negative errno on failure)."""
        ring = self._ring
        assert ring is not None
        ffi, lib = ring.ffi, ring.lib
        while len(self._ops) >= ring.entries:
            await self._space.park()
        if ring is not self._ring:
            raise BlockIOError(errno.EIO, f"{self.path}: io_uring went away")
        self._ensure_loop()
        n = len(views)
        if n:
            iov = ffi.new("struct iovec[]", n)
            bufs = [ffi.from_buffer(v, require_writable=writable) for v in views]
            for i in range(n):
                iov[i].iov_base = bufs[i]
                iov[i].iov_len = views[i].nbytes
        else:
            iov, bufs = ffi.NULL, []
        ud = self._next_ud
        self._next_ud = ud + 1 if ud < 0xFFFFFFFFFFFF else 1
        rc = lib.vfu_ring_prep(ring.ring, op, fd, iov, n, offset, ud, flags)
        if rc == -errno.EBUSY:  # SQ full of unsubmitted entries: push them out first
            self._submit()
            rc = lib.vfu_ring_prep(ring.ring, op, fd, iov, n, offset, ud, flags)
        if rc < 0:
            raise BlockIOError(-rc, f"io_uring prep: {os.strerror(-rc)}")
        task = trio.lowlevel.current_task()
        self._ops[ud] = _Op(task, (iov, bufs))
        if len(self._ops) == 1 and not self._unsubmitted:
            # Ring idle: submit now rather than one scheduler pass later.
            try:
                self._submit()
            except OSError as exc:
                del self._ops[ud]
                raise BlockIOError.from_oserror(exc, "io_uring submit") from None
        else:
            self._unsubmitted += 1
        if self._wake is not None:
            self._wake.cancel()  # the ring task submits and waits for the new entry too

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the kernel owns the buffers until the CQE

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    # -- BlockBackend ------------------------------------------------------------------------

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        if self._ring is None:
            return await super().readv(offset, bufs)
        views = byte_views(bufs)
        total = iov_length(views)
        self._check_range(offset, total)
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self._live_fd()
        done = 0
        while done < total:
            part = iov_slice(views, done) if done else views
            res = await self._run(self._ring.lib.VFU_OP_READV, fd, part[:1024], offset + done, 0, True)
            if res < 0:
                raise BlockIOError(-res, f"read at offset {offset + done}: {os.strerror(-res)}")
            if res == 0:  # past EOF: the file shrank; reads as zeroes, like FileBackend
                _zero_views(part)
                return
            done += res

    async def writev(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        if self._ring is None:
            return await super().writev(offset, bufs, fua)
        views = byte_views(bufs)
        total = iov_length(views)
        self._check_range(offset, total)
        self._check_writable()
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self._live_fd()
        flags = _RWF_DSYNC if fua and self._dsync_writes else 0
        done = 0
        while done < total:
            part = iov_slice(views, done) if done else views
            res = await self._run(self._ring.lib.VFU_OP_WRITEV, fd, part[:1024], offset + done, flags, False)
            if res < 0:
                if flags and -res in _UNSUPPORTED:
                    # No RWF_DSYNC here: write plainly, then fdatasync (FileBackend's fallback).
                    self._dsync_writes = False
                    flags = 0
                    continue
                raise BlockIOError(-res, f"write at offset {offset + done}: {os.strerror(-res)}")
            if res == 0:
                raise BlockIOError(errno.EIO, f"write at offset {offset + done} made no progress")
            done += res
        if fua and not flags:
            await self.flush()

    def begin_flush(self) -> PendingFlush:
        if self._ring is None or self.read_only:
            return super().begin_flush()
        return PendingFlush(self.flush)  # the ring's FSYNC starts when awaited

    async def flush(self) -> None:
        if self._ring is None or self.read_only:
            return await super().flush()
        fd = self._live_fd()
        res = await self._run(self._ring.lib.VFU_OP_FSYNC, fd, (), 0, self._ring.lib.VFU_FSYNC_DATASYNC, False)
        if res < 0:
            raise BlockIOError(-res, f"fdatasync: {os.strerror(-res)}")

    async def aclose(self) -> None:
        if self._ops:
            self._idle = trio.Event()
            with trio.CancelScope(shield=True):
                await self._idle.wait()
        # flush (in FileBackend.aclose) goes through a thread; the ring is no longer needed.
        ring, self._ring = self._ring, None
        if self._wake is not None:
            self._wake.cancel()
        if ring is not None:
            trio.lowlevel.notify_closing(ring.efd)
            ring.close()
        await super().aclose()
