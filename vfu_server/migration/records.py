"""Declarative, append-only record layouts for standard formats.

A device author declares a record once and gets a safe encoder and decoder::

    REGS = RecordLayout(0x0300, "EXAMPLE_REGS", [
        ("scratch", "I"), ("src", "Q"), ("dst", "Q"), ("len", "I"),
    ])
    rec = REGS.pack(state.regs)                 # attributes or a mapping
    values, tail = REGS.unpack(rec)             # dict of ints/bytes, tail bytes

Payload without a variable tail: the fixed fields, packed little-endian with no
implicit padding.  With ``tail=True``::

    +-----------+---------+------------------------+--------------------+
    | fixed_len | rsvd=0  | fixed fields           | tail (variable)    |
    |   le16    |  le16   | (fixed_len bytes)      |                    |
    +-----------+---------+------------------------+--------------------+

Compatibility (docs/migration-format.md section 4): fields are only ever
appended.  A reader takes the fields it knows from the bytes present, gives a
missing *trailing* field its default, and ignores fixed bytes it does not know;
a field cut in half is an error.  :class:`StructLayout` applies the same rules
to array elements (their size travels in the record, see ``entry_size``).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .envelope import REC_OPTIONAL, REC_PER_INSTANCE, Record
from .errors import MigrationFormatError

__all__ = ["Field", "RecordLayout", "StructLayout"]

_INT_CODES = set("bBhHiIqQ")


@dataclass(frozen=True)
class Field:
    """One fixed field: ``fmt`` is a single struct code (``B H I Q`` ...) or ``Ns``."""

    name: str
    fmt: str
    default: int | bytes = 0
    #: The format minor that introduced the field; informational, for docs.
    since_minor: int = 0

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.fmt)


def _as_field(f: Field | tuple) -> Field:
    fld = f if isinstance(f, Field) else Field(*f)
    if not (fld.fmt in _INT_CODES or (fld.fmt.endswith("s") and fld.fmt[:-1].isdigit())):
        raise ValueError(f"field {fld.name}: unsupported struct code {fld.fmt!r}")
    if fld.fmt.endswith("s") and not isinstance(fld.default, bytes):
        fld = Field(fld.name, fld.fmt, bytes(fld.size), fld.since_minor)
    return fld


class StructLayout:
    """An append-only sequence of fixed fields."""

    def __init__(self, fields: Iterable[Field | tuple], what: str = "struct") -> None:
        self.fields: tuple[Field, ...] = tuple(_as_field(f) for f in fields)
        self.what = what
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"{what}: duplicate field names")
        self.size = sum(f.size for f in self.fields)

    def pack(self, values: Mapping[str, Any] | object) -> bytes:
        get = values.get if isinstance(values, Mapping) else (
            lambda n, d: getattr(values, n, d))
        out = bytearray()
        for f in self.fields:
            v = get(f.name, f.default)
            if isinstance(v, bool):
                v = int(v)
            try:
                if f.fmt.endswith("s") and len(v) != f.size:
                    raise struct.error(f"needs exactly {f.size} bytes, got {len(v)}")
                out += struct.pack("<" + f.fmt, v)
            except (struct.error, TypeError) as exc:
                raise MigrationFormatError(
                    errno.EINVAL, f"{self.what}.{f.name}={v!r} does not fit {f.fmt}: {exc}"
                ) from None
        return bytes(out)

    def unpack(self, data: bytes | memoryview) -> dict[str, Any]:
        out: dict[str, Any] = {}
        off = 0
        for f in self.fields:
            if off + f.size <= len(data):
                out[f.name] = struct.unpack_from("<" + f.fmt, data, off)[0]
            elif off >= len(data):
                out[f.name] = f.default
            else:
                raise MigrationFormatError(
                    errno.EBADMSG, f"{self.what}: field {f.name} cut short ({len(data)} bytes)"
                )
            off += f.size
        return out

    def pack_array(self, items: Iterable[Mapping[str, Any] | object]) -> bytes:
        return b"".join(self.pack(i) for i in items)

    def unpack_array(self, data: bytes | memoryview, count: int, entry_size: int
                     ) -> list[dict[str, Any]]:
        """Decode ``count`` elements of ``entry_size`` bytes each (append-only)."""
        if entry_size <= 0 and count:
            raise MigrationFormatError(errno.EBADMSG, f"{self.what}: entry_size 0")
        if count * entry_size > len(data):
            raise MigrationFormatError(
                errno.EBADMSG, f"{self.what}: {count} entries of {entry_size} bytes overrun "
                f"{len(data)} bytes")
        return [self.unpack(data[i * entry_size:(i + 1) * entry_size]) for i in range(count)]


class RecordLayout(StructLayout):
    """A record type of a standard format: id, name, flags and its fields."""

    def __init__(
        self,
        type_id: int,
        name: str,
        fields: Sequence[Field | tuple],
        *,
        tail: bool = False,
        optional: bool = False,
        per_instance: bool = False,
        version: int = 0,
        since_minor: int = 0,
        doc: str = "",
    ) -> None:
        super().__init__(fields, name)
        if not 0 < type_id <= 0xFFFF:
            raise ValueError(f"record type {type_id:#x} out of range")
        self.type_id = type_id
        self.name = name
        self.tail = tail
        self.optional = optional
        self.per_instance = per_instance
        self.version = version
        #: Format minor that introduced the record: writers targeting an older
        #: minor leave it out (the machine-type trick).
        self.since_minor = since_minor
        self.doc = doc

    @property
    def flags(self) -> int:
        return (REC_OPTIONAL if self.optional else 0) | (
            REC_PER_INSTANCE if self.per_instance else 0)

    def pack(self, values: Mapping[str, Any] | object, tail: bytes = b"",  # type: ignore[override]
             instance: int = 0) -> Record:
        fixed = super().pack(values)
        if self.tail:
            payload = struct.pack("<HH", len(fixed), 0) + fixed + bytes(tail)
        elif tail:
            raise ValueError(f"{self.name} has no variable tail")
        else:
            payload = fixed
        return Record(self.type_id, payload, self.flags, instance, self.version)

    def unpack(self, rec: Record | bytes | memoryview  # type: ignore[override]
               ) -> tuple[dict[str, Any], bytes]:
        payload = rec.payload if isinstance(rec, Record) else bytes(rec)
        if isinstance(rec, Record) and rec.type != self.type_id:
            raise MigrationFormatError(
                errno.EINVAL, f"expected record {self.name}, got type {rec.type:#06x}")
        if not self.tail:
            return super().unpack(payload), b""
        if len(payload) < 4:
            raise MigrationFormatError(errno.EBADMSG, f"{self.name}: payload too short")
        fixed_len, rsvd = struct.unpack_from("<HH", payload, 0)
        if rsvd:
            raise MigrationFormatError(errno.EBADMSG, f"{self.name}: reserved field not zero")
        if 4 + fixed_len > len(payload):
            raise MigrationFormatError(
                errno.EBADMSG, f"{self.name}: fixed_len {fixed_len} overruns the payload")
        return super().unpack(payload[4:4 + fixed_len]), payload[4 + fixed_len:]
