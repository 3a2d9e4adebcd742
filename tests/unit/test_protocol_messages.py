"""Payload layouts of every vfio-user message: exact bytes, round trips, and rejection of
malformed payloads (MalformedMessage, errno EINVAL)."""

from __future__ import annotations

import errno
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfu_server.protocol import messages as m
from vfu_server.protocol.codec import HEADER, encode
from vfu_server.protocol.constants import (
    Command,
    DmaMapFlags,
    DmaUnmapFlags,
    FeatureFlags,
    IrqSetFlags,
    MsgFlags,
    RegionFlags,
)
from vfu_server.protocol.errors import MalformedMessage

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


def total(command: int, payload: bytes) -> int:
    """Size of the whole message on the wire (header included)."""
    msg = encode(1, command, payload)
    assert HEADER.unpack_from(msg)[2] == len(msg)
    return len(msg)


# --------------------------------------------------------------------------------------------
# header / encode


def test_encode_header_layout() -> None:
    msg = encode(0x1234, Command.REGION_READ, b"abcd")
    assert msg == bytes.fromhex("3412 0900 14000000 00000000 00000000") + b"abcd"


def test_encode_reply_no_reply_flags_and_id_wrap() -> None:
    msg = encode(0x1_0005, Command.REGION_WRITE, b"", reply=True)
    assert HEADER.unpack_from(msg) == (5, 10, 16, MsgFlags.REPLY, 0)
    msg = encode(7, Command.REGION_WRITE, b"xy", no_reply=True)
    assert HEADER.unpack_from(msg) == (7, 10, 18, MsgFlags.NO_REPLY, 0)


def test_error_reply_is_header_only_with_errno() -> None:
    msg = encode(3, Command.DMA_MAP, b"payload that must vanish", reply=True, error=errno.EEXIST)
    assert len(msg) == 16
    assert HEADER.unpack_from(msg) == (3, 2, 16, MsgFlags.REPLY | MsgFlags.ERROR, errno.EEXIST)


def test_device_reset_is_header_only() -> None:
    assert total(Command.DEVICE_RESET, b"") == 16
    assert encode(28, Command.DEVICE_RESET, reply=True) == struct.pack("<HHIII", 28, 13, 16, 1, 0)


# --------------------------------------------------------------------------------------------
# VERSION

QEMU_VERSION_JSON = (
    '{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    '"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, '
    '"write_multiple": true}}'
)


def test_version_qemu_request_is_214_bytes_and_decodes() -> None:
    payload = struct.pack("<HH", 0, 0) + QEMU_VERSION_JSON.encode() + b"\0"
    assert len(QEMU_VERSION_JSON) + 1 == 194
    assert total(Command.VERSION, payload) == 214
    v = m.Version.unpack(payload)
    assert (v.major, v.minor) == (0, 0)
    assert v.capabilities["write_multiple"] is True
    assert v.capabilities["migration"]["pgsize"] == 4096


def test_version_pack_exact_bytes() -> None:
    v = m.Version(0, 0, {"max_msg_fds": 16})
    assert v.pack() == b"\0\0\0\0" + b'{"capabilities":{"max_msg_fds":16}}' + b"\0"
    assert m.Version(1, 2).pack() == b"\x01\x00\x02\x00" + b'{"capabilities":{}}\0'


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.dictionaries(st.text(max_size=10), st.one_of(st.integers(0, 2**40), st.booleans(), st.text(max_size=5)),
                       max_size=5))
def test_version_round_trip(major: int, minor: int, caps: dict) -> None:
    v = m.Version(major, minor, caps)
    assert m.Version.unpack(v.pack()) == v


def test_version_without_json_means_no_capabilities() -> None:
    assert m.Version.unpack(b"\0\0\0\0").capabilities == {}
    assert m.Version.unpack(b"\0\0\0\0\0").capabilities == {}
    # A JSON object without "capabilities" is an empty set of capabilities.
    assert m.Version.unpack(b"\0\0\0\0{}\0").capabilities == {}


