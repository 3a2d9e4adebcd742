"""The NVMe controller's migratable state and its two formats.

``opaque/vfu-nvme`` (UUID 8a6f08cb-ae20-5b17-ad1d-4264296b484d = uuid5(NS, "opaque/vfu-nvme")):
:class:`NvmeMigState` as schema-checked TLV; only vfu-server's NVMe controller reads it.

``nvme-ctrl/std/1`` (UUID a035903e-a033-5eaf-812b-d1b8c0ea4232): documented records,
docs/migration-format.md section 5.3; the I/O queues are carried as the NVMe Controller State
v0 of NVMe Base 2.1 (TP4159, Figs. 359-361), verbatim, without the Controller State header of
Fig. 358.

Both formats encode and decode the same plain-data tree, :class:`NvmeMigState`, captured after
the controller quiesced (no fetched but uncompleted command except outstanding AERs and
completions held back by a full CQ, which the tree names explicitly). :func:`validate` checks a
decoded tree against the profile it carries -- the destination compares that profile with its
own before loading -- so a tree that passes is safe to apply.
"""

from __future__ import annotations

import errno
import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

from vfu_server.migration.envelope import Record
from vfu_server.migration.errors import MigrationFormatError
from vfu_server.migration.formats import (
    FormatSet,
    OpaqueFormat,
    RecordSet,
    StandardFormat,
    register_formats,
)
from vfu_server.migration.generic import (
    GENERIC_LAYOUTS,
    IntxState,
    MsixState,
    PciConfigState,
    PciProfile,
    PciState,
    generic_records,
    pci_parts_from_records,
    profile_of_records,
)
from vfu_server.migration.records import RecordLayout, StructLayout

# The records that are plain copies of the controller's live state are its classes (one
# definition each); the names below are the format's, which its opaque schema also uses.
from .state import AsyncEvent as AerEvent
from .state import CompletionQueueState as CqState
from .state import ErrorLogEntry as ErrorEntry
from .state import ShadowDoorbells as Dbbuf
from .state import SmartCounters as SmartState
from .state import SubmissionQueueState as SqState

__all__ = [
    "NVME_FORMATS",
    "NVME_OPAQUE",
    "NVME_STANDARD",
    "AerEvent",
    "AerState",
    "CqPending",
    "CqState",
    "CtrlProfile",
    "CtrlRegs",
    "Dbbuf",
    "ErrorEntry",
    "FeatureState",
    "NamespaceMig",
    "NsProfile",
    "NvmeMigState",
    "PendingCqe",
    "SmartState",
    "SqState",
    "TempThreshold",
    "VectorConfig",
    "decode_device_abi",
    "encode_device_abi",
    "sample_state",
    "validate",
]

CSTS_RDY = 1
CC_EN = 1
AER_EVENT_TYPES = 8
MAX_CHANGED_NS = 1024
MAX_ERROR_LOG = 256
PAGE = 4096
_U16, _U32, _U48, _U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 48) - 1, (1 << 64) - 1


def _names(cls: type) -> tuple[str, ...]:
    """A record class's field names (not its class attributes, such as opaque_name)."""
    return tuple(f.name for f in fields(cls))


# -- the state tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NsProfile:
    """One namespace as the guest sees it, from the controller's configuration."""

    nsid: int
    size_bytes: int  # backend capacity; NSZE = size_bytes >> LBADS
    lbads: int  # log2 of the configured LBA data size
    read_only: bool = False
    nguid: bytes = bytes(16)
    eui64: bytes = bytes(8)
    uuid: bytes = bytes(16)


@dataclass(frozen=True)
class CtrlProfile:
    """The controller's guest-visible ABI: PROFILE.device_abi of ``nvme-ctrl/std/1``."""

    cap: int
    vs: int
    mqes: int  # CAP.MQES, 0-based
    mdts: int
    nn: int
    oacs: int
    oncs: int
    sgls: int
    max_io_queue_pairs: int
    msix_vectors: int
    aerl: int  # 0-based
    elpe: int  # 0-based
    vwc: int
    lba_formats: tuple[int, ...]  # LBADS per format index
    serial: str
    model: str
    firmware: str
    namespaces: tuple[NsProfile, ...] = ()


@dataclass(frozen=True)
class CtrlRegs:
    cc: int = 0
    csts: int = 0
    aqa: int = 0
    intms: int = 0
    asq: int = 0
    acq: int = 0


@dataclass(frozen=True)
class TempThreshold:
    sensor: int  # 0 composite, 1..8 sensors
    kind: int  # 0 over, 1 under
    value: int  # Kelvin


@dataclass(frozen=True)
class VectorConfig:
    vector: int
    coalescing_disable: bool


@dataclass(frozen=True)
class FeatureState:
    arbitration: int = 0
    power_state: int = 0
    temperature_thresholds: tuple[TempThreshold, ...] = ()  # set ones, (sensor, kind) ascending
    error_recovery: int = 0
    volatile_write_cache: bool = True
    queues_granted: tuple[int, ...] = ()  # () not set, else (NSQA, NCQA), 0-based
    interrupt_coalescing: int = 0
    vector_config: tuple[VectorConfig, ...] = ()  # set ones, vector ascending
    write_atomicity: int = 0
    async_event_config: int = 0
    keep_alive_timer: int = 0
    host_behavior: bytes = bytes(512)
    timestamp_ms: int = 0  # host timestamp value at the moment of saving
    timestamp_set: bool = False


@dataclass(frozen=True)
class AerState:
    outstanding: tuple[int, ...] = ()  # CIDs of outstanding AERs, oldest first
    pending: tuple[AerEvent, ...] = ()  # queued events, oldest first
    masked_types: tuple[int, ...] = ()  # ascending
    changed_namespaces: tuple[int, ...] = ()


