"""The device-state stream envelope ("DEVSTATE"), encoder and strict decoder.

Every format, standard or opaque, travels in the same envelope so a reader can
tell from the first 64 bytes which format it is looking at.  All integers are
little-endian.  Normative text: docs/migration-format.md section 2.

Header (64 bytes)::

     0               4               8              12              16
    +-------+-------+-------+-------+-------+-------+-------+-------+
    |            magic "DEVSTATE"   |env_maj|env_min|  header_len   |  0
    +-------+-------+-------+-------+-------+-------+-------+-------+
    |                    format_uuid (RFC 9562 byte order)          | 16
    +-------+-------+-------+-------+-------+-------+-------+-------+
    |fmt_maj|fmt_min|     flags     |                               | 32
    +-------+-------+-------+-------+       producer_uuid           |
    |                               | profile_crc32c| header_crc32c | 48
    +-------+-------+-------+-------+-------+-------+-------+-------+

    flags: bit0 PRECOPY_PART, bit1 FINAL (exactly one of the two), bit2 HAS_CRC.

Record header (16 bytes), then ``length`` payload bytes, zero-padded to 8::

    +-------+-------+---------------+-------+-------+---------------+
    | type  | flags |   instance    |rec_ver| rsvd=0|    length     |
    +-------+-------+---------------+-------+-------+---------------+
    record flags: bit0 OPTIONAL, bit1 PER_INSTANCE

The stream ends with an END record (type 0, length 8):
``{u32 record_count; u32 crc32c}``; ``record_count`` excludes END and the CRC
covers every byte from offset 0 up to (not including) the END record header.
``header_crc32c`` is the CRC of the ``header_len`` header bytes with the
header_crc32c field itself taken as zero.  ``profile_crc32c`` is the CRC of the
PROFILE record's payload, or 0 when there is none.
"""

from __future__ import annotations

import errno
import struct
import uuid
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .crc import crc32c
from .errors import MigrationFormatError

__all__ = [
    "ENV_MAJOR",
    "ENV_MINOR",
    "FLAG_FINAL",
    "FLAG_HAS_CRC",
    "FLAG_PRECOPY_PART",
    "HEADER_LEN",
    "MAGIC",
    "MAX_RECORDS",
    "MAX_STREAM_BYTES",
    "REC_END",
    "REC_OPTIONAL",
    "REC_PER_INSTANCE",
    "REC_PROFILE",
    "Envelope",
    "EnvelopeHeader",
    "EnvelopeScanner",
    "FormatSpec",
    "Record",
    "decode_envelope",
    "encode_envelope",
    "parse_envelope",
    "parse_header",
]

MAGIC = b"DEVSTATE"
NIL_UUID = uuid.UUID(int=0)
ENV_MAJOR = 1
ENV_MINOR = 0
HEADER_LEN = 64
MAX_HEADER_LEN = 4096

FLAG_PRECOPY_PART = 1 << 0
FLAG_FINAL = 1 << 1
FLAG_HAS_CRC = 1 << 2
_HEADER_FLAGS = FLAG_PRECOPY_PART | FLAG_FINAL | FLAG_HAS_CRC

REC_OPTIONAL = 1 << 0
REC_PER_INSTANCE = 1 << 1
_RECORD_FLAGS = REC_OPTIONAL | REC_PER_INSTANCE

REC_END = 0x0000
REC_PROFILE = 0x0001
VENDOR_FIRST = 0x8000

#: Bounds that keep a hostile stream from making the reader allocate without limit.
MAX_STREAM_BYTES = 64 << 20
MAX_RECORDS = 1 << 16

_HDR = struct.Struct("<8sHHI16sHHI16sII")
_REC = struct.Struct("<HHIHHI")
_END = struct.Struct("<II")
assert _HDR.size == HEADER_LEN and _REC.size == 16


def _bad(reason: str, err: int = errno.EBADMSG) -> MigrationFormatError:
    return MigrationFormatError(err, reason)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class Record:
    """One record: ``type``, ``payload`` and the header fields around it."""

    type: int
    payload: bytes = b""
    flags: int = 0
    instance: int = 0
    version: int = 0

    @property
    def optional(self) -> bool:
        return bool(self.flags & REC_OPTIONAL)


