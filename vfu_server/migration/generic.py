"""Generic records every standard format starts with (types 0x0001-0x00FF).

PROFILE (0x0001) -- the guest-visible ABI; compared before anything is loaded.
PCI_CONFIG (0x0002) -- writable config-space state.
MSIX (0x0003) -- the MSI-X table and PBA (the server owns them).
INTX (0x0004) -- INTx line level.

Byte layouts are in docs/migration-format.md section 5; the layouts below are
the single source the encoder and decoder use.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .envelope import REC_PROFILE, Record
from .errors import MigrationFormatError
from .records import RecordLayout, StructLayout

if TYPE_CHECKING:
    from .formats import RecordSet

__all__ = [
    "GENERIC_LAYOUTS",
    "INTX",
    "MSIX",
    "PCI_CONFIG",
    "PROFILE",
    "IntxState",
    "MsixState",
    "MsixVector",
    "PciConfigState",
    "PciProfile",
    "PciState",
    "generic_records",
    "intx_from_record",
    "intx_to_record",
    "msix_from_record",
    "msix_to_record",
    "pci_config_from_record",
    "pci_config_to_record",
    "pci_parts_from_records",
    "profile_from_record",
    "profile_of_records",
    "profile_to_record",
]

_SIX = (0, 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class PciProfile:
    """The guest-visible ABI of a device instance (PROFILE record)."""

    vendor_id: int
    device_id: int
    subsys_vendor_id: int = 0
    subsys_id: int = 0
    class_code: int = 0  # 24-bit base/sub/prog-if
    revision: int = 0
    bar_sizes: tuple[int, ...] = _SIX  # bytes, 0 = BAR not implemented
    bar_flags: tuple[int, ...] = _SIX  # low BAR bits: b0 I/O, b2:1 type (2 = 64-bit), b3 prefetch
    msix_vectors: int = 0
    msix_table_bir: int = 0
    msix_table_offset: int = 0
    msix_pba_bir: int = 0
    msix_pba_offset: int = 0
    capabilities: bytes = b""  # capability list layout: (cap_id, offset) byte pairs
    backend_hash: bytes = bytes(32)  # identity hash of the backend, never its data
    device_abi: bytes = b""  # device-specific ABI, defined by each format


@dataclass(frozen=True)
class PciConfigState:
    """Writable PCI configuration state (PCI_CONFIG record)."""

    command: int = 0
    cache_line_size: int = 0
    latency_timer: int = 0
    interrupt_line: int = 0
    pm_control: int = 0
    bars: tuple[int, ...] = _SIX  # raw BAR dwords as the guest programmed them
    rom_bar: int = 0
    pcie_devctl: int = 0
    pcie_devctl2: int = 0
    pcie_lnkctl: int = 0
    msix_control: int = 0  # Message Control word: b15 enable, b14 function mask


@dataclass(frozen=True)
class MsixVector:
    addr: int = 0
    data: int = 0
    ctrl: int = 1  # Vector Control: b0 masked (the reset value)


@dataclass(frozen=True)
class MsixState:
    vectors: tuple[MsixVector, ...] = field(default_factory=tuple)
    pba: bytes = b""  # pending bits, vector i = byte i//8 bit i%8


@dataclass(frozen=True)
class IntxState:
    level: int = 0


PROFILE = RecordLayout(REC_PROFILE, "PROFILE", [
    ("vendor_id", "H"), ("device_id", "H"), ("subsys_vendor_id", "H"), ("subsys_id", "H"),
    ("class_code", "I"), ("revision", "B"), ("reserved0", "B"), ("msix_vectors", "H"),
    ("msix_table_bir", "B"), ("msix_pba_bir", "B"), ("reserved1", "H"),
    ("msix_table_offset", "I"), ("msix_pba_offset", "I"),
    *[(f"bar{i}_size", "Q") for i in range(6)],
    *[(f"bar{i}_flags", "B") for i in range(6)], ("reserved2", "H"),
    ("backend_hash", "32s"), ("capabilities_len", "H"), ("device_abi_len", "H"),
    ("reserved3", "I"),
], tail=True, doc="tail: capabilities bytes, then device_abi bytes")

PCI_CONFIG = RecordLayout(0x0002, "PCI_CONFIG", [
    ("command", "H"), ("cache_line_size", "B"), ("latency_timer", "B"),
    ("interrupt_line", "B"), ("reserved0", "B"), ("pm_control", "H"),
    *[(f"bar{i}", "I") for i in range(6)], ("rom_bar", "I"),
    ("pcie_devctl", "H"), ("pcie_devctl2", "H"), ("pcie_lnkctl", "H"), ("msix_control", "H"),
])

MSIX = RecordLayout(0x0003, "MSIX", [
    ("num_vectors", "H"), ("entry_size", "H", 16), ("pba_len", "H"), ("reserved0", "H"),
], tail=True, doc="tail: num_vectors entries of entry_size bytes, then pba_len PBA bytes")
MSIX_ENTRY = StructLayout([("addr", "Q"), ("data", "I"), ("ctrl", "I", 1)], "MSIX.entry")

INTX = RecordLayout(0x0004, "INTX", [("level", "B"), ("reserved0", "B"), ("reserved1", "H")])


def _bad(reason: str) -> MigrationFormatError:
    return MigrationFormatError(errno.EINVAL, reason)


def _six(name: str, t: tuple[int, ...]) -> tuple[int, ...]:
    if len(t) != 6:
        raise _bad(f"{name} needs 6 entries, got {len(t)}")
    return t


def profile_to_record(p: PciProfile) -> Record:
    v: dict[str, Any] = {k: getattr(p, k) for k in PciProfile.__dataclass_fields__}
    for i, (s, f) in enumerate(zip(_six("bar_sizes", p.bar_sizes),
                                   _six("bar_flags", p.bar_flags), strict=True)):
        v[f"bar{i}_size"], v[f"bar{i}_flags"] = s, f
    v["capabilities_len"] = len(p.capabilities)
    v["device_abi_len"] = len(p.device_abi)
    return PROFILE.pack(v, tail=p.capabilities + p.device_abi)


def profile_from_record(values: dict[str, Any], tail: bytes) -> PciProfile:
    caps_len, abi_len = values["capabilities_len"], values["device_abi_len"]
    if caps_len + abi_len > len(tail):
        raise MigrationFormatError(errno.EBADMSG, "PROFILE: capability/ABI lengths overrun")
    return PciProfile(
        vendor_id=values["vendor_id"], device_id=values["device_id"],
        subsys_vendor_id=values["subsys_vendor_id"], subsys_id=values["subsys_id"],
        class_code=values["class_code"], revision=values["revision"],
        bar_sizes=tuple(values[f"bar{i}_size"] for i in range(6)),
        bar_flags=tuple(values[f"bar{i}_flags"] for i in range(6)),
        msix_vectors=values["msix_vectors"],
        msix_table_bir=values["msix_table_bir"], msix_table_offset=values["msix_table_offset"],
        msix_pba_bir=values["msix_pba_bir"], msix_pba_offset=values["msix_pba_offset"],
        capabilities=bytes(tail[:caps_len]),
        backend_hash=values["backend_hash"],
        device_abi=bytes(tail[caps_len:caps_len + abi_len]),
    )


def pci_config_to_record(c: PciConfigState) -> Record:
    v: dict[str, Any] = {k: getattr(c, k) for k in PciConfigState.__dataclass_fields__}
    for i, b in enumerate(_six("bars", c.bars)):
        v[f"bar{i}"] = b
    return PCI_CONFIG.pack(v)


def pci_config_from_record(values: dict[str, Any]) -> PciConfigState:
    kw = {k: values[k] for k in PciConfigState.__dataclass_fields__ if k != "bars"}
    return PciConfigState(bars=tuple(values[f"bar{i}"] for i in range(6)), **kw)


def msix_to_record(m: MsixState) -> Record:
    return MSIX.pack(
        {"num_vectors": len(m.vectors), "entry_size": MSIX_ENTRY.size, "pba_len": len(m.pba)},
        tail=MSIX_ENTRY.pack_array(m.vectors) + m.pba,
    )


def msix_from_record(values: dict[str, Any], tail: bytes, expect_vectors: int | None = None
                     ) -> MsixState:
    n, esize, pba_len = values["num_vectors"], values["entry_size"], values["pba_len"]
    if expect_vectors is not None and n != expect_vectors:
        raise _bad(f"MSIX: {n} vectors, this device has {expect_vectors}")
    if n and esize < 1:
        raise MigrationFormatError(errno.EBADMSG, "MSIX: entry_size 0")
    if n * esize + pba_len > len(tail):
        raise MigrationFormatError(errno.EBADMSG, "MSIX: table and PBA overrun the record")
    if pba_len * 8 < n:
        raise _bad(f"MSIX: PBA of {pba_len} bytes cannot hold {n} vectors")
    entries = MSIX_ENTRY.unpack_array(tail, n, esize)
    pba = bytes(tail[n * esize:n * esize + pba_len])
    return MsixState(tuple(MsixVector(**e) for e in entries), pba)


def intx_to_record(i: IntxState) -> Record:
    return INTX.pack(i)


def intx_from_record(values: dict[str, Any]) -> IntxState:
    if values["level"] > 1:
        raise _bad(f"INTX: level {values['level']} is not 0 or 1")
    return IntxState(values["level"])


GENERIC_LAYOUTS = (PROFILE, PCI_CONFIG, MSIX, INTX)


@dataclass(frozen=True)
class PciState:
    """The part of a device's state tree that the generic records carry: a device's state
    dataclass derives from it (frozen, its own fields after these, with defaults), and its
    standard format writes them with generic_records."""

    profile: PciProfile
    pci: PciConfigState = field(default_factory=PciConfigState)
    msix: MsixState = field(default_factory=MsixState)
    intx: IntxState = field(default_factory=IntxState)


def generic_records(state: PciState) -> Iterator[Record]:
    """The records a standard format starts with: PROFILE, PCI_CONFIG, MSIX, INTX."""
    yield profile_to_record(state.profile)
    yield pci_config_to_record(state.pci)
    yield msix_to_record(state.msix)
    yield intx_to_record(state.intx)


def profile_of_records(rs: RecordSet) -> PciProfile:
    """The stream's PROFILE (the format checks its device_abi before anything else)."""
    return profile_from_record(*rs.one(PROFILE))


def pci_parts_from_records(rs: RecordSet, profile: PciProfile
                           ) -> tuple[PciConfigState, MsixState, IntxState]:
    """PCI_CONFIG, MSIX (as many vectors as `profile` says) and INTX (optional: level 0)."""
    pci = pci_config_from_record(rs.one(PCI_CONFIG)[0])
    msix = msix_from_record(*rs.one(MSIX), expect_vectors=profile.msix_vectors)
    intx_rec = rs.maybe(INTX)
    intx = intx_from_record(intx_rec[0]) if intx_rec else IntxState()
    return pci, msix, intx
