"""Selectable state formats: the device-facing API and the format registry.

A device owns a :class:`FormatSet` -- the formats it can save and load, e.g. a
standard one (``example/std/1``) and its implementation's opaque one
(``opaque/vfu-example``).  Device state is plain data (dataclasses of ints,
bytes and tuples); a format turns it into envelope records and back:

* :class:`StandardFormat` -- documented records declared with
  :class:`~vfu_server.migration.records.RecordLayout`; anyone may implement it.
* :class:`OpaqueFormat` -- one OPAQUE_BLOB record holding a schema-checked TLV
  of the state tree; only the same implementation family reads it.

Selection: :meth:`FormatSet.find` accepts a full name (``example/std/1``), an
alias (``standard``, ``opaque``) or a UUID string, optionally suffixed with
``:MINOR`` -- the syntax of ``--migration-format``.
"""

from __future__ import annotations

import errno
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from . import opaque
from .envelope import (
    REC_OPTIONAL,
    REC_PROFILE,
    VENDOR_FIRST,
    Envelope,
    Record,
    decode_envelope,
    encode_envelope,
)
from .errors import MigrationError, MigrationFormatError
from .generic import PciProfile, PciState, profile_of_records
from .records import RecordLayout

__all__ = [
    "NAMESPACE",
    "PRODUCER_UUID",
    "REC_OPAQUE_BLOB",
    "FormatSet",
    "OpaqueFormat",
    "RecordSet",
    "StandardFormat",
    "StateFormat",
    "format_uuid",
    "get_formats",
    "register_formats",
    "registered_families",
]

#: uuid5(NAMESPACE_URL, "urn:x-vfio-user-device-state"); format UUIDs are uuid5(NAMESPACE, name).
NAMESPACE = uuid.UUID("2fb9b70f-431a-5772-82bf-db124779cf01")
#: Identifies vfu-server as the producer in the envelope header (informational only).
PRODUCER_UUID = uuid.uuid5(NAMESPACE, "producer/vfu-server")
REC_OPAQUE_BLOB = 0x8001
_OPAQUE_HDR = struct.Struct("<16sII")


def _pci_profile(state: PciState) -> PciProfile:
    return state.profile


def format_uuid(name: str) -> uuid.UUID:
    """The UUID of a format family+major, e.g. ``format_uuid("example/std/1")``."""
    return uuid.uuid5(NAMESPACE, name)


class StateFormat:
    """One selectable format.  Subclasses implement the record mapping."""

    kind: str = "standard"

    def __init__(
        self,
        name: str,
        *,
        major: int,
        minor_max: int = 0,
        minor_min: int = 0,
        uuid_: uuid.UUID | None = None,
        aliases: Sequence[str] = (),
        description: str = "",
        state_type: type | None = None,
    ) -> None:
        self.name = name
        self.uuid = uuid_ or format_uuid(name)
        self.major = major
        self.minor_min = minor_min
        self.minor_max = minor_max
        self.aliases = tuple(aliases)
        self.description = description
        self.state_type = state_type
        # A state tree with the generic head (generic.PciState) has its profile where every
        # format finds it; others name it (profile=...) or have none.
        self._pci_state = isinstance(state_type, type) and issubclass(state_type, PciState)
        self._profile: Callable[[Any], Any] | None = _pci_profile if self._pci_state else None

    # ---- to implement
    @property
    def known_record_types(self) -> frozenset[int]:
        raise NotImplementedError

    def to_records(self, state: Any, minor: int) -> list[Record]:
        raise NotImplementedError

    def from_records(self, records: Sequence[Record], env: Envelope) -> Any:
        raise NotImplementedError

    def precopy_records(self, state: Any, minor: int) -> list[Record]:
        """Records sent ahead in PRE_COPY (validated early, not applied)."""
        return []

    def check_precopy(self, records: Sequence[Record], local: Any | None) -> None:
        """Destination-side early check of a PRE_COPY envelope.  Raise to refuse."""

    def profile_of(self, state: Any) -> Any | None:
        """The guest-visible profile inside a decoded state, if the format knows it."""
        return self._profile(state) if self._profile else None

    # ---- provided
    def _minor(self, minor: int | None) -> int:
        if minor is None:
            return self.minor_max
        if not self.minor_min <= minor <= self.minor_max:
            raise MigrationError(
                errno.EINVAL, f"{self.name}: minor {minor} outside {self.minor_min}..{self.minor_max}")
        return minor

    def encode(self, state: Any, *, minor: int | None = None,
               producer_uuid: uuid.UUID | None = PRODUCER_UUID) -> bytes:
        """A complete FINAL envelope for ``state``."""
        m = self._minor(minor)
        return encode_envelope(self.uuid, self.major, m, self.to_records(state, m),
                               final=True, producer_uuid=producer_uuid)

    def encode_precopy(self, state: Any, *, minor: int | None = None,
                       producer_uuid: uuid.UUID | None = PRODUCER_UUID) -> bytes | None:
        """A PRECOPY_PART envelope, or None when the format sends nothing early."""
        m = self._minor(minor)
        recs = self.precopy_records(state, m)
        if not recs:
            return None
        return encode_envelope(self.uuid, self.major, m, recs, final=False,
                               producer_uuid=producer_uuid)

    def decode_envelope(self, env: Envelope) -> Any:
        if not env.header.final:
            raise MigrationFormatError(errno.EINVAL, f"{self.name}: not a FINAL envelope")
        return self.from_records(env.records, env)

    def decode(self, data: bytes) -> Any:
        """Strictly decode one FINAL envelope of this format into a state."""
        env, _ = decode_envelope(data, [self])
        return self.decode_envelope(env)

    def descriptor(self) -> dict[str, Any]:
        """The JSON format descriptor used by listings (control socket, CLI)."""
        return {
            "uuid": str(self.uuid),
            "name": self.name,
            "kind": self.kind,
            "major": self.major,
            "minor_min": self.minor_min,
            "minor_max": self.minor_max,
            "aliases": list(self.aliases),
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.uuid}>"


