"""DEVICE_SET_IRQS semantics (Interrupts) and the MSI-X table/PBA of the device model."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from vfu_devices.example import DmaCopyEngine
from vfu_server.pci import Msix, PciDevice, PciIdentity
from vfu_server.pci.bar import MemoryBar
from vfu_server.pci.endpoint import Endpoint
from vfu_server.pci.irq import Interrupts
from vfu_server.protocol.constants import IrqIndex, IrqInfoFlags, IrqSetFlags
from vfu_server.protocol.errors import VfioUserError
from vfu_server.protocol.messages import IrqSet

NONE, BOOL, EVENTFD = IrqSetFlags.DATA_NONE, IrqSetFlags.DATA_BOOL, IrqSetFlags.DATA_EVENTFD
MASK, UNMASK, TRIGGER = IrqSetFlags.ACTION_MASK, IrqSetFlags.ACTION_UNMASK, IrqSetFlags.ACTION_TRIGGER


class Efd:
    """An eventfd the test keeps; ``give()`` hands a dup to the code under test (which owns it)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.given: list[int] = []

    def give(self) -> int:
        dup = os.dup(self.fd)
        self.given.append(dup)
        return dup

    def count(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def efds():
    made: list[Efd] = []

    def make(n: int) -> list[Efd]:
        new = [Efd() for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for e in made:
        e.close()


def set_irqs(irqs: Interrupts, flags: int, index: int, start: int, count: int, fds=(), data: bytes = b"") -> None:
    irqs.set_irqs(IrqSet.unpack(IrqSet(flags, index, start, count, data).pack()), list(fds))


def einval(irqs: Interrupts, *args, **kw) -> None:
    with pytest.raises(VfioUserError) as exc:
        set_irqs(irqs, *args, **kw)
    assert exc.value.errno == errno.EINVAL


@pytest.fixture
def irqs():
    i = Interrupts(intx=True, msi_vectors=2, msix_vectors=4)
    yield i
    i.close()


# --------------------------------------------------------------------------------------------
# info


def test_irq_info(irqs: Interrupts) -> None:
    assert irqs.info(IrqIndex.INTX).count == 1
    assert irqs.info(IrqIndex.INTX).flags == IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED
    assert irqs.info(IrqIndex.MSI).count == 2
    assert irqs.info(IrqIndex.MSIX).count == 4
    assert not irqs.info(IrqIndex.MSIX).flags & IrqInfoFlags.NORESIZE
    assert irqs.info(IrqIndex.ERR).count == 1 and irqs.info(IrqIndex.REQ).count == 1
    with pytest.raises(VfioUserError) as exc:
        irqs.info(5)
    assert exc.value.errno == errno.EINVAL
    assert Interrupts(intx=False).info(IrqIndex.INTX).count == 0


# --------------------------------------------------------------------------------------------
# assign, de-assign, disable


def test_assign_and_signal(irqs: Interrupts, efds) -> None:
    e = efds(4)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 4, [x.give() for x in e])
    assert irqs.signal(IrqIndex.MSIX, 2)
    assert [x.count() for x in e] == [0, 0, 1, 0]
    irqs.signal(IrqIndex.MSIX, 2)
    irqs.signal(IrqIndex.MSIX, 2)
    assert e[2].count() == 2
    assert not irqs.signal(IrqIndex.MSIX, 4)  # no such vector: ignored


def test_assign_in_chunks_with_start(irqs: Interrupts, efds) -> None:
    e = efds(4)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 2, [e[0].give(), e[1].give()])
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 2, 2, [e[2].give(), e[3].give()])
    for v in range(4):
        irqs.signal(IrqIndex.MSIX, v)
    assert [x.count() for x in e] == [1, 1, 1, 1]


def test_reassign_closes_the_old_fd(irqs: Interrupts, efds) -> None:
    a, b = efds(2)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 1, 1, [a.give()])
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 1, 1, [b.give()])
    assert not is_open(a.given[0])
    irqs.signal(IrqIndex.MSIX, 1)
    assert (a.count(), b.count()) == (0, 1)


def test_deassign_with_zero_fds(irqs: Interrupts, efds) -> None:
    e = efds(4)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 4, [x.give() for x in e])
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 1, 2)  # de-assign vectors 1 and 2
    assert not is_open(e[1].given[0]) and not is_open(e[2].given[0])
    assert is_open(e[0].given[0]) and is_open(e[3].given[0])
    for v in range(4):
        irqs.signal(IrqIndex.MSIX, v)
    assert [x.count() for x in e] == [1, 0, 0, 1]
    # The vectors without an fd keep their interrupt pending, delivered on re-assign.
    assert irqs.pending_bits(IrqIndex.MSIX) == [False, True, True, False]
    f = efds(1)[0]
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 1, 1, [f.give()])
    assert f.count() == 1
    assert irqs.pending_bits(IrqIndex.MSIX) == [False, False, True, False]


