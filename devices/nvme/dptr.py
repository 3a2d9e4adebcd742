"""Data pointers: PRP entries/lists and SGLs, turned into guest memory segments.

Everything read here comes from the guest, so every address, offset and length is checked and
every walk is bounded; a bad pointer becomes an :class:`NvmeError`, never an exception of
another kind. Segments are ``(address, length)``; address ``BIT_BUCKET`` marks an SGL bit
bucket (read data the host does not want).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from vfu_server.protocol.errors import DmaError

from .constants import Status
from .errors import NvmeError

BIT_BUCKET = -1
Segment = tuple[int, int]

#: upper bound on SGL descriptors per command; a real host needs a few hundred at most
MAX_SGL_DESCRIPTORS = 4096
_SGL = struct.Struct("<QI3xB")
SGL_DATA_BLOCK = 0x0
SGL_BIT_BUCKET = 0x1
SGL_SEGMENT = 0x2
SGL_LAST_SEGMENT = 0x3


class Memory(Protocol):
    def read(self, iova: int, length: int) -> bytes: ...
    def views(self, iova: int, length: int, *, write: bool = False) -> list[memoryview]: ...


def _read(mem: Memory, addr: int, length: int) -> bytes:
    try:
        return mem.read(addr, length)
    except DmaError as exc:
        raise NvmeError(Status.DATA_TRANSFER_ERROR, f"reading a data pointer list: {exc}") from None


def _append(segs: list[Segment], addr: int, length: int) -> None:
    # Merge physically contiguous pieces: fewer views, fewer iovecs for the backend.
    if segs and addr != BIT_BUCKET and segs[-1][0] != BIT_BUCKET and segs[-1][0] + segs[-1][1] == addr:
        segs[-1] = (segs[-1][0], segs[-1][1] + length)
    else:
        segs.append((addr, length))


def prp_segments(mem: Memory, prp1: int, prp2: int, length: int, page_size: int) -> list[Segment]:
    """Segments of a PRP-described transfer of ``length`` bytes (NVMe Base 4.1.1)."""
    if length <= 0:
        return []
    if prp1 & 3:
        raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP1 {prp1:#x} is not dword aligned")
    segs: list[Segment] = []
    first = min(length, page_size - (prp1 % page_size))
    _append(segs, prp1, first)
    remaining = length - first
    if remaining == 0:
        return segs
    if remaining <= page_size:
        if prp2 % page_size:
            raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP2 {prp2:#x} has an offset")
        _append(segs, prp2, remaining)
        return segs
    if prp2 & 7:
        raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP list pointer {prp2:#x} is not qword aligned")
    list_addr = prp2
    # The transfer length is bounded by MDTS, so this loop runs at most a few pages.
    while remaining > 0:
        slots = (page_size - list_addr % page_size) // 8
        needed = -(-remaining // page_size)
        count = min(needed, slots)
        entries = struct.unpack(f"<{count}Q", _read(mem, list_addr, 8 * count))
        chained = needed > slots
        data_entries = entries[:-1] if chained else entries
        for entry in data_entries:
            if entry % page_size:
                raise NvmeError(Status.INVALID_PRP_OFFSET, f"PRP entry {entry:#x} has an offset")
            n = min(page_size, remaining)
            _append(segs, entry, n)
            remaining -= n
        if chained:
            list_addr = entries[-1]
            if list_addr & 7:
                raise NvmeError(Status.INVALID_PRP_OFFSET, f"chained PRP list {list_addr:#x} misaligned")
    return segs


def sgl_segments(mem: Memory, sgl1: bytes | memoryview, length: int, *, to_host: bool) -> list[Segment]:
    """Segments of an SGL-described transfer (NVMe Base 4.1.2).

    ``sgl1`` is the 16-byte descriptor from the command; ``to_host`` is true when the
    controller writes guest memory (a read command), where bit buckets are allowed.
    """
    segs: list[Segment] = []
    total = 0
    seen = 0

    def data(addr: int, n: int, ident: int) -> None:
        nonlocal total
        kind, subtype = ident >> 4, ident & 0xF
        if subtype != 0:
            raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL subtype {subtype} (only addresses)")
        if kind == SGL_BIT_BUCKET:
            if not to_host:
                raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, "bit bucket in a host-to-controller SGL")
            if n:
                _append(segs, BIT_BUCKET, n)
        elif n:
            _append(segs, addr, n)
        total += n

    addr, n, ident = _SGL.unpack(bytes(sgl1[:16]))
    kind = ident >> 4
    if kind in (SGL_DATA_BLOCK, SGL_BIT_BUCKET):
        data(addr, n, ident)
    elif kind in (SGL_SEGMENT, SGL_LAST_SEGMENT):
        last = kind == SGL_LAST_SEGMENT
        while True:
            if ident & 0xF:
                raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, "SGL segment with offset addressing")
            if n == 0 or n % 16:
                raise NvmeError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR, f"SGL segment length {n}")
            count = n // 16
            seen += count
            if seen > MAX_SGL_DESCRIPTORS:
                raise NvmeError(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS, f"more than {MAX_SGL_DESCRIPTORS} SGL descriptors")
            raw = _read(mem, addr, n)
            next_desc: tuple[int, int, int] | None = None
            for i in range(count):
                d_addr, d_len, d_ident = _SGL.unpack_from(raw, 16 * i)
                d_kind = d_ident >> 4
                if d_kind in (SGL_SEGMENT, SGL_LAST_SEGMENT):
                    if i != count - 1 or last:
                        raise NvmeError(Status.INVALID_SGL_SEGMENT_DESCRIPTOR,
                                        "SGL segment descriptor not at the end of a non-last segment")
                    next_desc = (d_addr, d_len, d_ident)
                elif d_kind in (SGL_DATA_BLOCK, SGL_BIT_BUCKET):
                    data(d_addr, d_len, d_ident)
                else:
                    raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL descriptor type {d_kind}")
            if next_desc is None:
                break
            addr, n, ident = next_desc
            last = (ident >> 4) == SGL_LAST_SEGMENT
    else:
        raise NvmeError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL descriptor type {kind}")
    if total < length:
        raise NvmeError(Status.DATA_SGL_LENGTH_INVALID, f"SGL describes {total} bytes, command needs {length}")
    return truncate(segs, length)


def truncate(segs: Sequence[Segment], length: int) -> list[Segment]:
    out: list[Segment] = []
    for addr, n in segs:
        if length <= 0:
            break
        take = min(n, length)
        out.append((addr, take))
        length -= take
    return out


def segment_views(mem: Memory, segs: Sequence[Segment], *, write: bool) -> list[memoryview]:
    """Zero-copy views of guest memory for ``segs`` (bit buckets get scratch buffers)."""
    out: list[memoryview] = []
    try:
        for addr, n in segs:
            if addr == BIT_BUCKET:
                out.append(memoryview(bytearray(n)))
            else:
                out.extend(mem.views(addr, n, write=write))
    except DmaError as exc:
        raise NvmeError(Status.DATA_TRANSFER_ERROR, str(exc)) from None
    return out
