"""RAM-backed block device, the default when no ``--backing`` is given and the test oracle."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from typing import Any

import trio

from .base import BlockBackend, byte_views, iov_length
from .errors import BlockIOError

__all__ = ["MemoryBackend"]

_PAGE = mmap.PAGESIZE


class MemoryBackend(BlockBackend):
    """A zero-initialised disk of ``size`` bytes held in a memfd.

    A mapping rather than a bytearray so that an untouched multi-gigabyte disk
    costs no RAM, and so that discard can hand whole pages back to the kernel with
    ``MADV_REMOVE`` (they read back as zeroes).  Contents vanish on close.
    """

    def __init__(self, size: int, read_only: bool = False, block_size: int = 512) -> None:
        if size <= 0:
            raise ValueError(f"memory backend size must be positive, not {size}")
        if block_size not in (512, 4096):
            raise ValueError(f"block_size must be 512 or 4096, not {block_size}")
        self.size = size
        self.block_size = block_size
        self.read_only = read_only
        # A memfd rather than anonymous memory: a live handover passes the disk to the
        # successor process as this fd (docs/handover.md). Untouched pages still cost nothing.
        self.fd: int | None = os.memfd_create("vfu-ramdisk", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except OSError:
            os.close(self.fd)
            raise
        self._view = memoryview(self._map)

    def adopt_fd(self, fd: int) -> None:
        """Use another process's disk (its :attr:`fd`, from a live handover) instead of ours,
        which is dropped. Takes ownership of ``fd``; it must be a disk of the same size."""
        try:
            if os.fstat(fd).st_size != self.size:
                raise ValueError(f"handed-over RAM disk has {os.fstat(fd).st_size} bytes, expected {self.size}")
            new = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        if self._map is not None:
            self._view.release()
            self._map.close()
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self._map, self._view = fd, new, memoryview(new)

    def _mem(self) -> memoryview:
        if self._map is None:
            raise BlockIOError(errno.EBADF, "memory backend is closed")
        return self._view

    async def readv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        views = byte_views(bufs)
        self._check_range(offset, iov_length(views))
        # Schedule point first: a tight loop of RAM-speed requests must not starve other tasks.
        await trio.lowlevel.checkpoint()
        mem = self._mem()
        for mv in views:
            n = mv.nbytes
            mv[:] = mem[offset : offset + n]
            offset += n

    async def writev(self, offset: int, bufs: Sequence[memoryview], fua: bool = False) -> None:
        views = byte_views(bufs)
        self._check_range(offset, iov_length(views))
        self._check_writable()
        await trio.lowlevel.checkpoint()
        mem = self._mem()
        for mv in views:
            n = mv.nbytes
            mem[offset : offset + n] = mv
            offset += n

    async def flush(self) -> None:
        self._mem()
        await trio.lowlevel.checkpoint()

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, may_unmap=True)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._check_range(offset, length)
        self._check_writable()
        await trio.lowlevel.checkpoint()
        mem = self._mem()
        end = offset + length
        first = -(-offset // _PAGE) * _PAGE
        last = end // _PAGE * _PAGE
        if may_unmap and last > first:
            # Hand the whole pages inside the range back to the kernel (they read back as
            # zeroes and cost no RAM); only the ragged edges need a memset.
            assert self._map is not None
            # MADV_REMOVE frees the shared memfd's pages (MADV_DONTNEED would keep the data).
            self._map.madvise(mmap.MADV_REMOVE, first, last - first)
            self._zero(mem, offset, first)
            self._zero(mem, last, end)
        else:
            self._zero(mem, offset, end)

    @staticmethod
    def _zero(mem: memoryview, lo: int, hi: int) -> None:
        # Bounded chunks so zeroing a huge range does not allocate a huge temporary.
        chunk = 1 << 20
        zeros = bytes(min(chunk, max(hi - lo, 0)))
        while lo < hi:
            n = min(chunk, hi - lo)
            mem[lo : lo + n] = zeros[:n] if n != len(zeros) else zeros
            lo += n

    async def aclose(self) -> None:
        if self._map is not None:
            self._view.release()
            self._map.close()
            self._map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        await trio.lowlevel.checkpoint()

    def describe(self) -> dict[str, Any]:
        return {"kind": "memory", "size": self.size, "read_only": self.read_only}


def export_ram_disks(backends: Sequence[BlockBackend | None]) -> tuple[dict[str, Any], list[int]]:
    """A device's RAM disks for a live handover: ``{"ram_disks": [position, ...]}`` and their
    memfds in that order (file and NBD backends are reopened by the successor itself)."""
    positions = [i for i, b in enumerate(backends) if isinstance(b, MemoryBackend) and b.fd is not None]
    return {"ram_disks": positions}, [backends[i].fd for i in positions]  # type: ignore[union-attr]


def adopt_ram_disks(backends: Sequence[BlockBackend | None], data: dict[str, Any], fds: list[int]) -> None:
    """The successor's side of :func:`export_ram_disks`: each listed RAM disk of ours takes the
    predecessor's memfd. Takes ownership of ``fds`` (closed here on error)."""
    positions = data.get("ram_disks", [])
    try:
        if not isinstance(positions, list) or len(positions) != len(fds):
            raise ValueError(f"{len(fds)} RAM disk fds for {positions!r}")
        for pos in positions:
            if not isinstance(pos, int) or not 0 <= pos < len(backends) or not isinstance(backends[pos], MemoryBackend):
                raise ValueError(f"the predecessor's RAM disk {pos!r} is not a RAM disk here")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    for i, (pos, fd) in enumerate(zip(positions, fds, strict=True)):
        try:
            backends[pos].adopt_fd(fd)  # type: ignore[union-attr]
        except BaseException:
            for rest in fds[i + 1 :]:
                os.close(rest)
            raise