@pytest.mark.parametrize(
    "tail, why",
    [
        (b'{"capabilities":{}}', "no NUL"),
        (b'{"capabilities":{}\0', "bad JSON"),
        (b"\xff\xfe\0", "not UTF-8"),
        (b"[1, 2]\0", "not an object"),
        (b'"text"\0', "string, not an object"),
        (b"42\0", "number, not an object"),
        (b'{"capabilities": [1]}\0', "capabilities not an object"),
        (b'{"capabilities": 5}\0', "capabilities not an object"),
        (b'{"a":1}\0{}\0', "NUL inside"),
    ],
)
def test_version_rejects(tail: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        m.Version.unpack(b"\0\0\0\0" + tail)
    assert info.value.errno == errno.EINVAL, why


def test_version_short_payload() -> None:
    with pytest.raises(MalformedMessage):
        m.Version.unpack(b"\0\0\0")


# --------------------------------------------------------------------------------------------
# DMA_MAP / DMA_UNMAP


def test_dma_map_exact_bytes_and_48_byte_message() -> None:
    d = m.DmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, offset=0x1000, address=0xFFFC0000, size=0x40000)
    raw = d.pack()
    assert raw == (
        bytes.fromhex("20000000 03000000")
        + (0x1000).to_bytes(8, "little")
        + (0xFFFC0000).to_bytes(8, "little")
        + (0x40000).to_bytes(8, "little")
    )
    assert total(Command.DMA_MAP, raw) == 48
    assert m.DmaMap.unpack(raw) == d


@given(u32, u64, u64, u64, st.integers(32, 0xFFFFFFFF))
def test_dma_map_round_trip(flags: int, offset: int, address: int, size: int, argsz: int) -> None:
    d = m.DmaMap(flags, offset, address, size, argsz)
    assert m.DmaMap.unpack(d.pack()) == d


def test_dma_map_rejects_short_and_small_argsz() -> None:
    good = m.DmaMap(1, 0, 0, 4096).pack()
    with pytest.raises(MalformedMessage):
        m.DmaMap.unpack(good[:31])
    with pytest.raises(MalformedMessage):
        m.DmaMap.unpack(struct.pack("<I", 31) + good[4:])


def test_dma_unmap_exact_bytes_and_40_byte_message() -> None:
    u = m.DmaUnmap(0, 0xC3000, 0x15000)
    raw = u.pack()
    assert raw == struct.pack("<IIQQ", 24, 0, 0xC3000, 0x15000)
    assert total(Command.DMA_UNMAP, raw) == 40
    assert m.DmaUnmap.unpack(raw) == u


def test_dma_unmap_all() -> None:
    raw = m.DmaUnmap(DmaUnmapFlags.ALL, 0, 0).pack()
    assert raw == bytes.fromhex("18000000 02000000") + bytes(16)
    u = m.DmaUnmap.unpack(raw)
    assert u.flags == DmaUnmapFlags.ALL and u.address == 0 and u.size == 0


@given(u32, u64, u64, st.integers(24, 0xFFFFFFFF))
def test_dma_unmap_round_trip(flags: int, address: int, size: int, argsz: int) -> None:
    u = m.DmaUnmap(flags, address, size, argsz)
    assert m.DmaUnmap.unpack(u.pack()) == u


def test_dma_unmap_rejects_short_and_small_argsz() -> None:
    with pytest.raises(MalformedMessage):
        m.DmaUnmap.unpack(bytes(23))
    with pytest.raises(MalformedMessage):
        m.DmaUnmap.unpack(struct.pack("<IIQQ", 23, 0, 0, 0))


# --------------------------------------------------------------------------------------------
# DEVICE_GET_INFO


def test_device_info_exact_bytes_and_32_byte_message() -> None:
    assert m.DeviceInfo().pack() == struct.pack("<IIII", 16, 0, 0, 0)
    reply = m.DeviceInfo(flags=3, num_regions=9, num_irqs=5).pack()
    assert reply == bytes.fromhex("10000000 03000000 09000000 05000000")
    assert total(Command.DEVICE_GET_INFO, reply) == 32
    assert m.DeviceInfo.unpack(reply) == m.DeviceInfo(3, 9, 5, 16)


@given(u32, u32, u32, u32)
def test_device_info_round_trip(a: int, b: int, c: int, d: int) -> None:
    info = m.DeviceInfo(a, b, c, d)
    assert m.DeviceInfo.unpack(info.pack()) == info