@dataclass(frozen=True)
class NamespaceMig:
    nsid: int
    lba_format: int  # FLBAS format index (may differ from the profile's after Format NVM)
    lbads: int
    nsze: int
    nguid: bytes = bytes(16)
    eui64: bytes = bytes(8)
    uuid: bytes = bytes(16)
    write_protected: bool = False
    backend_hash: bytes = bytes(32)  # informational; storage is shared, data not migrated


@dataclass(frozen=True)
class PendingCqe:
    sqid: int
    cid: int
    status: int  # 15-bit status field (SC, SCT, CRD, M, DNR)
    dw0: int = 0


@dataclass(frozen=True)
class CqPending:
    cqid: int
    entries: tuple[PendingCqe, ...]  # in posting order


@dataclass(frozen=True)
class NvmeMigState(PciState):
    regs: CtrlRegs = field(default_factory=CtrlRegs)
    sqs: tuple[SqState, ...] = ()  # qid ascending, the admin SQ (0) included
    cqs: tuple[CqState, ...] = ()
    dbbuf: Dbbuf = field(default_factory=Dbbuf)
    features: FeatureState = field(default_factory=FeatureState)
    aer: AerState = field(default_factory=AerState)
    error_log: tuple[ErrorEntry, ...] = ()  # oldest first
    smart: SmartState = field(default_factory=SmartState)
    namespaces: tuple[NamespaceMig, ...] = ()
    pending: tuple[CqPending, ...] = ()  # cqid ascending, only CQs holding completions


# -- PROFILE.device_abi ---------------------------------------------------------------------------

ABI_TYPE = 0x0101  # CTRL_PROFILE
_ABI_HEAD = struct.Struct("<HH")  # abi_type, fixed_len
_ABI_FIXED = StructLayout([
    ("cap", "Q"), ("vs", "I"), ("mqes", "H"), ("mdts", "B"), ("num_lba_formats", "B"),
    ("nn", "I"), ("oacs", "H"), ("oncs", "H"), ("sgls", "I"),
    ("max_io_queue_pairs", "H"), ("msix_vectors", "H"),
    ("aerl", "B"), ("elpe", "B"), ("vwc", "B"), ("ns_entry_size", "B"),
    ("ns_count", "H"), ("reserved0", "H"), ("lbads", "16s"),
    ("serial", "20s"), ("model", "40s"), ("firmware", "8s"),
], "CTRL_PROFILE")
_ABI_NS = StructLayout([
    ("nsid", "I"), ("lbads", "B"), ("flags", "B"), ("reserved0", "H"), ("size_bytes", "Q"),
    ("nguid", "16s"), ("eui64", "8s"), ("uuid", "16s"),
], "CTRL_PROFILE.namespace")


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


def encode_device_abi(p: CtrlProfile) -> bytes:
    if len(p.lba_formats) > 16:
        raise ValueError("at most 16 LBA formats")
    fixed = _ABI_FIXED.pack({
        "cap": p.cap, "vs": p.vs, "mqes": p.mqes, "mdts": p.mdts,
        "num_lba_formats": len(p.lba_formats), "nn": p.nn, "oacs": p.oacs, "oncs": p.oncs,
        "sgls": p.sgls, "max_io_queue_pairs": p.max_io_queue_pairs,
        "msix_vectors": p.msix_vectors, "aerl": p.aerl, "elpe": p.elpe, "vwc": p.vwc,
        "ns_entry_size": _ABI_NS.size, "ns_count": len(p.namespaces),
        "lbads": bytes(p.lba_formats).ljust(16, b"\0"),
        "serial": _ascii(p.serial, 20), "model": _ascii(p.model, 40),
        "firmware": _ascii(p.firmware, 8),
    })
    tail = _ABI_NS.pack_array({
        "nsid": n.nsid, "lbads": n.lbads, "flags": int(n.read_only), "size_bytes": n.size_bytes,
        "nguid": n.nguid, "eui64": n.eui64, "uuid": n.uuid,
    } for n in p.namespaces)
    return _ABI_HEAD.pack(ABI_TYPE, len(fixed)) + fixed + tail


def _bad(reason: str) -> MigrationFormatError:
    return MigrationFormatError(errno.EINVAL, f"nvme: {reason}")


def decode_device_abi(abi: bytes) -> CtrlProfile:
    """PROFILE.device_abi -> :class:`CtrlProfile` (EBADMSG if malformed, EINVAL if foreign)."""
    if len(abi) < _ABI_HEAD.size:
        raise MigrationFormatError(errno.EBADMSG, "nvme: device_abi too short")
    kind, flen = _ABI_HEAD.unpack_from(abi)
    if kind != ABI_TYPE:
        raise _bad(f"device_abi type {kind:#06x} is not CTRL_PROFILE")
    if _ABI_HEAD.size + flen > len(abi):
        raise MigrationFormatError(errno.EBADMSG, "nvme: device_abi fixed_len overruns")
    v = _ABI_FIXED.unpack(abi[_ABI_HEAD.size:_ABI_HEAD.size + flen])
    nlbaf = v["num_lba_formats"]
    if not 1 <= nlbaf <= 16:
        raise _bad(f"{nlbaf} LBA formats")
    rows = _ABI_NS.unpack_array(abi[_ABI_HEAD.size + flen:], v["ns_count"], v["ns_entry_size"])
    return CtrlProfile(
        cap=v["cap"], vs=v["vs"], mqes=v["mqes"], mdts=v["mdts"], nn=v["nn"], oacs=v["oacs"],
        oncs=v["oncs"], sgls=v["sgls"], max_io_queue_pairs=v["max_io_queue_pairs"],
        msix_vectors=v["msix_vectors"], aerl=v["aerl"], elpe=v["elpe"], vwc=v["vwc"],
        lba_formats=tuple(v["lbads"][:nlbaf]),
        serial=v["serial"].decode("ascii", "replace").rstrip(" "),
        model=v["model"].decode("ascii", "replace").rstrip(" "),
        firmware=v["firmware"].decode("ascii", "replace").rstrip(" "),
        namespaces=tuple(NsProfile(r["nsid"], r["size_bytes"], r["lbads"], bool(r["flags"] & 1),
                                   r["nguid"], r["eui64"], r["uuid"]) for r in rows),
    )


