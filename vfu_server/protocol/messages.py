"""Payload layouts of every vfio-user message, as frozen dataclasses with ``pack``/``unpack``.

Payloads start right after the 16-byte header. All integers are little-endian. ``unpack``
raises :class:`~vfu_server.protocol.errors.MalformedMessage` (errno EINVAL) on anything short,
oversized or inconsistent, so a handler can trust the values it gets.

The layouts follow QEMU's ``hw/vfio-user/protocol.h``, which is what real clients send, and
QEMU's ``docs/interop/vfio-user.rst``; where they differ the docstring says so.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from .constants import (
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    FeatureFlags,
    IrqSetFlags,
    RegionCapId,
    RegionFlags,
)
from .errors import MalformedMessage

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _need(buf: bytes | memoryview, size: int, what: str) -> None:
    if len(buf) < size:
        raise MalformedMessage(f"{what}: payload is {len(buf)} bytes, needs {size}")


# --------------------------------------------------------------------------------------------
# VERSION


@dataclass(frozen=True, slots=True)
class Version:
    """VERSION request and reply: ``major u16, minor u16, JSON string, NUL``."""

    major: int
    minor: int
    capabilities: dict = field(default_factory=dict)

    _HEAD = struct.Struct("<HH")

    def pack(self) -> bytes:
        text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        return self._HEAD.pack(self.major, self.minor) + text.encode() + b"\0"

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Version:
        _need(buf, 4, "VERSION")
        major, minor = cls._HEAD.unpack_from(buf)
        raw = bytes(buf[4:])
        caps: dict = {}
        if raw:
            if raw[-1] != 0:
                raise MalformedMessage("VERSION: capability string is not NUL-terminated")
            text = raw[:-1]
            if b"\0" in text:
                raise MalformedMessage("VERSION: NUL inside the capability string")
            if text:
                try:
                    doc = json.loads(text)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise MalformedMessage(f"VERSION: capabilities are not JSON: {exc}") from None
                if not isinstance(doc, dict):
                    raise MalformedMessage("VERSION: capabilities JSON is not an object")
                inner = doc.get("capabilities", {})
                if not isinstance(inner, dict):
                    raise MalformedMessage("VERSION: 'capabilities' is not an object")
                caps = inner
        return cls(major, minor, caps)


# --------------------------------------------------------------------------------------------
# DMA_MAP / DMA_UNMAP


@dataclass(frozen=True, slots=True)
class DmaMap:
    """DMA_MAP: ``argsz u32, flags u32, offset u64, address u64, size u64`` (+ 0 or 1 fd)."""

    flags: int
    offset: int
    address: int
    size: int
    argsz: int = 32

    _S = struct.Struct("<IIQQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> DmaMap:
        _need(buf, cls._S.size, "DMA_MAP")
        argsz, flags, offset, address, size = cls._S.unpack_from(buf)
        if argsz < cls._S.size:
            raise MalformedMessage(f"DMA_MAP: argsz {argsz} < {cls._S.size}")
        return cls(flags, offset, address, size, argsz)


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    """DMA_UNMAP: ``argsz u32, flags u32, address u64, size u64`` (+ a bitmap descriptor when
    GET_DIRTY_BITMAP is set, which this server refuses)."""

    flags: int
    address: int
    size: int
    argsz: int = 24

    _S = struct.Struct("<IIQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> DmaUnmap:
        _need(buf, cls._S.size, "DMA_UNMAP")
        argsz, flags, address, size = cls._S.unpack_from(buf)
        if argsz < cls._S.size:
            raise MalformedMessage(f"DMA_UNMAP: argsz {argsz} < {cls._S.size}")
        return cls(flags, address, size, argsz)


# --------------------------------------------------------------------------------------------
# DEVICE_GET_INFO


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """DEVICE_GET_INFO request and reply: ``argsz, flags, num_regions, num_irqs`` (u32 each)."""

    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0
    argsz: int = 16

    _S = struct.Struct("<IIII")

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> DeviceInfo:
        _need(buf, cls._S.size, "DEVICE_GET_INFO")
        argsz, flags, nreg, nirq = cls._S.unpack_from(buf)
        return cls(flags, nreg, nirq, argsz)


# --------------------------------------------------------------------------------------------
# DEVICE_GET_REGION_INFO and its capability chain


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """Capability 1: the mmappable areas of a region, ``(offset, size)`` relative to the region."""

    areas: tuple[tuple[int, int], ...]

    id = RegionCapId.SPARSE_MMAP
    version = 1

    def body(self) -> bytes:
        out = bytearray(_U32.pack(len(self.areas)) + b"\0\0\0\0")
        for off, size in self.areas:
            out += struct.pack("<QQ", off, size)
        return bytes(out)

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> SparseMmapCap:
        _need(body, 8, "SPARSE_MMAP cap")
        (n,) = _U32.unpack_from(body)
        _need(body, 8 + 16 * n, "SPARSE_MMAP cap areas")
        return cls(tuple(struct.unpack_from("<QQ", body, 8 + 16 * i) for i in range(n)))


@dataclass(frozen=True, slots=True)
class TypeCap:
    """Capability 2: a device-specific region's ``type`` and ``subtype``."""

    type: int
    subtype: int

    id = RegionCapId.TYPE
    version = 1

    def body(self) -> bytes:
        return struct.pack("<II", self.type, self.subtype)

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> TypeCap:
        _need(body, 8, "TYPE cap")
        return cls(*struct.unpack_from("<II", body))


