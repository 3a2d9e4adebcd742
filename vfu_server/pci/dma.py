"""Guest memory as the server sees it: the client's DMA_MAP regions, mmapped from their fds.

Devices reach guest memory only through :class:`GuestMemory`. Every access is bounds-checked
against the current map, so a bad guest address becomes a :class:`DmaError` for the device to
report (an NVMe status, a virtio NEEDS_RESET), never a crash.

Accesses are zero-copy: :meth:`GuestMemory.view` hands out a ``memoryview`` of the shared
mapping that ``os.preadv`` can fill directly. A range that crosses two DMA regions cannot be a
single view; :meth:`GuestMemory.views` splits it.

An unmap while a device still holds a view of that region is safe: the mapping is dropped from
the table at once (new accesses fail), and the OS mapping lives on until the last view is
released, so an in-flight request can never touch unmapped memory.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ..protocol.constants import DmaMapFlags
from ..protocol.errors import DmaError, VfioUserError

PAGE_SIZE = mmap.PAGESIZE
# Plain int: ``int & IntFlag`` runs enum.Flag.__and__ in Python, on every writable access.
_WRITE = int(DmaMapFlags.WRITE)

DirtyHook = Callable[[int, int], None]


@dataclass(eq=False, slots=True)
class DmaRegion:
    """One DMA_MAP: ``[iova, iova + size)``, readable and maybe writable."""

    iova: int
    size: int
    flags: int
    offset: int
    mapping: mmap.mmap | None  # None: no fd came with the map; only message DMA could reach it
    view: memoryview | None
    #: the client's fd, kept open while mapped: a live handover passes it to the successor,
    #: which must map the very same memory (the mapping alone cannot be sent)
    fd: int | None = None

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def writable(self) -> bool:
        return bool(self.flags & _WRITE)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                # A device still holds a view (in-flight I/O). The kernel mapping stays until
                # that view is released; the region is already gone from the table.
                pass
            self.mapping = None


class GuestMemory:
    """The set of DMA regions of one client connection."""

    def __init__(self, max_regions: int = 65535) -> None:
        self.max_regions = max_regions
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []
        self._last: DmaRegion | None = None
        #: Changes whenever the set of regions does: whoever keeps host addresses of the
        #: mappings (a C fast path) must drop them when it moved.
        self.generation = 0
        #: Called with ``(iova, length)`` for every range handed out writable: the hook for
        #: dirty-page logging during migration.
        self.dirty_hook: DirtyHook | None = None

    # -- map management -------------------------------------------------------------------

    def add(self, iova: int, size: int, flags: int, fd: int | None, offset: int = 0) -> DmaRegion:
        """Map a region. Takes ownership of ``fd`` (kept with the region, closed when it goes)."""
        try:
            if size == 0:
                raise VfioUserError("DMA_MAP of size 0", errno.EINVAL)
            if iova + size > 1 << 64 or offset + size > 1 << 64:
                raise VfioUserError("DMA_MAP range overflows 64 bits", errno.EINVAL)
            if not flags & DmaMapFlags.READ:
                raise VfioUserError("DMA_MAP without READ permission", errno.EINVAL)
            if len(self._regions) >= self.max_regions:
                raise VfioUserError(f"more than {self.max_regions} DMA regions", errno.ENOSPC)
            i = bisect.bisect_right(self._starts, iova)
            if i > 0 and self._regions[i - 1].end > iova:
                raise VfioUserError(f"DMA_MAP [{iova:#x}, +{size:#x}) overlaps an existing map", errno.EEXIST)
            if i < len(self._regions) and self._regions[i].iova < iova + size:
                raise VfioUserError(f"DMA_MAP [{iova:#x}, +{size:#x}) overlaps an existing map", errno.EEXIST)
            mapping = view = None
            if fd is not None:
                mapping, view = _map(fd, offset, size, bool(flags & DmaMapFlags.WRITE))
            region = DmaRegion(iova, size, flags, offset, mapping, view, fd)
            fd = None  # the region owns it now
            self._starts.insert(i, iova)
            self._regions.insert(i, region)
            self.generation += 1
            return region
        finally:
            if fd is not None:
                os.close(fd)

    def remove(self, iova: int, size: int) -> DmaRegion:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0 or self._regions[i].iova != iova or self._regions[i].size != size:
            raise VfioUserError(f"DMA_UNMAP [{iova:#x}, +{size:#x}) matches no map", errno.ENOENT)
        region = self._regions.pop(i)
        self._starts.pop(i)
        self._last = None
        self.generation += 1
        region.release()
        return region

    def clear(self) -> None:
        self.generation += 1
        for region in self._regions:
            region.release()
        self._regions.clear()
        self._starts.clear()
        self._last = None

    @property
    def regions(self) -> tuple[DmaRegion, ...]:
        return tuple(self._regions)

    # -- access -----------------------------------------------------------------------------

    def _find(self, iova: int) -> DmaRegion:
        last = self._last
        if last is not None and last.iova <= iova < last.end:
            return last
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            region = self._regions[i]
            if iova < region.end:
                self._last = region
                return region
        raise DmaError(f"guest address {iova:#x} is not mapped")

    def view(self, iova: int, length: int, *, write: bool = False) -> memoryview:
        """A zero-copy view of ``[iova, iova + length)``, which must lie inside one region."""
        if length < 0 or iova < 0:
            raise DmaError(f"bad DMA range {iova:#x}+{length:#x}")
        region = self._find(iova)
        start = iova - region.iova
        if start + length > region.size:
            raise DmaError(f"DMA range {iova:#x}+{length:#x} crosses the end of its map")
        if region.view is None:
            raise DmaError(
                f"guest address {iova:#x} has no shared memory (the client sent no fd; "
                "run QEMU with memory-backend-memfd,share=on)"
            )
        if write:
            if not region.writable:
                raise DmaError(f"guest address {iova:#x} is mapped read-only", errno.EPERM)
            if self.dirty_hook is not None:
                self.dirty_hook(iova, length)
        return region.view[start : start + length]

    def views(self, iova: int, length: int, *, write: bool = False) -> list[memoryview]:
        """Like :meth:`view`, split at region boundaries."""
        if iova >= 0 and length > 0:
            # Fast path: the range lies inside the last region used (nearly every access).
            last = self._last
            if last is not None and last.iova <= iova and iova + length <= last.iova + last.size:
                return [self.view(iova, length, write=write)]
        out = []
        while length > 0:
            region = self._find(iova)
            chunk = min(length, region.end - iova)
            out.append(self.view(iova, chunk, write=write))
            iova += chunk
            length -= chunk
        return out

    def read(self, iova: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.views(iova, length))

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        pos = 0
        for v in self.views(iova, len(data), write=True):
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def contains(self, iova: int, length: int) -> bool:
        try:
            self.views(iova, length)
        except DmaError:
            return False
        return True


def _map(fd: int, offset: int, size: int, writable: bool) -> tuple[mmap.mmap, memoryview]:
    # A client that shrinks its memfd after the map would make a later DMA hit SIGBUS and kill
    # the server. QEMU seals its RAM memfds already; seal others against shrinking when they
    # allow it (a plain file cannot be sealed: then the size check below is all we have).
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        pass
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise VfioUserError(f"DMA_MAP fd: {exc.strerror}", errno.EBADF) from None
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
        raise VfioUserError(
            f"DMA_MAP of {offset:#x}+{size:#x} goes past the end of its fd ({st.st_size:#x} bytes)", errno.EINVAL)
    # mmap offsets must be page-aligned; QEMU's are, but a client may not be that careful.
    slack = offset % mmap.ALLOCATIONGRANULARITY
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        mapping = mmap.mmap(fd, size + slack, flags=mmap.MAP_SHARED, prot=prot, offset=offset - slack)
    except (OSError, ValueError, OverflowError) as exc:
        code = getattr(exc, "errno", None) or errno.EINVAL
        raise VfioUserError(f"cannot mmap DMA region fd (offset {offset:#x}, size {size:#x}): {exc}", code) from None
    view = memoryview(mapping)
    if slack:
        view = view[slack:]
    if not writable:
        view = view.toreadonly()
    return mapping, view