# -- validation of a decoded tree -----------------------------------------------------------------


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise _bad(reason)


def _ascending(items: tuple, key: str, what: str) -> None:
    keys = [getattr(i, key) for i in items]
    _need(all(a < b for a, b in itertools.pairwise(keys)),
          f"{what} not strictly ascending by {key}")


def validate(s: NvmeMigState) -> CtrlProfile:
    """Check a decoded tree against the profile it carries; returns that profile's ABI.

    Everything a controller needs to apply the tree without further checks is verified here:
    queue geometry and pointers, references between queues, vectors, limits, namespaces.
    The checks run in this order, and the first that fails gives the refusal.
    """
    abi = decode_device_abi(s.profile.device_abi)
    _check_registers(s, abi)
    sqs = {q.qid: q for q in s.sqs}
    cqs = {q.qid: q for q in s.cqs}
    _check_queues(s, abi, sqs, cqs)
    _check_pending_completions(s, sqs, cqs)
    _check_async_events(s.aer, abi)
    _check_doorbell_buffer(s.dbbuf)
    _check_features(s.features, abi)
    _check_logs(s)
    _check_namespaces(s, abi)
    return abi


def _check_registers(s: NvmeMigState, abi: CtrlProfile) -> None:
    _need(s.profile.msix_vectors == abi.msix_vectors, "PROFILE and CTRL_PROFILE disagree on vectors")
    r = s.regs
    for name in ("cc", "csts", "aqa", "intms"):
        _need(0 <= getattr(r, name) <= _U32, f"CTRL_REGS.{name} out of range")
    _need(0 <= r.asq <= _U64 and 0 <= r.acq <= _U64, "CTRL_REGS admin queue address out of range")


def _check_queues(s: NvmeMigState, abi: CtrlProfile, sqs: dict[int, SqState], cqs: dict[int, CqState]) -> None:
    """Order, the admin queues against the registers, geometry, and which CQ each SQ feeds."""
    _ascending(s.sqs, "qid", "submission queues")
    _ascending(s.cqs, "qid", "completion queues")
    r = s.regs
    if r.csts & CSTS_RDY:
        _need(bool(r.cc & CC_EN), "CSTS.RDY without CC.EN")
        _need(0 in sqs and 0 in cqs, "ready controller without admin queues")
        asq, acq = sqs[0], cqs[0]
        _need(asq.base == r.asq and acq.base == r.acq, "admin queue bases differ from ASQ/ACQ")
        _need(asq.size == (r.aqa & 0xFFF) + 1 and acq.size == ((r.aqa >> 16) & 0xFFF) + 1,
              "admin queue sizes differ from AQA")
        _need(asq.cqid == 0 and asq.priority == 0, "admin SQ must complete to CQ 0")
    else:
        _need(not sqs and not cqs, "queues on a controller that is not ready")
        _need(not s.aer.outstanding, "outstanding AERs on a controller that is not ready")
    page = 4096 << ((r.cc >> 7) & 0xF)
    for q in (*s.sqs, *s.cqs):
        kind = "CQ" if isinstance(q, CqState) else "SQ"
        _need(q.qid == 0 or 1 <= q.qid <= abi.max_io_queue_pairs, f"{kind} {q.qid}: bad queue id")
        _need(2 <= q.size <= abi.mqes + 1, f"{kind} {q.qid}: size {q.size}")
        _need(0 <= q.head < q.size and 0 <= q.tail < q.size, f"{kind} {q.qid}: head/tail beyond size")
        _need(0 <= q.base <= _U64 and q.base % page == 0, f"{kind} {q.qid}: base {q.base:#x}")
    for sq in s.sqs:
        _need(sq.cqid in cqs and (sq.cqid == 0) == (sq.qid == 0), f"SQ {sq.qid}: CQ {sq.cqid}")
        _need(0 <= sq.priority <= 3, f"SQ {sq.qid}: priority {sq.priority}")
    for cq in s.cqs:
        _need(0 <= cq.vector < abi.msix_vectors, f"CQ {cq.qid}: vector {cq.vector}")
        _need(cq.phase in (0, 1), f"CQ {cq.qid}: phase {cq.phase}")


def _check_pending_completions(s: NvmeMigState, sqs: dict[int, SqState], cqs: dict[int, CqState]) -> None:
    _ascending(s.pending, "cqid", "pending completions")
    for p in s.pending:
        _need(p.cqid in cqs and p.entries, f"PENDING_CQE for CQ {p.cqid}")
        feeders = [sq for sq in s.sqs if sq.cqid == p.cqid]
        # Each entry of a feeding SQ completes at most once; CQ 0 also completes the AERs.
        _need(len(p.entries) <= sum(sq.size for sq in feeders) + (len(s.aer.outstanding) if p.cqid == 0 else 0),
              f"CQ {p.cqid}: more pending completions than its SQs hold")
        for e in p.entries:
            _need(e.sqid in sqs and sqs[e.sqid].cqid == p.cqid, f"CQ {p.cqid}: completion for SQ {e.sqid}")
            _need(0 <= e.cid <= _U16 and 0 <= e.status < 1 << 15 and 0 <= e.dw0 <= _U32,
                  f"CQ {p.cqid}: completion fields out of range")


