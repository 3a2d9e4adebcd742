"""DEVSTATE envelope: round trips, every strict-decoder refusal, and fuzzing."""

from __future__ import annotations

import errno
import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfu_devices.example_format import EXAMPLE_FORMATS, sample_state
from vfu_server.migration.crc import crc32c
from vfu_server.migration.envelope import (
    REC_OPTIONAL,
    EnvelopeScanner,
    Record,
    decode_envelope,
    encode_envelope,
    parse_envelope,
)
from vfu_server.migration.errors import MigrationFormatError

U = uuid.UUID("11111111-2222-3333-4444-555555555555")


class Spec:
    name = "test/std/1"
    uuid = U
    major = 1
    minor_min = 0
    known_record_types = frozenset({0x0001, 0x0100, 0x0101})


def enc(records, **kw):
    return encode_envelope(U, 1, 0, records, **kw)


def refix_crc(b: bytearray) -> bytes:
    """Recompute header and END checksums after a deliberate edit."""
    b[60:64] = bytes(4)
    struct.pack_into("<I", b, 60, crc32c(bytes(b[:64])))
    end = len(b) - 24
    struct.pack_into("<I", b, end + 20, crc32c(bytes(b[:end])))
    return bytes(b)


def test_roundtrip_and_layout():
    recs = [Record(0x0001, b"profile"), Record(0x0100, b"x" * 9, instance=3, version=2)]
    data = enc(recs)
    assert data[:8] == b"DEVSTATE" and len(data) % 8 == 0
    env, _spec = decode_envelope(data, [Spec()])
    assert env.records == tuple(recs)
    assert env.header.format_uuid == U and env.header.final
    assert env.header.profile_crc == crc32c(b"profile")


def test_unknown_optional_skipped_unknown_mandatory_named():
    data = enc([Record(0x0100, b"a"), Record(0x0555, b"zz", flags=REC_OPTIONAL)])
    env, _ = decode_envelope(data, [Spec()])
    assert [r.type for r in env.records] == [0x0100]
    with pytest.raises(MigrationFormatError) as ei:
        decode_envelope(enc([Record(0x0555, b"zz")]), [Spec()])
    assert ei.value.errno == errno.EINVAL and "0x0555" in ei.value.reason


@pytest.mark.parametrize(
    ("mutate", "err", "words"),
    [
        (lambda b: b[:40], errno.EBADMSG, "truncated"),
        (lambda b: b[:-3], errno.EBADMSG, "overruns"),
        (lambda b: b + b"\0" * 8, errno.EBADMSG, "trailing"),
        (lambda b: b"XEVSTATE" + b[8:], errno.EBADMSG, "magic"),
        (lambda b: b[:70] + bytes([b[70] ^ 1]) + b[71:], errno.EBADMSG, "checksum"),
        (lambda b: refix_crc(bytearray(b[:20] + bytes([b[20] ^ 1]) + b[21:])), errno.EINVAL, "unknown state format"),
        (lambda b: refix_crc(bytearray(b[:8] + b"\x02" + b[9:])), errno.EPROTO, "version"),
        (lambda b: refix_crc(bytearray(b[:32] + b"\x02" + b[33:])), errno.EINVAL, "major"),
    ],
)
def test_strict_refusals(mutate, err, words):
    data = enc([Record(0x0100, b"abc")])
    with pytest.raises(MigrationFormatError) as ei:
        decode_envelope(mutate(data), [Spec()])
    assert ei.value.errno == err, ei.value
    assert words in ei.value.reason


def test_record_overrun_declared_length():
    data = bytearray(enc([Record(0x0100, b"abc")]))
    struct.pack_into("<I", data, 64 + 12, 10_000)
    with pytest.raises(MigrationFormatError, match="overruns"):
        parse_envelope(bytes(data))


def test_nonzero_padding_refused():
    data = bytearray(enc([Record(0x0100, b"abc")]))
    data[64 + 16 + 5] = 1
    with pytest.raises(MigrationFormatError, match="padding"):
        parse_envelope(refix_crc(data))


def test_scanner_incremental():
    data = enc([Record(0x0100, bytes(100)), Record(0x0101, b"q")]) + b"rest"
    sc = EnvelopeScanner()
    for i in range(len(data)):
        got = sc.feed(data[:i])
        assert got is None or got <= i
    assert sc.feed(data) == len(data) - 4


# ----------------------------------------------------------------- fuzzing
SEEDS = [enc([Record(0x0100, b"abc"), Record(0x0001, b"p" * 13)])] + [
    f.encode(sample_state()) for f in EXAMPLE_FORMATS
]


def _only_format_errors(data: bytes) -> None:
    for call in (
        lambda: decode_envelope(data, [Spec()]),
        lambda: EXAMPLE_FORMATS.decode(data),
    ):
        try:
            call()
        except MigrationFormatError:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _only_format_errors(data)
    _only_format_errors(b"DEVSTATE" + data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6),
    st.booleans(),
    st.integers(0, 600),
)
def test_fuzz_mutated_streams(seed, edits, fix_crc, cut):
    b = bytearray(seed)
    for pos, val in edits:
        b[pos % len(b)] = val
    if fix_crc and len(b) >= 88:
        b = bytearray(refix_crc(b))
    if cut:
        b = b[: max(0, len(b) - cut)]
    _only_format_errors(bytes(b))
