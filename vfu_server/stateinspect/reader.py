"""An independent reader of DEVSTATE streams, written from docs/migration-format.md.

Deliberately shares no code with ``vfu_server.migration``: it imports only the
standard library, so when both readers agree on a stream the specification --
not one implementation -- is what they agree on.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any

__all__ = [
    "FORMATS", "OPAQUE_RECORDS", "ORDER", "PCI_RECORDS", "RECORDS", "Bad", "crc32c", "decode_array",
    "decode_fields", "format_uuid", "inspect_stream", "profile_hook", "register_format",
    "register_records", "split_fixed",
]


class Bad(Exception):
    """The stream violates the specification; the message is one line."""


# CRC-32C, bit-reflected, poly 0x82F63B78 (spec section 2.4).
_T = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 * (_c & 1))
    _T.append(_c)


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _T[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


_NS = uuid.UUID("2fb9b70f-431a-5772-82bf-db124779cf01")
#: Format catalogue (spec section 6): name by UUID. Empty here: the reader names no device
#: family; each registers its formats (``register_format``) through a ``vfu_server.stateinspect``
#: entry point, loaded at the end of this module.
FORMATS: dict[uuid.UUID, str] = {}

Field = tuple[str, str]
# Record catalogue (spec section 5): type -> (name, [(field, struct code)], has_tail). The reader
# knows the records every PCI device shares (section 5.1); families add theirs (register_records).
_PROFILE_FIELDS = (
    [("vendor_id", "H"), ("device_id", "H"), ("subsys_vendor_id", "H"), ("subsys_id", "H"),
     ("class_code", "I"), ("revision", "B"), ("reserved0", "B"), ("msix_vectors", "H"),
     ("msix_table_bir", "B"), ("msix_pba_bir", "B"), ("reserved1", "H"),
     ("msix_table_offset", "I"), ("msix_pba_offset", "I")]
    + [(f"bar{i}_size", "Q") for i in range(6)]
    + [(f"bar{i}_flags", "B") for i in range(6)]
    + [("reserved2", "H"), ("backend_hash", "32s"), ("capabilities_len", "H"),
       ("device_abi_len", "H"), ("reserved3", "I")]
)
_PCI_FIELDS = (
    [("command", "H"), ("cache_line_size", "B"), ("latency_timer", "B"),
     ("interrupt_line", "B"), ("reserved0", "B"), ("pm_control", "H")]
    + [(f"bar{i}", "I") for i in range(6)]
    + [("rom_bar", "I"), ("pcie_devctl", "H"), ("pcie_devctl2", "H"), ("pcie_lnkctl", "H"),
       ("msix_control", "H")]
)
_MSIX_VECTOR = [("addr", "Q"), ("data", "I"), ("ctrl", "I")]
RECORDS: dict[int, tuple[str, list[Field], bool]] = {
    0x0001: ("PROFILE", _PROFILE_FIELDS, True),
    0x0002: ("PCI_CONFIG", _PCI_FIELDS, False),
    0x0003: ("MSIX", [("num_vectors", "H"), ("entry_size", "H"), ("pba_len", "H"),
                      ("reserved0", "H")], True),
    0x0004: ("INTX", [("level", "B"), ("reserved0", "B"), ("reserved1", "H")], False),
    0x8001: ("OPAQUE_BLOB", [], False),
}
#: The records every standard format starts with (section 5.1), in their order.
PCI_RECORDS = (0x0001, 0x0002, 0x0003, 0x0004)
#: The record of every opaque format (section 6.2).
OPAQUE_RECORDS = (0x8001,)
#: Each known format's records in the order of its table (spec sections 5.2-5.4, 6.2): a
#: record of a type not listed here that is not OPTIONAL is refused, and the listed ones must
#: come in this order, PROFILE first, each type's instances strictly ascending (section 4 rule 6).
ORDER: dict[str, list[int]] = {}
#: Whole-payload decoders by record type, and per-format passes over a decoded envelope (e.g. to
#: decode PROFILE.device_abi), registered by the families.
DECODERS: dict[int, Callable[[bytes], dict[str, Any]]] = {}
ENVELOPE_HOOKS: dict[str, Callable[[dict[str, Any]], None]] = {}


def format_uuid(name: str) -> uuid.UUID:
    """A format's UUID from its name (spec section 6: UUIDv5 in the DEVSTATE namespace)."""
    return uuid.uuid5(_NS, name)