@dataclass(frozen=True, slots=True)
class MsixMappableCap:
    """Capability 3: the MSI-X table may be mmapped over (no body)."""

    id = RegionCapId.MSIX_MAPPABLE
    version = 1

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> MsixMappableCap:
        return cls()


RegionCap = SparseMmapCap | TypeCap | MsixMappableCap
_CAP_CLASSES = {c.id: c for c in (SparseMmapCap, TypeCap, MsixMappableCap)}
_CAP_HEADER = struct.Struct("<HHI")


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """DEVICE_GET_REGION_INFO. Request and reply share the 32-byte ``vfio_region_info``::

        0  argsz u32   total size needed (32 + capabilities)
        4  flags u32   READ 1, WRITE 2, MMAP 4, CAPS 8
        8  index u32
        12 cap_offset u32   first capability, from the payload start (0 = none)
        16 size u64    0 = the region does not exist
        24 offset u64  mmap offset into the fd sent with the reply
        32 capabilities: {id u16, version u16, next u32} + body, chained by ``next``
    """

    index: int
    flags: int = 0
    size: int = 0
    offset: int = 0
    caps: tuple[RegionCap, ...] = ()
    argsz: int = 32
    cap_offset: int = 0

    _S = struct.Struct("<IIIIQQ")

    def pack(self, room: int | None = None) -> bytes:
        """Encode the reply into at most ``room`` payload bytes (the request's argsz).

        When the capabilities do not fit, the reply carries only the fixed part, with ``argsz``
        saying how much is needed and CAPS clear: QEMU then asks again with a larger argsz. A
        truncated reply with CAPS set makes QEMU fail realize.
        """
        chain = bytearray()
        base = self._S.size
        for i, cap in enumerate(self.caps):
            body = cap.body()
            start = base + len(chain)
            nxt = start + _CAP_HEADER.size + len(body)
            # Keep capabilities 8-byte aligned, as the kernel does.
            pad = (-nxt) % 8
            nxt += pad
            last = i == len(self.caps) - 1
            chain += _CAP_HEADER.pack(cap.id, cap.version, 0 if last else nxt) + body + b"\0" * pad
        needed = base + len(chain)
        # int(): ~ on an IntFlag complements only the defined bits and would drop unknown ones.
        flags = self.flags & ~int(RegionFlags.CAPS)
        if chain and (room is None or room >= needed):
            flags |= RegionFlags.CAPS
            return self._S.pack(needed, flags, self.index, base, self.size, self.offset) + bytes(chain)
        return self._S.pack(needed, flags, self.index, 0, self.size, self.offset)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> RegionInfo:
        _need(buf, cls._S.size, "DEVICE_GET_REGION_INFO")
        argsz, flags, index, cap_offset, size, offset = cls._S.unpack_from(buf)
        caps: list[RegionCap] = []
        if flags & RegionFlags.CAPS and cap_offset:
            seen = set()
            pos = cap_offset
            while pos:
                if pos in seen or pos < cls._S.size:
                    raise MalformedMessage(f"region info: capability chain loops or points back ({pos})")
                seen.add(pos)
                _need(buf, pos + _CAP_HEADER.size, "region info capability header")
                cid, _ver, nxt = _CAP_HEADER.unpack_from(buf, pos)
                end = nxt if nxt else len(buf)
                if end > len(buf) or end < pos + _CAP_HEADER.size:
                    raise MalformedMessage(f"region info: capability {cid} overruns the payload")
                klass = _CAP_CLASSES.get(cid)
                if klass is not None:
                    caps.append(klass.from_body(buf[pos + _CAP_HEADER.size : end]))
                pos = nxt
        return cls(index, flags, size, offset, tuple(caps), argsz, cap_offset)

    @classmethod
    def request(cls, index: int, argsz: int = 32) -> bytes:
        return cls._S.pack(argsz, 0, index, 0, 0, 0)

    def cap(self, kind: type) -> RegionCap | None:
        return next((c for c in self.caps if isinstance(c, kind)), None)


