"""GuestMemory: the DMA map table, bounds-checked zero-copy views, and unmap safety."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfu_server.pci.dma import GuestMemory
from vfu_server.protocol.constants import DmaMapFlags
from vfu_server.protocol.errors import DmaError, VfioUserError

RW = DmaMapFlags.READ | DmaMapFlags.WRITE
RO = DmaMapFlags.READ
PAGE = mmap.PAGESIZE


class Ram:
    """A memfd with the test's own mapping, to check what the server side sees and writes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("test-ram")
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)

    def dup(self) -> int:
        return os.dup(self.fd)

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


@pytest.fixture
def ram():
    made: list[Ram] = []

    def make(size: int = 4 * PAGE) -> Ram:
        r = Ram(size)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def gm():
    g = GuestMemory()
    yield g
    g.clear()


def errno_of(fn, *args, **kw) -> int:
    with pytest.raises(VfioUserError) as exc:
        fn(*args, **kw)
    return exc.value.errno


# --------------------------------------------------------------------------------------------
# map table


def test_map_read_write_through_shared_memory(gm: GuestMemory, ram) -> None:
    r = ram()
    gm.add(0x10000, r.size, RW, r.dup())
    r.mem[100:105] = b"hello"
    assert gm.read(0x10000 + 100, 5) == b"hello"
    gm.write(0x10000 + 200, b"world")
    assert r.mem[200:205] == b"world"
    v = gm.view(0x10000 + 300, 4, write=True)
    v[:] = b"\1\2\3\4"
    assert r.mem[300:304] == b"\1\2\3\4"
    del v


def test_map_with_offset_into_fd(gm: GuestMemory, ram) -> None:
    r = ram(8 * PAGE)
    r.mem[3 * PAGE : 3 * PAGE + 3] = b"abc"
    gm.add(0x0, 2 * PAGE, RW, r.dup(), offset=3 * PAGE)
    assert gm.read(0, 3) == b"abc"
    # An unaligned offset works too (mapped from the page below).
    r.mem[PAGE + 10 : PAGE + 13] = b"xyz"
    gm.add(0x100000, PAGE, RW, r.dup(), offset=PAGE + 10)
    assert gm.read(0x100000, 3) == b"xyz"


def test_fd_is_owned_and_closed(gm: GuestMemory, ram) -> None:
    r = ram()
    fd = r.dup()
    region = gm.add(0, r.size, RW, fd)
    assert region.fd == fd  # kept while mapped (a live handover sends it on)
    gm.remove(0, r.size)
    with pytest.raises(OSError):
        os.fstat(fd)
    gm.add(0, r.size, RW, r.dup())
    fd2 = r.dup()
    assert errno_of(gm.add, 0, PAGE, RW, fd2) == errno.EEXIST  # closed on error too
    with pytest.raises(OSError):
        os.fstat(fd2)


@pytest.mark.parametrize(
    "iova, size",
    [
        (0x10000, 0x4000),  # identical
        (0x11000, 0x1000),  # inside
        (0x0F000, 0x2000),  # straddles the start
        (0x13000, 0x2000),  # straddles the end
        (0x08000, 0x20000),  # contains it
    ],
)
def test_overlap_eexist(gm: GuestMemory, iova: int, size: int) -> None:
    gm.add(0x10000, 0x4000, RO, None)
    assert errno_of(gm.add, iova, size, RO, None) == errno.EEXIST
    assert len(gm.regions) == 1


def test_adjacent_maps_are_fine(gm: GuestMemory) -> None:
    gm.add(0x10000, 0x4000, RO, None)
    gm.add(0x14000, 0x1000, RO, None)
    gm.add(0x0F000, 0x1000, RO, None)
    assert [r.iova for r in gm.regions] == [0x0F000, 0x10000, 0x14000]


def test_unmap_mismatch_enoent(gm: GuestMemory) -> None:
    gm.add(0x10000, 0x4000, RO, None)
    for iova, size in ((0x10000, 0x1000), (0x11000, 0x3000), (0x20000, 0x1000), (0, 0x4000)):
        assert errno_of(gm.remove, iova, size) == errno.ENOENT
    gm.remove(0x10000, 0x4000)
    assert gm.regions == ()
    assert errno_of(gm.remove, 0x10000, 0x4000) == errno.ENOENT