def _check_async_events(a: AerState, abi: CtrlProfile) -> None:
    _need(len(a.outstanding) <= abi.aerl + 1, f"{len(a.outstanding)} outstanding AERs")
    _need(len(set(a.outstanding)) == len(a.outstanding), "duplicate AER command ids")
    _need(all(0 <= c <= _U16 for c in a.outstanding), "AER command id out of range")
    _need(len(a.pending) <= 64, "too many queued asynchronous events")
    for e in a.pending:
        _need(0 <= e.event_type < AER_EVENT_TYPES and 0 <= e.info <= 0xFF and 0 <= e.log_page <= 0xFF,
              "asynchronous event out of range")
    _need(list(a.masked_types) == sorted(set(a.masked_types)), "masked event types not ascending")
    _need(all(0 <= t < AER_EVENT_TYPES for t in a.masked_types), "masked event type out of range")
    _need(len(a.changed_namespaces) <= MAX_CHANGED_NS, "changed namespace list too long")
    _need(all(0 < n <= _U32 for n in a.changed_namespaces), "changed namespace id out of range")


def _check_doorbell_buffer(d: Dbbuf) -> None:
    if d.doorbells or d.event_idx:
        _need(bool(d.doorbells and d.event_idx) and d.doorbells != d.event_idx
              and d.doorbells % PAGE == 0 and d.event_idx % PAGE == 0
              and d.doorbells <= _U64 and d.event_idx <= _U64, "doorbell buffer addresses")


def _check_features(f: FeatureState, abi: CtrlProfile) -> None:
    for name in ("arbitration", "power_state", "error_recovery", "interrupt_coalescing",
                 "write_atomicity", "async_event_config", "keep_alive_timer"):
        _need(0 <= getattr(f, name) <= _U32, f"feature {name} out of range")
    keys = [(t.sensor, t.kind) for t in f.temperature_thresholds]
    _need(keys == sorted(set(keys)), "temperature thresholds not ascending")
    _need(all(0 <= t.sensor <= 8 and t.kind in (0, 1) and 0 <= t.value <= _U16
              for t in f.temperature_thresholds), "temperature threshold out of range")
    _ascending(f.vector_config, "vector", "interrupt vector configurations")
    _need(all(0 <= v.vector < abi.msix_vectors for v in f.vector_config), "vector configuration")
    _need(len(f.queues_granted) in (0, 2) and all(0 <= n < abi.max_io_queue_pairs for n in f.queues_granted),
          "number of queues granted")
    _need(len(f.host_behavior) == 512, "host behavior data is not 512 bytes")
    _need(0 <= f.timestamp_ms <= _U48, "timestamp out of range")


def _check_logs(s: NvmeMigState) -> None:
    """The error log and the SMART counters."""
    _need(len(s.error_log) <= MAX_ERROR_LOG, "error log too long")
    for e in s.error_log:
        _need(0 <= e.error_count <= _U64 and 0 <= e.sqid <= _U16 and 0 <= e.cid <= _U16
              and 0 <= e.status <= _U16 and 0 <= e.lba <= _U64 and 0 <= e.nsid <= _U32,
              "error log entry out of range")
    for name in _names(SmartState):
        _need(0 <= getattr(s.smart, name) <= _U64, f"SMART {name} out of range")


def _check_namespaces(s: NvmeMigState, abi: CtrlProfile) -> None:
    _need(tuple(n.nsid for n in s.namespaces) == tuple(n.nsid for n in abi.namespaces),
          "namespaces differ from the profile's")
    for ns, prof in zip(s.namespaces, abi.namespaces, strict=True):
        _need(0 <= ns.lba_format < len(abi.lba_formats), f"namespace {ns.nsid}: LBA format {ns.lba_format}")
        _need(ns.lbads == abi.lba_formats[ns.lba_format], f"namespace {ns.nsid}: LBADS {ns.lbads}")
        _need(ns.nsze == prof.size_bytes >> ns.lbads, f"namespace {ns.nsid}: NSZE {ns.nsze}")
        _need((ns.nguid, ns.eui64, ns.uuid) == (prof.nguid, prof.eui64, prof.uuid),
              f"namespace {ns.nsid}: identifiers differ from the profile's")
        _need(ns.write_protected == prof.read_only, f"namespace {ns.nsid}: write protection")
        _need(len(ns.backend_hash) == 32, f"namespace {ns.nsid}: backend hash")


# -- opaque/vfu-nvme ------------------------------------------------------------------------------


class _NvmeOpaque(OpaqueFormat):
    """OPAQUE_BLOB of :class:`NvmeMigState`, validated like a standard stream."""

    def from_records(self, records, env):  # type: ignore[no-untyped-def]
        state = super().from_records(records, env)
        validate(state)
        return state


NVME_OPAQUE = _NvmeOpaque(
    "opaque/vfu-nvme",
    state_type=NvmeMigState,
    schema_version=1,
    description="vfu-server's NVMe controller, implementation-private TLV of NvmeMigState",
)


# -- nvme-ctrl/std/1 ------------------------------------------------------------------------------
# Record layouts: docs/migration-format.md section 5.3 is the normative description.