# --------------------------------------------------------------------------------------------
# DEVICE_GET_REGION_IO_FDS


@dataclass(frozen=True, slots=True)
class IoFdSubRegion:
    """One ioeventfd sub-region: ``offset u64, size u64, fd_index u32, type u32, flags u32,
    padding u32, datamatch u64``."""

    offset: int
    size: int
    fd_index: int
    type: int = 0
    flags: int = 0
    datamatch: int = 0

    _S = struct.Struct("<QQIIIIQ")


@dataclass(frozen=True, slots=True)
class RegionIoFds:
    """DEVICE_GET_REGION_IO_FDS: ``argsz u32, flags u32, index u32, count u32`` + sub-regions."""

    index: int
    flags: int = 0
    sub_regions: tuple[IoFdSubRegion, ...] = ()
    argsz: int = 16
    count: int = 0

    _S = struct.Struct("<IIII")

    def pack(self, room: int | None = None) -> bytes:
        body = b"".join(
            IoFdSubRegion._S.pack(s.offset, s.size, s.fd_index, s.type, s.flags, 0, s.datamatch)
            for s in self.sub_regions
        )
        needed = self._S.size + len(body)
        n = len(self.sub_regions)
        if room is not None and room < needed:
            return self._S.pack(needed, self.flags, self.index, n)
        return self._S.pack(needed, self.flags, self.index, n) + body

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> RegionIoFds:
        _need(buf, cls._S.size, "DEVICE_GET_REGION_IO_FDS")
        argsz, flags, index, count = cls._S.unpack_from(buf)
        subs = []
        avail = (len(buf) - cls._S.size) // IoFdSubRegion._S.size
        for i in range(min(count, avail)):
            off, size, fdi, typ, fl, _pad, dm = IoFdSubRegion._S.unpack_from(
                buf, cls._S.size + i * IoFdSubRegion._S.size
            )
            subs.append(IoFdSubRegion(off, size, fdi, typ, fl, dm))
        return cls(index, flags, tuple(subs), argsz, count)


# --------------------------------------------------------------------------------------------
# IRQs


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """DEVICE_GET_IRQ_INFO request and reply: ``argsz, flags, index, count`` (u32 each)."""

    index: int
    flags: int = 0
    count: int = 0
    argsz: int = 16

    _S = struct.Struct("<IIII")

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> IrqInfo:
        _need(buf, cls._S.size, "DEVICE_GET_IRQ_INFO")
        argsz, flags, index, count = cls._S.unpack_from(buf)
        return cls(index, flags, count, argsz)