@dataclass(frozen=True)
class EnvelopeHeader:
    format_uuid: uuid.UUID
    format_major: int
    format_minor: int
    flags: int = FLAG_FINAL | FLAG_HAS_CRC
    producer_uuid: uuid.UUID = NIL_UUID
    profile_crc: int = 0
    env_major: int = ENV_MAJOR
    env_minor: int = ENV_MINOR
    header_len: int = HEADER_LEN

    @property
    def final(self) -> bool:
        return bool(self.flags & FLAG_FINAL)

    @property
    def precopy(self) -> bool:
        return bool(self.flags & FLAG_PRECOPY_PART)


@dataclass(frozen=True)
class Envelope:
    header: EnvelopeHeader
    records: tuple[Record, ...] = field(default_factory=tuple)

    def find(self, rtype: int) -> list[Record]:
        return [r for r in self.records if r.type == rtype]


class FormatSpec(Protocol):
    """What the strict decoder needs to know about a format it accepts."""

    name: str
    uuid: uuid.UUID
    major: int
    minor_min: int

    @property
    def known_record_types(self) -> Container[int]: ...


# ----------------------------------------------------------------------- encode
def encode_envelope(
    format_uuid: uuid.UUID,
    format_major: int,
    format_minor: int,
    records: Iterable[Record],
    *,
    final: bool = True,
    producer_uuid: uuid.UUID | None = None,
) -> bytes:
    """Serialise one envelope (header, records, END)."""
    recs = list(records)
    if len(recs) > MAX_RECORDS:
        raise _bad(f"too many records ({len(recs)})", errno.EINVAL)
    profile = [r for r in recs if r.type == REC_PROFILE]
    profile_crc = crc32c(profile[0].payload) if profile else 0
    flags = (FLAG_FINAL if final else FLAG_PRECOPY_PART) | FLAG_HAS_CRC
    header = bytearray(
        _HDR.pack(
            MAGIC, ENV_MAJOR, ENV_MINOR, HEADER_LEN, format_uuid.bytes,
            format_major, format_minor, flags,
            (producer_uuid or uuid.UUID(int=0)).bytes, profile_crc, 0,
        )
    )
    struct.pack_into("<I", header, 60, crc32c(header))
    out = bytearray(header)
    for r in recs:
        if not 0 < r.type <= 0xFFFF:
            raise _bad(f"record type {r.type:#x} out of range", errno.EINVAL)
        if r.flags & ~_RECORD_FLAGS:
            raise _bad(f"record {r.type:#06x}: unknown flags {r.flags:#x}", errno.EINVAL)
        if r.type >= VENDOR_FIRST and len(r.payload) < 16:
            raise _bad(f"vendor record {r.type:#06x} must start with a vendor UUID", errno.EINVAL)
        out += _REC.pack(r.type, r.flags, r.instance, r.version, 0, len(r.payload))
        out += r.payload
        out += bytes(_pad8(len(r.payload)) - len(r.payload))
    crc = crc32c(out)
    out += _REC.pack(REC_END, 0, 0, 0, 0, _END.size) + _END.pack(len(recs), crc)
    if len(out) > MAX_STREAM_BYTES:
        raise _bad(f"state of {len(out)} bytes exceeds {MAX_STREAM_BYTES}", errno.EFBIG)
    return bytes(out)


