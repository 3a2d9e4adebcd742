"""Type-0 PCI configuration space: initial image, write masks, BAR sizing, capability layout.

Layout of the header this builds::

    0x00 | device ID        | vendor ID        |
    0x04 | status           | command          |
    0x08 | class code (24)             | rev  |
    0x0c | BIST | hdr type | latency | cacheline |
    0x10 | BAR0 .. BAR5 (0x10 - 0x27)          |
    0x2c | subsystem ID     | subsystem vendor |
    0x30 | expansion ROM base address          |
    0x34 |                           | cap ptr |
    0x3c | max lat | min gnt | int pin | int line |
    0x40 .. 0xff   capabilities
    0x100 .. 0xfff extended capabilities (PCI Express only)

Writes go through a per-byte write mask and write-1-to-clear mask, so a driver (or a fuzzer)
can write anything anywhere and only legal bits change.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .bar import Bar
from .capabilities import Capability

COMMAND = 0x04
STATUS = 0x06
BAR0 = 0x10
ROM = 0x30
CAP_PTR = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

CMD_IO = 0x1
CMD_MEMORY = 0x2
CMD_MASTER = 0x4
CMD_INTX_DISABLE = 0x400
STATUS_CAP_LIST = 0x10
STATUS_INTERRUPT = 0x08


@dataclass(frozen=True, slots=True)
class PciIdentity:
    """What ``lspci -n`` shows: IDs, class code (base, sub, prog-if as 0xBBSSPP) and revision."""

    vendor_id: int
    device_id: int
    class_code: int = 0xFF0000
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0


class ConfigSpace:
    """The device's config space bytes and the rules for changing them."""

    def __init__(
        self,
        identity: PciIdentity,
        bars: Sequence[Bar | None],
        capabilities: Sequence[Capability],
        *,
        interrupt_pin: int = 0,
        rom_size: int = 0,
        extended: bool | None = None,
    ) -> None:
        if extended is None:
            extended = any(c.cap_id == 0x10 and not c.extended for c in capabilities) or any(
                c.extended for c in capabilities
            )
        self.size = 4096 if extended else 256
        self.data = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1c = bytearray(self.size)
        self.bars = list(bars) + [None] * (6 - len(bars))
        self.rom_size = rom_size
        self.capabilities = list(capabilities)
        self.write_hooks: list[Callable[[int, int, int, int], None]] = []
        d = self.data
        struct.pack_into("<HH", d, 0, identity.vendor_id, identity.device_id)
        struct.pack_into("<I", d, 8, identity.revision | identity.class_code << 8)
        struct.pack_into("<HH", d, 0x2C, identity.subsystem_vendor_id, identity.subsystem_id)
        d[INTERRUPT_PIN] = interrupt_pin
        struct.pack_into("<H", self.wmask, COMMAND, 0x0547)  # IO MEM MASTER PARITY SERR INTX_DISABLE
        struct.pack_into("<H", self.w1c, STATUS, 0xF900)
        self.wmask[0x0C] = 0xFF  # cache line size
        self.wmask[INTERRUPT_LINE] = 0xFF
        for i, bar in enumerate(self.bars):
            if bar is None:
                continue
            struct.pack_into("<I", d, BAR0 + 4 * i, bar.kind.type_bits())
            if bar.kind.is64 and (i == 5 or self.bars[i + 1] is not None):
                raise ValueError(f"64-bit BAR{i} needs BAR{i + 1} to be free")
            struct.pack_into("<I", self.wmask, BAR0 + 4 * i, ~(bar.size - 1) & (0xFFFFFFFC if bar.kind.io else 0xFFFFFFF0))
            if bar.kind.is64:
                struct.pack_into("<I", self.wmask, BAR0 + 4 * i + 4, (~(bar.size - 1) >> 32) & 0xFFFFFFFF)
        if rom_size:
            if rom_size & (rom_size - 1) or rom_size < 2048:
                raise ValueError("ROM size must be a power of two of at least 2 KiB")
            struct.pack_into("<I", self.wmask, ROM, (~(rom_size - 1) & 0xFFFFF800) | 1)
        self._layout()
        self.initial = bytes(self.data)

    def _layout(self) -> None:
        std = [c for c in self.capabilities if not c.extended]
        ext = [c for c in self.capabilities if c.extended]
        pos = 0x40
        prev_next = CAP_PTR
        for cap in std:
            body = cap.initial()
            off = cap.offset if cap.offset is not None else pos
            if off < 0x40 or off % 4 or off + len(body) > 0x100:
                raise ValueError(f"capability {cap.cap_id:#x} does not fit at {off:#x}")
            self._place(cap, off, body)
            self.data[off] = cap.cap_id
            self.data[prev_next] = off
            prev_next = off + 1
            pos = (off + len(body) + 3) & ~3
        if std:
            struct.pack_into("<H", self.data, STATUS, STATUS_CAP_LIST)
        if ext and self.size < 4096:
            raise ValueError("extended capabilities need a PCI Express capability")
        pos = 0x100
        prev: Capability | None = None
        for cap in ext:
            body = cap.initial()
            off = cap.offset if cap.offset is not None else pos
            if off < 0x100 or off % 4 or off + len(body) > 0x1000:
                raise ValueError(f"extended capability {cap.cap_id:#x} does not fit at {off:#x}")
            self._place(cap, off, body)
            struct.pack_into("<I", self.data, off, cap.cap_id | getattr(cap, "version", 1) << 16)
            if prev is not None:
                assert prev.offset is not None
                hdr = struct.unpack_from("<I", self.data, prev.offset)[0]
                struct.pack_into("<I", self.data, prev.offset, hdr | off << 20)
            prev = cap
            pos = (off + len(body) + 3) & ~3

    def _place(self, cap: Capability, off: int, body: bytes) -> None:
        for other in self.capabilities:
            if other is not cap and other.offset is not None and other.offset < off + len(body) and off < other.offset + other.size:
                raise ValueError(f"capabilities {cap.cap_id:#x} and {other.cap_id:#x} overlap")
        cap.offset = off
        n = len(body)
        self.data[off : off + n] = body
        self.wmask[off : off + n] = cap.write_mask()
        self.w1c[off : off + n] = cap.w1c_mask()

    # ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        self.data[:] = self.initial
        for cap in self.capabilities:
            cap.reset()

    def read(self, offset: int, count: int) -> bytes:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise IndexError(f"config read {offset:#x}+{count} outside {self.size} bytes")
        for cap in self.capabilities:
            assert cap.offset is not None
            if cap.offset < offset + count and offset < cap.offset + cap.size:
                self._refresh(cap, offset, count)
        return bytes(self.data[offset : offset + count])

    def _refresh(self, cap: Capability, offset: int, count: int) -> None:
        assert cap.offset is not None
        lo = max(offset, cap.offset)
        hi = min(offset + count, cap.offset + cap.size)
        value = cap.read(lo - cap.offset, hi - lo)
        if value is not None:
            self.data[lo:hi] = value.to_bytes(hi - lo, "little")

    def write(self, offset: int, data: bytes) -> None:
        count = len(data)
        if offset < 0 or offset + count > self.size:
            raise IndexError(f"config write {offset:#x}+{count} outside {self.size} bytes")
        old = bytes(self.data[offset : offset + count])
        d, wm, w1c = self.data, self.wmask, self.w1c
        for i, b in enumerate(data):
            o = offset + i
            d[o] = ((d[o] & ~wm[o]) | (b & wm[o])) & ~(b & w1c[o]) & 0xFF
        value = int.from_bytes(data, "little")
        old_value = int.from_bytes(old, "little")
        for cap in self.capabilities:
            assert cap.offset is not None
            if cap.offset < offset + count and offset < cap.offset + cap.size:
                cap.written(offset - cap.offset, count, value, old_value)
        for hook in self.write_hooks:
            hook(offset, count, value, old_value)

    # convenient typed accessors ----------------------------------------------------------

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.data, COMMAND)[0]

    @property
    def bus_master(self) -> bool:
        return bool(self.data[COMMAND] & CMD_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & CMD_INTX_DISABLE)

    def set_interrupt_status(self, asserted: bool) -> None:
        if asserted:
            self.data[STATUS] |= STATUS_INTERRUPT
        else:
            self.data[STATUS] &= ~STATUS_INTERRUPT & 0xFF

    def find(self, kind: type) -> Capability | None:
        return next((c for c in self.capabilities if isinstance(c, kind)), None)
