"""Schema-checked TLV serialisation of plain-data dataclass trees (opaque formats).

The opaque format is "whatever this implementation needs", but the destination
still parses untrusted bytes, so it must never be pickle.  This is a tiny
tag-length-value encoding driven by the dataclass type hints on both sides:

==== ============ ==========================================================
tag  kind         body
==== ============ ==========================================================
0x00 None         --
0x01 False        --
0x02 True         --
0x03 uint         LEB128 varint (value <= 2**64-1)
0x04 negint       LEB128 varint n, value = -1 - n (value >= -2**63)
0x05 bytes        varint length, bytes
0x06 str          varint length, UTF-8
0x07 sequence     varint count, count values (list[T] or tuple[T, ...])
0x08 struct       varint field count, the fields in declaration order
==== ============ ==========================================================

The decoder is told the root type and checks every tag against the type hint
it expects, so a stream can only ever produce instances of the declared
dataclasses.  A schema fingerprint (CRC-32C of a canonical description of the
type tree) travels with the data: a producer whose dataclasses changed shape
is refused instead of being mis-read.  Depth, counts and integer ranges are
bounded.

A struct is described by its class name, or by its ``opaque_name`` class attribute when it
has one: a class that took another's place in a tree (e.g. a device's live state class
serving as the record its format used to copy it into) keeps the fingerprint, and so the
streams, unchanged.
"""

from __future__ import annotations

import dataclasses
import errno
import types
import typing
from functools import cache
from typing import Any

from .crc import crc32c
from .errors import MigrationFormatError

__all__ = ["decode_tree", "encode_tree", "schema_fingerprint", "schema_text"]

T_NONE, T_FALSE, T_TRUE, T_UINT, T_NEGINT, T_BYTES, T_STR, T_SEQ, T_STRUCT = range(9)
MAX_DEPTH = 32
_U64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)


def _bad(reason: str, err: int = errno.EINVAL) -> MigrationFormatError:
    return MigrationFormatError(err, f"opaque state: {reason}")


