"""NVM command set I/O commands: Read, Write, Flush, Write Zeroes, DSM, Compare, Verify.

Data moves between the backend and guest memory through zero-copy views; a write's
completion is posted only after the backend has it (and, with FUA or the write cache
disabled, after it is durable).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from vfu_server.block.base import BlockBackend, iov_slice
from vfu_server.faults import Rule, flip_bits
from vfu_server.protocol.errors import DmaError

from .command import Command
from .constants import NSID_ALL, IoOpcode, Status
from .dptr import segment_views
from .errors import NvmeError
from .namespace import Namespace

if TYPE_CHECKING:
    from .controller import NvmeController

DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in blocks, starting LBA
VERIFY_CHUNK = 1 << 20
FUA = 1 << 30
DEAC = 1 << 25
_READ, _WRITE = int(IoOpcode.READ), int(IoOpcode.WRITE)

Handler = Callable[[Command], Awaitable[int]]


class IoCommands:
    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl
        self.handlers: dict[int, Handler] = {
            IoOpcode.FLUSH: self.flush,
            IoOpcode.WRITE: self.write,
            IoOpcode.READ: self.read,
            IoOpcode.COMPARE: self.compare,
            IoOpcode.WRITE_ZEROES: self.write_zeroes,
            IoOpcode.DATASET_MANAGEMENT: self.dataset_management,
            IoOpcode.VERIFY: self.verify,
        }

    async def execute(self, cmd: Command) -> int:
        handler = self.handlers.get(cmd.opcode)
        if handler is None:
            raise NvmeError(Status.INVALID_OPCODE, f"I/O opcode {cmd.opcode:#x}")
        if cmd.fuse:
            raise NvmeError(Status.INVALID_FIELD, "fused operations are not supported")
        return await handler(cmd)

    def begin(self, cmd: Command) -> Handler:
        """The handler a task runs for ``cmd``, with what can start at fetch started: a
        Flush asks its backends now (:meth:`BlockBackend.begin_flush`; a file's fdatasync
        begins here rather than a scheduler pass later, when the task first runs, 30-35 us
        of a queue-depth-1 write+fsync, docs/performance.md "Tenth session"). Never raises:
        an invalid command's error comes from the handler."""
        if cmd.opcode != IoOpcode.FLUSH or cmd.fuse:
            return self.execute
        try:
            targets = self._flush_targets(cmd)
        except NvmeError:
            return self.execute
        pending = [backend.begin_flush() for backend in targets]

        async def flush(cmd: Command) -> int:
            for p in pending:
                await p.wait()
            return 0

        return flush

    def try_inline(self, cmd: Command) -> bool:
        """Run a Read or Write now, without a task, when the backend can finish it without
        blocking (a page-cache read, a small buffered write). True: done, the command
        succeeded. False: nothing observable happened, run :meth:`execute` in a task. Raises
        exactly what :meth:`execute` would raise for the same command."""
        opcode = cmd.opcode
        if opcode == _READ:
            if cmd.fuse:
                return False
            ns, offset, length = self._rw_range(cmd)
            fn = getattr(ns.backend, "readv_nowait", None)
            if fn is None:
                return False
            if not fn(offset, self._views(cmd, length, to_host=True)):
                return False
            smart = self.ctrl.state.smart
            smart.bytes_read += length
            smart.host_read_commands += 1
            return True
        if opcode == _WRITE:
            if cmd.fuse:
                return False
            ns, offset, length = self._rw_range(cmd)
            fn = getattr(ns.backend, "writev_nowait", None)
            if fn is None:
                return False
            fua = bool(cmd.cdw12 & FUA) or not self.ctrl.state.features.volatile_write_cache
            if not fn(offset, self._views(cmd, length, to_host=False), fua=fua):
                return False
            smart = self.ctrl.state.smart
            smart.bytes_written += length
            smart.host_write_commands += 1
            return True
        return False

    def _rw_range(self, cmd: Command, *, limited: bool = True) -> tuple[Namespace, int, int]:
        ns = self.ctrl.namespace(cmd.nsid)
        slba = cmd.cdw10 | cmd.cdw11 << 32
        nlb = (cmd.cdw12 & 0xFFFF) + 1
        if (cmd.cdw12 >> 26) & 0xF:
            raise NvmeError(Status.INVALID_FIELD, "protection information is not supported")
        offset, length = ns.check_range(slba, nlb)
        if limited and length > self.ctrl.mdts_bytes:
            raise NvmeError(Status.INVALID_FIELD, f"transfer of {length} bytes exceeds MDTS")
        return ns, offset, length

    def _views(self, cmd: Command, length: int, *, to_host: bool) -> list[memoryview]:
        ctrl = self.ctrl
        prp1, page = cmd.prp1, ctrl.page_size
        if not cmd.flags & 0xC0 and 0 < length <= page - prp1 % page and not prp1 & 3:
            # PRPs, and PRP1 alone holds the transfer (4 KiB I/O): the one segment that
            # prp_segments() would return, without building the list.
            try:
                return ctrl.dma.views(prp1, length, write=to_host)
            except DmaError as exc:
                raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from None
        segs = cmd.segments(ctrl.dma, length, ctrl.page_size, to_host=to_host)
        return segment_views(ctrl.dma, segs, write=to_host)

    async def read(self, cmd: Command) -> int:
        ns, offset, length = self._rw_range(cmd)
        views = self._views(cmd, length, to_host=True)
        await ns.backend.readv(offset, views)
        smart = self.ctrl.state.smart
        smart.bytes_read += length
        smart.host_read_commands += 1
        return 0

    async def write(self, cmd: Command) -> int:
        ns, offset, length = self._rw_range(cmd)
        views = self._views(cmd, length, to_host=False)
        fua = bool(cmd.cdw12 & FUA) or not self.ctrl.state.features.volatile_write_cache
        await ns.backend.writev(offset, views, fua=fua)
        smart = self.ctrl.state.smart
        smart.bytes_written += length
        smart.host_write_commands += 1
        return 0

    async def execute_faulted(self, cmd: Command, rule: Rule) -> int:
        """A Read or Write that a ``corrupt`` or ``torn`` fault rule fired for (see
        docs/faults.md): corrupt flips bits in what a read returns or a write stores; torn
        stores only the first part of a write and fails it with a Write Fault (or the rule's
        status)."""
        if cmd.opcode == _READ:
            await self.read(cmd)
            if rule.action == "corrupt":
                _, _, length = self._rw_range(cmd)
                flip_bits(self._views(cmd, length, to_host=True), rule.bits, rule.rng)
            return 0
        ns, offset, length = self._rw_range(cmd)
        views = self._views(cmd, length, to_host=False)
        fua = bool(cmd.cdw12 & FUA) or not self.ctrl.state.features.volatile_write_cache
        if rule.action == "corrupt":
            data = bytearray(b"".join(views))
            flip_bits([memoryview(data)], rule.bits, rule.rng)
            await ns.backend.writev(offset, [memoryview(data)], fua=fua)
            return 0
        n = length // 2 // 512 * 512 if rule.torn_bytes is None else min(rule.torn_bytes, length)
        if n:
            await ns.backend.writev(offset, iov_slice(views, 0, n), fua=fua)
        if rule.status is None:
            raise NvmeError(Status.WRITE_FAULT, f"torn write: {n} of {length} bytes written", dnr=False)
        return 0

    async def flush(self, cmd: Command) -> int:
        for backend in self._flush_targets(cmd):
            await backend.flush()
        return 0

    def _flush_targets(self, cmd: Command) -> list[BlockBackend]:
        if cmd.nsid == NSID_ALL:
            return [ns.backend for ns in self.ctrl.namespaces.values() if not ns.backend.read_only]
        ns = self.ctrl.namespace(cmd.nsid)
        return [] if ns.backend.read_only else [ns.backend]

    async def compare(self, cmd: Command) -> int:
        ns, offset, length = self._rw_range(cmd)
        host = b"".join(bytes(v) for v in self._views(cmd, length, to_host=False))
        media = bytearray(length)
        await ns.backend.readv(offset, [memoryview(media)])
        if host != media:
            raise NvmeError(Status.COMPARE_FAILURE, "compare mismatch")
        return 0

    async def verify(self, cmd: Command) -> int:
        # Verify is not limited by MDTS; reading the range proves it is readable.
        ns, offset, length = self._rw_range(cmd, limited=False)
        buf = bytearray(min(length, VERIFY_CHUNK))
        while length:
            n = min(length, len(buf))
            await ns.backend.readv(offset, [memoryview(buf)[:n]])
            offset += n
            length -= n
        return 0

    async def write_zeroes(self, cmd: Command) -> int:
        ns, offset, length = self._rw_range(cmd, limited=False)
        await ns.backend.write_zeroes(offset, length, may_unmap=bool(cmd.cdw12 & DEAC))
        if cmd.cdw12 & FUA or not self.ctrl.state.features.volatile_write_cache:
            await ns.backend.flush()
        return 0

    async def dataset_management(self, cmd: Command) -> int:
        ns = self.ctrl.namespace(cmd.nsid)
        count = (cmd.cdw10 & 0xFF) + 1
        deallocate = bool(cmd.cdw11 & 1 << 2)
        length = count * DSM_RANGE.size
        raw = b"".join(bytes(v) for v in self._views(cmd, length, to_host=False))
        ranges = []
        for i in range(count):
            _attrs, nlb, slba = DSM_RANGE.unpack_from(raw, i * DSM_RANGE.size)
            if nlb:
                ranges.append(ns.check_range(slba, nlb))
        if deallocate:
            for offset, n in ranges:
                await ns.backend.discard(offset, n)
        return 0
