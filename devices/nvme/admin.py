"""Admin command set: queue management, Identify, features, log pages, events, format.

Handlers return dword 0 of the completion, or None for a command that completes later
(Asynchronous Event Request). Errors are raised as :class:`NvmeError`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import features, identify, logpages, ocp
from .command import Command
from .constants import (
    NSID_ALL,
    AdminOpcode,
    AsyncEventType,
    Cns,
    Feature,
    LogPage,
    Status,
)
from .dptr import segment_views
from .errors import NvmeError
from .queues import write_event_idx, write_shadow
from .state import CompletionQueueState, SubmissionQueueState

log = logging.getLogger("vfu_server.device.nvme")

if TYPE_CHECKING:
    from .controller import NvmeController

Handler = Callable[[Command], Awaitable[int | None]]


class AdminCommands:
    def __init__(self, ctrl: NvmeController) -> None:
        self.ctrl = ctrl
        self.handlers: dict[int, Handler] = {
            AdminOpcode.DELETE_IO_SQ: self.delete_io_sq,
            AdminOpcode.CREATE_IO_SQ: self.create_io_sq,
            AdminOpcode.GET_LOG_PAGE: self.get_log_page,
            AdminOpcode.DELETE_IO_CQ: self.delete_io_cq,
            AdminOpcode.CREATE_IO_CQ: self.create_io_cq,
            AdminOpcode.IDENTIFY: self.identify,
            AdminOpcode.ABORT: self.abort,
            AdminOpcode.SET_FEATURES: self.set_features,
            AdminOpcode.GET_FEATURES: self.get_features,
            AdminOpcode.ASYNC_EVENT_REQUEST: self.async_event_request,
            AdminOpcode.KEEP_ALIVE: self.keep_alive,
            AdminOpcode.DOORBELL_BUFFER_CONFIG: self.doorbell_buffer_config,
            AdminOpcode.FORMAT_NVM: self.format_nvm,
        }

    async def execute(self, cmd: Command) -> int | None:
        handler = self.handlers.get(cmd.opcode)
        if handler is None:
            raise NvmeError(Status.INVALID_OPCODE, f"admin opcode {cmd.opcode:#x}")
        if cmd.fuse:
            raise NvmeError(Status.INVALID_FIELD, "fused admin command")
        return await handler(cmd)

    # -- data transfer ---------------------------------------------------------------------

    def to_host(self, cmd: Command, data: bytes, length: int | None = None) -> None:
        """Copy ``data`` (truncated or zero-padded to ``length``) into the command's buffer."""
        if length is None:
            length = len(data)
        if length > self.ctrl.mdts_bytes:
            raise NvmeError(Status.INVALID_FIELD, f"transfer of {length} bytes exceeds MDTS")
        data = data[:length].ljust(length, b"\0")
        segs = cmd.segments(self.ctrl.dma, length, self.ctrl.page_size, to_host=True)
        pos = 0
        for v in segment_views(self.ctrl.dma, segs, write=True):
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def from_host(self, cmd: Command, length: int) -> bytes:
        segs = cmd.segments(self.ctrl.dma, length, self.ctrl.page_size, to_host=False)
        return b"".join(bytes(v) for v in segment_views(self.ctrl.dma, segs, write=False))

    # -- queue management --------------------------------------------------------------------

    def _check_new_queue(self, qid: int, qsize: int, exists: bool, pc: bool, base: int) -> None:
        if qid == 0 or qid > self.ctrl.info.max_queues or exists:
            raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"queue id {qid}")
        if qsize < 1 or qsize + 1 > self.ctrl.info.max_queue_entries:
            raise NvmeError(Status.INVALID_QUEUE_SIZE, f"queue size {qsize + 1}")
        if not pc:
            raise NvmeError(Status.INVALID_FIELD, "queue not physically contiguous (CAP.CQR)")
        if base % self.ctrl.page_size:
            raise NvmeError(Status.INVALID_PRP_OFFSET, f"queue base {base:#x}")

    async def create_io_cq(self, cmd: Command) -> int:
        ctrl = self.ctrl
        qid, qsize = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
        pc, ien, vector = bool(cmd.cdw11 & 1), bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
        self._check_new_queue(qid, qsize, qid in ctrl.state.cqs, pc, cmd.prp1)
        if (ctrl.state.regs.cc >> 20) & 0xF != 4:
            raise NvmeError(Status.INVALID_FIELD, "CC.IOCQES is not 16 bytes")
        if vector >= ctrl.msix_vectors():
            raise NvmeError(Status.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
        if not ctrl.dma.contains(cmd.prp1, (qsize + 1) * 16):
            raise NvmeError(Status.INVALID_FIELD, "completion queue memory is not mapped")
        ctrl.state.cqs[qid] = CompletionQueueState(qid, cmd.prp1, qsize + 1, vector, ien)
        ctrl.start_cq(qid)
        shadow = ctrl.state.shadow
        if shadow.enabled:
            write_shadow(ctrl.dma, shadow, qid, True, 0)
            write_event_idx(ctrl.dma, shadow, qid, True, 0)
        return 0

    async def create_io_sq(self, cmd: Command) -> int:
        ctrl = self.ctrl
        qid, qsize = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
        pc, prio, cqid = bool(cmd.cdw11 & 1), (cmd.cdw11 >> 1) & 3, cmd.cdw11 >> 16
        self._check_new_queue(qid, qsize, qid in ctrl.state.sqs, pc, cmd.prp1)
        if cqid == 0 or cqid not in ctrl.state.cqs:
            raise NvmeError(Status.COMPLETION_QUEUE_INVALID, f"completion queue {cqid}")
        if (ctrl.state.regs.cc >> 16) & 0xF != 6:
            raise NvmeError(Status.INVALID_FIELD, "CC.IOSQES is not 64 bytes")
        if not ctrl.dma.contains(cmd.prp1, (qsize + 1) * 64):
            raise NvmeError(Status.INVALID_FIELD, "submission queue memory is not mapped")
        ctrl.state.sqs[qid] = SubmissionQueueState(qid, cmd.prp1, qsize + 1, cqid, prio)
        shadow = ctrl.state.shadow
        if shadow.enabled:
            write_shadow(ctrl.dma, shadow, qid, False, 0)
            write_event_idx(ctrl.dma, shadow, qid, False, 0)
        ctrl.start_sq(qid)
        return 0

    async def delete_io_sq(self, cmd: Command) -> int:
        ctrl = self.ctrl
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid not in ctrl.state.sqs:
            raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"submission queue {qid}")
        # Commands already fetched complete normally (their CQ still exists); nothing
        # fetched is dropped without a completion.
        await ctrl.stop_sq(qid)
        del ctrl.state.sqs[qid]
        return 0

    async def delete_io_cq(self, cmd: Command) -> int:
        ctrl = self.ctrl
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid not in ctrl.state.cqs:
            raise NvmeError(Status.INVALID_QUEUE_IDENTIFIER, f"completion queue {qid}")
        if any(sq.cqid == qid for sq in ctrl.state.sqs.values()):
            raise NvmeError(Status.INVALID_QUEUE_DELETION, f"completion queue {qid} still has submission queues")
        del ctrl.state.cqs[qid]
        ctrl.cq_rt.pop(qid, None)
        ctrl._irq_pending.discard(qid)
        return 0

    # -- identify ------------------------------------------------------------------------------

    async def identify(self, cmd: Command) -> int:
        ctrl = self.ctrl
        cns, csi = cmd.cdw10 & 0xFF, cmd.cdw11 >> 24
        nsid = cmd.nsid
        if cns == Cns.CONTROLLER:
            data = identify.controller(ctrl.info, ctrl.state.features.volatile_write_cache)
        elif cns == Cns.NAMESPACE:
            if nsid == NSID_ALL:
                # Common namespace capabilities: the formats, no size.
                data = identify.namespace(0, ctrl.state.namespaces[0].lba_format if ctrl.state.namespaces else 0,
                                          bytes(16), bytes(8))
            else:
                ns = ctrl.namespace(nsid)
                nguid, eui = identify.namespace_ids(ctrl.info.serial, nsid)
                data = identify.namespace(ns.nsze, ns.state.lba_format, nguid, eui)
        elif cns in (Cns.ACTIVE_NS_LIST, Cns.CSI_ACTIVE_NS_LIST):
            if nsid >= 0xFFFFFFFE or (cns == Cns.CSI_ACTIVE_NS_LIST and csi != 0):
                raise NvmeError(Status.INVALID_FIELD, f"active namespace list after {nsid:#x} (CSI {csi})")
            data = identify.active_namespaces(list(ctrl.namespaces), nsid)
        elif cns == Cns.NS_ID_DESCRIPTORS:
            ctrl.namespace(nsid)
            data = identify.namespace_id_descriptors(*identify.namespace_ids(ctrl.info.serial, nsid))
        elif cns == Cns.CSI_NAMESPACE:
            if csi != 0:
                raise NvmeError(Status.INVALID_FIELD, f"command set {csi}")
            ctrl.namespace(nsid)
            data = identify.nvm_csi_namespace()
        elif cns == Cns.CSI_CONTROLLER:
            if csi != 0:
                raise NvmeError(Status.INVALID_FIELD, f"command set {csi}")
            data = identify.nvm_csi_controller()
        elif cns == Cns.CSI_INDEPENDENT_NAMESPACE:
            ns = ctrl.namespace(nsid)
            data = identify.csi_independent_namespace(ns.state.lba_format)
        else:
            raise NvmeError(Status.INVALID_FIELD, f"CNS {cns:#x}")
        self.to_host(cmd, data, identify.IDENTIFY_SIZE)
        return 0

    # -- features --------------------------------------------------------------------------------

    def _limits(self) -> features.FeatureLimits:
        return features.FeatureLimits(self.ctrl.info.max_queues, self.ctrl.msix_vectors())

    def _check_feature_nsid(self, fid: int, nsid: int) -> None:
        if fid in features.NS_SPECIFIC and nsid not in (0, NSID_ALL):
            self.ctrl.namespace(nsid)

    async def get_features(self, cmd: Command) -> int:
        ctrl = self.ctrl
        fid, sel = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 7
        self._check_feature_nsid(fid, cmd.nsid)
        if fid == ocp.FID_ERROR_INJECTION:  # OCP error injection: fault rules (.ocp)
            if sel == features.SEL_CAPABILITIES:
                return features.CAP_CHANGEABLE
            count, data = ocp.get_error_injection(ctrl)
            self.to_host(cmd, data, 4096)
            return count
        if sel == features.SEL_CAPABILITIES:
            return features.capabilities(fid)
        if sel > features.SEL_CAPABILITIES:
            raise NvmeError(Status.INVALID_FIELD, f"select {sel}")
        f = ctrl.state.features if sel == features.SEL_CURRENT else type(ctrl.state.features)()
        if fid == Feature.TIMESTAMP:
            self.to_host(cmd, self._timestamp(f), 8)
            return 0
        if fid == Feature.HOST_BEHAVIOR_SUPPORT:
            self.to_host(cmd, f.host_behavior, 512)
            return 0
        return features.get(f, fid, cmd.cdw11, self._limits())

    async def set_features(self, cmd: Command) -> int:
        ctrl = self.ctrl
        fid, save = cmd.cdw10 & 0xFF, bool(cmd.cdw10 >> 31)
        self._check_feature_nsid(fid, cmd.nsid)
        if fid == ocp.FID_ERROR_INJECTION and not save:
            length = (cmd.cdw11 & 0x7F) * ocp.ENTRY.size
            return ocp.set_error_injection(ctrl, cmd, self.from_host(cmd, length) if length else b"")
        if fid not in features.SUPPORTED:
            raise NvmeError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
        if save:
            raise NvmeError(Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#x} cannot be saved")
        f = ctrl.state.features
        if fid == Feature.TIMESTAMP:
            raw = self.from_host(cmd, 8)
            f.timestamp_ms = int.from_bytes(raw[:6], "little")
            f.timestamp_set_at_ms = ctrl.now_ms()
            f.timestamp_set = True
            return 0
        if fid == Feature.HOST_BEHAVIOR_SUPPORT:
            f.host_behavior = self.from_host(cmd, 512)
            return 0
        io_queues = any(qid != 0 for qid in (*ctrl.state.sqs, *ctrl.state.cqs))
        result = features.set(f, fid, cmd.cdw11, self._limits(), io_queues)
        if fid == Feature.TEMPERATURE_THRESHOLD:
            self._check_temperature()
        return result

    def _timestamp(self, f: features.Features) -> bytes:
        now = self.ctrl.now_ms()
        if f.timestamp_set:
            value, attrs = f.timestamp_ms + now - f.timestamp_set_at_ms, 1 << 1  # origin: host
        else:
            value, attrs = now, 0  # time since controller reset
        return (value & ((1 << 48) - 1)).to_bytes(6, "little") + bytes([attrs, 0])

    def critical_warning(self) -> int:
        f = self.ctrl.state.features
        over = f.temperature_thresholds.get((0, features.OVER), features.default_threshold(0, features.OVER))
        under = f.temperature_thresholds.get((0, features.UNDER), 0)
        temp = identify.COMPOSITE_TEMPERATURE
        return 0x2 if temp > over or temp < under else 0

    def _check_temperature(self) -> None:
        if self.critical_warning() & 0x2 and self.ctrl.state.features.async_event_config & 0x2:
            self.ctrl.async_event(AsyncEventType.SMART, 0x01, LogPage.SMART)

    # -- log pages ---------------------------------------------------------------------------------

    async def get_log_page(self, cmd: Command) -> int:
        ctrl = self.ctrl
        lid, rae = cmd.cdw10 & 0xFF, bool(cmd.cdw10 & 1 << 15)
        numd = ((cmd.cdw10 >> 16) | (cmd.cdw11 & 0xFFFF) << 16) + 1
        offset = cmd.cdw12 | cmd.cdw13 << 32
        length = numd * 4
        if offset & 3:
            raise NvmeError(Status.INVALID_FIELD, f"log page offset {offset:#x} not dword aligned")
        aer = ctrl.state.aer
        clears: int | None = None
        if lid == LogPage.ERROR_INFO:
            data, clears = logpages.error_information(ctrl.state.error_log), AsyncEventType.ERROR
        elif lid == LogPage.SMART:
            if cmd.nsid not in (0, NSID_ALL):
                ctrl.namespace(cmd.nsid)
            data = logpages.smart(ctrl.state.smart, self.critical_warning(), ctrl.power_on_seconds())
            clears = AsyncEventType.SMART
        elif lid == LogPage.FIRMWARE_SLOT:
            data = logpages.firmware_slot(ctrl.info.firmware)
        elif lid == LogPage.CHANGED_NS_LIST:
            data, clears = logpages.changed_namespaces(aer.changed_namespaces), AsyncEventType.NOTICE
        elif lid == LogPage.COMMANDS_EFFECTS:
            if cmd.cdw14 >> 24 != 0:
                raise NvmeError(Status.INVALID_FIELD, f"effects log for command set {cmd.cdw14 >> 24}")
            data = logpages.commands_effects()
        else:
            raise NvmeError(Status.INVALID_LOG_PAGE, f"log page {lid:#x}")
        if offset >= len(data):
            raise NvmeError(Status.INVALID_FIELD, f"offset {offset} beyond log page {lid:#x}")
        self.to_host(cmd, data[offset : offset + length], length)
        if clears is not None and not rae:
            aer.masked_types.discard(int(clears))
            if lid == LogPage.CHANGED_NS_LIST:
                aer.changed_namespaces.clear()
            ctrl.deliver_async_events()
        return 0

    # -- events, abort, keep alive -------------------------------------------------------------

    async def async_event_request(self, cmd: Command) -> int | None:
        aer = self.ctrl.state.aer
        if len(aer.outstanding) >= identify.AER_LIMIT:
            raise NvmeError(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED, "too many AERs")
        aer.outstanding.append(cmd.cid)
        self.ctrl.deliver_async_events()
        return None

    async def abort(self, cmd: Command) -> int:
        # Commands run to completion quickly here; report "not aborted" (dword 0 bit 0).
        return 1

    async def keep_alive(self, cmd: Command) -> int:
        return 0

    # -- doorbell buffer config ------------------------------------------------------------------

    async def doorbell_buffer_config(self, cmd: Command) -> int:
        ctrl = self.ctrl
        dbs, eis = cmd.prp1, cmd.prp2
        page = ctrl.page_size
        if dbs % page or eis % page or dbs == eis or cmd.psdt:
            raise NvmeError(Status.INVALID_FIELD, f"doorbell buffers {dbs:#x}/{eis:#x}")
        if not ctrl.dma.contains(dbs, page) or not ctrl.dma.contains(eis, page):
            raise NvmeError(Status.INVALID_FIELD, "doorbell buffers are not mapped")
        shadow = ctrl.state.shadow
        shadow.doorbells, shadow.event_idx = dbs, eis
        log.info("shadow doorbells at %#x, event indexes at %#x", dbs, eis)
        # Seed the shadows with what the controller knows, so nothing already submitted or
        # consumed looks new (or undone) when the shadows take over.
        for sq in ctrl.state.sqs.values():
            write_shadow(ctrl.dma, shadow, sq.qid, False, sq.tail)
            write_event_idx(ctrl.dma, shadow, sq.qid, False, sq.tail)
        for cq in ctrl.state.cqs.values():
            write_shadow(ctrl.dma, shadow, cq.qid, True, cq.head)
            write_event_idx(ctrl.dma, shadow, cq.qid, True, cq.head)
        return 0

    # -- format ------------------------------------------------------------------------------------

    async def format_nvm(self, cmd: Command) -> int:
        ctrl = self.ctrl
        lbaf = (cmd.cdw10 & 0xF) | ((cmd.cdw10 >> 12) & 0x3) << 4
        mset, pi, ses = (cmd.cdw10 >> 4) & 1, (cmd.cdw10 >> 5) & 7, (cmd.cdw10 >> 9) & 7
        if lbaf >= len(identify.LBA_FORMATS) or mset or pi:
            raise NvmeError(Status.INVALID_FORMAT, f"LBA format {lbaf}, MSET {mset}, PI {pi}")
        if ses > 1:
            raise NvmeError(Status.INVALID_FIELD, f"secure erase setting {ses}")
        targets = list(ctrl.namespaces.values()) if cmd.nsid == NSID_ALL else [ctrl.namespace(cmd.nsid)]
        for ns in targets:
            if ns.backend.read_only:
                raise NvmeError(Status.NAMESPACE_WRITE_PROTECTED, f"namespace {ns.nsid} is read-only")
        for ns in targets:
            if ses == 1:
                await ns.backend.write_zeroes(0, ns.backend.size, may_unmap=True)
            ns.state.lba_format = lbaf
        return 0