def test_disable_all_with_data_none_count_0(irqs: Interrupts, efds) -> None:
    e = efds(4)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 4, [x.give() for x in e])
    set_irqs(irqs, NONE | MASK, IrqIndex.MSIX, 0, 1)
    irqs.signal(IrqIndex.MSIX, 0)
    set_irqs(irqs, NONE | TRIGGER, IrqIndex.MSIX, 0, 0)
    assert not any(is_open(x.given[0]) for x in e)
    assert not irqs.lines[IrqIndex.MSIX].active
    assert irqs.pending_bits(IrqIndex.MSIX) == [False] * 4
    assert not irqs.lines[IrqIndex.MSIX].masked[0]


def test_msix_enable_with_no_vectors(irqs: Interrupts) -> None:
    # QEMU: EVENTFD|TRIGGER start 0 count 1 and no fd = "enable MSI-X with no vectors".
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 1)
    assert not irqs.lines[IrqIndex.MSIX].active


def test_err_irq_assign(irqs: Interrupts, efds) -> None:
    (e,) = efds(1)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.ERR, 0, 1, [e.give()])
    assert irqs.signal(IrqIndex.ERR, 0) and e.count() == 1


# --------------------------------------------------------------------------------------------
# mask / unmask / software trigger


def test_mask_holds_pending_and_unmask_delivers(irqs: Interrupts, efds) -> None:
    e = efds(4)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 4, [x.give() for x in e])
    set_irqs(irqs, NONE | MASK, IrqIndex.MSIX, 1, 1)
    assert not irqs.signal(IrqIndex.MSIX, 1)
    assert not irqs.signal(IrqIndex.MSIX, 1)
    assert e[1].count() == 0
    assert irqs.pending_bits(IrqIndex.MSIX) == [False, True, False, False]
    set_irqs(irqs, NONE | UNMASK, IrqIndex.MSIX, 1, 1)
    assert e[1].count() == 1  # one delivery for however many while masked
    assert irqs.pending_bits(IrqIndex.MSIX) == [False] * 4
    set_irqs(irqs, NONE | UNMASK, IrqIndex.MSIX, 1, 1)
    assert e[1].count() == 0  # no pending: unmask alone does not signal


def test_bool_mask_selects_vectors(irqs: Interrupts, efds) -> None:
    e = efds(4)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 4, [x.give() for x in e])
    set_irqs(irqs, BOOL | MASK, IrqIndex.MSIX, 0, 4, data=b"\1\0\1\0")
    for v in range(4):
        irqs.signal(IrqIndex.MSIX, v)
    assert [x.count() for x in e] == [0, 1, 0, 1]
    set_irqs(irqs, BOOL | UNMASK, IrqIndex.MSIX, 0, 4, data=b"\0\0\1\0")
    assert [x.count() for x in e] == [0, 0, 1, 0]
    assert irqs.pending_bits(IrqIndex.MSIX) == [True, False, False, False]


def test_software_trigger(irqs: Interrupts, efds) -> None:
    e = efds(4)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 4, [x.give() for x in e])
    set_irqs(irqs, NONE | TRIGGER, IrqIndex.MSIX, 1, 2)
    assert [x.count() for x in e] == [0, 1, 1, 0]
    set_irqs(irqs, BOOL | TRIGGER, IrqIndex.MSIX, 0, 4, data=b"\1\0\0\1")
    assert [x.count() for x in e] == [1, 0, 0, 1]


# --------------------------------------------------------------------------------------------
# INTx: level, automask, unmask re-signal, resample fd


def test_intx_automask_and_unmask_resignal(irqs: Interrupts, efds) -> None:
    (e,) = efds(1)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.INTX, 0, 1, [e.give()])
    irqs.set_intx(True)
    assert e.count() == 1
    assert irqs.lines[IrqIndex.INTX].masked[0]  # automasked
    irqs.set_intx(True)  # still asserted: no new edge
    assert e.count() == 0
    # QEMU unmasks (DATA_NONE|UNMASK) while the device still asserts: signalled again, re-masked.
    set_irqs(irqs, NONE | UNMASK, IrqIndex.INTX, 0, 1)
    assert e.count() == 1
    assert irqs.lines[IrqIndex.INTX].masked[0]
    # The device drops the line; unmask now does not signal.
    irqs.set_intx(False)
    set_irqs(irqs, NONE | UNMASK, IrqIndex.INTX, 0, 1)
    assert e.count() == 0
    # A new rising edge while unmasked signals once.
    irqs.set_intx(True)
    assert e.count() == 1