@pytest.mark.parametrize(
    "iova, size, flags, code",
    [
        (0, 0, RW, errno.EINVAL),  # size 0
        (2**64 - PAGE, 2 * PAGE, RW, errno.EINVAL),  # wraps
        (0, PAGE, DmaMapFlags.WRITE, errno.EINVAL),  # no READ
    ],
)
def test_bad_maps(gm: GuestMemory, iova: int, size: int, flags: int, code: int) -> None:
    assert errno_of(gm.add, iova, size, flags, None) == code


def test_max_regions(ram) -> None:
    g = GuestMemory(max_regions=2)
    g.add(0, PAGE, RO, None)
    g.add(PAGE, PAGE, RO, None)
    assert errno_of(g.add, 2 * PAGE, PAGE, RO, None) == errno.ENOSPC


def test_bad_fd_is_an_error_reply_not_a_crash(gm: GuestMemory) -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(VfioUserError):
        gm.add(0, PAGE, RW, r)  # a pipe cannot be mmapped
    assert gm.regions == ()


def test_map_larger_than_the_fd_is_refused(gm: GuestMemory, ram) -> None:
    """Touching a mapping past the end of a memfd raises SIGBUS and would kill the server
    process, so a map that claims more than the fd holds must be refused (Python's mmap does)."""
    r = ram(PAGE)
    with pytest.raises(VfioUserError) as exc:
        gm.add(0, 16 * PAGE, RW, r.dup())
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(VfioUserError):
        gm.add(0, PAGE, RW, r.dup(), offset=PAGE)
    assert gm.regions == ()


# --------------------------------------------------------------------------------------------
# access checks


def test_view_bounds(gm: GuestMemory, ram) -> None:
    r = ram(2 * PAGE)
    gm.add(0x10000, 2 * PAGE, RW, r.dup())
    assert len(gm.view(0x10000, 2 * PAGE)) == 2 * PAGE
    assert len(gm.view(0x10000 + 2 * PAGE - 1, 1)) == 1
    for iova, length in ((0x10000, 2 * PAGE + 1), (0x10000 + 2 * PAGE - 1, 2), (0x10000 - 1, 1),
                         (0x10000 + 2 * PAGE, 1), (0, 1), (-1, 1), (0x10000, -1)):
        with pytest.raises(DmaError):
            gm.view(iova, length)
    assert gm.contains(0x10000, 2 * PAGE)
    assert not gm.contains(0x10000, 2 * PAGE + 1)


def test_dma_error_is_efault(gm: GuestMemory) -> None:
    with pytest.raises(DmaError) as exc:
        gm.read(0x1234, 4)
    assert exc.value.errno == errno.EFAULT


def test_cross_region_views(gm: GuestMemory, ram) -> None:
    a, b = ram(PAGE), ram(PAGE)
    gm.add(0, PAGE, RW, a.dup())
    gm.add(PAGE, PAGE, RW, b.dup())  # adjacent, different fds
    a.mem[PAGE - 3 :] = b"abc"
    b.mem[:3] = b"def"
    with pytest.raises(DmaError):
        gm.view(PAGE - 3, 6)
    vs = gm.views(PAGE - 3, 6)
    assert [bytes(v) for v in vs] == [b"abc", b"def"]
    del vs
    assert gm.read(PAGE - 3, 6) == b"abcdef"
    gm.write(PAGE - 2, b"WXYZ")
    assert a.mem[PAGE - 2 :] == b"WX" and b.mem[:2] == b"YZ"
    assert gm.contains(0, 2 * PAGE)


def test_cross_region_with_a_hole_fails(gm: GuestMemory, ram) -> None:
    a, b = ram(PAGE), ram(PAGE)
    gm.add(0, PAGE, RW, a.dup())
    gm.add(2 * PAGE, PAGE, RW, b.dup())
    with pytest.raises(DmaError):
        gm.read(PAGE - 1, 2)
    with pytest.raises(DmaError):
        gm.write(PAGE - 1, b"xx")
    assert not gm.contains(0, 3 * PAGE)


