"""What the devices' C fast paths (:mod:`vfu_devices._fastio_build`) share: loading the helper
and the table of guest memory they may touch.

The helper is compiled on first use into the user's cache (``./run`` builds it ahead of
time). When it cannot be had, or with ``VFU_FASTIO=0`` in the environment, the devices
run on Python alone, which is the reference: the C paths only ever do what Python would do.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from vfu_server.pci.dma import GuestMemory

log = logging.getLogger("vfu_server.device.fastio")

_logged = False


def _disabled() -> bool:
    return os.environ.get("VFU_FASTIO", "1") == "0"


def load_module(build: bool = True) -> Any:
    """The compiled helper, or None (the reason is logged once) when it cannot be had.
    ``build=False``: None as well when it is not built yet (building takes seconds)."""
    global _logged
    if _disabled():
        return None
    from ._fastio_build import HELPER

    try:
        return HELPER.load(build=build)
    except OSError as exc:
        if not _logged:
            _logged = True
            log.info("C I/O fast path unavailable, using Python only: %s", exc.strerror)
        return None


class WriteBehind:
    """The byte range a C run noted for write-behind (the ``wb`` of its context, while the
    backend's ``write_behind_until`` says the guest flushes often): its write-back starts with
    :meth:`start`, which the device calls once the run's interrupt is out."""

    __slots__ = ("_lib", "_wb", "pending")

    def __init__(self, ffi: Any, lib: Any, ctx: Any) -> None:
        ctx.wb.fd = -1
        self._lib = lib
        self._wb = ffi.addressof(ctx, "wb")
        #: a run noted a range: :meth:`start` once the interrupt is out
        self.pending = False

    @staticmethod
    def deadline(until: int) -> int:
        """The ``write_behind_until`` to hand C: 0 once passed, so that C reads no clock per
        write."""
        return until if until and until > time.monotonic_ns() else 0

    def after_run(self, deadline: int) -> None:
        """A run with ``deadline`` (from :meth:`deadline`) ended: did it note anything?"""
        if deadline and self._wb.fd >= 0:
            self.pending = True

    def start(self) -> None:
        """Start the write-back of what the runs since the last call noted."""
        self.pending = False
        self._lib.vfu_write_behind(self._wb)


class RegionTable:
    """The DMA regions of a :class:`GuestMemory` as C sees them: (iova, length, host address,
    writable), rebuilt whenever the set of regions changed."""

    def __init__(self, ffi: Any, dma: GuestMemory) -> None:
        self.ffi = ffi
        self.dma = dma
        self.generation = -1
        self.master = False
        self.table = ffi.new("struct vfu_region[]", 1)
        self.count = 0

    def sync(self) -> bool:
        """Bring the table up to date; True if it changed (point the C context at it)."""
        dma = self.dma
        master = dma.master
        if dma.generation == self.generation and master == self.master:
            return False
        ffi = self.ffi
        # Bus Master Enable clear: C sees no memory at all, so Python meets (and reports) it.
        mapped = [r for r in dma.regions if r.view is not None] if master else []
        table = ffi.new("struct vfu_region[]", max(1, len(mapped)))
        for entry, region in zip(table, mapped, strict=False):
            # The address only: a held buffer export would keep DMA_UNMAP from closing the
            # mmap. The generation check drops the address before it could go stale.
            buf = ffi.from_buffer(region.view)
            try:
                entry.host = int(ffi.cast("uintptr_t", buf))
            finally:
                ffi.release(buf)
            entry.iova, entry.len, entry.writable = region.iova, region.size, region.writable
        self.table, self.count = table, len(mapped)
        self.generation, self.master = dma.generation, master
        return True


def load_vq(vq: Any, queue: Any) -> None:
    """Point a ``struct vfu_vq`` at a :class:`SplitQueue`'s rings, from where Python (and
    what C completed before, not yet published) left off."""
    s = queue.state
    vq.desc, vq.avail, vq.used, vq.size = s.desc_table, s.avail_ring, s.used_ring, s.size
    vq.next_avail = s.next_avail
    vq.next_used = (s.next_used + queue.pending_elsewhere) & 0xFFFF
    vq.indirect_ok = queue.indirect_ok


def backend_fast_io(backend: Any) -> tuple[int, int, int] | None:
    """(read fd, write fd, largest inline transfer) of a backend that allows it, else None."""
    fn = getattr(backend, "fast_io", None)
    return fn() if fn is not None else None


async def load_module_async() -> Any:
    """:func:`load_module` for a device's start: a cached build loads at once, a first build
    runs in a worker thread so that the event loop is not held for seconds."""
    module = load_module(build=False)
    if module is None and not _disabled():
        import trio

        module = await trio.to_thread.run_sync(load_module)
    return module
