"""nvme-ctrl/std/1 and opaque/vfu-nvme without a server: round trips, the S0PT phase rule,
validation of everything a destination applies, compatibility rules, profile checks."""

from __future__ import annotations

import dataclasses
import errno
import struct

import pytest

from vfu_devices.nvme.migration_format import (
    CTRL_REGS,
    ERROR_LOG,
    NVME_FORMATS,
    NVME_OPAQUE,
    NVME_STANDARD,
    SMART,
    AerState,
    CqPending,
    CqState,
    Dbbuf,
    ErrorEntry,
    NvmeMigState,
    PendingCqe,
    SmartState,
    SqState,
    decode_device_abi,
    encode_device_abi,
    sample_state,
)
from vfu_server.migration.envelope import REC_OPTIONAL, Record, encode_envelope
from vfu_server.migration.errors import MigrationError
from vfu_server.migration.session import LoadSession

R = dataclasses.replace


def _encode_records(records, minor=0):
    return encode_envelope(NVME_STANDARD.uuid, 1, minor, records, final=True)


@pytest.mark.parametrize("fmt", [NVME_STANDARD, NVME_OPAQUE], ids=lambda f: f.name)
def test_round_trip(fmt):
    s = sample_state()
    got_fmt, got = NVME_FORMATS.decode(fmt.encode(s))
    assert got_fmt is fmt and got == s


@pytest.mark.parametrize("tail,phase", [(0, 1), (0, 0), (3, 1), (3, 0), (15, 0)])
def test_cq_phase_survives_s0pt(tail, phase):
    s = sample_state()
    cqs = (s.cqs[0], s.cqs[1], CqState(2, 0x23000, 16, 2, False, tail, tail, phase))
    s = R(s, cqs=cqs)
    assert NVME_STANDARD.decode(NVME_STANDARD.encode(s)).cqs[2].phase == phase
    recs = [r for r in NVME_STANDARD.to_records(s, 0) if r.type == 0x7001]
    raw = recs[0].payload
    cq2 = raw[8 + 24 * 2 + 24:8 + 24 * 2 + 48]
    attr = struct.unpack_from("<I", cq2, 16)[0]
    assert (attr >> 2) & 1 == (phase if tail else phase ^ 1)


def _bad_states():
    s = sample_state()
    sq1, sq2 = s.sqs[1], s.sqs[2]
    cq1 = s.cqs[1]
    ns = s.namespaces[0]
    yield "sq head beyond size", R(s, sqs=(s.sqs[0], R(sq1, head=64), sq2))
    yield "qid beyond max queues", R(s, sqs=(s.sqs[0], sq1, R(sq2, qid=9)))
    yield "sq size beyond mqes", R(s, sqs=(s.sqs[0], R(sq1, size=4096), sq2))
    yield "cq vector beyond msix", R(s, cqs=(s.cqs[0], R(cq1, vector=5), s.cqs[2]))
    yield "sq on a missing cq", R(s, sqs=(s.sqs[0], R(sq1, cqid=3), sq2))
    yield "io sq on the admin cq", R(s, sqs=(s.sqs[0], R(sq1, cqid=0), sq2))
    yield "unaligned queue", R(s, sqs=(s.sqs[0], R(sq1, base=0x20010), sq2))
    yield "duplicate qid", R(s, sqs=(s.sqs[0], sq1, R(sq2, qid=1)))
    yield "pending on a missing cq", R(s, pending=(CqPending(3, (PendingCqe(1, 1, 0),)),))
    yield "pending from a foreign sq", R(s, pending=(CqPending(2, (PendingCqe(1, 1, 0),)),))
    yield "too many AERs", R(s, aer=AerState(outstanding=(1, 2, 3, 4, 5)))
    yield "duplicate AER cids", R(s, aer=AerState(outstanding=(1, 1)))
    yield "namespace size", R(s, namespaces=(R(ns, nsze=ns.nsze + 1),))
    yield "namespace identity", R(s, namespaces=(R(ns, nguid=bytes(16)),))
    yield "namespace format", R(s, namespaces=(R(ns, lba_format=1),))
    yield "not ready with queues", R(s, regs=R(s.regs, csts=0))
    yield "admin base not ASQ", R(s, regs=R(s.regs, asq=0x40000))
    yield "admin size not AQA", R(s, regs=R(s.regs, aqa=0x000F001F))
    yield "dbbuf half configured", R(s, dbbuf=Dbbuf(0x30000, 0))
    yield "error log entry", R(s, error_log=(ErrorEntry(1, 1 << 16, 0, 0),))