CTRL_REGS = RecordLayout(0x0110, "CTRL_REGS", [
    ("cc", "I"), ("csts", "I"), ("aqa", "I"), ("intms", "I"), ("asq", "Q"), ("acq", "Q"),
])
#: TP4159 I/O Submission Queue State and I/O Completion Queue State (24 bytes each).
SQ_ENTRY = StructLayout([
    ("prp1", "Q"), ("qsize", "H"), ("qid", "H"), ("cqid", "H"), ("attr", "H"),
    ("head", "H"), ("tail", "H"), ("reserved0", "I"),
], "SQ state")
CQ_ENTRY = StructLayout([
    ("prp1", "Q"), ("qsize", "H"), ("qid", "H"), ("head", "H"), ("tail", "H"),
    ("attr", "I"), ("reserved0", "I"),
], "CQ state")
ADMIN_QUEUES = RecordLayout(0x0111, "ADMIN_QUEUES", [
    *[(f"sq_{f.name}", f.fmt) for f in SQ_ENTRY.fields],
    *[(f"cq_{f.name}", f.fmt) for f in CQ_ENTRY.fields],
])
#: NVMECS v0 header; carried verbatim (no fixed_len prefix: it is a foreign structure).
NVMECS_V0 = RecordLayout(0x7001, "NVMECS_V0", [
    ("ver", "H"), ("niosq", "H"), ("niocq", "H"), ("reserved0", "H"),
], doc="then NIOSQ 24-byte SQ entries, then NIOCQ 24-byte CQ entries, qid ascending")
DBBUF = RecordLayout(0x0113, "DBBUF", [
    ("dbs", "Q"), ("eis", "Q"), ("enabled", "B"), ("reserved0", "B"), ("reserved1", "H"),
    ("reserved2", "I"),
])
FEATURE = RecordLayout(0x0120, "FEATURE", [
    ("fid", "B"), ("sel", "B"), ("reserved0", "H"), ("value", "I"), ("data_len", "I"),
], tail=True, per_instance=True, doc="instance = FID; tail: data_len bytes of feature data")
TEMP_ENTRY = StructLayout([("sensor", "B"), ("kind", "B"), ("threshold", "H")], "FEATURE.04")
VECTOR_ENTRY = StructLayout([("vector", "H"), ("cd", "B"), ("reserved0", "B")], "FEATURE.09")
AER = RecordLayout(0x0130, "AER", [
    ("outstanding_count", "H"), ("event_count", "H"), ("event_size", "H", 4),
    ("changed_ns_count", "H"), ("masked_types", "I"), ("reserved0", "I"),
], tail=True, doc="tail: CIDs (le16 each), events, changed NSIDs (le32 each)")
AER_EVENT = StructLayout([("type", "B"), ("info", "B"), ("log_page", "B"), ("reserved0", "B")],
                         "AER.event")
ERROR_LOG = RecordLayout(0x0131, "ERROR_LOG", [
    ("count", "H"), ("entry_size", "H", 32), ("reserved0", "I"),
], tail=True, optional=True, doc="tail: count entries of entry_size bytes, oldest first")
ERROR_ENTRY = StructLayout([
    ("error_count", "Q"), ("sqid", "H"), ("cid", "H"), ("status", "H"), ("reserved0", "H"),
    ("lba", "Q"), ("nsid", "I"), ("reserved1", "I"),
], "ERROR_LOG.entry")
SMART = RecordLayout(0x0132, "SMART", [(name, "Q") for name in _names(SmartState)],
                     optional=True)
NAMESPACE = RecordLayout(0x0140, "NAMESPACE", [
    ("nsid", "I"), ("flbas", "B"), ("lbads", "B"), ("attached", "B", 1), ("write_protected", "B"),
    ("nsze", "Q"), ("ncap", "Q"), ("nguid", "16s"), ("eui64", "8s"), ("uuid", "16s"),
    ("backend_hash", "32s"),
], per_instance=True)
PENDING_CQE = RecordLayout(0x0150, "PENDING_CQE", [
    ("cqid", "H"), ("count", "H"), ("entry_size", "H", 16), ("reserved0", "H"),
], tail=True, per_instance=True, doc="instance = cqid; tail: count CQEs, posting order")
CQE = StructLayout([
    ("dw0", "I"), ("dw1", "I"), ("sqhd", "H"), ("sqid", "H"), ("cid", "H"), ("status", "H"),
], "PENDING_CQE.entry")

NVME_LAYOUTS = (CTRL_REGS, ADMIN_QUEUES, NVMECS_V0, DBBUF, FEATURE, AER, ERROR_LOG, SMART,
                NAMESPACE, PENDING_CQE)

FID_TEMPERATURE, FID_NUM_QUEUES, FID_VECTOR_CONFIG = 0x04, 0x07, 0x09
FID_TIMESTAMP, FID_HOST_BEHAVIOR = 0x0E, 0x16
#: FIDs whose whole current value is FEATURE.value, by FeatureState field.
_VALUE_FIDS = {0x01: "arbitration", 0x02: "power_state", 0x05: "error_recovery",
               0x06: "volatile_write_cache", 0x08: "interrupt_coalescing",
               0x0A: "write_atomicity", 0x0B: "async_event_config", 0x0F: "keep_alive_timer"}
_DATA_FIDS = {FID_TEMPERATURE, FID_VECTOR_CONFIG, FID_TIMESTAMP, FID_HOST_BEHAVIOR}


def _sq_entry(q: SqState) -> dict:
    return {"prp1": q.base, "qsize": q.size - 1, "qid": q.qid, "cqid": q.cqid,
            "attr": 1 | (q.priority & 3) << 1, "head": q.head, "tail": q.tail}


def _cq_entry(q: CqState) -> dict:
    # S0PT: the phase tag of slot 0 as last written: the current phase once the tail has
    # moved past slot 0 in this pass, the previous one while the tail is at 0.
    s0pt = q.phase if q.tail else q.phase ^ 1
    return {"prp1": q.base, "qsize": q.size - 1, "qid": q.qid, "head": q.head, "tail": q.tail,
            "attr": 1 | int(q.irq_enabled) << 1 | s0pt << 2 | (q.vector & 0xFFFF) << 16}


def _sq_from(v: dict) -> SqState:
    _need(v["attr"] & 1 == 1 and not v["attr"] & ~0x7, f"SQ {v['qid']}: ATTR {v['attr']:#x}")
    return SqState(v["qid"], v["prp1"], v["qsize"] + 1, v["cqid"], (v["attr"] >> 1) & 3,
                   v["head"], v["tail"])