def register_format(name: str, order: list[int] | tuple[int, ...] | None = None, *,
                    envelope_hook: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Name a format in the catalogue. With `order` (its table's record types) the reader also
    judges its streams' record order; `envelope_hook` runs over each decoded envelope of it."""
    FORMATS[format_uuid(name)] = name
    if order is not None:
        ORDER[name] = list(order)
    if envelope_hook is not None:
        ENVELOPE_HOOKS[name] = envelope_hook


def register_records(records: dict[int, tuple[str, list[Field], bool]],
                     decoders: dict[int, Callable[[bytes], dict[str, Any]]] | None = None) -> None:
    """A family's record types: fixed layouts (name, fields, has_tail) and, for those a field
    list cannot describe, whole-payload decoders. A type registered already with another
    definition is refused (ValueError): two families cannot both own one record type."""
    for rtype, spec in records.items():
        if RECORDS.get(rtype, spec) != spec:
            raise ValueError(f"record type {rtype:#06x} is {RECORDS[rtype][0]} already")
    for rtype, fn in (decoders or {}).items():
        if DECODERS.get(rtype, fn) is not fn:
            raise ValueError(f"record type {rtype:#06x} has a decoder already")
    RECORDS.update(records)
    DECODERS.update(decoders or {})


HEADER_FLAGS = {0: "PRECOPY_PART", 1: "FINAL", 2: "HAS_CRC"}
RECORD_FLAGS = {0: "OPTIONAL", 1: "PER_INSTANCE"}


def flag_names(v: int, names: dict[int, str]) -> list[str]:
    return [names.get(b, f"bit{b}") for b in range(32) if v >> b & 1]


def decode_fields(spec: list[Field], data: bytes) -> dict[str, Any]:
    """A fixed layout's fields; a layout cut short after a whole field is an older writer's
    (the absent fields take the reader's defaults), one cut inside a field is bad."""
    out: dict[str, Any] = {}
    off = 0
    for name, code in spec:
        size = struct.calcsize("<" + code)
        if off + size > len(data):
            if off < len(data):
                raise Bad(f"field {name} cut short")
            break  # older writer: field absent, reader default applies
        v = struct.unpack_from("<" + code, data, off)[0]
        out[name] = v.hex() if isinstance(v, bytes) else v
        off += size
    return out


def split_fixed(name: str, payload: bytes) -> tuple[bytes, bytes]:
    """A payload with a variable part (section 4 rule 4): u16 fixed_len, u16 reserved (zero), then
    the fixed part and the tail."""
    if len(payload) < 4:
        raise Bad(f"{name}: payload too short")
    flen, rsvd = struct.unpack_from("<HH", payload)
    if rsvd or 4 + flen > len(payload):
        raise Bad(f"{name}: bad fixed_len/reserved")
    return payload[4:4 + flen], payload[4 + flen:]


def decode_array(name: str, spec: list[Field], data: bytes, count: int,
                 size: int) -> list[dict[str, Any]]:
    """`count` entries of `size` bytes each (a size beyond the layout is a newer writer's)."""
    if count and size == 0:
        raise Bad(f"{name}: entry size 0")
    if count * size > len(data):
        raise Bad(f"{name}: {count} entries of {size} bytes overrun the record")
    return [decode_fields(spec, data[i * size:(i + 1) * size]) for i in range(count)]


def profile_hook(key: str, decode: Callable[[bytes], dict[str, Any]]
                 ) -> Callable[[dict[str, Any]], None]:
    """An envelope hook that decodes PROFILE.device_abi with `decode` into the field `key`."""
    def hook(env: dict[str, Any]) -> None:
        for r in env["records"]:
            if r["name"] == "PROFILE" and r["fields"] is not None:
                r["fields"][key] = decode(bytes.fromhex(r["fields"]["device_abi"]))
    return hook


def _tlv(data: bytes, pos: int, depth: int = 0) -> tuple[Any, int]:
    """Schema-less walk of the opaque TLV (spec section 6.2)."""
    if depth > 32:
        raise Bad("opaque TLV nested too deep")

    def varint(p: int) -> tuple[int, int]:
        n = shift = 0
        for _ in range(10):
            if p >= len(data):
                raise Bad("opaque TLV truncated")
            b = data[p]
            p += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n, p
        raise Bad("opaque TLV varint too long")

    if pos >= len(data):
        raise Bad("opaque TLV truncated")
    tag = data[pos]
    pos += 1
    if tag in (0, 1, 2):
        return (None, False, True)[tag], pos
    if tag == 3:
        return varint(pos)
    if tag == 4:
        n, pos = varint(pos)
        return -1 - n, pos
    if tag in (5, 6):
        n, pos = varint(pos)
        if pos + n > len(data):
            raise Bad("opaque TLV string overruns")
        raw = data[pos:pos + n]
        return (raw.hex() if tag == 5 else raw.decode("utf-8", "replace")), pos + n
    if tag in (7, 8):
        n, pos = varint(pos)
        if n > len(data) - pos:
            raise Bad("opaque TLV count overruns")
        items = []
        for _ in range(n):
            v, pos = _tlv(data, pos, depth + 1)
            items.append(v)
        return (items if tag == 7 else {"struct": items}), pos
    raise Bad(f"opaque TLV unknown tag {tag:#x}")


def _decode_record(rtype: int, payload: bytes) -> dict[str, Any] | None:
    if rtype in DECODERS:
        return DECODERS[rtype](payload)
    if rtype not in RECORDS:
        return None
    name, spec, tail = RECORDS[rtype]
    if rtype == 0x8001:
        if len(payload) < 24:
            raise Bad("OPAQUE_BLOB shorter than its 24-byte header")
        fam, ver, crc = struct.unpack_from("<16sII", payload)
        tree, end = _tlv(payload, 24)
        if end != len(payload):
            raise Bad("OPAQUE_BLOB has bytes after its TLV tree")
        return {"family_uuid": str(uuid.UUID(bytes=fam)), "schema_version": ver,
                "schema_crc": f"{crc:#010x}", "tree": tree}
    fixed, rest = split_fixed(name, payload) if tail else (payload, b"")
    out = decode_fields(spec, fixed)
    if rtype == 0x0001:
        cl, al = out.get("capabilities_len", 0), out.get("device_abi_len", 0)
        if cl + al > len(rest):
            raise Bad("PROFILE: capability/ABI lengths overrun")
        out["capabilities"] = rest[:cl].hex()
        out["device_abi"] = rest[cl:cl + al].hex()
    elif rtype == 0x0003:
        # Fields are append-only: a short fixed part leaves later fields at their default 0.
        n, es, pl = out.get("num_vectors", 0), out.get("entry_size", 16), out.get("pba_len", 0)
        if n * es + pl > len(rest) or (n and es == 0):
            raise Bad("MSIX: table and PBA overrun the record")
        out["vectors"] = decode_array("MSIX", _MSIX_VECTOR, rest, n, es)
        out["pba"] = rest[n * es:n * es + pl].hex()
    return out


def _decode_checked(rtype: int, name: str, payload: bytes) -> dict[str, Any] | None:
    """A record decoder that meets bytes it cannot make sense of reports the stream as bad;
    a reader of untrusted input never fails with anything else."""
    try:
        return _decode_record(rtype, payload)
    except Bad:
        raise
    except (KeyError, IndexError, ValueError, TypeError, struct.error) as exc:
        raise Bad(f"record {rtype:#06x} {name}: malformed ({type(exc).__name__}: {exc})") from None


def _one(data: bytes, start: int) -> tuple[dict[str, Any], int]:
    d = data[start:]
    if len(d) < 64:
        raise Bad(f"truncated header at offset {start}")
    (magic, emaj, emin, hlen, fu, fmaj, fmin, flags, pu, pcrc, hcrc) = struct.unpack_from(
        "<8sHHI16sHHI16sII", d)
    if magic != b"DEVSTATE":
        raise Bad(f"bad magic at offset {start}")
    if emaj != 1:
        raise Bad(f"unsupported envelope version {emaj}.{emin}")
    if hlen < 64 or hlen % 8 or hlen > 4096 or hlen > len(d):
        raise Bad(f"bad header_len {hlen}")
    if flags & ~7 or bool(flags & 1) == bool(flags & 2):
        raise Bad(f"bad header flags {flags:#x}")
    has_crc = bool(flags & 4)
    if has_crc and crc32c(d[:60] + b"\0\0\0\0" + d[64:hlen]) != hcrc:
        raise Bad("header checksum mismatch")
    fu_ = uuid.UUID(bytes=fu)
    env: dict[str, Any] = {
        "offset": start, "format": FORMATS.get(fu_, "unknown"), "format_uuid": str(fu_),
        "envelope_version": f"{emaj}.{emin}", "format_version": f"{fmaj}.{fmin}",
        "flags": flag_names(flags, HEADER_FLAGS), "producer_uuid": str(uuid.UUID(bytes=pu)),
        "profile_crc32c": f"{pcrc:#010x}", "records": [],
    }
    pos = hlen
    while True:
        if pos + 16 > len(d):
            raise Bad(f"truncated record header at offset {start + pos}")
        rtype, rflags, inst, rver, rsvd, length = struct.unpack_from("<HHIHHI", d, pos)
        body = pos + 16
        end = body + ((length + 7) & ~7)
        if end > len(d):
            raise Bad(f"record {rtype:#06x} at offset {start + pos} overruns the stream")
        if rsvd or rflags & ~3 or any(d[body + length:end]):
            raise Bad(f"record {rtype:#06x} at offset {start + pos}: non-zero reserved/padding")
        payload = d[body:body + length]
        if rtype == 0:
            if length != 8:
                raise Bad("malformed END record")
            count, crc = struct.unpack_from("<II", payload)
            if count != len(env["records"]):
                raise Bad(f"END counts {count} records, found {len(env['records'])}")
            if has_crc and crc32c(d[:pos]) != crc:
                raise Bad("stream checksum mismatch")
            env["record_count"] = count
            env["checksums"] = "verified" if has_crc else "absent"
            prof = [r for r in env["records"] if r["_rtype"] == 1]
            if len(prof) > 1:
                raise Bad("more than one PROFILE record")
            if has_crc and pcrc != (prof[0]["_crc"] if prof else 0):
                raise Bad("profile_crc32c does not match the PROFILE record")
            _check_order(env)
            for r in env["records"]:
                del r["_rtype"], r["_crc"]
            if env["format"] in ENVELOPE_HOOKS:
                ENVELOPE_HOOKS[env["format"]](env)
            return env, start + end
        name = RECORDS.get(rtype, ("unknown", [], False))[0]
        env["records"].append({
            "type": f"{rtype:#06x}", "name": name, "flags": flag_names(rflags, RECORD_FLAGS),
            "instance": inst, "version": rver, "length": length,
            "fields": _decode_checked(rtype, name, payload), "_rtype": rtype, "_crc": crc32c(payload),
        })
        pos = end


def _check_order(env: dict[str, Any]) -> None:
    """Section 2.6 and 4 rules 6-7 for a format this reader knows: no unknown mandatory record,
    PROFILE first, the known records in table order with strictly ascending instances.
    Unknown OPTIONAL records are skipped and do not count for the order."""
    table = ORDER.get(env["format"])
    if table is None:
        return  # a format this reader does not know: shown record by record, unjudged
    rank = {t: i for i, t in enumerate(table)}
    last: tuple[int, int] | None = None
    for r in env["records"]:
        t = r["_rtype"]
        if t not in rank:
            if "OPTIONAL" not in r["flags"]:
                raise Bad(f"{env['format']}: unknown mandatory record type {t:#06x}")
            continue
        if last is None and 0x0001 in rank and t != 0x0001:
            raise Bad(f"{env['format']}: PROFILE is not the first record")
        if last is not None:
            if rank[t] < rank[last[0]]:
                raise Bad(f"{env['format']}: record {t:#06x} after {last[0]:#06x}, out of the "
                          "format's order")
            if t == last[0] and r["instance"] <= last[1]:
                raise Bad(f"{env['format']}: record {t:#06x} instances not strictly ascending")
        last = (t, r["instance"])
    if last is None and 0x0001 in rank:
        raise Bad(f"{env['format']}: no PROFILE record")


def inspect_stream(data: bytes) -> list[dict[str, Any]]:
    """Parse a whole stream (one or more envelopes, the last FINAL). Raises Bad."""
    envs = []
    pos = 0
    while pos < len(data):
        env, pos = _one(data, pos)
        envs.append(env)
        if "FINAL" in env["flags"]:
            if pos != len(data):
                raise Bad(f"{len(data) - pos} trailing bytes after the FINAL envelope")
            break
    if not envs:
        raise Bad("empty stream")
    if "FINAL" not in envs[-1]["flags"]:
        raise Bad("stream ends without a FINAL envelope")
    return envs


def _load_format_decoders() -> None:
    """Import the device families' decoders (``vfu_server.stateinspect`` entry points, each
    next to its devices), which register into the tables above. The
    reader itself names no device family: its catalogue is what these register."""
    import importlib
    import warnings
    from importlib.metadata import entry_points

    for ep in entry_points(group="vfu_server.stateinspect"):
        try:
            importlib.import_module(ep.value)
        except Exception as exc:
            # One broken family must not take the reader down: its formats show as unknown.
            warnings.warn(f"vfu-state: the {ep.name} decoders ({ep.value}) are not loaded: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=1)


_load_format_decoders()
