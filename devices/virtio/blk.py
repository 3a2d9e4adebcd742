"""virtio-blk (VIRTIO 1.2 section 5.2) on the project's block backends.

Requests of a queue run concurrently (up to ``max_inflight``), data moves between the backend
and guest RAM through memoryviews without copies, and a request completes only after the
backend finished it: a write is in the backend (page cache / NBD server) when the guest sees
it complete, and durable after a FLUSH. There is no per-request FUA in virtio-blk; the driver
flushes. On SIGTERM in-flight requests finish and the backend is flushed.
"""

from __future__ import annotations

import argparse
import errno
import struct
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import trio

from vfu_server.block import (
    BlockBackend,
    BlockError,
    MemoryBackend,
    open_backend,
    open_file_backend,
    parse_backend_spec,
    parse_size,
)
from vfu_server.block.base import iov_slice
from vfu_server.block.cache import VolatileCache
from vfu_server.block.memory import adopt_ram_disks, export_ram_disks
from vfu_server.block.spec import BACKING_IO, BackendSpec
from vfu_server.faults import FaultDomain, FaultSet, Rule, flip_bits
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
from vfu_server.migration import MigrationFormatError
from vfu_server.pci.dma import GuestMemory
from vfu_server.pci.polling import DEFAULT_POLL_US
from vfu_server.sandbox import SandboxNeeds

from ..fastio import RegionTable, WriteBehind, backend_fast_io, load_vq
from ..fastio import load_module_async as load_fastio
from .pci import VirtioPciDevice
from .queue import DescriptorChain, SplitQueue, VirtqueueError
from .spec import DeviceId, bit

if TYPE_CHECKING:
    from .migration_format import VirtioDevState

SECTOR = 512
MAX_QUEUES = 16

F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_MQ = 1, 2, 5, 6, 9, 10, 12
F_DISCARD, F_WRITE_ZEROES = 13, 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20

SIZE_MAX = 1 << 20
MAX_SEGMENTS = 32  # discard / write-zeroes ranges per request
MAX_RANGE_SECTORS = 0x3FFFFF  # per range, about 2 GiB
_HDR = struct.Struct("<IIQ")
_RANGE = struct.Struct("<QII")
_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")


def _blk_status(text: str) -> int:
    value = int(text, 0)
    if not 0 <= value <= 0xFF:
        raise ValueError("a virtio-blk status is one byte")
    return value


#: what --fault rules can match and do on virtio-blk (docs/faults.md): ops are request types,
#: LBAs 512-byte sectors, queues request queue indices
BLK_FAULTS = FaultDomain(
    name="virtio-blk",
    ops={"read": T_IN, "write": T_OUT, "flush": T_FLUSH, "get-id": T_GET_ID, "discard": T_DISCARD,
         "write-zeroes": T_WRITE_ZEROES},
    matches=frozenset({"op", "lba", "queue"}),
    actions=frozenset({"status", "delay", "hang", "corrupt", "torn", "reset"}),
    statuses={"ok": S_OK, "ioerr": S_IOERR, "unsupp": S_UNSUPP},
    parse_status=_blk_status,
    fast_ops=frozenset({T_IN, T_OUT}),
)