def _cq_from(v: dict) -> CqState:
    attr = v["attr"]
    _need(attr & 1 == 1 and not attr & 0xFFF8, f"CQ {v['qid']}: ATTR {attr:#x}")
    s0pt = (attr >> 2) & 1
    phase = s0pt if v["tail"] else s0pt ^ 1
    return CqState(v["qid"], v["prp1"], v["qsize"] + 1, attr >> 16, bool(attr & 2),
                   v["head"], v["tail"], phase)


def _prefixed(v: dict, prefix: str) -> dict:
    return {k[len(prefix):]: x for k, x in v.items() if k.startswith(prefix)}


def _feature_records(f: FeatureState) -> Iterator[Record]:
    rows: list[tuple[int, int, bytes]] = []
    for fid, name in _VALUE_FIDS.items():
        rows.append((fid, int(getattr(f, name)), b""))
    if f.temperature_thresholds:
        rows.append((FID_TEMPERATURE, 0, TEMP_ENTRY.pack_array(
            {"sensor": t.sensor, "kind": t.kind, "threshold": t.value} for t in f.temperature_thresholds)))
    if f.queues_granted:
        rows.append((FID_NUM_QUEUES, f.queues_granted[0] | f.queues_granted[1] << 16, b""))
    if f.vector_config:
        rows.append((FID_VECTOR_CONFIG, 0, VECTOR_ENTRY.pack_array(
            {"vector": c.vector, "cd": int(c.coalescing_disable)} for c in f.vector_config)))
    if f.timestamp_set:
        # The Get Features Timestamp data: 48-bit ms, attributes (bit 1 = set by the host).
        rows.append((FID_TIMESTAMP, 0, f.timestamp_ms.to_bytes(6, "little") + b"\x02\x00"))
    rows.append((FID_HOST_BEHAVIOR, 0, f.host_behavior))
    for fid, value, data in sorted(rows):
        yield FEATURE.pack({"fid": fid, "value": value, "data_len": len(data)}, tail=data,
                           instance=fid)