def test_device_info_short() -> None:
    with pytest.raises(MalformedMessage):
        m.DeviceInfo.unpack(bytes(15))


# --------------------------------------------------------------------------------------------
# DEVICE_GET_REGION_INFO


def test_region_info_request_is_48_bytes() -> None:
    req = m.RegionInfo.request(7)
    assert req == struct.pack("<IIIIQQ", 32, 0, 7, 0, 0, 0)
    assert total(Command.DEVICE_GET_REGION_INFO, req) == 48
    parsed = m.RegionInfo.unpack(req)
    assert (parsed.index, parsed.argsz, parsed.caps) == (7, 32, ())


def test_region_info_without_caps_exact_bytes() -> None:
    info = m.RegionInfo(7, RegionFlags.READ | RegionFlags.WRITE, 4096)
    raw = info.pack(room=32)
    assert raw == struct.pack("<IIIIQQ", 32, 3, 7, 0, 4096, 0)
    assert total(Command.DEVICE_GET_REGION_INFO, raw) == 48
    # CAPS in the declared flags is dropped when there is no chain; other bits are kept.
    assert m.RegionInfo(0, RegionFlags.CAPS | 1, 16).pack()[4:8] == struct.pack("<I", 1)
    assert m.RegionInfo(0, RegionFlags.CAPS | 0x10 | 1, 16).pack()[4:8] == struct.pack("<I", 0x11)


def test_region_info_sparse_mmap_exact_bytes_80_byte_message() -> None:
    info = m.RegionInfo(0, RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP, 0x4000, 0,
                        (m.SparseMmapCap(((0x1000, 0x2000),)),))
    raw = info.pack(room=1024)
    expected = (
        struct.pack("<IIIIQQ", 64, 0x7 | RegionFlags.CAPS, 0, 32, 0x4000, 0)
        + struct.pack("<HHI", 1, 1, 0)  # id SPARSE_MMAP, version 1, last
        + struct.pack("<II", 1, 0)  # nr_areas, reserved
        + struct.pack("<QQ", 0x1000, 0x2000)
    )
    assert raw == expected
    assert total(Command.DEVICE_GET_REGION_INFO, raw) == 80
    back = m.RegionInfo.unpack(raw)
    assert back.caps == (m.SparseMmapCap(((0x1000, 0x2000),)),)
    assert back.flags & RegionFlags.CAPS and back.cap_offset == 32 and back.argsz == 64


def test_region_info_truncation_when_argsz_is_short() -> None:
    """The reply fits in the request's argsz: fixed part only, CAPS clear, argsz = needed."""
    info = m.RegionInfo(0, RegionFlags.READ | RegionFlags.MMAP, 0x4000, 0,
                        (m.SparseMmapCap(((0, 0x1000), (0x2000, 0x2000))), m.MsixMappableCap()))
    full = info.pack()
    needed = len(full)
    assert needed == 32 + (8 + 8 + 32) + 8
    for room in (32, 40, needed - 1):
        short = info.pack(room=room)
        assert len(short) == 32
        argsz, flags, index, cap_offset, size, _offset = struct.unpack("<IIIIQQ", short)
        assert argsz == needed
        assert not flags & RegionFlags.CAPS
        assert flags == RegionFlags.READ | RegionFlags.MMAP
        assert cap_offset == 0 and size == 0x4000 and index == 0
        assert m.RegionInfo.unpack(short).caps == ()
    assert info.pack(room=needed) == full
    assert info.pack(room=needed + 100) == full


def test_region_info_three_cap_chain() -> None:
    caps = (m.SparseMmapCap(((0, 0x1000),)), m.TypeCap(3, 1), m.MsixMappableCap())
    info = m.RegionInfo(9, RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP, 0x2000, 0x10000, caps)
    raw = info.pack()
    # Walk the chain by hand: offsets are from the payload start, 8-byte aligned.
    pos = struct.unpack_from("<I", raw, 12)[0]
    seen = []
    while True:
        cid, ver, nxt = struct.unpack_from("<HHI", raw, pos)
        assert pos % 8 == 0 and ver == 1
        seen.append((cid, pos))
        if not nxt:
            break
        assert nxt > pos
        pos = nxt
    assert seen == [(1, 32), (2, 32 + 8 + 8 + 16), (3, 32 + 32 + 16)]
    assert struct.unpack_from("<II", raw, 32 + 32 + 8) == (3, 1)  # TYPE body
    assert len(raw) == 32 + 32 + 16 + 8 == struct.unpack_from("<I", raw)[0]
    back = m.RegionInfo.unpack(raw)
    assert back.caps == caps
    assert back.cap(m.TypeCap) == m.TypeCap(3, 1)
    assert back.cap(m.MsixMappableCap) == m.MsixMappableCap()
    assert (back.index, back.size, back.offset) == (9, 0x2000, 0x10000)


