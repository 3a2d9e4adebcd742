"""Config space: initial image, write masks, W1C, BAR and ROM sizing, capability chains."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfu_server.pci import (
    DeviceSerialNumber,
    IoBar,
    MemoryBar,
    Msi,
    Msix,
    PciDevice,
    PciExpress,
    PciIdentity,
    PowerManagement,
    VendorSpecific,
    VendorSpecificExtended,
)
from vfu_server.pci.config import ConfigSpace
from vfu_server.pci.endpoint import Endpoint
from vfu_server.protocol.constants import PciRegion, RegionFlags
from vfu_server.protocol.errors import VfioUserError

IDENT = PciIdentity(vendor_id=0x1AF4, device_id=0x1042, class_code=0x010802, revision=3,
                    subsystem_vendor_id=0x1AF4, subsystem_id=0x0002)


class Conventional(PciDevice):
    """Plain PCI: 32-bit BAR0, 64-bit prefetchable BAR2 (+BAR3), I/O BAR4, MSI, a vendor cap."""

    identity = IDENT
    bar0 = MemoryBar(0x1000)
    bar2 = MemoryBar(0x10_0000, is64=True, prefetchable=True)
    bar4 = IoBar(0x100)
    capabilities = (PowerManagement(), Msi(vectors=4, per_vector_mask=True), VendorSpecific(b"\x11\x22\x33"))
    intx = True


class Express(PciDevice):
    identity = IDENT
    bar0 = MemoryBar(0x4000)
    # 8 GiB: the size shows in the upper dword. With callbacks, so no RAM backs it (a
    # callback-less BAR is a bytearray of its full size).
    bar1 = MemoryBar(0x2_0000_0000, is64=True, read=lambda self, off, size: 0,
                     write=lambda self, off, size, value: None)
    bar4 = MemoryBar(0x1000)
    capabilities = (
        PowerManagement(),
        Msix(vectors=8, table_bar=4, pba_offset=0x800),
        PciExpress(),
        DeviceSerialNumber(0x0123456789ABCDEF),
        VendorSpecificExtended(0x42, b"\xaa\xbb\xcc\xdd"),
    )
    rom_size = 0x800

    def rom_bytes(self) -> bytes:
        return b"\x55\xaa" + b"ROM"


class NoCaps(PciDevice):
    identity = PciIdentity(vendor_id=0x1234, device_id=0x0001)


def r(dev: PciDevice, off: int, size: int = 4) -> int:
    return int.from_bytes(Endpoint(dev).region_read(PciRegion.CONFIG, off, size), "little")


def w(dev: PciDevice, off: int, value: int, size: int = 4) -> None:
    Endpoint(dev).region_write(PciRegion.CONFIG, off, value.to_bytes(size, "little"))


def walk(dev: PciDevice) -> list[tuple[int, int]]:
    out = []
    pos = r(dev, 0x34, 1)
    while pos:
        assert pos >= 0x40 and pos % 4 == 0 and len(out) < 48
        out.append((pos, r(dev, pos, 1)))
        pos = r(dev, pos + 1, 1)
    return out


def walk_extended(dev: PciDevice) -> list[tuple[int, int, int]]:
    out = []
    pos = 0x100
    while pos:
        hdr = r(dev, pos)
        if hdr == 0:
            break
        out.append((pos, hdr & 0xFFFF, (hdr >> 16) & 0xF))
        pos = hdr >> 20
        assert len(out) < 64
    return out


# --------------------------------------------------------------------------------------------
# initial image


def test_identity_and_header() -> None:
    dev = Conventional()
    assert r(dev, 0) == 0x1042_1AF4
    assert r(dev, 8) == 0x010802_03
    assert r(dev, 0x2C) == 0x0002_1AF4
    assert r(dev, 0x0E, 1) == 0  # header type 0
    assert r(dev, 0x3D, 1) == 1  # INTx pin A
    assert NoCaps().config.read(0x3D, 1) == b"\1", "INTx is on by default"

    class NoIntx(NoCaps):
        intx = False

    assert NoIntx().config.read(0x3D, 1) == b"\0"
    assert dev.config.size == 256
    assert Express().config.size == 4096


def test_status_cap_list_only_with_capabilities() -> None:
    assert r(Conventional(), 0x06, 2) & 0x10
    assert not r(NoCaps(), 0x06, 2) & 0x10
    assert r(NoCaps(), 0x34, 1) == 0


def test_bar_type_bits() -> None:
    dev = Conventional()
    assert r(dev, 0x10) == 0x0  # 32-bit memory
    assert r(dev, 0x18) == 0xC  # 64-bit prefetchable
    assert r(dev, 0x1C) == 0
    assert r(dev, 0x20) == 0x1  # I/O
    assert r(dev, 0x14) == 0 and r(dev, 0x24) == 0


# --------------------------------------------------------------------------------------------
# write masks and W1C


def test_read_only_fields_ignore_writes() -> None:
    dev = Conventional()
    before = dev.config.read(0, 256)
    for off in (0x00, 0x08, 0x2C, 0x34):
        w(dev, off, 0xFFFFFFFF)
        w(dev, off, 0)
    after = dev.config.read(0, 256)
    assert after[0x00:0x0C] == before[0x00:0x0C]
    assert after[0x2C:0x30] == before[0x2C:0x30]
    assert after[0x34] == before[0x34]


def test_command_register_mask() -> None:
    dev = Conventional()
    w(dev, 0x04, 0xFFFF, 2)
    assert r(dev, 0x04, 2) == 0x0547
    assert dev.bus_master and dev.config.intx_disabled
    w(dev, 0x04, 0, 2)
    assert r(dev, 0x04, 2) == 0 and not dev.bus_master


def test_status_w1c() -> None:
    dev = Conventional()
    cfg = dev.config
    struct.pack_into("<H", cfg.data, 0x06, 0xF900 | 0x10 | 0x08)  # errors latched + cap list + intx
    w(dev, 0x06, 0x0100, 2)  # write 1 to one error bit only: it alone clears
    assert r(dev, 0x06, 2) == 0xF800 | 0x10 | 0x08
    w(dev, 0x06, 0x0000, 2)  # writing 0 changes nothing
    assert r(dev, 0x06, 2) == 0xF800 | 0x10 | 0x08
    w(dev, 0x06, 0xFFFF, 2)  # read-only bits stay, all W1C bits clear
    assert r(dev, 0x06, 2) == 0x10 | 0x08


def test_dword_write_over_command_and_status() -> None:
    dev = Conventional()
    struct.pack_into("<H", dev.config.data, 0x06, 0x8000 | 0x10)
    w(dev, 0x04, 0x8000_0006)
    assert r(dev, 0x04) == 0x0010_0006


def test_cache_line_and_interrupt_line_writable() -> None:
    dev = Conventional()
    w(dev, 0x0C, 0xFFFFFFFF)
    assert r(dev, 0x0C) == 0x0000_00FF
    w(dev, 0x3C, 0xFFFFFFFF)
    assert r(dev, 0x3C) == 0x0000_01FF  # line writable, pin read-only


# --------------------------------------------------------------------------------------------
# BAR sizing


def test_bar_sizing_32bit_memory() -> None:
    dev = Conventional()
    w(dev, 0x10, 0xFFFFFFFF)
    assert r(dev, 0x10) == 0xFFFFF000  # size 4 KiB, type bits 0
    w(dev, 0x10, 0xFE60_0123)  # low bits below the size are not stored
    assert r(dev, 0x10) == 0xFE60_0000


def test_bar_sizing_64bit() -> None:
    dev = Conventional()
    w(dev, 0x18, 0xFFFFFFFF)
    w(dev, 0x1C, 0xFFFFFFFF)
    assert r(dev, 0x18) == 0xFFF0_000C  # 1 MiB, 64-bit, prefetchable
    assert r(dev, 0x1C) == 0xFFFFFFFF
    w(dev, 0x18, 0xC000_0000)
    w(dev, 0x1C, 0x0000_0080)
    assert r(dev, 0x18) == 0xC000_000C and r(dev, 0x1C) == 0x80


def test_bar_sizing_64bit_above_4g() -> None:
    dev = Express()
    w(dev, 0x14, 0xFFFFFFFF)
    w(dev, 0x18, 0xFFFFFFFF)
    assert r(dev, 0x14) == 0x0000_0004  # 8 GiB: nothing writable in the low dword
    assert r(dev, 0x18) == 0xFFFF_FFFE


def test_bar_sizing_io() -> None:
    dev = Conventional()
    w(dev, 0x20, 0xFFFFFFFF)
    assert r(dev, 0x20) == 0xFFFFFF01


def test_absent_bars_read_zero_after_sizing() -> None:
    dev = Conventional()
    for off in (0x14, 0x24):
        w(dev, off, 0xFFFFFFFF)
        assert r(dev, off) == 0


def test_region_info_of_bars() -> None:
    dev = Express()
    info, fd = Endpoint(dev).region_info(1)
    assert info.size == 0x2_0000_0000 and fd is None
    assert Endpoint(dev).region_info(2)[0].size == 0  # upper half of the 64-bit BAR1
    assert Endpoint(dev).region_info(3)[0].size == 0 and Endpoint(dev).region_info(3)[0].flags == 0
    cfg = Endpoint(dev).region_info(PciRegion.CONFIG)[0]
    assert cfg.size == 4096 and cfg.flags == RegionFlags.READ | RegionFlags.WRITE


def test_64bit_bar_needs_a_free_upper_half() -> None:
    with pytest.raises(ValueError):
        type("Bad", (PciDevice,), {"identity": IDENT, "bar5": MemoryBar(0x1000, is64=True)})()
    with pytest.raises(ValueError):
        type("Bad2", (PciDevice,), {"identity": IDENT, "bar0": MemoryBar(0x1000, is64=True),
                                    "bar1": MemoryBar(0x1000)})()


@pytest.mark.parametrize("size", [0, 8, 0x1800, 0x3000])
def test_bar_size_must_be_power_of_two(size: int) -> None:
    with pytest.raises(ValueError):
        MemoryBar(size)


# --------------------------------------------------------------------------------------------
# expansion ROM


def test_rom_bar_absent_reads_zero() -> None:
    dev = Conventional()
    for value in (0xFFFFF800, 0xFFFFFFFE, 0xFFFFFFFF):
        w(dev, 0x30, value)
        assert r(dev, 0x30) == 0
    info, _ = Endpoint(dev).region_info(PciRegion.ROM)
    assert info.size == 0 and info.flags == 0


def test_rom_bar_present() -> None:
    dev = Express()
    w(dev, 0x30, 0xFFFFF800)
    assert r(dev, 0x30) == 0xFFFFF800  # 2 KiB
    w(dev, 0x30, 0xFFFFFFFF)
    assert r(dev, 0x30) == 0xFFFFF801  # enable bit writable, reserved bits not
    w(dev, 0x30, 0)
    info, _ = Endpoint(dev).region_info(PciRegion.ROM)
    assert info.size == 0x800 and info.flags == RegionFlags.READ
    assert Endpoint(dev).region_read(PciRegion.ROM, 0, 5) == b"\x55\xaaROM"
    assert Endpoint(dev).region_read(PciRegion.ROM, 0x7FC, 4) == bytes(4)
    with pytest.raises(VfioUserError) as exc:
        Endpoint(dev).region_read(PciRegion.ROM, 0x7FC, 8)
    assert exc.value.errno == errno.EINVAL
    Endpoint(dev).region_write(PciRegion.ROM, 0, b"\0\0")  # dropped
    assert Endpoint(dev).region_read(PciRegion.ROM, 0, 2) == b"\x55\xaa"


# --------------------------------------------------------------------------------------------
# capabilities


def test_standard_capability_chain() -> None:
    dev = Conventional()
    chain = walk(dev)
    assert [cid for _, cid in chain] == [0x01, 0x05, 0x09]
    pm, msi, vnd = (off for off, _ in chain)
    assert pm == 0x40
    assert r(dev, pm + 2, 2) & 0x7 == 3  # PM version 3
    assert r(dev, msi + 2, 2) == 0x0180 | (2 << 1)  # per-vector mask, 64-bit, MMC = log2(4)
    assert r(dev, vnd + 2, 1) == 6 and dev.config.read(vnd + 3, 3) == b"\x11\x22\x33"


def test_express_chain_and_extended_caps() -> None:
    dev = Express()
    assert [cid for _, cid in walk(dev)] == [0x01, 0x11, 0x10]
    ext = walk_extended(dev)
    assert [(cid, ver) for _, cid, ver in ext] == [(0x0003, 1), (0x000B, 1)]
    dsn, vsec = ext[0][0], ext[1][0]
    assert dsn == 0x100
    assert struct.unpack("<Q", dev.config.read(dsn + 4, 8))[0] == 0x0123456789ABCDEF
    assert r(dev, vsec + 4) == 0x42 | 1 << 16 | 12 << 20
    assert dev.config.read(vsec + 8, 4) == b"\xaa\xbb\xcc\xdd"


def test_pcie_without_extended_caps_has_zero_at_0x100() -> None:
    class Plain(PciDevice):
        identity = IDENT
        capabilities = (PciExpress(),)

    dev = Plain()
    assert dev.config.size == 4096 and r(dev, 0x100) == 0
    pcie = walk(dev)[0][0]
    assert r(dev, pcie + 2, 2) & 0xF0 == 0  # endpoint
    assert r(dev, pcie + 2, 2) & 0xF == 2  # version 2


def test_extended_caps_need_pcie() -> None:
    with pytest.raises(ValueError):
        ConfigSpace(IDENT, [], [DeviceSerialNumber(1)], extended=False)


def test_msix_capability_fields() -> None:
    dev = Express()
    msix = next(off for off, cid in walk(dev) if cid == 0x11)
    assert r(dev, msix + 2, 2) == 7  # table size - 1, disabled
    assert r(dev, msix + 4) == 0x000 | 4  # table offset 0 in BAR4
    assert r(dev, msix + 8) == 0x800 | 4
    w(dev, msix + 2, 0xFFFF, 2)
    assert r(dev, msix + 2, 2) == 0xC007  # only enable and function mask are writable
    assert dev.msix.enabled and dev.msix.function_masked
    w(dev, msix + 4, 0xFFFFFFFF)
    assert r(dev, msix + 4) == 4


def test_pm_power_state_and_pme_status_w1c() -> None:
    dev = Conventional()
    pm = walk(dev)[0][0]
    w(dev, pm + 4, 0x0003, 2)
    assert dev.caps[0].power_state == 3
    dev.config.data[pm + 5] |= 0x80  # PME status latched
    w(dev, pm + 4, 0x8000, 2)
    assert r(dev, pm + 4, 2) == 0x0008  # D0 (write of 0), No_Soft_Reset, PME status cleared


def test_overlapping_fixed_offsets_rejected() -> None:
    a, b = PowerManagement(), VendorSpecific(b"abcd")
    a.offset, b.offset = 0x40, 0x44
    with pytest.raises(ValueError):
        ConfigSpace(IDENT, [], [a, b])


def test_capability_that_does_not_fit_rejected() -> None:
    big = VendorSpecific(bytes(0xC0))
    with pytest.raises(ValueError):
        ConfigSpace(IDENT, [], [PowerManagement(), big])


def test_flr_requests_reset_and_self_clears() -> None:
    class Flr(PciDevice):
        identity = IDENT
        capabilities = (PciExpress(flr=True),)

    dev = Flr()
    pcie = walk(dev)[0][0]
    assert r(dev, pcie + 4) & 1 << 28
    w(dev, pcie + 8, 0x8000, 2)
    assert Endpoint(dev).take_pending_reset() is not None
    assert not r(dev, pcie + 8, 2) & 0x8000


# --------------------------------------------------------------------------------------------
# bounds, reset, fuzz


def test_config_access_out_of_range_is_einval() -> None:
    dev = Conventional()
    for off, count in ((256, 1), (255, 2), (0, 257)):
        with pytest.raises(VfioUserError) as exc:
            Endpoint(dev).region_read(PciRegion.CONFIG, off, count)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(VfioUserError):
            Endpoint(dev).region_write(PciRegion.CONFIG, off, bytes(count))


def test_whole_config_read_returns_exact_count() -> None:
    assert len(Endpoint(Express()).region_read(PciRegion.CONFIG, 0, 4096)) == 4096
    assert len(Endpoint(Conventional()).region_read(PciRegion.CONFIG, 0, 256)) == 256


async def test_reset_restores_power_on_image() -> None:
    dev = Express()
    initial = dev.config.read(0, 4096)
    w(dev, 0x04, 0x0006, 2)
    w(dev, 0x10, 0xFE600000)
    w(dev, 0x30, 0xFFFFFFFF)
    assert dev.config.read(0, 4096) != initial
    await Endpoint(dev).do_reset()
    assert dev.config.read(0, 4096) == initial


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(min_size=1, max_size=8)), max_size=30))
def test_random_writes_only_change_writable_bits(writes) -> None:
    dev = Conventional()
    cfg = dev.config
    for off, data in writes:
        data = data[: 256 - off]
        before = bytes(cfg.data)
        cfg.write(off, data)
        after = bytes(cfg.data)
        for i, b in enumerate(data):
            o = off + i
            expect = ((before[o] & ~cfg.wmask[o]) | (b & cfg.wmask[o])) & ~(b & cfg.w1c[o]) & 0xFF
            assert after[o] == expect, hex(o)
        assert after[:off] == before[:off] and after[off + len(data) :] == before[off + len(data) :]
    assert cfg.read(0, 4) == cfg.initial[0:4]