def test_read_only_map(gm: GuestMemory, ram) -> None:
    r = ram(PAGE)
    r.mem[:4] = b"ROM!"
    gm.add(0xFFFC0000, PAGE, RO, r.dup())
    assert gm.read(0xFFFC0000, 4) == b"ROM!"
    assert gm.view(0xFFFC0000, 4).readonly
    with pytest.raises(DmaError) as exc:
        gm.write(0xFFFC0000, b"x")
    assert exc.value.errno == errno.EPERM
    with pytest.raises(DmaError):
        gm.view(0xFFFC0000, 1, write=True)
    assert r.mem[:4] == b"ROM!"


def test_read_only_fd_can_be_mapped(gm: GuestMemory, ram) -> None:
    r = ram(PAGE)
    ro = os.open(f"/proc/self/fd/{r.fd}", os.O_RDONLY)
    gm.add(0, PAGE, RO, ro)
    assert gm.read(0, 4) == bytes(4)


def test_fd_less_map_is_dma_error(gm: GuestMemory) -> None:
    # Without a client that serves DMA_READ/DMA_WRITE (and outside a device task) a map that
    # came without an fd cannot be reached; it is mapped all the same.
    gm.add(0xC0000, 0x20000, RO, None)
    for fn in (lambda: gm.read(0xC0000, 4), lambda: gm.view(0xC0000, 1), lambda: gm.write(0xC0000, b"x")):
        with pytest.raises(DmaError):
            fn()
    assert gm.contains(0xC0000, 1)
    assert not gm.contains(0xE0000, 1)
    gm.remove(0xC0000, 0x20000)


def test_unmap_while_a_view_is_held(gm: GuestMemory, ram) -> None:
    r = ram(PAGE)
    gm.add(0, PAGE, RW, r.dup())
    held = gm.view(0, 16, write=True)
    gm.remove(0, PAGE)  # must not raise although a view is exported
    with pytest.raises(DmaError):
        gm.read(0, 1)
    # The old view still reaches the same memory.
    held[:4] = b"late"
    assert r.mem[:4] == b"late"
    r.mem[4:8] = b"more"
    assert bytes(held[4:8]) == b"more"
    held.release()
    # The range can be mapped again.
    gm.add(0, PAGE, RW, r.dup())
    assert gm.read(0, 8) == b"latemore"


def test_clear_while_views_are_held(gm: GuestMemory, ram) -> None:
    a, b = ram(PAGE), ram(PAGE)
    gm.add(0, PAGE, RW, a.dup())
    gm.add(PAGE, PAGE, RW, b.dup())
    views = gm.views(PAGE - 2, 4)
    gm.clear()
    assert gm.regions == ()
    assert [bytes(v) for v in views] == [bytes(2), bytes(2)]


def test_dirty_hook_sees_writes_only(gm: GuestMemory, ram) -> None:
    r = ram(2 * PAGE)
    gm.add(0, 2 * PAGE, RW, r.dup())
    seen: list[tuple[int, int]] = []
    gm.dirty_hook = lambda iova, length: seen.append((iova, length))
    gm.read(0, 100)
    gm.write(PAGE - 1, b"ab")
    gm.view(10, 5, write=True)
    assert seen == [(PAGE - 1, 2), (10, 5)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 4), st.booleans()), max_size=25))
def test_map_table_model(ops) -> None:
    """Random map/unmap sequences (in pages, fd-less) against a set-of-ranges model."""
    g = GuestMemory()
    model: dict[int, int] = {}
    for start, pages, is_map in ops:
        iova, size = start * PAGE, pages * PAGE
        if is_map:
            overlaps = any(s < iova + size and iova < s + n for s, n in model.items())
            try:
                g.add(iova, size, RO, None)
            except VfioUserError as exc:
                assert overlaps and exc.errno == errno.EEXIST
            else:
                assert not overlaps
                model[iova] = size
        else:
            try:
                g.remove(iova, size)
            except VfioUserError as exc:
                assert model.get(iova) != size and exc.errno == errno.ENOENT
            else:
                assert model.pop(iova) == size
        assert [(r.iova, r.size) for r in g.regions] == sorted(model.items())
