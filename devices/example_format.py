"""The example DMA-copy-engine device's state and its two formats (reference user).

``example/std/1`` (standard)::

    PROFILE (0x0001)  device_abi = EXAMPLE_ABI {le16 abi_revision; le16 num_msix}
    PCI_CONFIG (0x0002)
    MSIX (0x0003)
    INTX (0x0004)
    EXAMPLE_REGS (0x0300)  {le32 scratch; le32 len; le64 src; le64 dst;
                            le32 ctrl; le32 status; le32 irq_count; le32 reserved}

``opaque/vfu-example`` (opaque): :class:`ExampleState` as schema-checked TLV.

It lives next to the device (the library names no device) and is the reference for the
golden vectors in tests/vectors/. The device itself needs no code for it: it keeps its
registers in an :class:`ExampleRegs`, and ``migration_state = ("regs",)`` lets the base class
fill :class:`ExampleState` in and out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from vfu_server.migration.envelope import Record
from vfu_server.migration.formats import (
    FormatSet,
    OpaqueFormat,
    RecordSet,
    StandardFormat,
    register_formats,
)
from vfu_server.migration.generic import (
    GENERIC_LAYOUTS,
    IntxState,
    MsixState,
    PciConfigState,
    PciProfile,
    PciState,
    generic_records,
    pci_parts_from_records,
    profile_of_records,
)
from vfu_server.migration.records import RecordLayout

__all__ = [
    "EXAMPLE_FORMATS",
    "EXAMPLE_OPAQUE",
    "EXAMPLE_REGS",
    "EXAMPLE_STANDARD",
    "ExampleRegs",
    "ExampleState",
    "example_device_abi",
    "sample_state",
]


@dataclass
class ExampleRegs:
    """BAR0 registers of the DMA copy engine (quiesced: no copy in flight). Mutable: the
    device keeps its live registers in one."""

    scratch: int = 0
    src: int = 0
    dst: int = 0
    len: int = 0
    ctrl: int = 0
    status: int = 0
    irq_count: int = 0


@dataclass(frozen=True)
class ExampleState(PciState):
    regs: ExampleRegs = field(default_factory=ExampleRegs)


EXAMPLE_REGS = RecordLayout(0x0300, "EXAMPLE_REGS", [
    ("scratch", "I"), ("len", "I"), ("src", "Q"), ("dst", "Q"),
    ("ctrl", "I"), ("status", "I"), ("irq_count", "I"), ("reserved0", "I"),
])

_ABI = struct.Struct("<HH")
EXAMPLE_ABI_REVISION = 1


def example_device_abi(num_msix: int) -> bytes:
    """The PROFILE device_abi bytes the example device should advertise."""
    return _ABI.pack(EXAMPLE_ABI_REVISION, num_msix)


def _save(state: ExampleState, minor: int) -> Iterator[Record]:
    yield from generic_records(state)
    yield EXAMPLE_REGS.pack(state.regs)


def _load(rs: RecordSet, minor: int) -> ExampleState:
    profile = profile_of_records(rs)
    pci, msix, intx = pci_parts_from_records(rs, profile)
    regs_v, _ = rs.one(EXAMPLE_REGS)
    regs = ExampleRegs(**{k: regs_v[k] for k in ExampleRegs.__dataclass_fields__})
    return ExampleState(profile, pci, msix, intx, regs)


EXAMPLE_STANDARD = StandardFormat(
    "example/std/1",
    major=1,
    minor_max=0,
    records=(*GENERIC_LAYOUTS, EXAMPLE_REGS),
    save=_save,
    load=_load,
    state_type=ExampleState,
    description="Example DMA engine, documented records (docs/migration-format.md)",
)

EXAMPLE_OPAQUE = OpaqueFormat(
    "opaque/vfu-example",
    state_type=ExampleState,
    schema_version=1,
    description="vfu-server's example device, implementation-private TLV",
)

#: Opaque first: same-build migration is the common case (design doc 6.5).
EXAMPLE_FORMATS = FormatSet([EXAMPLE_OPAQUE, EXAMPLE_STANDARD])
register_formats("example", EXAMPLE_FORMATS)


def sample_state() -> ExampleState:
    """A fully populated, deterministic state (golden vectors, tests, demos)."""
    from vfu_server.migration.generic import MsixVector

    profile = PciProfile(
        vendor_id=0x1B36, device_id=0x0011, subsys_vendor_id=0x1AF4, subsys_id=0x1100,
        class_code=0xFF0000, revision=1,
        bar_sizes=(0x1000, 0, 0x1000, 0, 0, 0), bar_flags=(0, 0, 0, 0, 0, 0),
        msix_vectors=2, msix_table_bir=2, msix_table_offset=0, msix_pba_bir=2,
        msix_pba_offset=0x800, capabilities=bytes([0x11, 0x40]),
        backend_hash=bytes(range(32)), device_abi=example_device_abi(2),
    )
    return ExampleState(
        profile=profile,
        pci=PciConfigState(command=0x0006, cache_line_size=0x10, interrupt_line=11,
                           bars=(0xFEB00000, 0, 0xFEB01000, 0, 0, 0), msix_control=0x8001),
        msix=MsixState((MsixVector(0xFEE00000, 0x4021, 0), MsixVector(0xFEE01000, 0x4022, 1)),
                       b"\x02"),
        intx=IntxState(0),
        regs=ExampleRegs(scratch=0xDEADBEEF, src=0x1_0000_0000, dst=0x2000, len=4096,
                         ctrl=0, status=0x1, irq_count=3),
    )