@dataclass(frozen=True, slots=True)
class IrqSet:
    """DEVICE_SET_IRQS: ``argsz, flags, index, start, count`` (u32 each), then for DATA_BOOL one
    byte per sub-index. Eventfds for DATA_EVENTFD travel as SCM_RIGHTS, not in the payload.

    Exactly one DATA bit and one ACTION bit must be set.
    """

    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    argsz: int = 20

    _S = struct.Struct("<IIIII")

    def pack(self) -> bytes:
        return self._S.pack(self._S.size + len(self.data), self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> IrqSet:
        _need(buf, cls._S.size, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = cls._S.unpack_from(buf)
        data_bits = flags & IRQ_SET_DATA_MASK
        action_bits = flags & IRQ_SET_ACTION_MASK
        if data_bits.bit_count() != 1 or action_bits.bit_count() != 1:
            raise MalformedMessage(f"SET_IRQS: flags {flags:#x} need exactly one DATA and one ACTION bit")
        if flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK):
            raise MalformedMessage(f"SET_IRQS: unknown flag bits {flags:#x}")
        if start + count > 0xFFFFFFFF:
            raise MalformedMessage("SET_IRQS: start + count overflows")
        data = b""
        if data_bits == IrqSetFlags.DATA_BOOL:
            _need(buf, cls._S.size + count, "SET_IRQS bool data")
            data = bytes(buf[cls._S.size : cls._S.size + count])
        return cls(flags, index, start, count, data, argsz)

    @property
    def data_type(self) -> IrqSetFlags:
        return IrqSetFlags(self.flags & IRQ_SET_DATA_MASK)

    @property
    def action(self) -> IrqSetFlags:
        return IrqSetFlags(self.flags & IRQ_SET_ACTION_MASK)


# --------------------------------------------------------------------------------------------
# Region access (the hot path: plain functions over precompiled structs, no objects)

REGION_ACCESS = struct.Struct("<QII")  # offset, region, count; data follows


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """REGION_READ / REGION_WRITE: ``offset u64, region u32, count u32`` then ``count`` bytes.

    A read request carries no data; its reply and a write request carry ``count`` bytes.
    """

    region: int
    offset: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        return REGION_ACCESS.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def unpack(cls, buf: bytes | memoryview, with_data: bool) -> RegionAccess:
        _need(buf, REGION_ACCESS.size, "REGION access")
        offset, region, count = REGION_ACCESS.unpack_from(buf)
        data = b""
        if with_data:
            if len(buf) - REGION_ACCESS.size != count:
                raise MalformedMessage(
                    f"REGION access: count {count} but {len(buf) - REGION_ACCESS.size} data bytes"
                )
            data = bytes(buf[REGION_ACCESS.size :])
        return cls(region, offset, count, data)


WRITE_MULTI_ENTRY = struct.Struct("<QII8s")  # offset, region, count (<= 8), data[8]
MAX_WRITE_MULTI = 200


def unpack_write_multi(buf: bytes | memoryview) -> list[tuple[int, int, bytes]]:
    """REGION_WRITE_MULTI: ``wr_cnt u64`` then ``wr_cnt`` entries of 24 bytes.

    Returns ``(region, offset, data)`` triples in order.
    """
    _need(buf, 8, "REGION_WRITE_MULTI")
    (n,) = _U64.unpack_from(buf)
    if n > MAX_WRITE_MULTI:
        raise MalformedMessage(f"REGION_WRITE_MULTI: {n} entries > {MAX_WRITE_MULTI}")
    _need(buf, 8 + WRITE_MULTI_ENTRY.size * n, "REGION_WRITE_MULTI entries")
    out = []
    for i in range(n):
        offset, region, count, data = WRITE_MULTI_ENTRY.unpack_from(buf, 8 + i * WRITE_MULTI_ENTRY.size)
        if count == 0 or count > 8:
            raise MalformedMessage(f"REGION_WRITE_MULTI: entry {i} count {count} not in 1..8")
        out.append((region, offset, data[:count]))
    return out


def pack_write_multi(writes: Sequence[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(_U64.pack(len(writes)))
    for region, offset, data in writes:
        if not 0 < len(data) <= 8:
            raise ValueError("REGION_WRITE_MULTI entries carry 1..8 bytes")
        out += WRITE_MULTI_ENTRY.pack(offset, region, len(data), data)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# DMA_READ / DMA_WRITE (server -> client)

DMA_RW = struct.Struct("<QQ")  # address u64, count u64; data at payload offset 16
DMA_RW_DATA = DMA_RW.size


@dataclass(frozen=True, slots=True)
class DmaAccess:
    """DMA_READ / DMA_WRITE in the spec's layout: ``address u64, count u64``, data from payload
    byte 16 (message byte 32).

    A DMA_READ request carries no data and its reply carries ``count`` bytes; a DMA_WRITE
    request carries ``count`` bytes and its reply echoes address and count with no data.
    QEMU 11.1.3 and libvfio-user both speak this layout (QEMU refuses a shorter, 28-byte
    request with EINVAL and reads only the count's low 32 bits).
    """

    address: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        return DMA_RW.pack(self.address, self.count) + self.data

    @classmethod
    def unpack(cls, buf: bytes | memoryview, with_data: bool) -> DmaAccess:
        """``with_data``: exactly ``count`` data bytes must follow (a DMA_WRITE request, a
        DMA_READ reply); without, none may (a DMA_READ request, a DMA_WRITE reply)."""
        _need(buf, DMA_RW.size, "DMA access")
        address, count = DMA_RW.unpack_from(buf)
        extra = len(buf) - DMA_RW_DATA
        if with_data:
            if extra != count:
                raise MalformedMessage(f"DMA access: count {count} but {extra} data bytes")
            data = bytes(buf[DMA_RW_DATA:])
        else:
            if extra:
                raise MalformedMessage(f"DMA access: {extra} unexpected bytes after address and count")
            data = b""
        if address + count > 1 << 64:
            raise MalformedMessage(f"DMA access {address:#x}+{count:#x} overflows 64 bits")
        return cls(address, count, data)


# --------------------------------------------------------------------------------------------
# DEVICE_FEATURE, MIG_DATA_READ / MIG_DATA_WRITE


@dataclass(frozen=True, slots=True)
class DeviceFeature:
    """DEVICE_FEATURE: ``argsz u32, flags u32`` (index in the low 16 bits; GET, SET, PROBE),
    then feature-specific data."""

    flags: int
    data: bytes = b""
    argsz: int = 0

    _S = struct.Struct("<II")

    @property
    def index(self) -> int:
        return self.flags & 0xFFFF

    @property
    def is_get(self) -> bool:
        return bool(self.flags & FeatureFlags.GET)

    @property
    def is_set(self) -> bool:
        return bool(self.flags & FeatureFlags.SET)

    @property
    def is_probe(self) -> bool:
        return bool(self.flags & FeatureFlags.PROBE)

    def pack(self) -> bytes:
        argsz = self.argsz or self._S.size + len(self.data)
        return self._S.pack(argsz, self.flags) + self.data

    @classmethod
    def get_reply(cls, flags: int, data: bytes, room: int) -> bytes:
        """A GET reply: ``argsz`` is 8 + the data ("its length is added to argsz"). When that
        exceeds ``room`` (the request's argsz), only ``argsz`` and ``flags`` go back, so the
        client learns the size it needs (the spec's "Message sizes" rule)."""
        needed = cls._S.size + len(data)
        if needed > room:
            return cls._S.pack(needed, flags)
        return cls._S.pack(needed, flags) + data

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> DeviceFeature:
        _need(buf, cls._S.size, "DEVICE_FEATURE")
        argsz, flags = cls._S.unpack_from(buf)
        # int(): ~ on an IntFlag is 0 here (it complements only the defined bits).
        if flags & ~int(0xFFFF | FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE):
            raise MalformedMessage(f"DEVICE_FEATURE: unknown flag bits {flags:#x}")
        if flags & FeatureFlags.GET and flags & FeatureFlags.SET and not flags & FeatureFlags.PROBE:
            raise MalformedMessage("DEVICE_FEATURE: GET and SET together without PROBE")
        return cls(flags, bytes(buf[cls._S.size :]), argsz)


@dataclass(frozen=True, slots=True)
class MigData:
    """MIG_DATA_READ / MIG_DATA_WRITE: ``argsz u32, size u32``, then ``size`` bytes (write
    request and read reply).

    ``pack`` sets ``argsz`` to 8 + the data carried, which is what a read reply and a write
    request need; a read request carries no data but must say how large a reply it takes
    (:meth:`read_request`). A write reply has no payload at all.
    """

    size: int
    data: bytes = b""
    argsz: int = 0

    _S = struct.Struct("<II")

    def pack(self) -> bytes:
        argsz = self.argsz or self._S.size + len(self.data)
        return self._S.pack(argsz, self.size) + self.data

    @classmethod
    def read_request(cls, size: int) -> bytes:
        """A MIG_DATA_READ request for ``size`` bytes. Its ``argsz`` "is the maximum size of the
        reply payload", so 8 + ``size``: libvfio-user refuses anything smaller."""
        return cls._S.pack(cls._S.size + size, size)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, with_data: bool) -> MigData:
        _need(buf, cls._S.size, "MIG_DATA")
        argsz, size = cls._S.unpack_from(buf)
        data = b""
        if with_data:
            if len(buf) - cls._S.size < size:
                raise MalformedMessage(f"MIG_DATA: size {size} but {len(buf) - cls._S.size} bytes")
            data = bytes(buf[cls._S.size : cls._S.size + size])
        return cls(size, data, argsz)