def test_intx_edge_while_masked_is_delivered_on_unmask(irqs: Interrupts, efds) -> None:
    (e,) = efds(1)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.INTX, 0, 1, [e.give()])
    set_irqs(irqs, NONE | MASK, IrqIndex.INTX, 0, 1)
    irqs.set_intx(True)
    assert e.count() == 0
    set_irqs(irqs, NONE | UNMASK, IrqIndex.INTX, 0, 1)
    assert e.count() == 1


def test_intx_resample_fd(irqs: Interrupts, efds) -> None:
    a, b = efds(2)
    set_irqs(irqs, EVENTFD | UNMASK, IrqIndex.INTX, 0, 1, [a.give()])
    assert irqs.intx_resample_fd == a.given[0]
    set_irqs(irqs, EVENTFD | UNMASK, IrqIndex.INTX, 0, 1, [b.give()])
    assert not is_open(a.given[0]) and irqs.intx_resample_fd == b.given[0]
    set_irqs(irqs, NONE | TRIGGER, IrqIndex.INTX, 0, 0)
    assert irqs.intx_resample_fd is None and not is_open(b.given[0])


# --------------------------------------------------------------------------------------------
# errors: EINVAL, and fds are never leaked


@pytest.mark.parametrize(
    "flags, index, start, count",
    [
        (EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 5),  # past the end
        (EVENTFD | TRIGGER, IrqIndex.MSIX, 4, 1),
        (EVENTFD | TRIGGER, IrqIndex.MSIX, 3, 2),
        (EVENTFD | TRIGGER, IrqIndex.MSIX, 0xFFFFFFF0, 0x0F),
        (NONE | MASK, IrqIndex.MSIX, 0, 0),  # count 0 is only for NONE|TRIGGER
        (EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 0),
        (NONE | TRIGGER, IrqIndex.MSI, 2, 1),
        (NONE | UNMASK, IrqIndex.INTX, 1, 1),
        (NONE | TRIGGER, 5, 0, 1),  # no such index
        (NONE | TRIGGER, 0xFFFFFFFF, 0, 0),
    ],
)
def test_bad_ranges_einval(irqs: Interrupts, flags: int, index: int, start: int, count: int) -> None:
    einval(irqs, flags, index, start, count)


def test_no_vectors_at_all_einval() -> None:
    irqs = Interrupts(intx=False)
    einval(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 1)
    einval(irqs, NONE | UNMASK, IrqIndex.INTX, 0, 1)


def test_errors_close_the_fds(irqs: Interrupts, efds) -> None:
    e = efds(3)
    cases = [
        (EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 2, [e[0].give(), e[1].give(), e[2].give()]),  # 3 fds, 2 vectors
        (NONE | TRIGGER, IrqIndex.MSIX, 0, 1, [e[0].give()]),  # fds without DATA_EVENTFD
        (BOOL | MASK, IrqIndex.MSIX, 0, 1, [e[0].give()]),
        (EVENTFD | MASK, IrqIndex.MSIX, 0, 1, [e[0].give()]),  # eventfds only with TRIGGER
        (EVENTFD | UNMASK, IrqIndex.MSIX, 0, 1, [e[0].give()]),  # resample only for INTx
        (EVENTFD | TRIGGER, IrqIndex.MSIX, 3, 2, [e[0].give(), e[1].give()]),
        (EVENTFD | TRIGGER, 9, 0, 1, [e[0].give()]),
    ]
    for flags, index, start, count, fds in cases:
        einval(irqs, flags, index, start, count, fds, data=b"\1" * count if flags & BOOL else b"")
        assert not any(is_open(fd) for fd in fds), (flags, index)
    assert not irqs.lines[IrqIndex.MSIX].active


def test_close_drops_everything(irqs: Interrupts, efds) -> None:
    e = efds(5)
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 4, [x.give() for x in e[:4]])
    set_irqs(irqs, EVENTFD | TRIGGER, IrqIndex.INTX, 0, 1, [e[4].give()])
    set_irqs(irqs, NONE | MASK, IrqIndex.MSIX, 0, 1)
    irqs.signal(IrqIndex.MSIX, 0)
    irqs.close()
    assert not any(is_open(x.given[0]) for x in e)
    assert irqs.pending_bits(IrqIndex.MSIX) == [False] * 4
    assert not any(irqs.lines[IrqIndex.MSIX].masked)


# --------------------------------------------------------------------------------------------
# MSI-X table and PBA in the device model (example device: table at BAR2+0, PBA at BAR2+0x800)