@given(
    st.integers(0, 20),
    st.lists(st.tuples(u64, u64), max_size=6),
    st.one_of(st.none(), st.tuples(u32, u32)),
    st.booleans(),
    u64,
    u64,
)
def test_region_info_round_trip(index, areas, typ, msix, size, offset) -> None:
    caps: list = []
    if areas:
        caps.append(m.SparseMmapCap(tuple(areas)))
    if typ is not None:
        caps.append(m.TypeCap(*typ))
    if msix:
        caps.append(m.MsixMappableCap())
    info = m.RegionInfo(index, RegionFlags.READ, size, offset, tuple(caps))
    raw = info.pack()
    back = m.RegionInfo.unpack(raw)
    assert back.caps == tuple(caps)
    assert (back.index, back.size, back.offset, back.argsz) == (index, size, offset, len(raw))
    assert bool(back.flags & RegionFlags.CAPS) == bool(caps)


def _info_with_chain(chain: bytes, cap_offset: int = 32) -> bytes:
    return struct.pack("<IIIIQQ", 32 + len(chain), RegionFlags.CAPS, 0, cap_offset, 0, 0) + chain


@pytest.mark.parametrize(
    "raw",
    [
        _info_with_chain(struct.pack("<HHI", 2, 1, 32) + bytes(8)),  # next points at itself
        _info_with_chain(struct.pack("<HHI", 2, 1, 8) + bytes(8)),  # next points into the header
        _info_with_chain(struct.pack("<HHI", 2, 1, 0) + bytes(8), cap_offset=16),
        _info_with_chain(struct.pack("<HHI", 2, 1, 0)),  # TYPE body missing
        _info_with_chain(struct.pack("<HHI", 1, 1, 0) + struct.pack("<II", 2, 0) + bytes(16)),  # 2 areas, 1 sent
        _info_with_chain(struct.pack("<HHI", 2, 1, 200) + bytes(8)),  # next past the end
        _info_with_chain(b"\x01\x00", cap_offset=32),  # header cut short
        bytes(31),
    ],
)
def test_region_info_rejects_bad_chains(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        m.RegionInfo.unpack(raw)


def test_region_info_unknown_cap_is_skipped() -> None:
    chain = struct.pack("<HHI", 77, 1, 48) + bytes(8) + struct.pack("<HHI", 2, 1, 0) + struct.pack("<II", 5, 6)
    assert m.RegionInfo.unpack(_info_with_chain(chain)).caps == (m.TypeCap(5, 6),)


# --------------------------------------------------------------------------------------------
# DEVICE_GET_REGION_IO_FDS


def test_region_io_fds_layout_and_truncation() -> None:
    sub = m.IoFdSubRegion(offset=0x10, size=4, fd_index=0, type=0, flags=1, datamatch=0xAB)
    info = m.RegionIoFds(0, sub_regions=(sub, sub))
    raw = info.pack()
    # Each sub-region is 40 bytes: offset, size, fd_index, type, flags, padding, datamatch.
    assert raw[:16] == struct.pack("<IIII", 16 + 80, 0, 0, 2)
    assert raw[16:56] == struct.pack("<QQIIIIQ", 0x10, 4, 0, 0, 1, 0, 0xAB)
    assert len(raw) == 96
    back = m.RegionIoFds.unpack(raw)
    assert back.sub_regions == (sub, sub) and back.count == 2 and back.argsz == 96
    short = info.pack(room=16)
    assert short == struct.pack("<IIII", 96, 0, 0, 2)
    assert m.RegionIoFds.unpack(short).sub_regions == ()
    assert m.RegionIoFds(3).pack() == struct.pack("<IIII", 16, 0, 3, 0)
    with pytest.raises(MalformedMessage):
        m.RegionIoFds.unpack(bytes(15))


# --------------------------------------------------------------------------------------------
# IRQs


def test_irq_info_exact_bytes_and_32_byte_message() -> None:
    raw = m.IrqInfo(2, flags=3, count=4).pack()
    assert raw == struct.pack("<IIII", 16, 3, 2, 4)
    assert total(Command.DEVICE_GET_IRQ_INFO, raw) == 32
    assert m.IrqInfo.unpack(raw) == m.IrqInfo(2, 3, 4, 16)
    with pytest.raises(MalformedMessage):
        m.IrqInfo.unpack(bytes(12))


DATA = [IrqSetFlags.DATA_NONE, IrqSetFlags.DATA_BOOL, IrqSetFlags.DATA_EVENTFD]
ACTIONS = [IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK, IrqSetFlags.ACTION_TRIGGER]


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("action", ACTIONS)
def test_set_irqs_every_valid_combination(data: IrqSetFlags, action: IrqSetFlags) -> None:
    bools = b"\x01\x00\x01" if data == IrqSetFlags.DATA_BOOL else b""
    s = m.IrqSet(data | action, index=2, start=1, count=3, data=bools)
    raw = s.pack()
    assert raw[:20] == struct.pack("<IIIII", 20 + len(bools), data | action, 2, 1, 3)
    assert raw[20:] == bools
    back = m.IrqSet.unpack(raw)
    assert back.data_type == data and back.action == action
    assert (back.index, back.start, back.count, back.data) == (2, 1, 3, bools)


def test_set_irqs_qemu_message_is_36_bytes() -> None:
    raw = m.IrqSet(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 3, 0, 1).pack()
    assert raw == bytes.fromhex("14000000 24000000 03000000 00000000 01000000")
    assert total(Command.DEVICE_SET_IRQS, raw) == 36


def _set_irqs_raw(flags: int, count: int = 1, start: int = 0, tail: bytes = b"") -> bytes:
    return struct.pack("<IIIII", 20, flags, 2, start, count) + tail


@pytest.mark.parametrize(
    "flags",
    [
        0,
        IrqSetFlags.DATA_NONE,  # no action
        IrqSetFlags.ACTION_TRIGGER,  # no data
        IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER,
        IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_MASK,
        IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK,
        IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_TRIGGER,
        0x7 | 0x38,
        IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER | 0x40,  # unknown bit
        IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER | 0x8000_0000,
    ],
)
def test_set_irqs_invalid_flag_combinations(flags: int) -> None:
    with pytest.raises(MalformedMessage):
        m.IrqSet.unpack(_set_irqs_raw(flags))


def test_set_irqs_bool_data_short_and_overflow() -> None:
    flags = IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER
    with pytest.raises(MalformedMessage):
        m.IrqSet.unpack(_set_irqs_raw(flags, count=4, tail=b"\1\1\1"))
    assert m.IrqSet.unpack(_set_irqs_raw(flags, count=4, tail=b"\1\0\1\0")).data == b"\1\0\1\0"
    with pytest.raises(MalformedMessage):
        m.IrqSet.unpack(_set_irqs_raw(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, start=0xFFFFFFFF, count=1))
    with pytest.raises(MalformedMessage):
        m.IrqSet.unpack(bytes(19))


# --------------------------------------------------------------------------------------------
# REGION_READ / REGION_WRITE / WRITE_MULTI


def test_region_read_request_and_reply_layout() -> None:
    req = m.RegionAccess(region=7, offset=0x30, count=4).pack()
    assert req == struct.pack("<QII", 0x30, 7, 4)
    assert total(Command.REGION_READ, req) == 32
    reply = m.RegionAccess(7, 0x30, 4, b"\x00\xf8\xff\xff").pack()
    assert total(Command.REGION_READ, reply) == 32 + 4
    back = m.RegionAccess.unpack(reply, with_data=True)
    assert back == m.RegionAccess(7, 0x30, 4, b"\x00\xf8\xff\xff")
    assert m.RegionAccess.unpack(req, with_data=False) == m.RegionAccess(7, 0x30, 4)


@given(u32, u64, st.binary(max_size=64))
def test_region_write_round_trip(region: int, offset: int, data: bytes) -> None:
    w = m.RegionAccess(region, offset, len(data), data)
    raw = w.pack()
    assert len(raw) == 16 + len(data)
    assert m.RegionAccess.unpack(raw, with_data=True) == w


def test_region_write_count_mismatch() -> None:
    with pytest.raises(MalformedMessage):
        m.RegionAccess.unpack(struct.pack("<QII", 0, 0, 4) + b"abc", with_data=True)
    with pytest.raises(MalformedMessage):
        m.RegionAccess.unpack(struct.pack("<QII", 0, 0, 4) + b"abcde", with_data=True)
    with pytest.raises(MalformedMessage):
        m.RegionAccess.unpack(bytes(15), with_data=False)


def test_write_multi_layout() -> None:
    writes = [(0, 0x04, b"\x11\x22\x33\x44"), (2, 0x800, b"\x01"), (0, 0x08, bytes(range(8)))]
    raw = m.pack_write_multi(writes)
    assert len(raw) == 8 + 24 * 3
    assert total(Command.REGION_WRITE_MULTI, raw) == 16 + 8 + 24 * 3
    assert raw[:8] == struct.pack("<Q", 3)
    assert raw[8:32] == struct.pack("<QII", 0x04, 0, 4) + b"\x11\x22\x33\x44" + bytes(4)
    assert m.unpack_write_multi(raw) == writes


@given(st.lists(st.tuples(u32, u64, st.binary(min_size=1, max_size=8)), max_size=m.MAX_WRITE_MULTI))
def test_write_multi_round_trip(writes) -> None:
    assert m.unpack_write_multi(m.pack_write_multi(writes)) == writes


def test_write_multi_rejects() -> None:
    with pytest.raises(MalformedMessage):  # too many entries
        m.unpack_write_multi(struct.pack("<Q", 201) + bytes(24 * 201))
    with pytest.raises(MalformedMessage):  # entries missing
        m.unpack_write_multi(struct.pack("<Q", 2) + bytes(24))
    for count in (0, 9):
        with pytest.raises(MalformedMessage):
            m.unpack_write_multi(struct.pack("<Q", 1) + struct.pack("<QII", 0, 0, count) + bytes(8))
    with pytest.raises(MalformedMessage):
        m.unpack_write_multi(b"\x01")
    for bad in (b"", bytes(9)):
        with pytest.raises(ValueError):
            m.pack_write_multi([(0, 0, bad)])
    assert m.unpack_write_multi(struct.pack("<Q", 200) + m.pack_write_multi([(0, 0, b"x")] * 200)[8:]) == [
        (0, 0, b"x")
    ] * 200


# --------------------------------------------------------------------------------------------
# DMA_READ / DMA_WRITE (the spec's layout: address u64, count u64, data at message byte 32)


def test_dma_read_request_and_reply_bytes_as_qemu_11_1_3_sent_them() -> None:
    # The request: header + address + count, 32 bytes, no data.
    req = encode(0x8000, Command.DMA_READ, m.DmaAccess(0x10000000, 8).pack())
    assert req == (struct.pack("<HHIII", 0x8000, Command.DMA_READ, 32, 0, 0)
                   + bytes.fromhex("00000010 00000000 08000000 00000000"))
    # QEMU 11.1.3's reply to an 8-byte read at 0x10000000 (digest §6.10): 32 + 8 bytes, the
    # data at message byte 32.
    reply = (struct.pack("<HHIII", 0x8000, Command.DMA_READ, 40, 1, 0)
             + bytes.fromhex("00000010 00000000 08000000 00000000 44332211 88776655"))
    back = m.DmaAccess.unpack(reply[16:], with_data=True)
    assert back == m.DmaAccess(0x10000000, 8, bytes.fromhex("4433221188776655"))
    assert reply[32:] == back.data


def test_dma_write_request_and_reply_layout() -> None:
    data = b"ABCDEFGH"
    msg = encode(0x8001, Command.DMA_WRITE, m.DmaAccess(0xFEE0_0000, len(data), data).pack())
    assert len(msg) == 32 + len(data)
    assert struct.unpack_from("<QQ", msg, 16) == (0xFEE0_0000, 8)
    assert msg[32:] == data
    assert m.DmaAccess.unpack(msg[16:], with_data=True).data == data
    # The reply echoes address and count, without the data.
    reply = m.DmaAccess(0xFEE0_0000, 8).pack()
    assert reply == struct.pack("<QQ", 0xFEE0_0000, 8)
    assert m.DmaAccess.unpack(reply, with_data=False) == m.DmaAccess(0xFEE0_0000, 8)


def test_dma_access_rejects_the_old_28_byte_layout_and_bad_counts() -> None:
    with pytest.raises(MalformedMessage):
        m.DmaAccess.unpack(bytes(15), with_data=False)
    # u32 count, data at byte 12 of the payload: what this project used to send.
    with pytest.raises(MalformedMessage):
        m.DmaAccess.unpack(struct.pack("<QI", 0, 8), with_data=False)
    with pytest.raises(MalformedMessage):
        m.DmaAccess.unpack(struct.pack("<QI", 0, 8) + bytes(8), with_data=True)
    # Data must be exactly ``count`` bytes where it belongs, and absent where it does not.
    with pytest.raises(MalformedMessage):
        m.DmaAccess.unpack(struct.pack("<QQ", 0, 8) + bytes(7), with_data=True)
    with pytest.raises(MalformedMessage):
        m.DmaAccess.unpack(struct.pack("<QQ", 0, 8) + bytes(9), with_data=True)
    with pytest.raises(MalformedMessage):
        m.DmaAccess.unpack(struct.pack("<QQ", 0, 8) + bytes(8), with_data=False)
    with pytest.raises(MalformedMessage):
        m.DmaAccess.unpack(struct.pack("<QQ", (1 << 64) - 4, 8), with_data=False)


@st.composite
def _dma_access(draw: st.DrawFn) -> m.DmaAccess:
    data = draw(st.binary(max_size=64))
    address = draw(st.integers(0, (1 << 64) - len(data)))
    return m.DmaAccess(address, len(data), data)


@given(_dma_access())
def test_dma_access_round_trip(a: m.DmaAccess) -> None:
    raw = a.pack()
    assert len(raw) == 16 + a.count
    assert m.DmaAccess.unpack(raw, with_data=True) == a
    head = m.DmaAccess(a.address, a.count)
    assert m.DmaAccess.unpack(head.pack(), with_data=False) == head


@given(st.binary(max_size=80), st.booleans())
def test_dma_access_unpack_never_crashes(raw: bytes, with_data: bool) -> None:
    try:
        a = m.DmaAccess.unpack(raw, with_data)
    except MalformedMessage:
        return
    assert a.pack() == raw


# --------------------------------------------------------------------------------------------
# DEVICE_FEATURE, MIG_DATA_READ / MIG_DATA_WRITE


def test_device_feature_layout_and_properties() -> None:
    f = m.DeviceFeature(2 | FeatureFlags.SET, b"\x01\x00\x00\x00")
    raw = f.pack()
    assert raw == struct.pack("<II", 12, 2 | FeatureFlags.SET) + b"\x01\x00\x00\x00"
    back = m.DeviceFeature.unpack(raw)
    assert back.index == 2 and back.is_set and not back.is_get and not back.is_probe
    assert back.data == b"\x01\x00\x00\x00" and back.argsz == 12
    probe = m.DeviceFeature.unpack(m.DeviceFeature(1 | FeatureFlags.PROBE | FeatureFlags.GET | FeatureFlags.SET).pack())
    assert probe.is_probe and probe.is_get and probe.is_set
    assert m.DeviceFeature(0xF100 | FeatureFlags.GET, argsz=200).pack()[:4] == struct.pack("<I", 200)


@given(st.integers(0, 0xFFFF), st.sampled_from([FeatureFlags.GET, FeatureFlags.SET, FeatureFlags.PROBE,
                                                 FeatureFlags.PROBE | FeatureFlags.GET,
                                                 FeatureFlags.PROBE | FeatureFlags.GET | FeatureFlags.SET]),
       st.binary(max_size=40))
def test_device_feature_round_trip(index: int, kind: int, data: bytes) -> None:
    f = m.DeviceFeature(index | kind, data, argsz=8 + len(data))
    assert m.DeviceFeature.unpack(f.pack()) == f


def test_device_feature_get_reply_sizes() -> None:
    """GET: "the data is added in the data section and its length is added to argsz"; a reply
    larger than the request's argsz carries only argsz (the needed size) and flags."""
    flags = 0xF100 | FeatureFlags.GET
    assert m.DeviceFeature.get_reply(flags, b"x" * 24, 200) == struct.pack("<II", 32, flags) + b"x" * 24
    assert m.DeviceFeature.get_reply(flags, b"x" * 24, 32) == struct.pack("<II", 32, flags) + b"x" * 24
    assert m.DeviceFeature.get_reply(flags, b"x" * 24, 31) == struct.pack("<II", 32, flags)


def test_device_feature_rejects() -> None:
    with pytest.raises(MalformedMessage):
        m.DeviceFeature.unpack(struct.pack("<II", 8, 1 | FeatureFlags.GET | FeatureFlags.SET))
    with pytest.raises(MalformedMessage):
        m.DeviceFeature.unpack(struct.pack("<II", 8, 1 | 1 << 19))
    with pytest.raises(MalformedMessage):
        m.DeviceFeature.unpack(bytes(7))


def test_mig_data_layout() -> None:
    """MIG_DATA_READ request: "*argsz* is the maximum size of the reply payload", so a request
    for 4,096 bytes says 8 + 4,096 (libvfio-user refuses less)."""
    req = m.MigData.read_request(4096)
    assert req == struct.pack("<II", 8 + 4096, 4096)
    assert m.MigData.unpack(req, with_data=False) == m.MigData(4096, b"", 8 + 4096)
    w = m.MigData(3, b"abc")
    raw = w.pack()
    assert raw == struct.pack("<II", 11, 3) + b"abc"
    assert m.MigData.unpack(raw, with_data=True) == m.MigData(3, b"abc", 11)
    with pytest.raises(MalformedMessage):
        m.MigData.unpack(struct.pack("<II", 11, 4) + b"abc", with_data=True)
    with pytest.raises(MalformedMessage):
        m.MigData.unpack(bytes(7), with_data=False)


@given(st.binary(max_size=100))
def test_mig_data_round_trip(data: bytes) -> None:
    assert m.MigData.unpack(m.MigData(len(data), data).pack(), with_data=True).data == data


# --------------------------------------------------------------------------------------------
# No payload decoder raises anything but MalformedMessage


DECODERS = [
    m.Version.unpack,
    m.DmaMap.unpack,
    m.DmaUnmap.unpack,
    m.DeviceInfo.unpack,
    m.RegionInfo.unpack,
    m.RegionIoFds.unpack,
    m.IrqInfo.unpack,
    m.IrqSet.unpack,
    lambda b: m.RegionAccess.unpack(b, True),
    lambda b: m.RegionAccess.unpack(b, False),
    m.unpack_write_multi,
    lambda b: m.DmaAccess.unpack(b, True),
    m.DeviceFeature.unpack,
    lambda b: m.MigData.unpack(b, True),
]


@given(st.sampled_from(range(len(DECODERS))), st.binary(max_size=200))
def test_decoders_raise_only_malformed(which: int, raw: bytes) -> None:
    try:
        DECODERS[which](raw)
    except MalformedMessage:
        pass


@given(st.binary(max_size=120))
def test_region_info_decoder_on_random_chains(chain: bytes) -> None:
    """Random capability chains after a valid fixed part: decode or MalformedMessage."""
    raw = struct.pack("<IIIIQQ", 32 + len(chain), RegionFlags.CAPS, 0, 32, 0, 0) + chain
    try:
        m.RegionInfo.unpack(raw)
    except MalformedMessage:
        pass


def test_version_json_is_compact_enough_for_qemu() -> None:
    # The JSON text itself is exactly what json.dumps produces with compact separators.
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "pgsizes": 4096, "max_dma_maps": 65535}
    raw = m.Version(0, 0, caps).pack()
    assert json.loads(raw[4:-1]) == {"capabilities": caps}
    assert b" " not in raw