class RecordSet:
    """Checked access to a standard format's records while loading."""

    def __init__(self, fmt_name: str, records: Sequence[Record]) -> None:
        self.name = fmt_name
        self.records = list(records)
        self._used: set[int] = set()

    def _err(self, reason: str) -> MigrationFormatError:
        return MigrationFormatError(errno.EINVAL, f"{self.name}: {reason}")

    def all(self, layout: RecordLayout) -> list[tuple[int, dict[str, Any], bytes]]:
        """Every instance of a record type, as (instance, fields, tail), ascending."""
        out = []
        last = -1
        for i, r in enumerate(self.records):
            if r.type != layout.type_id:
                continue
            if r.instance <= last:
                raise self._err(f"{layout.name} instances not strictly ascending")
            last = r.instance
            self._used.add(i)
            values, tail = layout.unpack(r)
            out.append((r.instance, values, tail))
        return out

    def maybe(self, layout: RecordLayout) -> tuple[dict[str, Any], bytes] | None:
        found = self.all(layout)
        if len(found) > 1:
            raise self._err(f"{layout.name} appears more than once")
        return (found[0][1], found[0][2]) if found else None

    def one(self, layout: RecordLayout) -> tuple[dict[str, Any], bytes]:
        found = self.maybe(layout)
        if found is None:
            raise self._err(f"mandatory record {layout.name} missing")
        return found


SaveFn = Callable[[Any, int], Iterable[Record]]
LoadFn = Callable[[RecordSet, int], Any]


