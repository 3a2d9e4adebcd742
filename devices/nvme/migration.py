"""The controller side of NVMe migration: its profile, a snapshot of its state, and applying one.

:mod:`.migration_format` turns :class:`NvmeMigState` into bytes and back; this module maps the
controller's live state (:mod:`.state` plus the runtime beside it: completions waiting for CQ
room, the power-on and timestamp clocks) to that tree and back. The controller calls
:func:`snapshot` only after it quiesced, and :func:`apply` only with a tree that passed
:func:`~.migration_format.validate` and the profile comparison.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from vfu_server.block import BlockBackend
from vfu_server.migration.generic import PciProfile

from . import identify
from .constants import NVME_VERSION_1_4
from .migration_format import (
    AerState,
    CqPending,
    CtrlProfile,
    CtrlRegs,
    FeatureState,
    NamespaceMig,
    NsProfile,
    NvmeMigState,
    PendingCqe,
    TempThreshold,
    VectorConfig,
    encode_device_abi,
)
from .queues import CqRuntime, PendingCompletion
from .state import (
    AsyncEventState,
    Features,
    Registers,
)

if TYPE_CHECKING:
    from .controller import NvmeController

log = logging.getLogger("vfu_server.device.nvme")

SGLS = 0x1 | 1 << 16  # as Identify Controller reports


def _ns_size(ctrl: NvmeController, index: int) -> tuple[int, bool, dict]:
    nsid = index + 1
    ns = ctrl.namespaces.get(nsid)
    source = ns.backend if ns is not None else ctrl.sources[index]
    if isinstance(source, BlockBackend):
        return source.size, source.read_only, source.describe()
    # An NBD backend not opened yet: what its specification says.
    return source.size or 0, source.read_only, {"kind": source.kind, "size": source.size}


def ctrl_profile(ctrl: NvmeController) -> CtrlProfile:
    """The guest-visible ABI, from the configuration (never from guest-changed state)."""
    info = ctrl.info
    namespaces = []
    for i in range(len(ctrl.sources)):
        size, read_only, _ = _ns_size(ctrl, i)
        nguid, eui64 = identify.namespace_ids(info.serial, i + 1)
        namespaces.append(NsProfile(i + 1, size, identify.LBA_FORMATS[ctrl.lba_format], read_only,
                                    nguid, eui64, bytes(16)))
    return CtrlProfile(
        cap=ctrl.cap, vs=NVME_VERSION_1_4, mqes=info.max_queue_entries - 1, mdts=info.mdts,
        nn=len(ctrl.sources), oacs=identify.OACS, oncs=identify.ONCS, sgls=SGLS,
        max_io_queue_pairs=info.max_queues, msix_vectors=ctrl.msix_vectors(),
        aerl=identify.AER_LIMIT - 1, elpe=identify.ERROR_LOG_ENTRIES - 1, vwc=1,
        lba_formats=tuple(identify.LBA_FORMATS), serial=info.serial, model=info.model,
        firmware=info.firmware, namespaces=tuple(namespaces),
    )


def profile(ctrl: NvmeController, base: PciProfile) -> PciProfile:
    # backend_hash stays zero: the storage may be reached by another path on the destination,
    # so backends are identified per namespace (NAMESPACE.backend_hash) and not compared.
    return replace(base, device_abi=encode_device_abi(ctrl_profile(ctrl)))


def backend_hash(describe: dict) -> bytes:
    return hashlib.sha256(json.dumps(describe, sort_keys=True, default=str).encode()).digest()


def snapshot(ctrl: NvmeController) -> NvmeMigState:
    s = ctrl.state
    r = s.regs
    f = s.features
    timestamp = 0
    if f.timestamp_set:
        timestamp = (f.timestamp_ms + ctrl.now_ms() - f.timestamp_set_at_ms) & ((1 << 48) - 1)
    features = FeatureState(
        arbitration=f.arbitration, power_state=f.power_state,
        temperature_thresholds=tuple(TempThreshold(sensor, kind, value) for (sensor, kind), value
                                     in sorted(f.temperature_thresholds.items())),
        error_recovery=f.error_recovery, volatile_write_cache=f.volatile_write_cache,
        queues_granted=tuple(f.queues_granted) if f.queues_granted is not None else (),
        interrupt_coalescing=f.interrupt_coalescing,
        vector_config=tuple(VectorConfig(v, d) for v, d in sorted(f.vector_coalescing_disable.items())),
        write_atomicity=f.write_atomicity, async_event_config=f.async_event_config,
        keep_alive_timer=f.keep_alive_timer, host_behavior=bytes(f.host_behavior),
        timestamp_ms=timestamp, timestamp_set=f.timestamp_set,
    )
    namespaces = []
    for i, ns_state in enumerate(s.namespaces):
        size, read_only, describe = _ns_size(ctrl, i)
        lbads = identify.LBA_FORMATS[ns_state.lba_format]
        nguid, eui64 = identify.namespace_ids(ctrl.info.serial, ns_state.nsid)
        namespaces.append(NamespaceMig(ns_state.nsid, ns_state.lba_format, lbads, size >> lbads,
                                       nguid, eui64, bytes(16), read_only, backend_hash(describe)))
    pending = []
    for qid in sorted(ctrl.cq_rt):
        rt = ctrl.cq_rt[qid]
        if rt.waiting and qid in s.cqs:
            pending.append(CqPending(qid, tuple(PendingCqe(p.sqid, p.cid, p.status & 0x7FFF,
                                                           p.dw0 & 0xFFFFFFFF) for p in rt.waiting)))
    return NvmeMigState(
        profile=ctrl.migration_profile(),
        **ctrl.pci_state(),
        regs=CtrlRegs(r.cc, r.csts, r.aqa, r.intms, r.asq, r.acq),
        # Copies: the live objects go on changing once the controller runs again.
        sqs=tuple(replace(q) for q in sorted(s.sqs.values(), key=lambda q: q.qid)),
        cqs=tuple(replace(q) for q in sorted(s.cqs.values(), key=lambda q: q.qid)),
        dbbuf=replace(s.shadow),
        features=features,
        aer=AerState(tuple(s.aer.outstanding),
                     tuple(replace(e) for e in s.aer.pending),
                     tuple(sorted(s.aer.masked_types)), tuple(s.aer.changed_namespaces)),
        error_log=tuple(replace(e) for e in s.error_log),
        smart=replace(s.smart, power_on_seconds=ctrl.power_on_seconds()),
        namespaces=tuple(namespaces),
        pending=tuple(pending),
    )


def apply(ctrl: NvmeController, st: NvmeMigState) -> None:
    """Make the (reset, quiesced) controller hold ``st``; queues start again on resume."""
    ctrl.load_pci_state(st)
    s = ctrl.state
    r = st.regs
    s.regs = Registers(vs=NVME_VERSION_1_4, intms=r.intms, cc=r.cc, csts=r.csts, aqa=r.aqa,
                       asq=r.asq, acq=r.acq)
    # Copies: the loaded tree stays as it was decoded while the controller changes its own.
    s.sqs = {q.qid: replace(q) for q in st.sqs}
    s.cqs = {q.qid: replace(q) for q in st.cqs}
    s.shadow = replace(st.dbbuf)
    f = st.features
    s.features = Features(
        arbitration=f.arbitration, power_state=f.power_state,
        temperature_thresholds={(t.sensor, t.kind): t.value for t in f.temperature_thresholds},
        error_recovery=f.error_recovery, volatile_write_cache=f.volatile_write_cache,
        queues_granted=(f.queues_granted[0], f.queues_granted[1]) if f.queues_granted else None,
        interrupt_coalescing=f.interrupt_coalescing,
        vector_coalescing_disable={v.vector: v.coalescing_disable for v in f.vector_config},
        write_atomicity=f.write_atomicity, async_event_config=f.async_event_config,
        keep_alive_timer=f.keep_alive_timer, host_behavior=bytes(f.host_behavior),
        timestamp_ms=f.timestamp_ms, timestamp_set_at_ms=ctrl.now_ms(), timestamp_set=f.timestamp_set,
    )
    s.aer = AsyncEventState(list(st.aer.outstanding),
                            [replace(e) for e in st.aer.pending],
                            set(st.aer.masked_types), list(st.aer.changed_namespaces))
    s.smart = replace(st.smart)
    ctrl._power_on_anchor = time.monotonic()
    s.error_log = [replace(e) for e in st.error_log]
    by_nsid = {ns.nsid: ns for ns in st.namespaces}
    for i, ns_state in enumerate(s.namespaces):
        loaded = by_nsid[ns_state.nsid]
        ns_state.lba_format = loaded.lba_format
        _, _, describe = _ns_size(ctrl, i)
        if loaded.backend_hash != backend_hash(describe):
            log.info("namespace %d: the source reached its storage another way (%s here); "
                     "storage is shared, data is not migrated", ns_state.nsid, describe.get("kind"))
    ctrl.page_size = 4096 << ((r.cc >> 7) & 0xF)
    ctrl.cq_rt = {q.qid: CqRuntime(q.qid) for q in st.cqs}
    for p in st.pending:
        ctrl.cq_rt[p.cqid].waiting = deque(PendingCompletion(e.sqid, e.cid, e.status, e.dw0)
                                           for e in p.entries)
    ctrl._intx_level = bool(st.intx.level)