@pytest.mark.parametrize("fmt", [NVME_STANDARD, NVME_OPAQUE], ids=lambda f: f.name)
@pytest.mark.parametrize("case", list(_bad_states()), ids=lambda c: c[0])
def test_invalid_states_are_refused(fmt, case):
    _, state = case
    try:
        data = fmt.encode(state)
    except MigrationError as exc:  # some cannot even be written (field too wide)
        assert exc.errno == errno.EINVAL
        return
    with pytest.raises(MigrationError) as info:
        NVME_FORMATS.decode(data)
    assert info.value.errno == errno.EINVAL


def test_unsorted_io_queues_are_refused():
    s = sample_state()
    recs = NVME_STANDARD.to_records(s, 0)
    cs = next(r for r in recs if r.type == 0x7001)
    raw = bytearray(cs.payload)
    raw[8:32], raw[32:56] = raw[32:56], raw[8:32]  # swap the two SQ entries
    recs = [Record(0x7001, bytes(raw)) if r.type == 0x7001 else r for r in recs]
    with pytest.raises(MigrationError) as info:
        NVME_STANDARD.decode(_encode_records(recs))
    assert info.value.errno == errno.EINVAL


def test_optional_records_may_be_omitted():
    s = sample_state()
    recs = [r for r in NVME_STANDARD.to_records(s, 0) if r.type not in (ERROR_LOG.type_id, SMART.type_id)]
    got = NVME_STANDARD.decode(_encode_records(recs))
    assert got.error_log == () and got.smart == SmartState()
    assert got == R(s, error_log=(), smart=SmartState())


def test_newer_minor_with_unknown_optional_record_loads():
    s = sample_state()
    recs = NVME_STANDARD.to_records(s, 0)
    recs.insert(-1, Record(0x0160, b"\x01\x02\x03", REC_OPTIONAL))  # a future TIMERS record
    assert NVME_STANDARD.decode(_encode_records(recs, minor=1)) == s


def test_unknown_mandatory_record_is_refused_by_type():
    recs = NVME_STANDARD.to_records(sample_state(), 0)
    recs.insert(-1, Record(0x01FF, b"x"))
    with pytest.raises(MigrationError) as info:
        NVME_STANDARD.decode(_encode_records(recs, minor=1))
    assert info.value.errno == errno.EINVAL and "0x01ff" in info.value.reason


def _swap_first(recs, a, b):
    """``recs`` with the first record of type ``a`` and the first of type ``b`` exchanged."""
    recs = list(recs)
    i = next(n for n, r in enumerate(recs) if r.type == a)
    j = next(n for n, r in enumerate(recs) if r.type == b)
    recs[i], recs[j] = recs[j], recs[i]
    return recs


ORDER_VIOLATIONS = {
    # 4 rule 6: "records in the order of the format's table"; DBBUF is 8th, NVMECS_V0 7th.
    "dbbuf-before-nvmecs": lambda recs: _swap_first(recs, 0x0113, 0x7001),
    "pci-config-first": lambda recs: _swap_first(recs, 0x0001, 0x0002),
    "features-descending": lambda recs: [
        *[r for r in recs if r.type < 0x0120],
        *sorted((r for r in recs if r.type == 0x0120), key=lambda r: -r.instance),
        *[r for r in recs if r.type > 0x0120]],
    "feature-twice": lambda recs: [*recs[:recs.index(next(r for r in recs if r.type == 0x0120)) + 1],
                                   next(r for r in recs if r.type == 0x0120),
                                   *recs[recs.index(next(r for r in recs if r.type == 0x0120)) + 1:]],
}


@pytest.mark.parametrize("case", ORDER_VIOLATIONS)
def test_order_violations_are_refused(case):
    """Section 2.6 and 4 rule 6: a stream whose records are out of the table's order, or whose
    instances of a type are not strictly ascending, is refused (EINVAL)."""
    recs = NVME_STANDARD.to_records(sample_state(), 0)
    assert len([r for r in recs if r.type == 0x0120]) >= 2, "the sample needs two FEATURE records"
    with pytest.raises(MigrationError) as info:
        NVME_STANDARD.decode(_encode_records(ORDER_VIOLATIONS[case](recs)))
    assert info.value.errno == errno.EINVAL, info.value