def _features_from(rs: RecordSet) -> FeatureState:
    kw: dict = {}
    for inst, v, tail in rs.all(FEATURE):
        fid = v["fid"]
        _need(inst == fid, f"FEATURE instance {inst} carries FID {fid:#x}")
        _need(v["sel"] == 0, f"FEATURE {fid:#x}: only current values (SEL 0) can be loaded")
        n = v["data_len"]
        if n > len(tail):
            raise MigrationFormatError(errno.EBADMSG, f"nvme: FEATURE {fid:#x} data overruns")
        data = bytes(tail[:n])
        if fid in _VALUE_FIDS:
            name = _VALUE_FIDS[fid]
            kw[name] = bool(v["value"] & 1) if name == "volatile_write_cache" else v["value"]
            _need(name != "volatile_write_cache" or v["value"] <= 1, "FEATURE 06h value")
        elif fid == FID_NUM_QUEUES:
            kw["queues_granted"] = (v["value"] & 0xFFFF, v["value"] >> 16)
        elif fid == FID_TEMPERATURE:
            _need(n % TEMP_ENTRY.size == 0, "FEATURE 04h data length")
            kw["temperature_thresholds"] = tuple(
                TempThreshold(e["sensor"], e["kind"], e["threshold"])
                for e in TEMP_ENTRY.unpack_array(data, n // TEMP_ENTRY.size, TEMP_ENTRY.size))
        elif fid == FID_VECTOR_CONFIG:
            _need(n % VECTOR_ENTRY.size == 0, "FEATURE 09h data length")
            kw["vector_config"] = tuple(
                VectorConfig(e["vector"], bool(e["cd"]))
                for e in VECTOR_ENTRY.unpack_array(data, n // VECTOR_ENTRY.size, VECTOR_ENTRY.size))
            _need(all(e["cd"] <= 1 for e in VECTOR_ENTRY.unpack_array(
                data, n // VECTOR_ENTRY.size, VECTOR_ENTRY.size)), "FEATURE 09h CD")
        elif fid == FID_TIMESTAMP:
            _need(n == 8 and bool(data[6] & 0x02), "FEATURE 0Eh data (origin must be the host)")
            kw["timestamp_ms"] = int.from_bytes(data[:6], "little")
            kw["timestamp_set"] = True
        elif fid == FID_HOST_BEHAVIOR:
            _need(n == 512, "FEATURE 16h data is not 512 bytes")
            kw["host_behavior"] = data
        else:
            raise _bad(f"FEATURE {fid:#x} is not supported")
        _need(fid in _DATA_FIDS or n == 0, f"FEATURE {fid:#x} carries data")
    return FeatureState(**kw)


def _save(s: NvmeMigState, minor: int) -> Iterator[Record]:
    yield from generic_records(s)
    r = s.regs
    yield CTRL_REGS.pack(r)
    sqs = {q.qid: q for q in s.sqs}
    cqs = {q.qid: q for q in s.cqs}
    if 0 in sqs and 0 in cqs:
        yield ADMIN_QUEUES.pack({**{f"sq_{k}": v for k, v in _sq_entry(sqs[0]).items()},
                                 **{f"cq_{k}": v for k, v in _cq_entry(cqs[0]).items()}})
    io_sqs = [q for q in s.sqs if q.qid]
    io_cqs = [q for q in s.cqs if q.qid]
    body = (NVMECS_V0.pack({"niosq": len(io_sqs), "niocq": len(io_cqs)}).payload
            + SQ_ENTRY.pack_array(_sq_entry(q) for q in io_sqs)
            + CQ_ENTRY.pack_array(_cq_entry(q) for q in io_cqs))
    yield Record(NVMECS_V0.type_id, body, NVMECS_V0.flags, 0, NVMECS_V0.version)
    d = s.dbbuf
    yield DBBUF.pack({"dbs": d.doorbells, "eis": d.event_idx, "enabled": int(bool(d.doorbells))})
    yield from _feature_records(s.features)
    a = s.aer
    yield AER.pack(
        {"outstanding_count": len(a.outstanding), "event_count": len(a.pending),
         "event_size": AER_EVENT.size, "changed_ns_count": len(a.changed_namespaces),
         "masked_types": sum(1 << t for t in a.masked_types)},
        tail=struct.pack(f"<{len(a.outstanding)}H", *a.outstanding)
        + AER_EVENT.pack_array({"type": e.event_type, "info": e.info, "log_page": e.log_page}
                               for e in a.pending)
        + struct.pack(f"<{len(a.changed_namespaces)}I", *a.changed_namespaces))
    yield ERROR_LOG.pack({"count": len(s.error_log), "entry_size": ERROR_ENTRY.size},
                         tail=ERROR_ENTRY.pack_array(s.error_log))
    yield SMART.pack(s.smart)
    for ns in s.namespaces:
        yield NAMESPACE.pack({"nsid": ns.nsid, "flbas": ns.lba_format, "lbads": ns.lbads,
                              "write_protected": int(ns.write_protected), "nsze": ns.nsze,
                              "ncap": ns.nsze, "nguid": ns.nguid, "eui64": ns.eui64,
                              "uuid": ns.uuid, "backend_hash": ns.backend_hash}, instance=ns.nsid)
    for p in s.pending:
        yield PENDING_CQE.pack(
            {"cqid": p.cqid, "count": len(p.entries), "entry_size": CQE.size},
            tail=CQE.pack_array({"dw0": e.dw0, "sqid": e.sqid, "cid": e.cid, "status": e.status << 1}
                                for e in p.entries), instance=p.cqid)


def _load(rs: RecordSet, minor: int) -> NvmeMigState:
    profile = profile_of_records(rs)
    decode_device_abi(profile.device_abi)  # a foreign ABI is refused before anything else
    pci, msix, intx = pci_parts_from_records(rs, profile)
    rv, _ = rs.one(CTRL_REGS)
    regs = CtrlRegs(**{k: rv[k] for k in _names(CtrlRegs)})
    sqs: list[SqState] = []
    cqs: list[CqState] = []
    admin = rs.maybe(ADMIN_QUEUES)
    if admin is not None:
        av = admin[0]
        sq, cq = _sq_from(_prefixed(av, "sq_")), _cq_from(_prefixed(av, "cq_"))
        _need(sq.qid == 0 and cq.qid == 0, "ADMIN_QUEUES must describe queue 0")
        sqs.append(sq)
        cqs.append(cq)
    cs = [r for r in rs.records if r.type == NVMECS_V0.type_id]
    _need(len(cs) == 1, "mandatory record NVMECS_V0 missing or repeated")
    rs.all(NVMECS_V0)  # mark it used
    raw = cs[0].payload
    if len(raw) < 8:
        raise MigrationFormatError(errno.EBADMSG, "nvme: NVMECS_V0 shorter than its header")
    hv = NVMECS_V0.unpack(raw[:8])[0]
    _need(hv["ver"] == 0, f"NVMECS version {hv['ver']} (only 0 is defined)")
    nsq, ncq = hv["niosq"], hv["niocq"]
    if 8 + 24 * (nsq + ncq) != len(raw):
        raise MigrationFormatError(errno.EBADMSG, "nvme: NVMECS_V0 length does not match NIOSQ/NIOCQ")
    sqs += [_sq_from(v) for v in SQ_ENTRY.unpack_array(raw[8:], nsq, 24)]
    cqs += [_cq_from(v) for v in CQ_ENTRY.unpack_array(raw[8 + 24 * nsq:], ncq, 24)]
    _need(all(q.qid for q in sqs[1 if admin else 0:]) and all(q.qid for q in cqs[1 if admin else 0:]),
          "NVMECS_V0 describes queue 0")
    dv, _ = rs.one(DBBUF)
    _need(dv["enabled"] == int(bool(dv["dbs"])), "DBBUF enabled flag disagrees with its PRP")
    dbbuf = Dbbuf(dv["dbs"], dv["eis"]) if dv["enabled"] else Dbbuf()
    features = _features_from(rs)
    av, tail = rs.one(AER)
    no, ne, es, nc = (av["outstanding_count"], av["event_count"], av["event_size"],
                      av["changed_ns_count"])
    if 2 * no + ne * es + 4 * nc > len(tail):
        raise MigrationFormatError(errno.EBADMSG, "nvme: AER lists overrun the record")
    _need(not av["masked_types"] >> AER_EVENT_TYPES, "AER masked_types beyond event type 7")
    events = AER_EVENT.unpack_array(tail[2 * no:], ne, es)
    aer = AerState(
        outstanding=struct.unpack_from(f"<{no}H", tail, 0),
        pending=tuple(AerEvent(e["type"], e["info"], e["log_page"]) for e in events),
        masked_types=tuple(t for t in range(AER_EVENT_TYPES) if av["masked_types"] >> t & 1),
        changed_namespaces=struct.unpack_from(f"<{nc}I", tail, 2 * no + ne * es),
    )
    err = rs.maybe(ERROR_LOG)
    error_log: tuple[ErrorEntry, ...] = ()
    if err is not None:
        ev, etail = err
        error_log = tuple(ErrorEntry(**{k: e[k] for k in _names(ErrorEntry)})
                          for e in ERROR_ENTRY.unpack_array(etail, ev["count"], ev["entry_size"]))
    sm = rs.maybe(SMART)
    smart = SmartState(**{k: sm[0][k] for k in _names(SmartState)}) if sm else SmartState()
    namespaces = []
    for inst, v, _ in rs.all(NAMESPACE):
        _need(inst == v["nsid"], f"NAMESPACE instance {inst} carries NSID {v['nsid']}")
        _need(v["attached"] == 1 and v["write_protected"] <= 1 and v["ncap"] == v["nsze"],
              f"namespace {inst}: attachment/protection/capacity")
        namespaces.append(NamespaceMig(v["nsid"], v["flbas"], v["lbads"], v["nsze"], v["nguid"],
                                       v["eui64"], v["uuid"], bool(v["write_protected"]),
                                       v["backend_hash"]))
    pending = []
    for inst, v, ptail in rs.all(PENDING_CQE):
        _need(inst == v["cqid"], f"PENDING_CQE instance {inst} carries CQ {v['cqid']}")
        entries = CQE.unpack_array(ptail, v["count"], v["entry_size"])
        pending.append(CqPending(v["cqid"], tuple(PendingCqe(e["sqid"], e["cid"], e["status"] >> 1, e["dw0"])
                                                  for e in entries)))
    state = NvmeMigState(profile=profile, pci=pci, msix=msix, intx=intx, regs=regs,
                         sqs=tuple(sqs), cqs=tuple(cqs), dbbuf=dbbuf,
                         features=features, aer=aer, error_log=error_log, smart=smart,
                         namespaces=tuple(namespaces), pending=tuple(pending))
    validate(state)
    return state


NVME_STANDARD = StandardFormat(
    "nvme-ctrl/std/1",
    major=1,
    minor_max=0,
    records=(*GENERIC_LAYOUTS, *NVME_LAYOUTS),
    save=_save,
    load=_load,
    state_type=NvmeMigState,
    description="NVMe controller, documented records with TP4159 queue state (docs/migration-format.md 5.3)",
)

#: Opaque first: same-build migration is the common case (design doc 6.5).
NVME_FORMATS = FormatSet([NVME_OPAQUE, NVME_STANDARD])
register_formats("nvme", NVME_FORMATS)


def sample_state() -> NvmeMigState:
    """A fully populated, deterministic, valid state (golden vectors, tests, docs)."""
    from vfu_server.migration.generic import MsixVector

    nguid, eui64 = bytes(range(16)), bytes(range(0xA0, 0xA8))
    abi = CtrlProfile(
        cap=0x0040_0000_1401_03FF, vs=0x00010400, mqes=1023, mdts=5, nn=1, oacs=0x0102,
        oncs=0x00DD, sgls=0x10001, max_io_queue_pairs=4, msix_vectors=5, aerl=3, elpe=63, vwc=1,
        lba_formats=(9, 12), serial="VFU0001", model="vfu-server NVMe", firmware="0.1",
        namespaces=(NsProfile(1, 16 << 20, 9, False, nguid, eui64, bytes(16)),),
    )
    profile = PciProfile(
        vendor_id=0x1234, device_id=0xFE10, subsys_vendor_id=0x1234, subsys_id=0x0010,
        class_code=0x010802, revision=1, bar_sizes=(0x4000, 0, 0, 0, 0, 0),
        bar_flags=(0x4, 0, 0, 0, 0, 0), msix_vectors=5, msix_table_bir=0,
        msix_table_offset=0x2000, msix_pba_bir=0, msix_pba_offset=0x3000,
        capabilities=bytes([0x01, 0x40, 0x11, 0x48, 0x10, 0x54]),
        device_abi=encode_device_abi(abi),
    )
    return NvmeMigState(
        profile=profile,
        pci=PciConfigState(command=0x0406, cache_line_size=0x10, interrupt_line=11,
                           bars=(0xFEB00004, 0, 0, 0, 0, 0), msix_control=0x8004),
        msix=MsixState(tuple(MsixVector(0xFEE00000 + 0x1000 * i, 0x4020 + i, 0) for i in range(5)),
                       b"\x04"),
        intx=IntxState(0),
        regs=CtrlRegs(cc=0x00460001, csts=0x1, aqa=0x001F001F, intms=0, asq=0x10000, acq=0x11000),
        sqs=(SqState(0, 0x10000, 32, 0, 0, 7, 7), SqState(1, 0x20000, 64, 1, 0, 10, 12),
             SqState(2, 0x22000, 64, 1, 2, 63, 0)),
        cqs=(CqState(0, 0x11000, 32, 0, True, 6, 6, 1), CqState(1, 0x21000, 4, 1, True, 0, 3, 1),
             CqState(2, 0x23000, 16, 2, False, 0, 0, 0)),
        dbbuf=Dbbuf(0x30000, 0x31000),
        features=FeatureState(arbitration=3, temperature_thresholds=(TempThreshold(0, 0, 350),),
                              volatile_write_cache=False, queues_granted=(3, 3),
                              vector_config=(VectorConfig(1, True),), async_event_config=0x100,
                              keep_alive_timer=15000, host_behavior=b"\x01" + bytes(511),
                              timestamp_ms=1_700_000_000_000, timestamp_set=True),
        aer=AerState(outstanding=(20, 21), pending=(AerEvent(0, 1, 1),), masked_types=(2,),
                     changed_namespaces=(1,)),
        error_log=(ErrorEntry(1, 1, 5, 0x4004, 0, 1), ErrorEntry(2, 0, 9, 0x0002)),
        smart=SmartState(bytes_read=1 << 20, bytes_written=1 << 21, host_read_commands=256,
                         host_write_commands=512, power_cycles=2, power_on_seconds=3600,
                         error_count=2),
        namespaces=(NamespaceMig(1, 0, 9, (16 << 20) >> 9, nguid, eui64, bytes(16), False,
                                 bytes(range(32, 64))),),
        pending=(CqPending(1, (PendingCqe(1, 12, 0), PendingCqe(2, 40, 0x0281, 7))),),
    )
