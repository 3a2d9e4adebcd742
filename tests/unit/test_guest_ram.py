"""The client's GuestRam gives its memfd back: closed, as a context manager, or when dropped."""

from __future__ import annotations

import gc
import os

import pytest
from test_pci_irq import is_open as _open

from vfu_server.client import GuestRam


def test_close_and_context_manager_release_the_memfd() -> None:
    ram = GuestRam(1 << 16)
    fd = ram.fd
    ram.write(0, b"abcd")
    assert ram.read(0, 4) == b"abcd" and _open(fd)
    ram.close()
    assert not _open(fd)
    ram.close()  # twice is harmless
    with GuestRam(1 << 16) as ram2:
        fd2 = ram2.fd
        assert _open(fd2)
    assert not _open(fd2)


def test_a_dropped_guest_ram_closes_its_memfd() -> None:
    ram = GuestRam(1 << 16)
    fd = ram.fd
    del ram
    gc.collect()
    assert not _open(fd)


@pytest.mark.parametrize(("size", "error"), [(-1, OSError), (0, ValueError)])  # ftruncate, mmap
def test_a_failed_mapping_leaves_no_fd(size: int, error: type[Exception]) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(error):
        GuestRam(size)
    assert set(os.listdir("/proc/self/fd")) <= before