def test_unknown_optional_records_may_sit_anywhere_after_profile():
    s = sample_state()
    recs = NVME_STANDARD.to_records(s, 0)
    recs.insert(1, Record(0x0160, b"\x01", REC_OPTIONAL))
    recs.insert(5, Record(0x8123, bytes(16), REC_OPTIONAL))
    assert NVME_STANDARD.decode(_encode_records(recs, minor=1)) == s


def test_fields_are_append_only():
    s = sample_state()
    recs = [Record(r.type, r.payload + bytes(8)) if r.type == CTRL_REGS.type_id else r
            for r in NVME_STANDARD.to_records(s, 0)]
    assert NVME_STANDARD.decode(_encode_records(recs)) == s
    recs = [Record(r.type, r.payload[:-3]) if r.type == CTRL_REGS.type_id else r
            for r in NVME_STANDARD.to_records(s, 0)]
    with pytest.raises(MigrationError) as info:
        NVME_STANDARD.decode(_encode_records(recs))
    assert info.value.errno == errno.EBADMSG


def test_device_abi_round_trip_and_foreign_abi():
    s = sample_state()
    abi = decode_device_abi(s.profile.device_abi)
    assert encode_device_abi(abi) == s.profile.device_abi
    with pytest.raises(MigrationError) as info:
        decode_device_abi(b"\x01\x00\x04\x00" + bytes(4))  # example/std/1's ABI shape
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("change", ["size", "lba", "serial"])
def test_profile_mismatch_refused_in_precopy(change):
    s = sample_state()
    abi = decode_device_abi(s.profile.device_abi)
    ns = abi.namespaces[0]
    other = {"size": R(abi, namespaces=(R(ns, size_bytes=ns.size_bytes // 2),)),
             "lba": R(abi, namespaces=(R(ns, lbads=12),)),
             "serial": R(abi, serial="OTHER")}[change]
    local = R(s.profile, device_abi=encode_device_abi(other))
    ls = LoadSession(NVME_FORMATS, local_profile=local)
    with pytest.raises(MigrationError) as info:
        ls.write(NVME_STANDARD.encode_precopy(s))
    assert info.value.errno == errno.EINVAL
    # The opaque format carries the same profile: refused when the stream completes.
    ls = LoadSession(NVME_FORMATS, local_profile=local)
    ls.write(NVME_OPAQUE.encode(s))
    with pytest.raises(MigrationError) as info:
        ls.finish()
    assert info.value.errno == errno.EINVAL


def test_backend_identity_is_not_compared():
    s = sample_state()
    other = R(s, namespaces=(R(s.namespaces[0], backend_hash=bytes(32)),))
    ls = LoadSession(NVME_FORMATS, local_profile=s.profile)
    ls.write(NVME_STANDARD.encode_precopy(other) + NVME_STANDARD.encode(other))
    assert ls.finish() == other


def test_not_ready_controller_round_trips():
    s = sample_state()
    idle = NvmeMigState(profile=s.profile, pci=s.pci, msix=s.msix, namespaces=s.namespaces)
    assert NVME_STANDARD.decode(NVME_STANDARD.encode(idle)) == idle
    assert all(r.type != 0x0111 for r in NVME_STANDARD.to_records(idle, 0))


def test_queue_state_dataclasses_are_what_tp4159_carries():
    # Everything in SqState/CqState has a TP4159 field: nothing NVMe-queue-related hides elsewhere.
    assert [f.name for f in dataclasses.fields(SqState)] == ["qid", "base", "size", "cqid", "priority",
                                                             "head", "tail"]
    assert [f.name for f in dataclasses.fields(CqState)] == ["qid", "base", "size", "vector",
                                                             "irq_enabled", "head", "tail", "phase"]


def test_the_format_records_are_the_live_state_classes():
    """One definition per record: the format copies nothing it could name, and the opaque
    schema keeps the names its streams were written with."""
    from vfu_devices.nvme import migration_format as mf
    from vfu_devices.nvme import state
    from vfu_server.migration.opaque import schema_text

    pairs = {mf.SqState: state.SubmissionQueueState, mf.CqState: state.CompletionQueueState,
             mf.Dbbuf: state.ShadowDoorbells, mf.AerEvent: state.AsyncEvent,
             mf.ErrorEntry: state.ErrorLogEntry, mf.SmartState: state.SmartCounters}
    text = schema_text(mf.NvmeMigState)
    for fmt_cls, live_cls in pairs.items():
        assert fmt_cls is live_cls
        assert f"{live_cls.opaque_name}{{" in text
        assert f"{live_cls.__name__}{{" not in text