# ----------------------------------------------------------------------- decode
def parse_header(data: bytes | bytearray | memoryview) -> EnvelopeHeader:
    """Parse and check the fixed header.  Needs ``header_len`` bytes."""
    if len(data) < HEADER_LEN:
        raise _bad(f"truncated header ({len(data)} of {HEADER_LEN} bytes)")
    (magic, env_major, env_minor, header_len, fuuid, fmaj, fmin, flags, puuid,
     profile_crc, header_crc) = _HDR.unpack_from(data, 0)
    if magic != MAGIC:
        raise _bad("bad magic, not a DEVSTATE stream")
    if env_major != ENV_MAJOR:
        raise _bad(f"envelope version {env_major}.{env_minor} not supported", errno.EPROTO)
    if header_len < HEADER_LEN or header_len > MAX_HEADER_LEN or header_len % 8:
        raise _bad(f"bad header_len {header_len}")
    if len(data) < header_len:
        raise _bad(f"truncated header ({len(data)} of {header_len} bytes)")
    if flags & ~_HEADER_FLAGS:
        raise _bad(f"unknown header flags {flags:#x}")
    if bool(flags & FLAG_FINAL) == bool(flags & FLAG_PRECOPY_PART):
        raise _bad("exactly one of FINAL and PRECOPY_PART must be set")
    if flags & FLAG_HAS_CRC:
        hdr = bytearray(data[:header_len])
        hdr[60:64] = bytes(4)
        if crc32c(hdr) != header_crc:
            raise _bad("header checksum mismatch")
    elif header_crc:
        raise _bad("header_crc32c set without HAS_CRC")
    return EnvelopeHeader(
        uuid.UUID(bytes=fuuid), fmaj, fmin, flags, uuid.UUID(bytes=puuid),
        profile_crc, env_major, env_minor, header_len,
    )


def parse_envelope(
    data: bytes | bytearray | memoryview,
    *,
    allow_trailing: bool = False,
    max_bytes: int = MAX_STREAM_BYTES,
) -> tuple[Envelope, int]:
    """Structurally parse one envelope starting at offset 0.

    Checks magic, versions, checksums, bounds, padding, END.  Knows nothing
    about formats.  Returns the envelope and the number of bytes it occupied;
    with ``allow_trailing=False`` any byte after END is an error.
    """
    if len(data) > max_bytes:
        raise _bad(f"stream exceeds {max_bytes} bytes", errno.EFBIG)
    data = memoryview(data)
    hdr = parse_header(data)
    pos = hdr.header_len
    records: list[Record] = []
    while True:
        if len(data) - pos < _REC.size:
            raise _bad(f"truncated: record header at offset {pos} incomplete")
        rtype, rflags, inst, rver, rsvd, length = _REC.unpack_from(data, pos)
        body = pos + _REC.size
        end = body + _pad8(length)
        if end > len(data):
            raise _bad(f"record {rtype:#06x} at offset {pos} overruns the stream "
                       f"({length} bytes declared)")
        if rsvd:
            raise _bad(f"record {rtype:#06x} at offset {pos}: reserved field not zero")
        if rflags & ~_RECORD_FLAGS:
            raise _bad(f"record {rtype:#06x} at offset {pos}: unknown flags {rflags:#x}")
        if any(data[body + length:end]):
            raise _bad(f"record {rtype:#06x} at offset {pos}: non-zero padding")
        if rtype == REC_END:
            if length != _END.size or rflags or inst or rver:
                raise _bad(f"malformed END record at offset {pos}")
            count, crc = _END.unpack_from(data, body)
            if count != len(records):
                raise _bad(f"END says {count} records, stream has {len(records)}")
            if hdr.flags & FLAG_HAS_CRC:
                if crc32c(data[:pos]) != crc:
                    raise _bad("stream checksum mismatch")
            elif crc:
                raise _bad("END crc32c set without HAS_CRC")
            pos = end
            break
        if rtype >= VENDOR_FIRST and length < 16:
            raise _bad(f"vendor record {rtype:#06x} shorter than its vendor UUID")
        if len(records) >= MAX_RECORDS:
            raise _bad(f"more than {MAX_RECORDS} records")
        records.append(Record(rtype, bytes(data[body:body + length]), rflags, inst, rver))
        pos = end
    if not allow_trailing and pos != len(data):
        raise _bad(f"{len(data) - pos} trailing bytes after END")
    profiles = [r for r in records if r.type == REC_PROFILE]
    if len(profiles) > 1:
        raise _bad("more than one PROFILE record")
    want = crc32c(profiles[0].payload) if profiles else 0
    if hdr.flags & FLAG_HAS_CRC and hdr.profile_crc != want:
        raise _bad("profile_crc32c does not match the PROFILE record")
    return Envelope(hdr, tuple(records)), pos


