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

A map that came without an fd is reached through DMA_READ/DMA_WRITE messages instead, from
device code that runs under :mod:`.msgdma` (device tasks, and BAR writes while such maps
exist). Bus Master Enable is checked here for both kinds: with it clear every access fails
with :class:`DmaError`, as a real device's would master-abort.
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

from greenlet import getcurrent

from ..protocol.constants import DmaMapFlags
from ..protocol.errors import DmaError, VfioUserError
from .msgdma import DmaContext, DmaExecutor, MessagePort

PAGE_SIZE = mmap.PAGESIZE
COMMAND = 0x04
CMD_MASTER = 0x4
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
        #: the device's config space image, for Bus Master Enable (None: always enabled)
        self.config_image: bytearray | None = None
        #: how to reach maps without an fd (the connection, while a client is connected)
        self.port: MessagePort | None = None
        #: the message-DMA context of the device code running now (set by the executor)
        self.context: DmaContext | None = None
        self.executor = DmaExecutor(self)
        #: True for a map without an fd that is no guest RAM (the device's own BAR window)
        self.window_filter: Callable[[int, int], bool] | None = None
        #: called once the first time a map without an fd makes message DMA needed
        self.on_message_mode: Callable[[], None] | None = None
        self._fdless = 0  # writable maps without an fd that count as guest RAM

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
            if self._counts(region):
                self._fdless += 1
                if self._fdless == 1 and self.on_message_mode is not None:
                    self.on_message_mode()
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
        if self._counts(region):
            self._fdless -= 1
        region.release()
        return region

    def clear(self) -> None:
        self.generation += 1
        for region in self._regions:
            region.release()
        self._regions.clear()
        self._starts.clear()
        self._last = None
        self._fdless = 0

    def _counts(self, region: DmaRegion) -> bool:
        return region.view is None and region.writable and not (
            self.window_filter is not None and self.window_filter(region.iova, region.size))

    @property
    def message_mode(self) -> bool:
        """Device code may meet guest RAM without an fd: run it where it can wait for messages."""
        return self._fdless > 0 and self.port is not None

    @property
    def master(self) -> bool:
        """Bus Master Enable: may the device access guest memory at all."""
        image = self.config_image
        return image is None or bool(image[COMMAND] & CMD_MASTER)

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

    def view(self, iova: int, length: int, *, write: bool = False, update: bool = False) -> memoryview:
        """A view of ``[iova, iova + length)``, which must lie inside one region: zero-copy
        for a map with an fd; for one without, the data read with DMA_READ (``write``: a
        buffer written back with DMA_WRITE, see :mod:`.msgdma`; ``update``: the caller
        changes part of it in place and is done with it before its next await)."""
        if length < 0 or iova < 0:
            raise DmaError(f"bad DMA range {iova:#x}+{length:#x}")
        image = self.config_image
        if image is not None and not image[COMMAND] & CMD_MASTER:
            raise DmaError(f"DMA to {iova:#x} with Bus Master Enable clear", errno.EPERM)
        region = self._find(iova)
        start = iova - region.iova
        if start + length > region.size:
            raise DmaError(f"DMA range {iova:#x}+{length:#x} crosses the end of its map")
        if write:
            if not region.writable:
                raise DmaError(f"guest address {iova:#x} is mapped read-only", errno.EPERM)
            if self.dirty_hook is not None:
                self.dirty_hook(iova, length)
        if region.view is None:
            ctx = self._message_context(iova)
            return ctx.bounce(iova, length, update) if write else memoryview(ctx.read(iova, length))
        return region.view[start : start + length]

    def _message_context(self, iova: int) -> DmaContext:
        ctx = self.context
        if self.port is None:
            raise DmaError(
                f"guest address {iova:#x} has no shared memory (the client sent no fd and serves "
                "no DMA_READ/DMA_WRITE; run QEMU with memory-backend-memfd,share=on)")
        if ctx is None or ctx.glet is not getcurrent():
            # Device code outside a task run by the executor (a bug of its own, or a region
            # read handler): it must not wait for a message here.
            raise DmaError(f"guest address {iova:#x} needs message DMA, which is not possible here", errno.EAGAIN)
        return ctx

    def before_interrupt(self) -> None:
        """Send the completed write-backs of the running step before the guest is told."""
        ctx = self.context
        if ctx is not None and ctx.writes and ctx.glet is getcurrent():
            ctx.flush_sync()

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
        length = len(data)
        if iova >= 0 and length > 0:
            last = self._last
            if last is None or not last.iova <= iova < last.end:
                last = self._find(iova)
            if last.view is None and iova + length <= last.end:
                # Message memory: the data is known, so no bounce buffer; sent in order.
                if not self.master:
                    raise DmaError(f"DMA to {iova:#x} with Bus Master Enable clear", errno.EPERM)
                if not last.writable:
                    raise DmaError(f"guest address {iova:#x} is mapped read-only", errno.EPERM)
                if self.dirty_hook is not None:
                    self.dirty_hook(iova, length)
                self._message_context(iova).write(iova, bytes(data))
                return
        for v in self.views(iova, length, write=True):
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def contains(self, iova: int, length: int) -> bool:
        """Whether ``[iova, iova + length)`` is mapped and the device may reach it (no access)."""
        if iova < 0 or length < 0 or not self.master:
            return False
        while length > 0:
            try:
                region = self._find(iova)
            except DmaError:
                return False
            chunk = min(length, region.end - iova)
            iova += chunk
            length -= chunk
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
