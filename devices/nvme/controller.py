"""The NVMe controller as a PCI device: registers, controller lifecycle, queue processing.

Task layout (all under the device's nursery)::

    run()                         opens NBD backends, then
      control loop                CC changes: enable, disable/reset, shutdown notification
      interrupt loop              one MSI-X signal per CQ vector per batch of completions
      session (while enabled)     nursery of the queue tasks below; cancelled on reset
        SQ loop per queue         woken by its doorbell; admin commands run inline,
          I/O command tasks       I/O commands each in their own task (QD32 overlaps)

Register callbacks only record values and set events: they run on the server's event loop
between messages and must not block. One exception: an I/O SQ doorbell that finds its SQ task
parked runs the new commands itself when they complete without blocking (``_submit_inline``).
Every command's outcome, including a bug, becomes a completion status; nothing a guest writes
can raise out of these tasks or callbacks.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import trio

from vfu_server import MemoryBar, Msix, PciDevice, PciExpress, PciIdentity, PowerManagement
from vfu_server.block import (
    BlockBackend,
    BlockError,
    BlockRangeError,
    BlockReadOnlyError,
    FileBackend,
    MemoryBackend,
    open_backend,
    open_file_backend,
    parse_backend_spec,
    parse_size,
)
from vfu_server.block.cache import VolatileCache
from vfu_server.block.memory import adopt_ram_disks, export_ram_disks
from vfu_server.block.spec import BACKING_IO, BackendSpec
from vfu_server.faults import FaultSet, Rule
from vfu_server.iostats import (
    BLOCK_KINDS,
    DISCARD,
    FLUSH,
    OTHER,
    READ,
    WRITE,
    WRITE_ZEROES,
    IoStats,
    QueueStats,
)
from vfu_server.pci.polling import DEFAULT_POLL_US, MAX_POLL_US, AdaptivePoll
from vfu_server.protocol.constants import IrqIndex
from vfu_server.protocol.errors import DmaError
from vfu_server.sandbox import SandboxNeeds

from ..fastio import load_module_async as load_fastio
from . import identify
from .admin import AdminCommands
from .command import Command
from .constants import (
    AEI_ERROR_INVALID_DOORBELL,
    AEI_ERROR_INVALID_DOORBELL_VALUE,
    CC_EN,
    CSTS_CFS,
    CSTS_RDY,
    DNR,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CC,
    REG_DOORBELLS,
    REG_INTMC,
    REG_INTMS,
    SHST_COMPLETE,
    SHST_NORMAL,
    SHST_OCCURRING,
    AsyncEventType,
    IoOpcode,
    Status,
)
from .errors import NvmeError
from .fastio import FastIo
from .faults import LBA_OPCODES, NVME_FAULTS
from .io import IoCommands
from .namespace import Namespace, lba_format_for
from .queues import (
    CqRuntime,
    InflightCounter,
    PendingCompletion,
    SqRuntime,
    cq_full,
    cq_pending,
    post_cqe,
    read_shadow,
    read_sqe,
    valid_cq_head,
    write_event_idx,
    write_shadow,
)
from .state import (
    AsyncEvent,
    CompletionQueueState,
    ErrorLogEntry,
    Features,
    NamespaceState,
    NvmeState,
    Registers,
    SubmissionQueueState,
)

if TYPE_CHECKING:
    from vfu_server.migration.generic import PciProfile

    from .migration_format import NvmeMigState

log = logging.getLogger("vfu_server.device.nvme")

MSIX_VECTORS = 65  # admin + 64 I/O queues, as QEMU's NVMe
MSIX_TABLE_OFFSET = 0x2000
MSIX_PBA_OFFSET = 0x3000
BAR0_SIZE = 0x4000
MAX_QUEUES_LIMIT = (MSIX_TABLE_OFFSET - REG_DOORBELLS) // 8 - 1  # doorbells must fit below the table
MPSMAX = 4  # 64 KiB pages
TIMEOUT_UNITS = 20  # CAP.TO, 500 ms units: 10 s
# 2^7 minimum pages = 512 KiB, as QEMU's nvme; Linux sends at most 128 segments anyway. It
# was 5 (128 KiB) until issue 18: a guest's 1 MiB read was then eight commands, not two.
MDTS = 7
MDTS_MAX = 8  # 1 MiB: a PRP list of it fits one page, which the C fast path wants
IO_INFLIGHT_PER_SQ = 256
QUIESCE_TIMEOUT = 10.0
INLINE_BATCH = 32  # commands an SQ doorbell write may run before it hands over to the SQ task


class NvmeController(PciDevice):
    """NVMe 1.4 controller (NVM command set) on block backends: files, NBD or RAM."""

    cli_name = "nvme"
    migration_imports = ("vfu_devices.nvme.migration",)
    identity = PciIdentity(vendor_id=0x1234, device_id=0xFE10, class_code=0x010802, revision=1,
                           subsystem_vendor_id=0x1234, subsystem_id=0x0010)
    bar0 = MemoryBar(BAR0_SIZE, is64=True)
    capabilities = (
        PowerManagement(),
        Msix(vectors=MSIX_VECTORS, table_bar=0, table_offset=MSIX_TABLE_OFFSET, pba_offset=MSIX_PBA_OFFSET),
        PciExpress(),
    )
    intx = True
    #: "opaque" (opaque/vfu-nvme) and "standard" (nvme-ctrl/std/1), see .migration_format
    migration_formats = "vfu_devices.nvme.migration_format:NVME_FORMATS"
    #: what --fault rules can match and do (devices/nvme/faults.py, docs/faults.md)
    fault_domain = NVME_FAULTS

    def __init__(
        self,
        backends: list[BlockBackend | BackendSpec] | None = None,
        *,
        lba_size: int = 512,
        serial: str = "VFU0001",
        model: str = "vfu-server NVMe",
        firmware: str = "0.1",
        max_queues: int = 64,
        max_queue_entries: int = 1024,
        poll_us: int = DEFAULT_POLL_US,
        volatile_cache: int | None = None,
        mdts: int = MDTS,
    ) -> None:
        super().__init__()
        if not 1 <= mdts <= MDTS_MAX:
            raise ValueError(f"--mdts must be 1..{MDTS_MAX}")
        #: bytes of volatile write cache over each namespace (None: writes go to the backend)
        self.volatile_cache = volatile_cache
        self.faults = FaultSet(NVME_FAULTS)
        #: commands a fault holds (delay, hang, fatal, reset) -> their SQ and whether a quiesce
        #: lets them run (delay, hang) rather than drops them: dropped at reset or SQ deletion
        self._held: dict[trio.CancelScope, tuple[int, bool]] = {}
        #: holds that :meth:`_release_held` ended: their commands run
        self._released: set[trio.CancelScope] = set()
        self._disable_seen = False
        #: OCP Error Injection entries as the host set them, with the rule each became (.ocp)
        self.ocp_injections: list[tuple[bytes, int | None]] = []
        #: why the last quiesce could not make the namespaces' writes visible to another
        #: client of their storage (None: it did): a live handover is refused then
        self._writes_not_visible: str | None = None
        if not 0 <= poll_us <= MAX_POLL_US:
            raise ValueError(f"--poll-us must be 0..{MAX_POLL_US}")
        #: the longest an I/O SQ that ran dry polls its shadow doorbell (0: never), see
        #: vfu_server.pci.polling
        self.poll_ns = poll_us * 1000
        if not 1 <= max_queues <= MAX_QUEUES_LIMIT:
            raise ValueError(f"--max-queues must be 1..{MAX_QUEUES_LIMIT}")
        if not 2 <= max_queue_entries <= 65536:
            raise ValueError("--max-queue-entries must be 2..65536")
        self.lba_format = lba_format_for(lba_size)
        self.sources: list[BlockBackend | BackendSpec] = list(backends or [MemoryBackend(64 << 20)])
        self.info = identify.ControllerInfo(
            vendor_id=self.identity.vendor_id,
            subsystem_vendor_id=self.identity.subsystem_vendor_id,
            serial=serial,
            model=model,
            firmware=firmware,
            mdts=mdts,
            max_queues=max_queues,
            max_queue_entries=max_queue_entries,
            namespace_count=len(self.sources),
        )
        self.mdts_bytes = (1 << mdts) * 4096
        self.state = NvmeState(
            namespaces=[NamespaceState(i + 1, self.lba_format) for i in range(len(self.sources))]
        )
        self.namespaces: dict[int, Namespace] = {}
        self.admin = AdminCommands(self)
        self.io = IoCommands(self)
        #: plain Reads and Writes in C (.fastio), when the helper could be built
        self.fastio: FastIo | None = None
        #: I/O statistics per SQ ("sq1", ...; the control socket's ``stats``)
        self.iostats = IoStats(BLOCK_KINDS)
        self._qstats: dict[int, QueueStats] = {}
        # runtime (not state): rebuilt on enable
        self.sq_rt: dict[int, SqRuntime] = {}
        self.cq_rt: dict[int, CqRuntime] = {}
        self.inflight = InflightCounter()
        self.page_size = 4096
        self._cc_changed = trio.Event()
        self._irq_wake = trio.Event()
        self._irq_pending: set[int] = set()
        # Completions of inline commands: posted at once, signalled once per SQ batch.
        self._defer_irq = False
        self._irq_deferred = False
        self._intx_level = False
        self._ready = trio.Event()
        self._tasks: trio.Nursery | None = None
        self._session: trio.Nursery | None = None
        self._session_scope: trio.CancelScope | None = None
        self._session_done: trio.Event | None = None
        self._power_on_anchor = time.monotonic()
        self._control_lock = trio.Lock()
        # migration: _paused stops fetching (and CC processing), _frozen also stops posting
        # completions; both end on resume(). _resumed is set while not paused.
        self._paused = False
        self._frozen = False
        self._resumed = trio.Event()
        self._resumed.set()
        #: paused because the client went away (not for a migration); the next register write
        #: from a client resumes it
        self._detached = False

    # -- command line -----------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--backing", action="append", default=[], metavar="FILE|nbd://...",
                            help="a namespace's storage (repeat for more namespaces)")
        parser.add_argument("--size", default=None, metavar="BYTES",
                            help="namespace size (RAM namespaces, or to create a backing file); default 64M")
        parser.add_argument("--namespaces", type=int, default=1, metavar="N",
                            help="number of RAM namespaces when there is no --backing")
        parser.add_argument("--lba-size", type=int, default=512, choices=[512, 4096])
        parser.add_argument("--serial", default="VFU0001")
        parser.add_argument("--model", default="vfu-server NVMe")
        parser.add_argument("--firmware", default="0.1")
        parser.add_argument("--max-queues", type=int, default=64, metavar="N",
                            help=f"I/O queue pairs (1..{MAX_QUEUES_LIMIT})")
        parser.add_argument("--max-queue-entries", type=int, default=1024, metavar="N",
                            help="entries per queue (CAP.MQES + 1)")
        parser.add_argument("--mdts", type=int, default=MDTS, metavar="N",
                            help=f"largest transfer: 2^N 4 KiB pages (1..{MDTS_MAX}; default %(default)s, 512 KiB; "
                                 "the guest sees it, so a handover successor of a server of before 2026-12 needs --mdts 5)")
        parser.add_argument("--read-only", action="store_true")
        parser.add_argument("--backing-io", choices=BACKING_IO, default="sync",
                            help="how file backings do their I/O: sync (preadv/pwritev inline from the page cache, a worker thread where that would block; default) or uring (io_uring; sync where the kernel or build refuses it)")
        parser.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US, metavar="US",
                            help="with shadow doorbells, keep polling an I/O queue that ran dry "
                                 "for US microseconds before asking the guest for a doorbell "
                                 "write (adaptive, up to US; trades CPU for latency; 0: off; default %(default)s)")
        parser.add_argument("--volatile-cache", nargs="?", const="64M", default=None, metavar="SIZE",
                            help="keep unflushed, non-FUA writes in a volatile cache of up to SIZE "
                                 "(default 64M) that the control socket's power-cut drops (docs/faults.md)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NvmeController:
        sources: list[BlockBackend | BackendSpec] = []
        try:
            if args.backing:
                for backing in args.backing:
                    spec = parse_backend_spec(backing, args.size, args.read_only)
                    if spec.kind == "file":
                        # Opened now so that a bad path is a command-line error, not a crash later.
                        sources.append(open_file_backend(replace(spec, io=args.backing_io)))
                    else:
                        sources.append(spec)
                if args.backing_io != "sync" and not any(isinstance(s, FileBackend) for s in sources):
                    raise ValueError(f"--backing-io {args.backing_io} is for file backings (RAM and NBD do their own I/O)")
            else:
                if args.backing_io != "sync":
                    raise ValueError(f"--backing-io {args.backing_io} is for file backings, not RAM namespaces")
                size = parse_size(args.size or "64M")
                if not 1 <= args.namespaces <= 1024:
                    raise ValueError("--namespaces must be 1..1024")
                sources = [MemoryBackend(size, read_only=args.read_only) for _ in range(args.namespaces)]
        except BlockError as exc:
            raise ValueError(str(exc)) from None
        cache = None if args.volatile_cache is None else parse_size(args.volatile_cache)
        return cls(sources, lba_size=args.lba_size, serial=args.serial, model=args.model,
                   firmware=args.firmware, max_queues=args.max_queues,
                   max_queue_entries=args.max_queue_entries, poll_us=args.poll_us,
                   volatile_cache=cache, mdts=args.mdts)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["namespaces"] = [ns.backend.describe() for ns in self.namespaces.values()]
        return d

    def sandbox_needs(self) -> SandboxNeeds:
        return SandboxNeeds.union(ns.backend.sandbox_needs() for ns in self.namespaces.values())

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # Backends (NBD connections) open here; "listening" waits for task_status.started().
        async with contextlib.AsyncExitStack() as stack:
            for i, source in enumerate(self.sources):
                if isinstance(source, BackendSpec):
                    backend = await stack.enter_async_context(open_backend(source))
                else:
                    backend = source
                    stack.push_async_callback(backend.aclose)
                if self.volatile_cache is not None and not backend.read_only:
                    backend = VolatileCache(backend, self.volatile_cache)
                ns_state = self.state.namespaces[i]
                ns = Namespace(ns_state, backend)
                if ns.nsze == 0:
                    raise ValueError(f"namespace {i + 1}: backend of {backend.size} bytes is smaller than one block")
                self.namespaces[ns_state.nsid] = ns
            # The C fast path: compiled on the very first start (in a thread), then from the cache.
            module = await load_fastio()
            self.fastio = FastIo(self, module) if module is not None else None
            async with trio.open_nursery() as nursery:
                self._tasks = nursery
                nursery.start_soon(self.dma.executor.run_task, self._control_loop)
                nursery.start_soon(self.dma.executor.run_task, self._interrupt_loop)
                self._ready.set()
                task_status.started()
                await trio.sleep_forever()

    async def shutdown(self) -> None:
        """SIGTERM: complete what the guest submitted, then make every write durable."""
        if not self._ready.is_set():
            return
        async with self._control_lock:
            await self._quiesce()
            await self.flush_all()

    async def reset(self) -> None:  # type: ignore[override]
        """DEVICE_RESET / FLR: the whole controller returns to power-on state."""
        async with self._control_lock:
            await self._quiesce()
            self._clear_controller(keep_admin_regs=False)

    async def client_disconnected(self) -> None:  # type: ignore[override]
        # The spec's Client Disconnection: "the device state should otherwise be retained".
        # Guest memory went with the client, so stop touching it the way a migration stops the
        # controller (completions that cannot be posted are held, as state), and keep the rest
        # (registers, queues, features, AERs) for the next client, as the virtio devices do.
        # It runs again on that client's first register write: by then it has mapped memory.
        if self._ready.is_set() and not self._paused:
            await self.quiesce()
            self._detached = True

    # -- migration (formats in .migration_format, state mapping in .migration) -----------------

    async def quiesce(self) -> None:
        """Leaving a running migration state: stop fetching SQ entries, let every fetched
        command complete (its CQE posted, or held as a pending completion when its CQ is full),
        deliver the interrupts owed, then stop touching guest memory until :meth:`resume`.
        Outstanding AERs stay outstanding: they are state (AER record).

        Commands a fault rule delays or hangs run now (a command held until the reset after a
        ``fatal`` or ``reset`` rule is dropped), then every write the guest saw complete is
        made visible to another client of the backend (``make_writes_visible``: what a
        volatile cache, --volatile-cache, holds is written back, an NBD export is flushed): a
        live handover's successor, or a migration's destination on shared storage, opens the
        backend anew and must read them (docs/faults.md, docs/handover.md). If that fails,
        a handover is refused (:meth:`handover_export`)."""
        self._paused = True
        if self._resumed.is_set():
            self._resumed = trio.Event()
        self._release_held()
        async with self._control_lock:
            with trio.move_on_after(QUIESCE_TIMEOUT) as timeout:
                while True:
                    # An admin command (Create I/O SQ) may start a queue while we wait.
                    running = [rt for rt in self.sq_rt.values() if not rt.done.is_set()]
                    if not running:
                        break
                    for rt in running:
                        rt.stop = True
                        rt.wake.set()
                    for rt in running:
                        await rt.done.wait()
                await self.inflight.wait_zero()
            if timeout.cancelled_caught:
                log.warning("migration: commands still in flight after %.0f s", QUIESCE_TIMEOUT)
            self.sq_rt.clear()
            self._frozen = True
            self._flush_interrupts()
            self._writes_not_visible = None
            for ns in self.namespaces.values():
                try:
                    await ns.backend.make_writes_visible()
                except BlockError as exc:
                    log.error("namespace %d: making its writes visible to other clients failed: %s", ns.nsid, exc)
                    self._writes_not_visible = f"namespace {ns.nsid}: {exc}"

    def resume(self) -> None:
        """Running again (after a load, a cancelled migration or a reset): fetch from every SQ
        the state holds, post held completions, and re-signal CQs with unconsumed entries (the
        host may have missed an interrupt across the switch-over; a spurious one is harmless)."""
        self._paused = self._frozen = self._detached = False
        self._resumed.set()
        if self._tasks is not None:
            self._tasks.start_soon(self.dma.executor.run_task, self._resume_queues)

    async def _resume_queues(self) -> None:
        async with self._control_lock:
            if self._paused:
                return
            s = self.state
            if s.regs.csts & CSTS_RDY and s.sqs and self._session is None and self._tasks is not None:
                self._session_done = trio.Event()
                await self._tasks.start(self._run_session)
            if self._session is not None:
                for qid in sorted(s.sqs):
                    if qid not in self.sq_rt:
                        self.start_sq(qid)
            for cq in list(s.cqs.values()):
                self.cq_rt.setdefault(cq.qid, CqRuntime(cq.qid))
                self._drain_waiting(cq)
                if cq_pending(cq):
                    self._irq_pending.add(cq.qid)
            if self._irq_pending:
                self._irq_wake.set()
            self._update_intx()
            # A CC write that arrived just before the stop is applied now.
            self._cc_changed.set()

    # .migration and the state tree it builds are imported by the first migration, not with
    # the controller: a server that never migrates does not pay for ~40 dataclasses.

    def migration_profile(self) -> PciProfile:
        from . import migration as nvme_migration

        return nvme_migration.profile(self, super().migration_profile())

    # -- live handover: RAM namespaces move as memfds; files and NBD the successor reopens --

    def _backends(self) -> list[BlockBackend | None]:
        return [ns.backend for _, ns in sorted(self.namespaces.items())]

    def handover_export(self) -> tuple[dict[str, Any], list[int]]:
        if self._writes_not_visible is not None:
            from vfu_server.handover import HandoverError

            raise HandoverError(errno.EIO, "the successor might not read every write the guest saw complete: "
                                           + self._writes_not_visible)
        return export_ram_disks(self._backends())

    def handover_adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        adopt_ram_disks(self._backends(), data, fds)

    def decode_device_abi(self, abi: bytes) -> Any:
        from .migration_format import decode_device_abi

        return decode_device_abi(abi)

    def save_state(self) -> NvmeMigState:
        from . import migration as nvme_migration

        return nvme_migration.snapshot(self)

    def load_state(self, state: NvmeMigState) -> None:
        from . import migration as nvme_migration

        nvme_migration.apply(self, state)

    def reset_state(self) -> None:
        """Entering RESUMING (the device is quiesced): power-on state, synchronously."""
        self.config.reset()
        self._reset_msix_table()
        self.irqs.set_intx(False)
        if self._session_scope is not None:
            self._session_scope.cancel()  # its queue tasks already ended in quiesce()
        self._session = self._session_scope = None
        self.sq_rt.clear()
        self.cq_rt.clear()
        self.inflight = InflightCounter()
        self._clear_controller(keep_admin_regs=False)
        # Drop a CC change that is still pending, but never the Event the control loop waits
        # on: replaced, it would leave the loop deaf to every later CC write (a controller
        # loaded disabled could then never be enabled).
        if self._cc_changed.is_set():
            self._cc_changed = trio.Event()

    # -- registers -----------------------------------------------------------------------------

    @property
    def cap(self) -> int:
        return ((self.info.max_queue_entries - 1)
                | 1 << 16  # CQR: queues must be physically contiguous
                | TIMEOUT_UNITS << 24
                | 1 << 37  # CSS: NVM command set
                | MPSMAX << 52)

    def _register_image(self) -> bytes:
        r = self.state.regs
        return struct.pack("<QIIIIIIIIQQII", self.cap, r.vs, r.intms, r.intms, r.cc, 0, r.csts, 0,
                           r.aqa, r.asq, r.acq, 0, 0)

    @bar0.reader
    def read_register(self, offset: int, size: int) -> int:
        if offset < 0x40:
            return int.from_bytes(self._register_image()[offset : offset + size].ljust(size, b"\0"), "little")
        return 0  # doorbells and reserved space read as zero

    @bar0.writer
    def write_register(self, offset: int, size: int, value: int) -> None:
        if self._detached and (self.migration is None or self.migration.running):
            self.resume()
        if offset >= REG_DOORBELLS:
            if size == 4 and offset % 4 == 0:
                self._doorbell((offset - REG_DOORBELLS) // 4, value & 0xFFFF)
            return
        r = self.state.regs
        for reg, width in ((REG_INTMS, 4), (REG_INTMC, 4), (REG_CC, 4), (REG_AQA, 4), (REG_ASQ, 8), (REG_ACQ, 8)):
            part = _merge(0, reg, width, offset, size, value)
            if part is None:
                continue
            if reg == REG_INTMS:
                r.intms |= part
                self._update_intx()
            elif reg == REG_INTMC:
                r.intms &= ~part
                self._update_intx()
            elif reg == REG_CC:
                new = _merge(r.cc, reg, width, offset, size, value)
                assert new is not None
                if r.cc & CC_EN and not new & CC_EN:
                    # A reset, even if EN is set again before the control loop looks (CSTS.RDY
                    # may already read 0 after a power cut, so a driver need not wait).
                    self._disable_seen = True
                r.cc = new
                self._cc_changed.set()
            elif reg == REG_AQA:
                r.aqa = _merge(r.aqa, reg, width, offset, size, value) or 0
                r.aqa &= 0x0FFF0FFF
            elif reg == REG_ASQ:
                r.asq = (_merge(r.asq, reg, width, offset, size, value) or 0) & ~0xFFF
            elif reg == REG_ACQ:
                r.acq = (_merge(r.acq, reg, width, offset, size, value) or 0) & ~0xFFF

    def _doorbell(self, index: int, value: int) -> None:
        if not self.state.regs.csts & CSTS_RDY:
            return
        qid, completion = index >> 1, bool(index & 1)
        if completion:
            cq = self.state.cqs.get(qid)
            if cq is None:
                self.async_event(AsyncEventType.ERROR, AEI_ERROR_INVALID_DOORBELL, 0x01)
                return
            if not valid_cq_head(cq, value):
                self.async_event(AsyncEventType.ERROR, AEI_ERROR_INVALID_DOORBELL_VALUE, 0x01)
                return
            cq.head = value
            if qid and self.state.shadow.enabled and not self._msix_mode():
                self._cq_event_idx(cq)  # INTx: have the next head update ring again
            self._drain_waiting(cq)
            self._update_intx()
            return
        sq = self.state.sqs.get(qid)
        if sq is None:
            self.async_event(AsyncEventType.ERROR, AEI_ERROR_INVALID_DOORBELL, 0x01)
            return
        if value >= sq.size:
            self.async_event(AsyncEventType.ERROR, AEI_ERROR_INVALID_DOORBELL_VALUE, 0x01)
            return
        sq.tail = value
        shadow = self.state.shadow
        if shadow.enabled and qid == 0:
            # Linux never updates the admin queue's shadow doorbell; mirroring the MMIO value keeps
            # the shadow authoritative for every queue without racing I/O queue submitters.
            write_shadow(self.dma, shadow, 0, False, value)
        rt = self.sq_rt.get(qid)
        if rt is not None:
            if qid and rt.poll.max_ns:
                rt.poll.arrived(self._driver_behind(sq))
            rt.poll.woken()
            # Inline saves a driver that waits for us the task's wake-up; a busy one (behind on
            # its completions) gains more from the scheduler pass before the task runs: more
            # of its commands are in by then and share one interrupt.
            if qid and rt.idle and not rt.wake.is_set() and not rt.poll.driver_busy and self._submit_inline(sq, rt):
                return
            rt.wake.set()

    def _submit_inline(self, sq: SubmissionQueueState, rt: SqRuntime) -> bool:
        """SQ tail doorbell while the SQ task is parked: fetch and run the new commands right
        here, in order, as the SQ loop would, and signal their completions at once. This saves
        the task's wake-up (a scheduler pass) per doorbell, which is most of QD1's cost.

        The task stays parked meanwhile (nothing else in the thread runs before this returns),
        so the SQ still has one executor. True: the SQ is empty again and its event index is
        written. False: wake the task for the rest (more than a batch, in-flight limit, an SQ
        entry that cannot be fetched, anything unexpected). Never raises."""
        if self._paused or rt.stop or self._session is None:
            return False
        limit = min(IO_INFLIGHT_PER_SQ, sq.size)
        try:
            for _ in range(INLINE_BATCH):
                if sq.head == self._sq_tail(sq):
                    shadow = self.state.shadow
                    if shadow.enabled and rt.poll.window_ns:
                        return False  # the woken task polls the shadow tail for a while
                    if shadow.enabled:
                        write_event_idx(self.dma, shadow, sq.qid, False, sq.tail)
                        if self._sq_tail(sq) != sq.head:
                            continue
                    rt.poll.ran_dry()
                    return True
                if rt.inflight.count >= limit:
                    return False
                if self.fastio is not None and self._run_fast(sq):
                    continue
                try:
                    raw = read_sqe(self.dma, sq)
                except DmaError:
                    return False  # the task meets it again and makes the controller fatal
                sq.head = (sq.head + 1) % sq.size
                self._start_io(sq, rt, Command.decode(raw, sq.qid))
            return False
        except Exception:
            log.exception("SQ %d: inline submission failed", sq.qid)
            return False
        finally:
            self._flush_deferred()

    # -- controller enable / disable / shutdown ------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            await self._cc_changed.wait()
            async with self._control_lock:
                if not self._paused:
                    self._cc_changed = trio.Event()
                    try:
                        await self._apply_cc()
                    except Exception:
                        log.exception("controller state change failed")
                        self.state.regs.csts |= CSTS_CFS
            if self._paused:
                # Stopped for migration: the change is applied (here or on the destination)
                # when the device runs again.
                await self._resumed.wait()

    async def _apply_cc(self) -> None:
        r = self.state.regs
        enabled = bool(r.cc & CC_EN)
        if not enabled or self._disable_seen:
            self._disable_seen = False
            if self._session is not None or r.csts:
                await self._quiesce()
                self._clear_controller(keep_admin_regs=True)
                r = self.state.regs  # a new register set, CC and the admin queue kept
            if not enabled:
                return
        if self._session is None and not r.csts & (CSTS_RDY | CSTS_CFS):
            await self._enable()
        shn = (r.cc >> 14) & 3
        if shn and self._session is not None and (r.csts >> 2) & 3 == SHST_NORMAL:
            r.csts = (r.csts & ~0xC) | SHST_OCCURRING << 2
            with trio.move_on_after(QUIESCE_TIMEOUT):
                await self.inflight.wait_zero()
            await self.flush_all()
            r.csts = (r.csts & ~0xC) | SHST_COMPLETE << 2

    async def _enable(self) -> None:
        r = self.state.regs
        cc = r.cc
        mps = (cc >> 7) & 0xF
        css, ams = (cc >> 4) & 7, (cc >> 11) & 7
        asqs, acqs = (r.aqa & 0xFFF) + 1, ((r.aqa >> 16) & 0xFFF) + 1
        page = 4096 << mps
        problems = []
        if mps > MPSMAX:
            problems.append(f"MPS {mps}")
        if css != 0:
            problems.append(f"CSS {css}")
        if ams != 0:
            problems.append(f"AMS {ams}")
        if asqs < 2 or acqs < 2 or asqs > self.info.max_queue_entries or acqs > self.info.max_queue_entries:
            problems.append(f"admin queue sizes {asqs}/{acqs}")
        if r.asq % page or r.acq % page:
            problems.append(f"admin queue addresses {r.asq:#x}/{r.acq:#x}")
        if problems:
            log.warning("controller enable refused: %s", ", ".join(problems))
            r.csts |= CSTS_CFS
            return
        self.page_size = page
        self.state.cqs[0] = CompletionQueueState(0, r.acq, acqs, vector=0)
        self.state.sqs[0] = SubmissionQueueState(0, r.asq, asqs, cqid=0)
        self._session_done = trio.Event()
        assert self._tasks is not None
        await self._tasks.start(self._run_session)
        self.cq_rt[0] = CqRuntime(0)
        self.start_sq(0)
        r.csts = CSTS_RDY

    async def _run_session(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        done = self._session_done
        scope = None
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    self._session, self._session_scope = nursery, scope
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            if self._session_scope is scope:  # reset_state() may have moved on already
                self._session = self._session_scope = None
            if done is not None:
                done.set()

    async def _quiesce(self, *, lose_inflight: bool = False) -> None:
        """Stop fetching, let in-flight commands complete (``lose_inflight``: a power cut, they
        never do), then end the session's tasks."""
        self._drop_held()  # commands a fault holds never complete: a reset drops them
        for rt in self.sq_rt.values():
            rt.stop = True
            rt.wake.set()
        with trio.move_on_after(0 if lose_inflight else QUIESCE_TIMEOUT) as timeout:
            for rt in list(self.sq_rt.values()):
                await rt.done.wait()
            await self.inflight.wait_zero()
        if timeout.cancelled_caught and not lose_inflight:
            log.warning("commands still in flight after %.0f s; abandoning them", QUIESCE_TIMEOUT)
        if self._session_scope is not None:
            self._session_scope.cancel()
            if self._session_done is not None:
                await self._session_done.wait()
        self.sq_rt.clear()
        self.cq_rt.clear()
        self.inflight = InflightCounter()

    def _clear_controller(self, *, keep_admin_regs: bool) -> None:
        s = self.state
        old = s.regs
        s.regs = Registers()
        if keep_admin_regs:
            s.regs.cc, s.regs.aqa, s.regs.asq, s.regs.acq = old.cc, old.aqa, old.asq, old.acq
        s.sqs.clear()
        s.cqs.clear()
        s.shadow = type(s.shadow)()
        s.features = Features()
        s.aer = type(s.aer)()
        self._irq_pending.clear()
        if self._intx_level:
            self._intx_level = False
            self.set_intx(False)

    async def flush_all(self) -> None:
        for ns in self.namespaces.values():
            if ns.backend.read_only:
                continue
            try:
                await ns.backend.flush()
            except BlockError as exc:
                log.error("namespace %d: flush failed: %s", ns.nsid, exc)

    # -- queues --------------------------------------------------------------------------------

    def start_sq(self, qid: int) -> None:
        if self._paused:
            return  # resume() starts every SQ of the state
        rt = SqRuntime(qid, poll=AdaptivePoll(self.poll_ns if qid else 0))
        self.sq_rt[qid] = rt
        assert self._session is not None
        self._session.start_soon(self.dma.executor.run_task, self._sq_loop, rt, name=f"nvme-sq{qid}")

    async def stop_sq(self, qid: int) -> None:
        """Stop fetching from SQ ``qid`` and wait until its commands have completed."""
        rt = self.sq_rt.get(qid)
        if rt is None:
            return
        rt.stop = True
        rt.wake.set()
        self._drop_held(qid)  # deleting an SQ aborts its commands
        if qid != 0:
            await rt.done.wait()
        await rt.inflight.wait_zero()
        del self.sq_rt[qid]

    def start_cq(self, qid: int) -> None:
        self.cq_rt[qid] = CqRuntime(qid)

    def _driver_behind(self, sq: SubmissionQueueState) -> bool:
        """The host has not yet consumed two or more completions posted on ``sq``'s CQ. One is
        not enough: a driver may finish a request, and its submitter may send the next, before
        it writes the CQ head."""
        cq = self.state.cqs.get(sq.cqid)
        return cq is not None and (cq.tail - self._host_cq_head(cq)) % cq.size >= 2

    def _sq_tail(self, sq: SubmissionQueueState) -> int:
        shadow = self.state.shadow
        if shadow.enabled:
            value = read_shadow(self.dma, shadow, sq.qid, False)
            if value is not None and value < sq.size:
                sq.tail = value
        return sq.tail

    async def _sq_loop(self, rt: SqRuntime) -> None:
        qid = rt.qid
        try:
            fetched = 0
            while not rt.stop:
                sq = self.state.sqs.get(qid)
                if sq is None:
                    return
                if sq.head == self._sq_tail(sq):
                    self._flush_deferred()
                    shadow = self.state.shadow
                    # No polling through DMA_READ messages: each look would be a round trip
                    # on the client's main loop.
                    if shadow.enabled and rt.poll.max_ns and not rt.poll.driver_busy and not self.dma.message_mode:
                        # While we look, the host need not ring: an event index one behind
                        # the tail is crossed only after a whole lap of the queue.
                        write_event_idx(self.dma, shadow, qid, False, (sq.tail - 1) % sq.size)
                        if await rt.poll.poll(lambda sq=sq: self._sq_tail(sq) != sq.head,
                                              lambda: rt.stop or self._paused):
                            rt.poll.arrived(self._driver_behind(sq))
                            continue
                    if shadow.enabled:
                        # Ask the host to ring the MMIO doorbell once it moves past what we
                        # consumed, then look again: it may have moved before the index landed.
                        write_event_idx(self.dma, shadow, qid, False, sq.tail)
                        if self._sq_tail(sq) != sq.head:
                            rt.poll.woken()
                            continue
                    rt.idle = True
                    try:
                        await rt.wake.wait()
                    finally:
                        rt.idle = False
                    rt.wake = trio.Event()
                    rt.poll.woken()
                    continue
                if qid != 0 and rt.inflight.count >= min(IO_INFLIGHT_PER_SQ, sq.size):
                    self._flush_deferred()
                    await rt.inflight.wait_below(min(IO_INFLIGHT_PER_SQ, sq.size))
                    continue
                if qid and self.fastio is not None:
                    done = self._run_fast(sq)
                    if done:
                        fetched += done
                        if fetched >= 64:
                            fetched = 0
                            self._flush_deferred()
                            await trio.lowlevel.checkpoint()
                        continue
                try:
                    raw = read_sqe(self.dma, sq)
                except DmaError as exc:
                    log.warning("SQ %d: cannot fetch entry %d: %s; controller fatal", qid, sq.head, exc)
                    self.state.regs.csts |= CSTS_CFS
                    return
                sq.head = (sq.head + 1) % sq.size
                cmd = Command.decode(raw, qid)
                if qid == 0:
                    self._flush_deferred()
                    await self._execute(sq, rt, cmd, self.admin.execute)
                else:
                    self._start_io(sq, rt, cmd)
                fetched += 1
                if fetched >= 64:
                    fetched = 0
                    self._flush_deferred()
                    await trio.lowlevel.checkpoint()
        finally:
            self._flush_deferred()
            rt.done.set()

    def _run_fast(self, sq: SubmissionQueueState) -> int:
        """Complete what C can from the head of I/O SQ ``sq`` (see .fastio); how many. Their
        interrupt is deferred like that of inline commands."""
        assert self.fastio is not None
        cq = self.state.cqs.get(sq.cqid)
        cq_rt = self.cq_rt.get(sq.cqid)
        # Python must see every write while dirty pages are logged, and held completions
        # go out before new ones.
        if cq is None or cq_rt is None or cq_rt.waiting or self._frozen or self.dma.dirty_hook is not None:
            return 0
        if self.faults.active and self.faults.could_match(NVME_FAULTS.fast_ops, sq.qid):
            return 0  # a rule may want one of these commands: Python looks at each
        try:
            done = self.fastio.run(sq, cq)
        except Exception:
            log.exception("SQ %d: fast path failed; Python only from now on", sq.qid)
            self.fastio = None
            return 0
        if done:
            self._irq_pending.add(cq.qid)
            self._irq_deferred = True
        return done

    def _start_io(self, sq: SubmissionQueueState, rt: SqRuntime, cmd: Command) -> None:
        """An I/O command just fetched: completed inline, or else given its own task."""
        t0 = perf_counter_ns()
        if self.faults.active and self._start_faulted(sq, rt, cmd, t0):
            return
        if not self._execute_inline(sq, cmd, t0):
            rt.inflight.inc()
            self.inflight.inc()
            self.queue_stats(sq.qid).in_flight += 1
            assert self._session is not None
            self.dma.executor.start_soon(self._session, self._execute_io_task, sq, rt, cmd, t0,
                                         self.io.begin(cmd))

    def queue_stats(self, qid: int) -> QueueStats:
        q = self._qstats.get(qid)
        if q is None:
            q = self._qstats[qid] = self.iostats.queue(f"sq{qid}")
        return q

    def _count(self, qid: int, cmd: Command, status: int, t0: int) -> None:
        """One I/O command completed, into its SQ's statistics."""
        q = self._qstats.get(qid) or self.queue_stats(qid)
        kind = _KIND.get(cmd.opcode, OTHER)
        nbytes = 0
        if not status:
            if kind <= WRITE:
                nbytes = ((cmd.cdw12 & 0xFFFF) + 1) << self.namespaces[cmd.nsid].lba_shift
        else:
            q.error(f"{status:#06x}")
        q.record(kind, nbytes, perf_counter_ns() - t0)

    def _execute_inline(self, sq: SubmissionQueueState, cmd: Command, t0: int) -> bool:
        """Complete an I/O command right here when the backend can do it without blocking.

        The interrupt for it is deferred: the SQ loop signals once for the whole batch before
        it next waits (:meth:`_flush_deferred`)."""
        try:
            if not self.io.try_inline(cmd):
                return False
            status = 0
        except Exception as exc:
            status = self._status_of(exc, sq, cmd)
        self._defer_irq = True
        try:
            self.complete(sq.qid, cmd.cid, status, 0)
        finally:
            self._defer_irq = False
        self._count(sq.qid, cmd, status, t0)
        return True

    def _flush_deferred(self) -> None:
        """Signal the completions that inline commands posted (one interrupt per vector), then
        start the write-back the C path noted (write-behind: off the host's wait)."""
        if self._irq_deferred:
            self._irq_deferred = False
            self._flush_interrupts()
        fast = self.fastio
        if fast is not None and fast.write_behind.pending:
            fast.write_behind.start()

    async def _execute_io_task(self, sq: SubmissionQueueState, rt: SqRuntime, cmd: Command, t0: int,
                               handler: Callable[[Command], Awaitable[int | None]]) -> None:
        status: int | None = None
        try:
            status = await self._execute(sq, rt, cmd, handler)
        finally:
            rt.inflight.dec()
            self.inflight.dec()
            self.queue_stats(sq.qid).in_flight -= 1
            if status is not None:
                self._count(sq.qid, cmd, status, t0)

    # -- fault injection (vfu_server.faults, .faults) --------------------------------------------

    def _start_faulted(self, sq: SubmissionQueueState, rt: SqRuntime, cmd: Command, t0: int) -> bool:
        """Ask the rules about an I/O command; True: a rule fired and a task does its action."""
        lba, blocks = None, 1
        if cmd.opcode in LBA_OPCODES:
            lba, blocks = cmd.cdw10 | cmd.cdw11 << 32, (cmd.cdw12 & 0xFFFF) + 1
        rule = self.faults.match(cmd.opcode, ns=cmd.nsid, lba=lba, blocks=blocks, queue=sq.qid)
        if rule is None:
            return False
        log.info("SQ %d cid %d opcode %#x: fault rule %d (%s)", sq.qid, cmd.cid, cmd.opcode, rule.id, rule.action)
        rt.inflight.inc()
        self.inflight.inc()
        self.queue_stats(sq.qid).in_flight += 1
        assert self._session is not None
        self.dma.executor.start_soon(self._session, self._faulted_io_task, sq, rt, cmd, rule, t0)
        return True

    async def _faulted_io_task(self, sq: SubmissionQueueState, rt: SqRuntime, cmd: Command, rule: Rule,
                               t0: int) -> None:
        """A fault rule's action on an I/O command. The statistics count what the guest sees:
        a completion with its status (a rule's status is an error of that status), and a
        command that never completes (dropped by a reset, a power cut or its SQ's deletion)
        as an error ``dropped`` that is no request."""
        status: int | None = None
        try:
            action = rule.action
            if action == "delay":
                if not await self._hold(rt, None, rule.delay_ms / 1000):
                    return  # a reset came first: dropped like a held command
            elif action == "hang":
                if not await self._hold(rt, rule):
                    return  # dropped by a reset or the SQ's deletion: no completion
            elif action in ("fatal", "reset"):
                # The controller stops fetching I/O (fatal also sets CSTS.CFS) and this command
                # waits for the reset that drops it.
                self._halt_io(fatal=action == "fatal")
                await self._hold(rt, None)
                return
            elif action == "status":
                assert rule.status is not None
                if rule.status & 0x7FF:
                    self._log_error(sq.qid, cmd, rule.status)
                self.complete(sq.qid, cmd.cid, rule.status, 0)
                status = rule.status
                return
            elif action in ("corrupt", "torn") and cmd.opcode in (IoOpcode.READ, IoOpcode.WRITE):
                status = await self._execute(sq, rt, cmd, lambda c: self.io.execute_faulted(c, rule), rule.status)
                return
            status = await self._execute(sq, rt, cmd, self.io.execute)
        finally:
            rt.inflight.dec()
            self.inflight.dec()
            q = self.queue_stats(sq.qid)
            q.in_flight -= 1
            if status is not None:
                self._count(sq.qid, cmd, status, t0)
            else:
                q.error("dropped")

    async def _hold(self, rt: SqRuntime, rule: Rule | None, seconds: float | None = None) -> bool:
        """Keep a command until ``rule`` is removed or ``seconds`` have passed (True: run it
        now), or until a reset, a power cut or its SQ's deletion drops it (False).

        A migration's quiesce or a live handover (:meth:`quiesce`) ends a delay or a hang early
        (True: the command runs and completes before the state is saved); a command waiting for
        the reset after a ``fatal`` or ``reset`` rule is dropped then (False)."""
        releasable = rule is not None or seconds is not None
        if self._paused:
            return releasable
        if rt.stop:
            return False  # its SQ is being stopped: _drop_held() may have run already
        with trio.CancelScope() as scope:
            self._held[scope] = (rt.qid, releasable)
            try:
                if seconds is not None:
                    await trio.sleep(seconds)
                elif rule is None:
                    await trio.sleep_forever()
                else:
                    await rule.wait_removed()
            finally:
                del self._held[scope]
        if scope in self._released:
            self._released.discard(scope)
            return True
        return not scope.cancelled_caught

    def _release_held(self) -> None:
        """Quiesce: held delays and hangs run now; commands waiting for a reset are dropped."""
        for scope, (_, releasable) in list(self._held.items()):
            if releasable:
                self._released.add(scope)
            scope.cancel()

    def _drop_held(self, qid: int | None = None) -> None:
        for scope, (held_qid, _) in list(self._held.items()):
            if qid is None or held_qid == qid:
                scope.cancel()

    def _halt_io(self, *, fatal: bool) -> None:
        """Stop fetching from the I/O queues until the driver resets the controller. The admin
        queue keeps running: a driver deletes its I/O queues before it disables the controller."""
        if fatal:
            self.state.regs.csts |= CSTS_CFS
        for qid, rt in self.sq_rt.items():
            if qid:
                rt.stop = True
                rt.wake.set()

    async def power_cut(self, *, keep: float = 0.0, seed: int = 0) -> dict[str, Any]:
        """Power loss: commands in flight never complete, what the volatile caches hold is lost
        (but for a seeded random ``keep`` fraction that reached the media first), and the
        controller comes back not ready (CSTS.CFS) until the driver resets it."""
        kept = lost = 0
        async with self._control_lock:
            await self._quiesce(lose_inflight=True)
            for nsid, ns in sorted(self.namespaces.items()):
                if isinstance(ns.backend, VolatileCache):
                    cut = await ns.backend.power_cut(keep, seed + nsid - 1)
                    kept += cut["kept_bytes"]
                    lost += cut["lost_bytes"]
            enabled = bool(self.state.regs.cc & CC_EN)
            self._clear_controller(keep_admin_regs=True)
            if enabled:
                # Only CC.EN 1 -> 0 -> 1 brings it back (a disabled controller needs no reset).
                self.state.regs.csts = CSTS_CFS
        log.warning("power cut: %d bytes of volatile cache lost, %d kept", lost, kept)
        return {"kept_bytes": kept, "lost_bytes": lost, "volatile_cache": self.volatile_cache is not None}

    async def _execute(self, sq: SubmissionQueueState, rt: SqRuntime, cmd: Command,
                       handler: Callable[[Command], Awaitable[int | None]],
                       status_on_success: int | None = None) -> int | None:
        """Run a command and post its completion; its status (None: it completes later).
        ``status_on_success``: a fault rule's status for a command it changed."""
        status, dw0 = 0, 0
        try:
            result = await handler(cmd)
            if result is None:  # completes later (Asynchronous Event Request)
                return None
            dw0 = result
            if status_on_success:  # a fault rule's status for a command it changed
                status = status_on_success
                self._log_error(sq.qid, cmd, status)
        except Exception as exc:
            status = self._status_of(exc, sq, cmd)
        self.complete(sq.qid, cmd.cid, status, dw0)
        return status

    def _status_of(self, exc: Exception, sq: SubmissionQueueState, cmd: Command) -> int:
        """The completion status for a command that raised ``exc`` (logged as an error)."""
        if isinstance(exc, NvmeError):
            status = exc.field
            log.debug("SQ %d cid %d opcode %#x: %s", sq.qid, cmd.cid, cmd.opcode, exc)
        elif isinstance(exc, DmaError):
            status = Status.DATA_TRANSFER_ERROR | DNR
            log.debug("SQ %d cid %d: %s", sq.qid, cmd.cid, exc)
        elif isinstance(exc, BlockRangeError):
            status = Status.LBA_OUT_OF_RANGE | DNR
        elif isinstance(exc, BlockReadOnlyError):
            status = Status.NAMESPACE_WRITE_PROTECTED | DNR
        elif isinstance(exc, BlockError):
            log.warning("namespace %d: backend error: %s", cmd.nsid, exc)
            self.state.smart.media_errors += 1
            status = Status.UNRECOVERED_READ_ERROR if cmd.opcode == 0x02 and sq.qid else Status.WRITE_FAULT
        else:
            log.error("SQ %d cid %d opcode %#x: internal error", sq.qid, cmd.cid, cmd.opcode,
                      exc_info=exc)
            status = Status.INTERNAL_ERROR
        if status:
            self._log_error(sq.qid, cmd, status)
        return status

    def _log_error(self, sqid: int, cmd: Command, status: int) -> None:
        smart = self.state.smart
        smart.error_count += 1
        entries = self.state.error_log
        entries.append(ErrorLogEntry(smart.error_count, sqid, cmd.cid, status, nsid=cmd.nsid))
        del entries[: -identify.ERROR_LOG_ENTRIES]

    # -- completions and interrupts ------------------------------------------------------------

    def complete(self, sqid: int, cid: int, status: int, dw0: int = 0) -> None:
        """Post a completion for a command of SQ ``sqid`` (dropped if its queues are gone)."""
        sq = self.state.sqs.get(sqid)
        if sq is None:
            return
        cq = self.state.cqs.get(sq.cqid)
        rt = self.cq_rt.get(sq.cqid)
        if cq is None or rt is None:
            return
        entry = PendingCompletion(sqid, cid, status, dw0)
        if rt.waiting or self._frozen or self._cq_is_full(cq):
            rt.waiting.append(entry)
            return
        self._post(cq, entry)

    def _host_cq_head(self, cq: CompletionQueueState) -> int:
        """The CQ head as the host last published it: the shadow doorbell's value where it is
        valid (I/O CQs with shadow doorbells, written without an MMIO write), else ours."""
        shadow = self.state.shadow
        if shadow.enabled and cq.qid != 0:
            head = read_shadow(self.dma, shadow, cq.qid, True)
            if head is not None and valid_cq_head(cq, head):
                return head
        return cq.head

    def refresh_cq_head(self, cq: CompletionQueueState) -> None:
        """Take the CQ head from the shadow doorbell (I/O CQs with shadow doorbells), where
        the host publishes it without an MMIO write."""
        head = self._host_cq_head(cq)
        if head != cq.head:
            cq.head = head
            self._cq_event_idx(cq)

    def _cq_event_idx(self, cq: CompletionQueueState) -> None:
        """Where the host should ring the MMIO CQ doorbell next. With MSI-X the controller
        reads the shadow head whenever it needs room, so the host need not ring: one behind
        the head is crossed only after a whole lap (_cq_is_full moves it to the head when
        completions must wait for room). INTx is a level the controller lowers when the host
        has consumed everything, so there every head update should ring, as in QEMU's nvme."""
        shadow = self.state.shadow
        at = cq.head if not self._msix_mode() else (cq.head - 1) % cq.size
        write_event_idx(self.dma, shadow, cq.qid, True, at)

    def _cq_is_full(self, cq: CompletionQueueState) -> bool:
        if not cq_full(cq):
            return False
        shadow = self.state.shadow
        if shadow.enabled and cq.qid != 0:
            self.refresh_cq_head(cq)
            if cq_full(cq):
                # Still full: have the host ring the MMIO doorbell when it frees an entry.
                write_event_idx(self.dma, shadow, cq.qid, True, cq.head)
                cq.head = self._host_cq_head(cq)
        return cq_full(cq)

    def _post(self, cq: CompletionQueueState, entry: PendingCompletion, batch: bool = False) -> None:
        """``batch``: one of several posted together (held completions drained), whose
        interrupt goes through the interrupt task once for all of them."""
        sq = self.state.sqs.get(entry.sqid)
        try:
            post_cqe(self.dma, cq, entry, sq.head if sq else 0)
        except DmaError as exc:
            log.warning("CQ %d: cannot post completion: %s", cq.qid, exc)
            return
        self._irq_pending.add(cq.qid)
        if self._defer_irq:
            self._irq_deferred = True  # the SQ loop signals at the end of its batch
        elif self.inflight.count <= 1 and not batch:
            # The controller's only command in flight (a FLUSH at queue depth 1): nothing to
            # share the interrupt with, and the interrupt task's two scheduler passes are
            # 25-30 us of the host's wait (docs/performance.md, "Tenth session").
            self._flush_interrupts()
        else:
            self._irq_wake.set()

    def _drain_waiting(self, cq: CompletionQueueState) -> None:
        rt = self.cq_rt.get(cq.qid)
        if rt is None or self._frozen:
            return
        while rt.waiting and not cq_full(cq):
            self._post(cq, rt.waiting.popleft(), batch=True)

    async def _interrupt_loop(self) -> None:
        while True:
            await self._irq_wake.wait()
            self._irq_wake = trio.Event()
            # One scheduling round for other commands finishing now to post too: one signal
            # per vector covers the whole batch.
            await trio.lowlevel.checkpoint()
            self._flush_interrupts()

    def _flush_interrupts(self) -> None:
        pending, self._irq_pending = self._irq_pending, set()
        if self._msix_mode():
            vectors = set()
            for qid in pending:
                cq = self.state.cqs.get(qid)
                if cq is not None and cq.irq_enabled:
                    vectors.add(cq.vector)
            for v in vectors:
                self.interrupt(v)
        else:
            self._update_intx()

    def _msix_mode(self) -> bool:
        assert self.msix is not None
        return self.msix.enabled or self.irqs.lines[IrqIndex.MSIX].active

    def _update_intx(self) -> None:
        """INTx is a level: asserted while any interrupt-enabled CQ holds unconsumed entries."""
        if self._msix_mode():
            return
        level = False
        if not self.state.regs.intms & 1:
            for cq in self.state.cqs.values():
                cq.head = self._host_cq_head(cq)
                if cq.irq_enabled and cq_pending(cq):
                    level = True
                    break
        if level != self._intx_level:
            self._intx_level = level
            self.set_intx(level)

    def msix_vectors(self) -> int:
        return MSIX_VECTORS

    # -- asynchronous events ---------------------------------------------------------------------

    def async_event(self, event_type: AsyncEventType, info: int, log_page: int) -> None:
        aer = self.state.aer
        event = AsyncEvent(int(event_type), info, log_page)
        if any(e.event_type == event.event_type and e.info == info for e in aer.pending):
            return
        aer.pending.append(event)
        self.deliver_async_events()

    def deliver_async_events(self) -> None:
        aer = self.state.aer
        while aer.outstanding:
            event = next((e for e in aer.pending if e.event_type not in aer.masked_types), None)
            if event is None:
                return
            aer.pending.remove(event)
            aer.masked_types.add(event.event_type)
            self.complete(0, aer.outstanding.pop(0), 0, event.dw0)

    # -- helpers for command handlers ------------------------------------------------------------

    def namespace(self, nsid: int) -> Namespace:
        ns = self.namespaces.get(nsid)
        if ns is None:
            raise NvmeError(Status.INVALID_NAMESPACE, f"namespace {nsid:#x}")
        return ns

    def power_on_seconds(self) -> int:
        return self.state.smart.power_on_seconds + int(time.monotonic() - self._power_on_anchor)

    def now_ms(self) -> int:
        return int(time.monotonic() * 1000)


_KIND = {int(IoOpcode.READ): READ, int(IoOpcode.WRITE): WRITE, int(IoOpcode.FLUSH): FLUSH,
         int(IoOpcode.DATASET_MANAGEMENT): DISCARD, int(IoOpcode.WRITE_ZEROES): WRITE_ZEROES}


def _merge(old: int, reg: int, width: int, offset: int, size: int, value: int) -> int | None:
    """Apply the bytes of an access ``[offset, offset+size)`` that fall into register ``reg``."""
    lo, hi = max(offset, reg), min(offset + size, reg + width)
    if lo >= hi:
        return None
    n = (hi - lo) * 8
    bits = (value >> ((lo - offset) * 8)) & ((1 << n) - 1)
    shift = (lo - reg) * 8
    mask = ((1 << n) - 1) << shift
    return (old & ~mask) | (bits << shift)