class StandardFormat(StateFormat):
    """A documented record-based format.

    ``save(state, minor)`` yields records (built with ``RecordLayout.pack``)
    in the documented order, PROFILE first; records whose layout was introduced
    after ``minor`` are dropped automatically.  ``load(records, minor)`` builds
    the state from a :class:`RecordSet`; any exception other than a
    :class:`MigrationError` it raises is reported as EINVAL.
    """

    kind = "standard"

    def __init__(
        self,
        name: str,
        *,
        major: int,
        records: Sequence[RecordLayout],
        save: SaveFn,
        load: LoadFn,
        minor_max: int = 0,
        minor_min: int = 0,
        aliases: Sequence[str] = ("standard",),
        description: str = "",
        state_type: type | None = None,
        profile: Callable[[Any], Any] | None = None,
        profile_from_records: Callable[[RecordSet], Any] | None = None,
    ) -> None:
        super().__init__(name, major=major, minor_max=minor_max, minor_min=minor_min,
                         aliases=aliases, description=description, state_type=state_type)
        self.layouts = {r.type_id: r for r in records}
        #: the position of each record type in the format's table (docs/migration-format.md)
        self.rank = {r.type_id: i for i, r in enumerate(records)}
        for r in records:
            if r.type_id >= VENDOR_FIRST and not r.optional:
                raise ValueError(f"{name}: vendor record {r.name} must be OPTIONAL")
        self._save = save
        self._load = load
        self._profile = profile or self._profile
        self._profile_from_records = profile_from_records or (
            profile_of_records if self._pci_state else None)

    @property
    def known_record_types(self) -> frozenset[int]:
        return frozenset(self.layouts)

    def to_records(self, state: Any, minor: int) -> list[Record]:
        out = []
        for rec in self._save(state, minor):
            layout = self.layouts.get(rec.type)
            if layout is None:
                raise MigrationError(errno.EINVAL, f"{self.name}: undeclared record {rec.type:#06x}")
            if layout.since_minor <= minor:
                out.append(rec)
        return out

    def _check_order(self, records: Sequence[Record]) -> None:
        """docs/migration-format.md 4, rule 6: PROFILE first; the known records in the order of
        the format's table, a type's records together with their instances strictly ascending.
        Unknown OPTIONAL records were dropped before this and take no part in the order."""
        if REC_PROFILE in self.layouts and (not records or records[0].type != REC_PROFILE):
            raise MigrationFormatError(errno.EINVAL, f"{self.name}: PROFILE must come first")
        last: Record | None = None
        for r in records:
            if r.type >= VENDOR_FIRST and not r.flags & REC_OPTIONAL:
                raise MigrationFormatError(
                    errno.EINVAL, f"{self.name}: vendor record {r.type:#06x} not OPTIONAL")
            if last is not None and r.type in self.rank and last.type in self.rank:
                if self.rank[r.type] < self.rank[last.type]:
                    raise MigrationFormatError(
                        errno.EINVAL, f"{self.name}: record {self._label(r.type)} after "
                        f"{self._label(last.type)}, against the format's order")
                if r.type == last.type and r.instance <= last.instance:
                    raise MigrationFormatError(
                        errno.EINVAL, f"{self.name}: {self._label(r.type)} instances not "
                        "strictly ascending")
            last = r

    def _label(self, type_id: int) -> str:
        layout = self.layouts.get(type_id)
        return f"{type_id:#06x} {layout.name}" if layout else f"{type_id:#06x}"

    def from_records(self, records: Sequence[Record], env: Envelope) -> Any:
        self._check_order(records)
        rs = RecordSet(self.name, records)
        try:
            return self._load(rs, env.header.format_minor)
        except MigrationError:
            raise
        except Exception as exc:
            raise MigrationFormatError(
                errno.EINVAL, f"{self.name}: state rejected: {exc}") from exc

    def precopy_records(self, state: Any, minor: int) -> list[Record]:
        # Only PROFILE goes early: it is what the destination can check before
        # the device stops, so an incompatible destination fails on the first write.
        return [r for r in self.to_records(state, minor) if r.type == REC_PROFILE]

    def check_precopy(self, records: Sequence[Record], local: Any | None) -> None:
        self._check_order(records)
        if local is None or self._profile_from_records is None:
            return
        remote = self._profile_from_records(RecordSet(self.name, records))
        if remote != local:
            raise MigrationFormatError(errno.EINVAL, f"{self.name}: source profile differs "
                                       f"from this device's ({_first_diff(remote, local)})")

    def descriptor(self) -> dict[str, Any]:
        d = super().descriptor()
        d["precopy"] = REC_PROFILE in self.layouts
        return d


def _first_diff(a: Any, b: Any) -> str:
    for name in getattr(a, "__dataclass_fields__", {}):
        if getattr(a, name) != getattr(b, name):
            return f"{name}: {getattr(a, name)!r} != {getattr(b, name)!r}"
    return "values differ"


