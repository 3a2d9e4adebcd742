"""Base Address Registers, declared on the device class.

A BAR is declared as a class attribute named ``bar0`` .. ``bar5``; the name gives its index::

    class MyDevice(PciDevice):
        bar0 = MemoryBar(0x1000)

        @bar0.reader
        def read_regs(self, offset: int, size: int) -> int: ...

        @bar0.writer
        def write_regs(self, offset: int, size: int, value: int) -> None: ...

Accesses arrive with ``size`` 1, 2, 4 or 8 and a little-endian integer value; larger accesses
from a client are split into aligned pieces. With ``register_size=4`` the callbacks only ever see
aligned 4-byte registers: a wider or unaligned read is assembled from the registers it covers,
and a partial write becomes read-modify-write of the register (as byte enables do on a bus). A BAR without a reader/writer behaves as plain RAM.
Parts of a BAR can be *mmappable*: backed by a memfd that the client maps directly, so guest
accesses there never become messages (and QEMU then stops posting writes for the device).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Reader = Callable[[Any, int, int], int]
Writer = Callable[[Any, int, int, int], None]


@dataclass(frozen=True, slots=True)
class BarKind:
    io: bool = False
    is64: bool = False
    prefetchable: bool = False

    def type_bits(self) -> int:
        if self.io:
            return 0x1
        return (0x4 if self.is64 else 0) | (0x8 if self.prefetchable else 0)


class Bar:
    """Declaration of one BAR (shared by all instances of the device class)."""

    def __init__(
        self,
        size: int,
        *,
        io: bool = False,
        is64: bool = False,
        prefetchable: bool = False,
        mmap_areas: Sequence[tuple[int, int]] = (),
        register_size: int | None = None,
        read: Reader | None = None,
        write: Writer | None = None,
    ) -> None:
        if size < (4 if io else 16) or size & (size - 1):
            # QEMU asserts on a non-power-of-two BAR and aborts the whole VM.
            raise ValueError(f"BAR size {size:#x} must be a power of two of at least {4 if io else 16}")
        if io and (is64 or prefetchable or mmap_areas):
            raise ValueError("an I/O BAR cannot be 64-bit, prefetchable or mmappable")
        for off, length in mmap_areas:
            if off % mmap.PAGESIZE or length % mmap.PAGESIZE or off + length > size or length <= 0:
                raise ValueError(f"mmap area {off:#x}+{length:#x} must be page-aligned and inside the BAR")
        self.size = size
        self.kind = BarKind(io, is64, prefetchable)
        self.mmap_areas = tuple(mmap_areas)
        self.read_fn = read
        self.write_fn = write
        if register_size not in (None, 1, 2, 4, 8):
            raise ValueError("register_size must be 1, 2, 4 or 8")
        #: with a register size, every access reaches the callbacks as whole aligned registers
        self.register_size = register_size
        self.index: int | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        if name.startswith("bar") and name[3:].isdigit() and int(name[3:]) <= 5:
            self.index = int(name[3:])
        elif self.index is None:
            raise TypeError(f"{owner.__name__}.{name}: declare BARs as attributes named bar0..bar5")

    def reader(self, fn: Reader) -> Reader:
        self.read_fn = fn
        return fn

    def writer(self, fn: Writer) -> Writer:
        self.write_fn = fn
        return fn


def MemoryBar(size: int, **kw: Any) -> Bar:
    """A 32-bit (or ``is64=True``) memory BAR."""
    return Bar(size, **kw)


def IoBar(size: int, **kw: Any) -> Bar:
    return Bar(size, io=True, **kw)


class BarBacking:
    """Per-instance storage of a BAR: RAM for callback-less BARs, a memfd for mmap areas."""

    def __init__(self, bar: Bar, name: str) -> None:
        self.bar = bar
        self.fd: int | None = None
        self.memory: mmap.mmap | bytearray | None = None
        if bar.mmap_areas:
            self.fd = os.memfd_create(f"vfu-{name}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, bar.size)
            self.memory = mmap.mmap(self.fd, bar.size, flags=mmap.MAP_SHARED)
        elif bar.read_fn is None and bar.write_fn is None:
            self.memory = bytearray(bar.size)

    def adopt_fd(self, fd: int) -> None:
        """Use another process's BAR memfd (a live handover: the client has it mapped, so it
        must stay the same memory) instead of ours. Takes ownership of ``fd``."""
        try:
            if os.fstat(fd).st_size != self.bar.size:
                raise ValueError(f"handed-over BAR memfd of {os.fstat(fd).st_size} bytes, expected {self.bar.size}")
            memory = mmap.mmap(fd, self.bar.size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self.fd, self.memory = fd, memory

    def in_mmap_area(self, offset: int, size: int) -> bool:
        return any(o <= offset and offset + size <= o + n for o, n in self.bar.mmap_areas)

    def close(self) -> None:
        if isinstance(self.memory, mmap.mmap):
            try:
                self.memory.close()
            except BufferError:
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
