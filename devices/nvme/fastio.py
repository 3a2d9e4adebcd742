"""Runs of plain Read/Write commands in C (:mod:`vfu_devices._fastio_build`), the rest in Python.

The controller's SQ loop and its doorbell path hand an I/O SQ to :meth:`FastIo.run` before
they fetch an entry themselves. C consumes entries from the head for as long as each is a
Read or Write it can complete at once from the page cache (or into it), posts their
completions, and stops without consuming the first entry it does not accept; Python then
fetches that one as before, with all its checks and statuses. Completions C posts are
signalled by the caller like those of inline Python commands (one interrupt per batch).

Per command this saves the Python work of the inline path: decoding the entry, the PRP walk,
the views and the completion, about 20 us of server CPU per 4 KiB I/O on the development VM
(see docs/performance.md).

C is used only while Python would not need to see the data movement: not while dirty pages
are logged for migration, not while completions wait for CQ room (order), not for backends
other than :class:`~vfu_server.block.FileBackend`. Set ``VFU_FASTIO=0`` to turn it (and
virtio-blk's) off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..fastio import RegionTable, WriteBehind, backend_fast_io
from .state import CompletionQueueState, SubmissionQueueState

if TYPE_CHECKING:
    from .controller import NvmeController

#: Entries one call may complete before the caller gets control back.
RUN_LIMIT = 64
#: Beyond this many namespaces the per-call namespace check costs more than it saves.
MAX_NAMESPACES = 32


class FastIo:
    """The C fast path of one controller."""

    def __init__(self, ctrl: NvmeController, module: Any) -> None:
        self.ctrl = ctrl
        self.ffi, self.lib = module.ffi, module.lib
        self.ctx = self.ffi.new("struct vfu_fastio *")
        self.write_behind = WriteBehind(self.ffi, self.lib, self.ctx)
        self.q = self.ffi.new("struct vfu_sq *")
        self.regions = RegionTable(self.ffi, ctrl.dma)
        self._ns = self.ffi.new("struct vfu_ns[]", 1)
        self._ns_key: tuple[Any, ...] | None = None
        self._backends: tuple[Any, ...] = ()
        #: each SQ's struct vfu_iostat, which C counts into (vfu_server/iostats.py)
        self._stats: dict[int, Any] = {}

    # -- what C is allowed to see ----------------------------------------------------------

    def _sync_namespaces(self) -> bool:
        namespaces = self.ctrl.namespaces
        if len(namespaces) > MAX_NAMESPACES:
            return False
        # Formats (lba_format) and backends (closed at shutdown) change rarely; check cheaply.
        key = tuple((nsid, ns.state.lba_format, ns.backend.size, backend_fast_io(ns.backend))
                    for nsid, ns in namespaces.items())
        if key == self._ns_key:
            return True
        count = max(namespaces, default=0)
        table = self.ffi.new("struct vfu_ns[]", max(1, count))
        for entry in table:
            entry.read_fd = entry.write_fd = -1
        inline = None
        for nsid, ns in namespaces.items():
            io = backend_fast_io(ns.backend)
            if io is None:
                continue
            entry = table[nsid - 1]
            entry.read_fd, entry.write_fd = io[0], io[1]
            entry.lba_shift = ns.lba_shift
            entry.nsze = ns.nsze
            inline = io[2] if inline is None else min(inline, io[2])
        self._ns = table
        self._backends = tuple(ns.backend for ns in namespaces.values())
        self.ctx.ns, self.ctx.nns = table, count
        self.ctx.max_bytes = min(self.ctrl.mdts_bytes, inline or 0)
        self._ns_key = key
        return True

    # -- the run ------------------------------------------------------------------------------

    def run(self, sq: SubmissionQueueState, cq: CompletionQueueState, limit: int = RUN_LIMIT) -> int:
        """Complete entries from ``sq``'s head up to its tail in C; returns how many. ``sq``
        and ``cq`` (head, tail, phase) and the SMART counters are updated."""
        ctrl = self.ctrl
        if not self._sync_namespaces():
            return 0
        if (cq.head - cq.tail - 1) % cq.size < (sq.tail - sq.head) % sq.size:
            # C stops at a full CQ; the host may have freed entries in the shadow doorbell only.
            ctrl.refresh_cq_head(cq)
        c, q = self.ctx, self.q
        if self.regions.sync():
            c.regions, c.nregions = self.regions.table, self.regions.count
        c.page_size = ctrl.page_size
        c.write_cache = ctrl.state.features.volatile_write_cache
        write_behind = 0
        for backend in self._backends:
            write_behind = max(write_behind, backend.write_behind_until)
        c.write_behind_until = write_behind = WriteBehind.deadline(write_behind)
        c.bytes_read = c.bytes_written = c.read_cmds = c.write_cmds = 0
        c.stats = self._stats.get(sq.qid) or self._stats_of(sq.qid)
        q.sq_base, q.sq_size, q.sq_head, q.sq_tail, q.sqid = sq.base, sq.size, sq.head, sq.tail, sq.qid
        q.cq_base, q.cq_size, q.cq_head, q.cq_tail, q.cq_phase = cq.base, cq.size, cq.head, cq.tail, cq.phase
        n: int = self.lib.vfu_fastio_run(c, q, limit)
        self.write_behind.after_run(write_behind)
        if n:
            sq.head = q.sq_head
            cq.tail, cq.phase = q.cq_tail, q.cq_phase
            smart = ctrl.state.smart
            smart.bytes_read += c.bytes_read
            smart.bytes_written += c.bytes_written
            smart.host_read_commands += c.read_cmds
            smart.host_write_commands += c.write_cmds
        return n

    def _stats_of(self, qid: int) -> Any:
        stats = self._stats[qid] = self.ctrl.queue_stats(qid).attach_c(self.ffi)
        return stats

    @property
    def stop_reason(self) -> int:
        """Why the last :meth:`run` stopped (``lib.VFU_STOP_*``)."""
        return int(self.ctx.stop)