class VirtioBlk(VirtioPciDevice):
    """virtio-blk: a disk on a raw file, an NBD export or RAM (--backing/--size)."""

    cli_name = "virtio-blk"
    virtio_id = DeviceId.BLOCK  # PCI device 0x1042
    class_code = 0x010000  # mass storage, SCSI (what QEMU uses for virtio-blk)
    config_size = _CONFIG.size
    msix_vectors = 1 + MAX_QUEUES
    queue_max_size = 256
    max_inflight = 64
    #: opaque/vfu-virtio-blk (default) and virtio-blk/std/1
    migration_formats = "vfu_devices.virtio.migration_format:BLK_FORMATS"
    fault_domain = BLK_FAULTS

    def __init__(self, backend: BlockBackend | BackendSpec, num_queues: int = 1, serial: str = "",
                 poll_us: int = DEFAULT_POLL_US, volatile_cache: int | None = None) -> None:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"--num-queues must be 1..{MAX_QUEUES}")
        self.spec = backend if isinstance(backend, BackendSpec) else None
        self.backend: BlockBackend | None = None if isinstance(backend, BackendSpec) else backend
        self.ready = trio.Event()
        if self.backend is not None:
            self.ready.set()
        read_only = self.backend.read_only if self.backend else bool(self.spec and self.spec.read_only)
        features = (bit(F_SIZE_MAX) | bit(F_SEG_MAX) | bit(F_BLK_SIZE) | bit(F_FLUSH) | bit(F_TOPOLOGY)
                    | bit(F_MQ) | bit(F_DISCARD) | bit(F_WRITE_ZEROES) | (bit(F_RO) if read_only else 0))
        super().__init__(num_queues=num_queues, device_features=features, poll_us=poll_us)
        self.serial = serial.encode()[:ID_BYTES]
        self._fast: _BlkFastPath | None = None
        #: I/O statistics per request queue ("q0", ...; the control socket's ``stats``)
        self.iostats = IoStats(BLOCK_KINDS)
        self._qstats: dict[int, QueueStats] = {}
        self.faults = FaultSet(BLK_FAULTS)
        #: requests a fault rule delays or hangs: a migration's quiesce or a handover ends them
        self._holds: set[trio.CancelScope] = set()
        #: bytes of volatile write cache over the backend (None: none); FLUSH is offered anyway
        self.volatile_cache = volatile_cache
        if self.backend is not None:
            self.backend = self._cached(self.backend)
        #: why the last quiesce could not make the backend's writes visible to another client
        #: of its storage (None: it did): a live handover is refused then
        self._writes_not_visible: str | None = None

    # -- command line --------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--backing", metavar="FILE", help="raw image, block device or nbd:// URI (none: RAM)")
        parser.add_argument("--size", metavar="BYTES", help="disk size (K/M/G suffixes); needed for RAM or to create")
        parser.add_argument("--read-only", action="store_true")
        parser.add_argument("--backing-io", choices=BACKING_IO, default="sync",
                            help="how file backings do their I/O: sync (preadv/pwritev inline from the page cache, a worker thread where that would block; default) or uring (io_uring; sync where the kernel or build refuses it)")
        parser.add_argument("--num-queues", type=int, default=1, metavar="N", help=f"request queues (1..{MAX_QUEUES})")
        parser.add_argument("--serial", default="", metavar="ID", help="disk serial (up to 20 bytes)")
        parser.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US, metavar="US",
                            help="keep polling a request queue that ran dry for US microseconds "
                                 "before asking the guest for a kick (adaptive, up to US; trades CPU for latency; 0: off; default %(default)s)")
        parser.add_argument("--volatile-cache", nargs="?", const="64M", default=None, metavar="SIZE",
                            help="keep unflushed writes in a volatile cache of up to SIZE (default 64M) "
                                 "that the control socket's power-cut drops (docs/faults.md)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> VirtioBlk:
        spec = parse_backend_spec(args.backing, args.size, args.read_only, args.backing_io)
        backend: BlockBackend | BackendSpec = spec
        # Files and RAM open here, so a bad path is a command-line error; NBD connects in run().
        try:
            if spec.kind == "memory":
                assert spec.size is not None
                backend = MemoryBackend(spec.size, read_only=spec.read_only)
            elif spec.kind == "file":
                backend = open_file_backend(spec)
        except BlockError as exc:
            raise ValueError(str(exc)) from None
        cache = None if args.volatile_cache is None else parse_size(args.volatile_cache)
        return cls(backend, num_queues=args.num_queues, serial=args.serial, poll_us=args.poll_us,
                   volatile_cache=cache)

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # The C fast path: compiled on the very first start (in a thread), then from the cache.
        module = await load_fastio()
        self._fast = _BlkFastPath(module, self.dma) if module is not None else None
        # Opening the backend (an NBD connection) needs the event loop; the server says
        # "listening" only after task_status.started(), and a failure before is a start-up error.
        if self.backend is not None:
            task_status.started()
            return
        assert self.spec is not None
        async with open_backend(self.spec) as backend:
            self.backend = self._cached(backend)
            self.ready.set()
            self.config_changed()
            task_status.started()
            await trio.sleep_forever()

    def handover_export(self) -> tuple[dict[str, Any], list[int]]:
        if self._writes_not_visible is not None:
            from vfu_server.handover import HandoverError

            raise HandoverError(errno.EIO, "the successor might not read every write the guest saw complete: "
                                           + self._writes_not_visible)
        return export_ram_disks([self.backend])

    def handover_adopt(self, data: dict[str, Any], fds: list[int]) -> None:
        adopt_ram_disks([self.backend], data, fds)

    async def shutdown(self) -> None:
        self.faults.clear()  # requests a rule holds run now rather than hold up the exit
        await self.drain()
        if self.backend is not None:
            try:
                await self.backend.flush()
            except BlockError as exc:
                self.log.error("final flush failed: %s", exc)
            if self.spec is None:
                await self.backend.aclose()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": self.backend.describe() if self.backend else None}

    async def quiesce_device(self) -> None:
        # Requests a rule delays, hangs or keeps for the reset it asked for stop waiting:
        # they complete before the state is saved (docs/faults.md).
        for scope in list(self._holds):
            scope.cancel()

    async def quiesce(self) -> None:
        """Migration or live handover: after the requests in flight, every write the guest saw
        complete is made visible to another client of the backend (``make_writes_visible``:
        what a volatile cache holds goes to the backend, an NBD export is flushed), where the
        successor (or a destination on shared storage) reads it: a write the guest saw
        complete is never left behind. If that fails, a handover is refused."""
        await super().quiesce()
        self._writes_not_visible = None
        if self.backend is not None:
            try:
                await self.backend.make_writes_visible()
            except BlockError as exc:
                self.log.error("making the backend's writes visible to other clients failed: %s", exc)
                self._writes_not_visible = str(exc)

    async def _hold(self, rule: Rule, seconds: float | None) -> bool:
        """Wait out a rule's delay (``seconds``), its removal (hang, ``seconds`` None), or
        forever (a reset rule, ``seconds`` -1); False if a quiesce ended the wait first."""
        if self._mig_stopped:
            return False
        with trio.CancelScope() as scope:
            self._holds.add(scope)
            try:
                if seconds is None:
                    await rule.wait_removed()
                elif seconds < 0:
                    await trio.sleep_forever()
                else:
                    await trio.sleep(seconds)
            finally:
                self._holds.discard(scope)
        return not scope.cancelled_caught

    def _cached(self, backend: BlockBackend) -> BlockBackend:
        if self.volatile_cache is None or backend.read_only:
            return backend
        return VolatileCache(backend, self.volatile_cache)

    async def power_cut(self, *, keep: float = 0.0, seed: int = 0) -> dict[str, Any]:
        """Power loss: requests in flight never complete, the volatile cache is lost (but for a
        seeded random ``keep`` fraction), and the device needs a reset (DEVICE_NEEDS_RESET)."""
        self.drop_requests("power cut")
        result = {"kept_bytes": 0, "lost_bytes": 0, "volatile_cache": self.volatile_cache is not None}
        if isinstance(self.backend, VolatileCache):
            result.update(await self.backend.power_cut(keep, seed))
        self.log.warning("power cut: %d bytes of volatile cache lost, %d kept", result["lost_bytes"],
                         result["kept_bytes"])
        return result

    def sandbox_needs(self) -> SandboxNeeds:
        return self.backend.sandbox_needs() if self.backend is not None else SandboxNeeds()

    # -- configuration ---------------------------------------------------------------------

    def read_config(self) -> bytes:
        b = self.backend
        capacity = b.size // SECTOR if b else 0
        block = b.block_size if b else SECTOR
        return _CONFIG.pack(
            capacity, SIZE_MAX, self.queue_max_size - 2,
            0, 0, 0,  # geometry (not offered)
            SECTOR,  # blk_size: logical block
            (block // SECTOR).bit_length() - 1, 0, 1, 0,  # topology: physical block exponent, ...
            1, self.num_queues,  # writeback; num_queues
            MAX_RANGE_SECTORS, MAX_SEGMENTS, block // SECTOR,  # discard
            MAX_RANGE_SECTORS, MAX_SEGMENTS, 1,  # write zeroes, may unmap
        )

    # -- migration: the backend is not migrated (storage is shared) ------------------------

    def save_device_state(self) -> dict[str, Any]:
        from .migration_format import BlkMig

        return {"blk": BlkMig(writeback=1, serial=self.serial)}

    def check_device_state(self, state: VirtioDevState) -> None:
        blk = state.blk
        if blk is None or blk.writeback != 1 or len(blk.serial) > ID_BYTES:
            raise MigrationFormatError(errno.EINVAL, f"{self.name}: virtio-blk state missing or "
                                       "not loadable (writeback must be 1, serial <= 20 bytes)")

    def load_device_state(self, state: VirtioDevState) -> None:
        assert state.blk is not None
        # The GET_ID string is what the guest saw: the destination takes the source's.
        self.serial = state.blk.serial

    # -- requests --------------------------------------------------------------------------

    def complete_fast(self, queue: SplitQueue) -> int:
        """IN and OUT requests on a file, in C (devices/_fastio_build.py), while Python need
        not see the data move (no dirty-page logging) and has nothing waiting to publish."""
        fast = self._fast
        if fast is None or self.dma.dirty_hook is not None or not queue.can_complete_elsewhere():
            return 0
        if self.faults.active and self.faults.could_match(BLK_FAULTS.fast_ops, queue.index):
            return 0  # a rule may want one of these requests: Python looks at each
        io = backend_fast_io(self.backend)
        if io is None:
            return 0
        assert self.backend is not None
        try:
            return fast.run(queue, io, self.backend.size, self.queue_stats(queue.index),
                            write_behind_until=self.backend.write_behind_until)
        except Exception:
            self.log.exception("queue %d: fast path failed; Python only from now on", queue.index)
            self._fast = None
            return 0

    def notify_queue(self, queue: SplitQueue) -> None:
        super().notify_queue(queue)
        fast = self._fast
        if fast is not None and fast.write_behind.pending:
            fast.write_behind.start()  # the interrupt is out: write-behind no longer delays the guest

    def process_nowait(self, queue: SplitQueue, chain: DescriptorChain) -> int | None:
        """Reads the page cache holds and writes small enough to be done inline anyway
        complete here, in the queue loop, without a task (``readv_nowait``/``writev_nowait``
        of the backend, where it has them). Everything else: None, :meth:`process` does it."""
        t0 = perf_counter_ns()
        backend = self.backend
        readable, writable = chain.readable, chain.writable
        if backend is None or chain.read_len < _HDR.size or not writable:
            return None  # not ready yet, or malformed: process() waits or raises
        first = readable[0]
        if first.nbytes < _HDR.size:
            return None
        rtype, _, sector = _HDR.unpack_from(first)
        if self.faults.active and self.faults.could_match(frozenset((rtype,)), queue.index):
            return None  # process() asks the rules
        length = chain.write_len - 1
        status_view = writable[-1]
        if status_view.nbytes == 1:
            data_in = writable[:-1]
        else:
            data_in = iov_slice(writable, 0, length)
            status_view = iov_slice(writable, length, 1)[0]
        written = 0
        try:
            if rtype == T_IN:
                read_nowait = getattr(backend, "readv_nowait", None)
                if read_nowait is None:
                    return None
                status = self._check(sector, length)
                if status == S_OK:
                    if not read_nowait(sector * SECTOR, data_in):
                        return None
                    written = length
            elif rtype == T_OUT:
                write_nowait = getattr(backend, "writev_nowait", None)
                if write_nowait is None:
                    return None
                status = self._check(sector, chain.read_len - _HDR.size, write=True)
                if status == S_OK:
                    data_out = readable[1:] if first.nbytes == _HDR.size else iov_slice(readable, _HDR.size)
                    if not write_nowait(sector * SECTOR, data_out):
                        return None
            elif rtype == T_GET_ID:
                written = _store(data_in, self.serial.ljust(ID_BYTES, b"\0")[:length])
                status = S_OK
            elif rtype == T_FLUSH:
                # Started here, awaited by process(): a file's fdatasync begins now rather than
                # a scheduler pass later, when the request's task first runs.
                chain.started = backend.begin_flush()
                return None
            else:
                return None
        except BlockError as exc:
            self.log.warning("request type %d at sector %d failed: %s", rtype, sector, exc)
            status = S_IOERR
        status_view[0] = status
        self._count(queue, rtype, status, written if rtype == T_IN else chain.read_len - _HDR.size, t0)
        return written + 1

    async def process(self, queue: SplitQueue, chain: DescriptorChain) -> int:
        if chain.read_len < _HDR.size or chain.write_len < 1:
            raise VirtqueueError(f"queue {queue.index}: virtio-blk request without header or status byte")
        t0 = perf_counter_ns()
        stats = self.queue_stats(queue.index)
        stats.in_flight += 1
        try:
            status, written, nbytes, rtype = await self._process(queue, chain)
        except trio.Cancelled:  # a reset or a power cut dropped it (a fault rule held it)
            stats.error("dropped")
            raise
        finally:
            stats.in_flight -= 1
        self._count(queue, rtype, status, nbytes, t0)
        return written + 1

    def queue_stats(self, index: int) -> QueueStats:
        q = self._qstats.get(index)
        if q is None:
            q = self._qstats[index] = self.iostats.queue(f"q{index}")
        return q

    def _count(self, queue: SplitQueue, rtype: int, status: int, nbytes: int, t0: int) -> None:
        q = self._qstats.get(queue.index) or self.queue_stats(queue.index)
        kind = _KIND.get(rtype, OTHER)
        if status:
            q.error(_STATUS_NAMES.get(status, str(status)))
            nbytes = 0
        elif kind > WRITE:
            nbytes = 0
        q.record(kind, nbytes, perf_counter_ns() - t0)

    async def _process(self, queue: SplitQueue, chain: DescriptorChain) -> tuple[int, int, int, int]:
        """One request: (status, bytes written into the chain, bytes moved, request type)."""
        rtype, _, sector = _HDR.unpack(chain.read_bytes(_HDR.size))
        data_in = iov_slice(chain.writable, 0, chain.write_len - 1)
        status_view = iov_slice(chain.writable, chain.write_len - 1, 1)[0]
        await self.ready.wait()
        if self.faults.active:
            lba, blocks = None, 1
            if rtype in (T_IN, T_OUT):
                lba = sector
                blocks = (chain.write_len - 1 if rtype == T_IN else chain.read_len - _HDR.size) // SECTOR
            rule = self.faults.match(rtype, lba=lba, blocks=blocks, queue=queue.index)
            if rule is not None:
                self.log.info("queue %d request type %d sector %d: fault rule %d (%s)", queue.index, rtype,
                              sector, rule.id, rule.action)
                done = await self._faulted(queue, chain, rule, rtype, sector, data_in, status_view)
                if done is not None:
                    return done
        return await self._serve(chain, rtype, sector, data_in, status_view)

    async def _faulted(self, queue: SplitQueue, chain: DescriptorChain, rule: Rule, rtype: int, sector: int,
                       data_in: list[memoryview], status_view: memoryview) -> tuple[int, int, int, int] | None:
        """A rule's action, as :meth:`_process` returns it (the statistics count what the guest
        sees: a rule's status is an error of that status, ``status=ok`` a request done), or None
        to serve the request normally now."""
        action = rule.action
        moved = chain.write_len - 1 if rtype == T_IN else chain.read_len - _HDR.size
        if action == "delay":
            await self._hold(rule, rule.delay_ms / 1000)
        elif action == "hang":
            await self._hold(rule, None)  # a device reset cancels this: the request is dropped
        elif action == "reset":
            self.needs_reset(f"fault rule {rule.id}")
            await self._hold(rule, -1)
            # Only a quiesce ends this: the device needs a reset anyway; the request fails.
            status_view[0] = S_IOERR
            return S_IOERR, 0, 0 if rtype == T_IN else moved, rtype
        elif action == "status":
            assert rule.status is not None
            status_view[0] = rule.status
            return rule.status, 0, 0 if rtype == T_IN else moved, rtype
        elif action == "corrupt" and rtype == T_IN:
            status, written, nbytes, _ = await self._serve(chain, rtype, sector, data_in, status_view)
            if status == S_OK:
                flip_bits(iov_slice(data_in, 0, written), rule.bits, rule.rng)
                if rule.status is not None:
                    status = status_view[0] = rule.status
            return status, written, nbytes, rtype
        elif action in ("corrupt", "torn") and rtype == T_OUT:
            length = moved
            status = self._check(sector, length, write=True)
            if status == S_OK:
                data = bytearray(chain.read_bytes(chain.read_len)[_HDR.size :])
                if action == "corrupt":
                    flip_bits([memoryview(data)], rule.bits, rule.rng)
                else:
                    n = length // 2 // SECTOR * SECTOR if rule.torn_bytes is None else min(rule.torn_bytes, length)
                    del data[n:]
                    status = S_IOERR if rule.status is None else rule.status
                assert self.backend is not None
                try:
                    if data:
                        await self.backend.writev(sector * SECTOR, [memoryview(data)])
                except BlockError as exc:
                    self.log.warning("request type %d at sector %d failed: %s", rtype, sector, exc)
                    status = S_IOERR
                if action == "corrupt" and rule.status is not None:
                    status = rule.status
            status_view[0] = status
            return status, 0, length, rtype
        return None

    async def _serve(self, chain: DescriptorChain, rtype: int, sector: int, data_in: list[memoryview],
                     status_view: memoryview) -> tuple[int, int, int, int]:
        written = 0
        backend = self.backend
        assert backend is not None
        try:
            if rtype == T_IN:
                status = self._check(sector, chain.write_len - 1)
                if status == S_OK:
                    await backend.readv(sector * SECTOR, data_in)
                    written = chain.write_len - 1
            elif rtype == T_OUT:
                length = chain.read_len - _HDR.size
                status = self._check(sector, length, write=True)
                if status == S_OK:
                    await backend.writev(sector * SECTOR, iov_slice(chain.readable, _HDR.size))
            elif rtype == T_FLUSH:
                started, chain.started = chain.started, None
                await (started.wait() if started is not None else backend.flush())
                status = S_OK
            elif rtype == T_GET_ID:
                ident = self.serial.ljust(ID_BYTES, b"\0")[: chain.write_len - 1]
                written = _store(data_in, ident)
                status = S_OK
            elif rtype in (T_DISCARD, T_WRITE_ZEROES):
                status = await self._ranges(rtype, chain.read_bytes(_HDR.size + _RANGE.size * MAX_SEGMENTS + 1)[_HDR.size :])
            else:
                status = S_UNSUPP
        except BlockError as exc:
            self.log.warning("request type %d at sector %d failed: %s", rtype, sector, exc)
            status = S_IOERR
        status_view[0] = status
        return status, written, written if rtype == T_IN else chain.read_len - _HDR.size, rtype

    def _check(self, sector: int, length: int, write: bool = False) -> int:
        b = self.backend
        assert b is not None
        if write and b.read_only:
            return S_IOERR
        if length % SECTOR or sector * SECTOR + length > b.size:
            return S_IOERR
        return S_OK

    async def _ranges(self, rtype: int, data: bytes) -> int:
        if len(data) % _RANGE.size or not data or len(data) > _RANGE.size * MAX_SEGMENTS:
            return S_IOERR
        ranges = [_RANGE.unpack_from(data, off) for off in range(0, len(data), _RANGE.size)]
        for sector, count, flags in ranges:
            # Discard must not carry the unmap flag; other flag bits are reserved (5.2.6.2).
            if flags & ~1 or (rtype == T_DISCARD and flags):
                return S_UNSUPP
            if count > MAX_RANGE_SECTORS or self._check(sector, count * SECTOR, write=True) != S_OK:
                return S_IOERR
        backend = self.backend
        assert backend is not None
        for sector, count, flags in ranges:
            if rtype == T_DISCARD:
                await backend.discard(sector * SECTOR, count * SECTOR)
            else:
                await backend.write_zeroes(sector * SECTOR, count * SECTOR, may_unmap=bool(flags & 1))
        return S_OK


_KIND = {T_IN: READ, T_OUT: WRITE, T_FLUSH: FLUSH, T_DISCARD: DISCARD, T_WRITE_ZEROES: WRITE_ZEROES}
_STATUS_NAMES = {S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}


def _store(views: list[memoryview], data: bytes) -> int:
    pos = 0
    for v in views:
        n = min(v.nbytes, len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n
    return pos


class _BlkFastPath:
    """The C side of :meth:`VirtioBlk.complete_fast`: its context and the region table."""

    def __init__(self, module: Any, dma: GuestMemory) -> None:
        self.ffi, self.lib = module.ffi, module.lib
        self.ctx = self.ffi.new("struct vfu_blk *")
        self.write_behind = WriteBehind(self.ffi, self.lib, self.ctx)
        self.vq = self.ffi.new("struct vfu_vq *")
        self.regions = RegionTable(self.ffi, dma)

    def run(self, queue: SplitQueue, io: tuple[int, int, int], capacity: int,
            stats: QueueStats | None = None, limit: int = 64, write_behind_until: int = 0) -> int:
        c, v = self.ctx, self.vq
        if stats is None:
            c.stats = self.ffi.NULL
        else:
            c.stats = stats.c if stats.c is not None else stats.attach_c(self.ffi)
        if self.regions.sync():
            c.regions, c.nregions = self.regions.table, self.regions.count
        c.read_fd, c.write_fd, c.max_bytes = io
        c.capacity = capacity
        c.write_behind_until = write_behind_until = WriteBehind.deadline(write_behind_until)
        load_vq(v, queue)
        n: int = self.lib.vfu_blk_run(c, v, limit)
        self.write_behind.after_run(write_behind_until)
        if n:
            queue.completed_elsewhere(n, v.next_avail)
        return n

    @property
    def stop_reason(self) -> int:
        return int(self.ctx.stop)