def _lookup(
    formats: Mapping[uuid.UUID, FormatSpec] | Sequence[FormatSpec], u: uuid.UUID
) -> FormatSpec | None:
    if isinstance(formats, Mapping):
        return formats.get(u)
    for f in formats:
        if f.uuid == u:
            return f
    return None


def check_format(hdr: EnvelopeHeader, formats: Mapping[uuid.UUID, FormatSpec]
                 | Sequence[FormatSpec]) -> FormatSpec:
    """Find the format a header names, or refuse (EINVAL) it."""
    spec = _lookup(formats, hdr.format_uuid)
    if spec is None:
        raise _bad(f"unknown state format {hdr.format_uuid}", errno.EINVAL)
    if hdr.format_major != spec.major:
        raise _bad(f"{spec.name}: major {hdr.format_major} does not match the UUID's "
                   f"major {spec.major}", errno.EINVAL)
    if hdr.format_minor < spec.minor_min:
        raise _bad(f"{spec.name}: minor {hdr.format_minor} older than the oldest "
                   f"supported ({spec.minor_min})", errno.EINVAL)
    return spec


def filter_known(env: Envelope, spec: FormatSpec) -> Envelope:
    """Drop unknown OPTIONAL records; refuse unknown mandatory ones by type."""
    known = spec.known_record_types
    kept = []
    for r in env.records:
        if r.type in known:
            kept.append(r)
        elif not r.optional:
            raise _bad(f"{spec.name}: unknown mandatory record type {r.type:#06x}", errno.EINVAL)
    return Envelope(env.header, tuple(kept))


def decode_envelope(
    data: bytes | bytearray | memoryview,
    formats: Mapping[uuid.UUID, FormatSpec] | Sequence[FormatSpec],
    *,
    max_bytes: int = MAX_STREAM_BYTES,
) -> tuple[Envelope, FormatSpec]:
    """Strictly decode exactly one envelope for one of ``formats``.

    The format is checked from the header *before* the body is parsed, so an
    unknown format is reported as such even when the body is damaged too.
    Unknown OPTIONAL records are removed from the result.
    """
    if len(data) >= HEADER_LEN:
        check_format(parse_header(data), formats)
    env, _ = parse_envelope(data, max_bytes=max_bytes)
    spec = check_format(env.header, formats)
    return filter_known(env, spec), spec


class EnvelopeScanner:
    """Finds where one envelope ends in a growing buffer, without re-parsing.

    ``feed(buf)`` is called with the *whole* buffer received so far (which must
    only grow); it returns the envelope's total length once END has arrived, or
    ``None`` while more bytes are needed.  Only framing is checked here; the
    complete envelope still goes through :func:`parse_envelope`.
    """

    def __init__(self, max_bytes: int = MAX_STREAM_BYTES) -> None:
        self.max_bytes = max_bytes
        self.header: EnvelopeHeader | None = None
        self._pos = 0
        self._records = 0
        self.end: int | None = None

    def feed(self, buf: bytes | bytearray | memoryview) -> int | None:
        if self.end is not None:
            return self.end
        if self.header is None:
            if len(buf) >= 8 and bytes(buf[:8]) != MAGIC:
                raise _bad("bad magic, not a DEVSTATE stream")
            if len(buf) < HEADER_LEN:
                return None
            hlen = struct.unpack_from("<I", buf, 12)[0]
            if HEADER_LEN <= hlen <= MAX_HEADER_LEN and len(buf) < hlen:
                return None
            self.header = parse_header(buf)
            self._pos = self.header.header_len
        while len(buf) - self._pos >= _REC.size:
            rtype, _f, _i, _v, _r, length = _REC.unpack_from(buf, self._pos)
            end = self._pos + _REC.size + _pad8(length)
            if end > self.max_bytes:
                raise _bad(f"stream exceeds {self.max_bytes} bytes", errno.EFBIG)
            if end > len(buf):
                return None
            self._pos = end
            if rtype == REC_END:
                self.end = end
                return end
            self._records += 1
            if self._records > MAX_RECORDS:
                raise _bad(f"more than {MAX_RECORDS} records")
        return None