class OpaqueFormat(StateFormat):
    """One OPAQUE_BLOB record: the state tree as schema-checked TLV.

    Record 0x8001 payload::

        +------------------+----------------+------------+-------------+
        | family uuid (16) | schema_version | schema_crc | TLV tree    |
        |                  |     le32       |   le32     | (opaque.py) |
        +------------------+----------------+------------+-------------+

    ``schema_crc`` is :func:`opaque.schema_fingerprint` of ``state_type``; a
    destination whose dataclasses differ refuses the blob instead of guessing.
    """

    kind = "opaque"

    def __init__(self, name: str, *, state_type: type, schema_version: int = 1,
                 aliases: Sequence[str] = ("opaque",), description: str = "",
                 profile: Callable[[Any], Any] | None = None) -> None:
        super().__init__(name, major=1, aliases=aliases, description=description,
                         state_type=state_type)
        self._profile = profile or self._profile
        self.schema_version = schema_version
        self.schema_crc = opaque.schema_fingerprint(state_type)

    @property
    def known_record_types(self) -> frozenset[int]:
        return frozenset({REC_OPAQUE_BLOB})

    def to_records(self, state: Any, minor: int) -> list[Record]:
        body = opaque.encode_tree(state, self.state_type)
        head = _OPAQUE_HDR.pack(self.uuid.bytes, self.schema_version, self.schema_crc)
        return [Record(REC_OPAQUE_BLOB, head + body)]

    def from_records(self, records: Sequence[Record], env: Envelope) -> Any:
        blobs = [r for r in records if r.type == REC_OPAQUE_BLOB]
        if len(blobs) != 1:
            raise MigrationFormatError(errno.EINVAL, f"{self.name}: expected one OPAQUE_BLOB, "
                                       f"found {len(blobs)}")
        p = blobs[0].payload
        if len(p) < _OPAQUE_HDR.size:
            raise MigrationFormatError(errno.EBADMSG, f"{self.name}: OPAQUE_BLOB too short")
        fam, ver, crc = _OPAQUE_HDR.unpack_from(p, 0)
        if fam != self.uuid.bytes:
            raise MigrationFormatError(errno.EINVAL, f"{self.name}: blob from another family "
                                       f"{uuid.UUID(bytes=fam)}")
        if ver != self.schema_version or crc != self.schema_crc:
            raise MigrationFormatError(
                errno.EINVAL, f"{self.name}: schema v{ver}/{crc:#010x} does not match this "
                f"build's v{self.schema_version}/{self.schema_crc:#010x}")
        return opaque.decode_tree(p[_OPAQUE_HDR.size:], self.state_type)

    def descriptor(self) -> dict[str, Any]:
        d = super().descriptor()
        d["precopy"] = False
        d["schema_version"] = self.schema_version
        return d


class FormatSet:
    """The formats one device supports; the first one is the default unless told."""

    def __init__(self, formats: Sequence[StateFormat], default: str | None = None) -> None:
        if not formats:
            raise ValueError("a FormatSet needs at least one format")
        self.formats = tuple(formats)
        uuids = [f.uuid for f in self.formats]
        if len(set(uuids)) != len(uuids):
            raise ValueError("duplicate format UUIDs")
        self.by_uuid = {f.uuid: f for f in self.formats}
        self.default = self.find(default)[0] if default else self.formats[0]

    def __iter__(self) -> Iterator[StateFormat]:
        return iter(self.formats)

    def __len__(self) -> int:
        return len(self.formats)

    def find(self, key: str | uuid.UUID) -> tuple[StateFormat, int | None]:
        """Resolve ``NAME|ALIAS|UUID[:MINOR]`` to (format, minor or None)."""
        if isinstance(key, uuid.UUID):
            fmt = self.by_uuid.get(key)
            if fmt is None:
                raise MigrationError(errno.EINVAL, f"unknown migration format {key}")
            return fmt, None
        text, _, minor_s = key.strip().partition(":")
        minor: int | None = None
        if minor_s:
            try:
                minor = int(minor_s, 0)
            except ValueError:
                raise MigrationError(errno.EINVAL, f"bad minor in {key!r}") from None
        fmt = None
        try:
            fmt = self.by_uuid.get(uuid.UUID(text))
        except ValueError:
            fmt = next((f for f in self.formats if f.name == text), None) or next(
                (f for f in self.formats if text in f.aliases), None)
        if fmt is None:
            names = ", ".join(f.name for f in self.formats)
            raise MigrationError(errno.EINVAL, f"unknown migration format {text!r} "
                                 f"(this device has: {names})")
        if minor is not None:
            fmt._minor(minor)  # range check
        return fmt, minor

    def descriptors(self) -> list[dict[str, Any]]:
        return [dict(f.descriptor(), default=f is self.default) for f in self.formats]

    def decode(self, data: bytes) -> tuple[StateFormat, Any]:
        """Detect the format from the stream's UUID and decode it."""
        env, spec = decode_envelope(data, list(self.formats))
        fmt = self.by_uuid[spec.uuid]
        return fmt, fmt.decode_envelope(env)


_REGISTRY: dict[str, FormatSet] = {}


def register_formats(family: str, formats: FormatSet) -> None:
    """Make a device family's formats visible to tools (``vfu-migrate``)."""
    _REGISTRY[family] = formats


def get_formats(family: str) -> FormatSet:
    try:
        return _REGISTRY[family]
    except KeyError:
        raise MigrationError(errno.ENOENT, f"no migration formats registered for {family!r}") from None


def registered_families() -> list[str]:
    return sorted(_REGISTRY)
