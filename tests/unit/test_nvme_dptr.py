"""PRP and SGL parsing against an in-memory guest: segment maths and guest-error statuses."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfu_devices.nvme.constants import Status
from vfu_devices.nvme.controller import _merge
from vfu_devices.nvme.dptr import BIT_BUCKET, prp_segments, segment_views, sgl_segments
from vfu_devices.nvme.errors import NvmeError
from vfu_server.protocol.errors import DmaError

PAGE = 4096


class FakeMemory:
    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)

    def _check(self, iova: int, length: int) -> None:
        if iova < 0 or length < 0 or iova + length > len(self.data):
            raise DmaError(f"{iova:#x}+{length} unmapped")

    def read(self, iova: int, length: int) -> bytes:
        self._check(iova, length)
        return bytes(self.data[iova : iova + length])

    def views(self, iova: int, length: int, *, write: bool = False) -> list[memoryview]:
        self._check(iova, length)
        return [memoryview(self.data)[iova : iova + length]]


def sgl(addr: int, length: int, kind: int, sub: int = 0) -> bytes:
    return struct.pack("<QI3xB", addr, length, kind << 4 | sub)


def status_of(fn, *args, **kw) -> Status:  # type: ignore[no-untyped-def]
    with pytest.raises(NvmeError) as info:
        fn(*args, **kw)
    return info.value.status


def test_prp_simple_cases() -> None:
    mem = FakeMemory()
    assert prp_segments(mem, 0x1000, 0, 4096, PAGE) == [(0x1000, 4096)]
    assert prp_segments(mem, 0x1800, 0x5000, 4096, PAGE) == [(0x1800, 2048), (0x5000, 2048)]
    assert prp_segments(mem, 0x1000, 0x2000, 8192, PAGE) == [(0x1000, 8192)]  # merged
    assert prp_segments(mem, 0x1000, 0, 0, PAGE) == []
    assert status_of(prp_segments, mem, 0x1002, 0, 512, PAGE) == Status.INVALID_PRP_OFFSET
    assert status_of(prp_segments, mem, 0x1000, 0x2200, 8192, PAGE) == Status.INVALID_PRP_OFFSET


def test_prp_chained_list() -> None:
    mem = FakeMemory()
    data_pages = [0x10000 + 0x2000 * i for i in range(6)]  # not contiguous
    list1 = 0x8000 - 16  # room for two entries: one data page + chain pointer
    struct.pack_into("<2Q", mem.data, list1, data_pages[1], 0x9000)
    struct.pack_into("<4Q", mem.data, 0x9000, *data_pages[2:])
    segs = prp_segments(mem, data_pages[0], list1, 6 * PAGE, PAGE)
    assert segs == [(p, PAGE) for p in data_pages]
    assert status_of(prp_segments, mem, data_pages[0], 1 << 30, 3 * PAGE, PAGE) == Status.DATA_TRANSFER_ERROR


@given(st.integers(0, PAGE // 4 - 1).map(lambda d: 0x40000 + 4 * d), st.integers(1, 32 * PAGE))
def test_prp_lengths_add_up(prp1: int, length: int) -> None:
    mem = FakeMemory()
    pages = [0x80000 + PAGE * 2 * i for i in range(40)]
    struct.pack_into(f"<{len(pages)}Q", mem.data, 0x20000, *pages)
    segs = prp_segments(mem, prp1, 0x20000 if length > 2 * PAGE - prp1 % PAGE else pages[0], length, PAGE)
    assert sum(n for _, n in segs) == length


def test_sgl_cases() -> None:
    mem = FakeMemory()
    assert sgl_segments(mem, sgl(0x1000, 4096, 0), 512, to_host=True) == [(0x1000, 512)]
    mem.data[0x2000:0x2030] = sgl(0x3000, 100, 0) + sgl(0, 50, 1) + sgl(0x4000, 16, 3)
    mem.data[0x4000:0x4010] = sgl(0x5000, 200, 0)
    segs = sgl_segments(mem, sgl(0x2000, 48, 2), 350, to_host=True)
    assert segs == [(0x3000, 100), (BIT_BUCKET, 50), (0x5000, 200)]
    assert status_of(sgl_segments, mem, sgl(0x2000, 48, 2), 350, to_host=False) == Status.SGL_DESCRIPTOR_TYPE_INVALID
    assert status_of(sgl_segments, mem, sgl(0x2000, 48, 2), 351, to_host=True) == Status.DATA_SGL_LENGTH_INVALID
    assert status_of(sgl_segments, mem, sgl(0x2000, 20, 2), 1, to_host=True) == Status.INVALID_SGL_SEGMENT_DESCRIPTOR
    assert status_of(sgl_segments, mem, sgl(0x2000, 48, 5), 1, to_host=True) == Status.SGL_DESCRIPTOR_TYPE_INVALID
    mem.data[0x6000:0x6010] = sgl(0x6000, 16, 2)  # a cycle
    assert status_of(sgl_segments, mem, sgl(0x6000, 16, 2), 1, to_host=True) == Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS
    views = segment_views(mem, segs, write=True)
    assert [len(v) for v in views] == [100, 50, 200]
    assert status_of(segment_views, mem, [(1 << 40, 1)], write=True) == Status.DATA_TRANSFER_ERROR


def test_register_merge() -> None:
    # a 4-byte write to the high half of an 8-byte register keeps the low half
    assert _merge(0x1111_2222_3333_4444, 0x28, 8, 0x2C, 4, 0xAAAA_BBBB) == 0xAAAA_BBBB_3333_4444
    assert _merge(0, 0x14, 4, 0x28, 4, 1) is None
    assert _merge(0xFF, 0x14, 4, 0x16, 1, 0x40) == 0x4000FF