@cache
def _hints(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _shape(tp: Any) -> tuple[str, Any]:
    """Classify a type hint: ('int', cls) ('bool',) ('bytes',) ('str',) ('seq', T, kind)
    ('struct', cls) ('opt', T)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return ("opt", rest[0])
        raise TypeError(f"unsupported union {tp!r}")
    if origin is list and len(args) == 1:
        return ("seq", (args[0], list))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return ("seq", (args[0], tuple))
    if tp is bool:
        return ("bool", None)
    if isinstance(tp, type) and issubclass(tp, int):
        return ("int", tp)
    if tp is bytes:
        return ("bytes", None)
    if tp is str:
        return ("str", None)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return ("struct", tp)
    raise TypeError(f"unsupported type {tp!r} in an opaque state tree")


@cache
def schema_text(tp: Any) -> str:
    """A canonical, stable description of a type tree (what the fingerprint hashes)."""
    kind, arg = _shape(tp)
    if kind == "opt":
        return f"?{schema_text(arg)}"
    if kind == "seq":
        return f"[{schema_text(arg[0])}]"
    if kind == "int":
        return "int" if arg is int else f"int:{arg.__name__}"
    if kind == "struct":
        inner = ",".join(f"{n}:{schema_text(t)}" for n, t in _hints(arg))
        return f"{getattr(arg, 'opaque_name', arg.__name__)}{{{inner}}}"
    return kind


def schema_fingerprint(tp: Any) -> int:
    return crc32c(schema_text(tp).encode())


def _varint(n: int, out: bytearray) -> None:
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _enc(v: Any, tp: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _bad("tree too deep")
    kind, arg = _shape(tp)
    if kind == "opt":
        if v is None:
            out.append(T_NONE)
        else:
            _enc(v, arg, out, depth)
        return
    if kind == "bool":
        if not isinstance(v, bool):
            raise _bad(f"expected bool, got {type(v).__name__}")
        out.append(T_TRUE if v else T_FALSE)
    elif kind == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad(f"expected int, got {type(v).__name__}")
        if v >= 0:
            if v > _U64:
                raise _bad(f"integer {v} wider than 64 bits")
            out.append(T_UINT)
            _varint(v, out)
        else:
            if v < _I64_MIN:
                raise _bad(f"integer {v} wider than 64 bits")
            out.append(T_NEGINT)
            _varint(-1 - v, out)
    elif kind in ("bytes", "str"):
        if kind == "bytes" and not isinstance(v, bytes | bytearray):
            raise _bad(f"expected bytes, got {type(v).__name__}")
        if kind == "str" and not isinstance(v, str):
            raise _bad(f"expected str, got {type(v).__name__}")
        data = v.encode() if kind == "str" else bytes(v)
        out.append(T_STR if kind == "str" else T_BYTES)
        _varint(len(data), out)
        out += data
    elif kind == "seq":
        if not isinstance(v, list | tuple):
            raise _bad(f"expected a sequence, got {type(v).__name__}")
        out.append(T_SEQ)
        _varint(len(v), out)
        for item in v:
            _enc(item, arg[0], out, depth + 1)
    else:  # struct
        if type(v) is not arg:
            raise _bad(f"expected {arg.__name__}, got {type(v).__name__}")
        fields = _hints(arg)
        out.append(T_STRUCT)
        _varint(len(fields), out)
        for name, ftp in fields:
            _enc(getattr(v, name), ftp, out, depth + 1)


def encode_tree(value: Any, tp: Any | None = None) -> bytes:
    """Encode a dataclass tree (``tp`` defaults to ``type(value)``)."""
    out = bytearray()
    try:
        _enc(value, tp or type(value), out, 0)
    except TypeError as exc:
        raise _bad(str(exc)) from None
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise _bad("truncated", errno.EBADMSG)
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        n = shift = 0
        for _ in range(10):
            b = self.byte()
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n
        raise _bad("varint longer than 10 bytes", errno.EBADMSG)

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _bad(f"length {n} overruns the data", errno.EBADMSG)
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


def _dec(r: _Reader, tp: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise _bad("tree too deep")
    kind, arg = _shape(tp)
    tag = r.byte()
    if kind == "opt":
        if tag == T_NONE:
            return None
        r.pos -= 1
        return _dec(r, arg, depth)
    if kind == "bool":
        if tag not in (T_FALSE, T_TRUE):
            raise _bad(f"expected bool tag, got {tag:#x}")
        return tag == T_TRUE
    if kind == "int":
        if tag == T_UINT:
            v = r.varint()
            if v > _U64:
                raise _bad("integer wider than 64 bits")
        elif tag == T_NEGINT:
            v = -1 - r.varint()
            if v < _I64_MIN:
                raise _bad("integer wider than 64 bits")
        else:
            raise _bad(f"expected int tag, got {tag:#x}")
        if arg is int:
            return v
        try:
            return arg(v)
        except ValueError:
            raise _bad(f"{v} is not a valid {arg.__name__}") from None
    if kind in ("bytes", "str"):
        want = T_STR if kind == "str" else T_BYTES
        if tag != want:
            raise _bad(f"expected {kind} tag, got {tag:#x}")
        data = r.take(r.varint())
        if kind == "bytes":
            return data
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise _bad("invalid UTF-8") from None
    if kind == "seq":
        if tag != T_SEQ:
            raise _bad(f"expected sequence tag, got {tag:#x}")
        count = r.varint()
        if count > len(r.data) - r.pos:  # every element takes at least one byte
            raise _bad(f"sequence of {count} overruns the data", errno.EBADMSG)
        items = [_dec(r, arg[0], depth + 1) for _ in range(count)]
        return items if arg[1] is list else tuple(items)
    # struct
    if tag != T_STRUCT:
        raise _bad(f"expected {arg.__name__} struct tag, got {tag:#x}")
    fields = _hints(arg)
    n = r.varint()
    if n != len(fields):
        raise _bad(f"{arg.__name__}: {n} fields, schema has {len(fields)}")
    kwargs = {name: _dec(r, ftp, depth + 1) for name, ftp in fields}
    try:
        return arg(**kwargs)
    except (TypeError, ValueError) as exc:
        raise _bad(f"{arg.__name__} rejected the values: {exc}") from None


def decode_tree(data: bytes, tp: Any) -> Any:
    """Decode bytes produced by :func:`encode_tree` for the same type ``tp``."""
    r = _Reader(bytes(data))
    try:
        v = _dec(r, tp, 0)
    except RecursionError:
        raise _bad("tree too deep") from None
    if r.pos != len(r.data):
        raise _bad(f"{len(r.data) - r.pos} trailing bytes", errno.EBADMSG)
    return v