def msix_cap(dev: PciDevice) -> int:
    pos = dev.config.read(0x34, 1)[0]
    while dev.config.read(pos, 1)[0] != 0x11:
        pos = dev.config.read(pos + 1, 1)[0]
    return pos


def enable_msix(dev: PciDevice) -> None:
    cap = msix_cap(dev)
    Endpoint(dev).region_write(7, cap + 2, struct.pack("<H", 0x8000 | 3))


def test_msix_table_initial_state_and_readback() -> None:
    dev = DmaCopyEngine()
    for v in range(4):
        entry = Endpoint(dev).region_read(2, 16 * v, 16)
        assert entry == bytes(12) + b"\x01\0\0\0"  # all vectors start masked
    Endpoint(dev).region_write(2, 16, struct.pack("<IIII", 0xFEE0_0000, 0, 0x4021, 1))
    assert Endpoint(dev).region_read(2, 16, 16) == struct.pack("<IIII", 0xFEE0_0000, 0, 0x4021, 1)
    assert Endpoint(dev).region_read(2, 16 + 8, 4) == struct.pack("<I", 0x4021)
    assert Endpoint(dev).region_read(2, 16, 8) == struct.pack("<Q", 0xFEE0_0000)
    # Other BAR2 bytes outside the table and PBA are plain RAM.
    Endpoint(dev).region_write(2, 0x400, b"\xab")
    assert Endpoint(dev).region_read(2, 0x400, 1) == b"\xab"


def test_pba_pending_bits_and_table_unmask(efds) -> None:
    dev = DmaCopyEngine()
    enable_msix(dev)
    e = efds(4)
    set_irqs(dev.irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 4, [x.give() for x in e])
    for v in range(4):  # unmask every vector in the table
        Endpoint(dev).region_write(2, 16 * v + 12, b"\0\0\0\0")
    Endpoint(dev).region_write(2, 16 * 1 + 12, b"\x01\0\0\0")  # mask vector 1
    assert dev.interrupt(1) is False
    assert Endpoint(dev).region_read(2, 0x800, 8) == struct.pack("<Q", 0b10)
    assert e[1].count() == 0
    assert dev.interrupt(3)
    assert e[3].count() == 1
    Endpoint(dev).region_write(2, 0x800, struct.pack("<Q", 0))  # the PBA is read-only
    assert Endpoint(dev).region_read(2, 0x800, 8) == struct.pack("<Q", 0b10)
    Endpoint(dev).region_write(2, 16 * 1 + 12, b"\0\0\0\0")  # unmask: pending delivered
    assert e[1].count() == 1
    assert Endpoint(dev).region_read(2, 0x800, 8) == bytes(8)


def test_pending_without_fd_shows_in_pba(efds) -> None:
    dev = DmaCopyEngine()
    enable_msix(dev)
    dev.interrupt(2)  # MSI-X enabled, no eventfd yet
    assert Endpoint(dev).region_read(2, 0x800, 4) == struct.pack("<I", 0b100)
    (e,) = efds(1)
    set_irqs(dev.irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 2, 1, [e.give()])
    assert e.count() == 1
    assert Endpoint(dev).region_read(2, 0x800, 4) == bytes(4)


async def test_reset_remasks_the_table() -> None:
    dev = DmaCopyEngine()
    Endpoint(dev).region_write(2, 12, b"\0\0\0\0")
    await Endpoint(dev).do_reset()
    assert Endpoint(dev).region_read(2, 12, 4) == b"\x01\0\0\0"


def test_msix_table_and_pba_in_separate_bars(efds) -> None:
    class TwoBars(PciDevice):
        identity = PciIdentity(vendor_id=0x1234, device_id=0x2)
        bar0 = MemoryBar(0x1000)
        bar1 = MemoryBar(0x1000)
        capabilities = (Msix(vectors=70, table_bar=0, table_offset=0x100, pba_bar=1, pba_offset=0x10),)

    dev = TwoBars()
    assert len(Endpoint(dev).region_read(1, 0x10, 16)) == 16  # 70 vectors: two PBA qwords
    Endpoint(dev).region_write(0, 0x100 + 16 * 69 + 12, b"\x01\0\0\0")
    enable_msix(dev)
    e = efds(70)
    set_irqs(dev.irqs, EVENTFD | TRIGGER, IrqIndex.MSIX, 0, 70, [x.give() for x in e])
    Endpoint(dev).region_write(0, 0x100 + 16 * 69 + 12, b"\x01\0\0\0")
    dev.interrupt(69)
    assert Endpoint(dev).region_read(1, 0x18, 8) == struct.pack("<Q", 1 << 5)
    assert e[69].count() == 0
    with pytest.raises(ValueError):
        Msix(vectors=4, table_bar=0, table_offset=0, pba_offset=0x20)  # overlaps the table
