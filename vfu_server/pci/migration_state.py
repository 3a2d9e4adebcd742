"""The generic PCI part of every migratable device's state: the profile a destination compares
before it loads, config space, the MSI-X table and pending bits, the INTx level.

Only a migration needs this (and the state classes of :mod:`vfu_server.migration.generic`
behind it), so :class:`~vfu_server.pci.device.PciDevice` imports it on first use.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import struct
import typing
from typing import TYPE_CHECKING, Any

from ..migration.generic import IntxState, MsixState, MsixVector, PciConfigState, PciProfile
from .capabilities import PciExpress, PowerManagement
from .config import COMMAND, INTERRUPT_LINE, ROM
from .device import state_hints

if TYPE_CHECKING:
    from .device import PciDevice

def pci_profile(device: PciDevice, device_abi: bytes = b"", backend_hash: bytes = bytes(32)) -> PciProfile:
    ident = type(device).identity
    sizes = tuple(b.size if b else 0 for b in device.bars)
    flags = tuple(b.kind.type_bits() if b else 0 for b in device.bars)
    caps = bytes(x for c in device.caps for x in (c.cap_id & 0xFF, (c.offset or 0) & 0xFF) if not c.extended)
    msix = device.msix
    return PciProfile(
        vendor_id=ident.vendor_id, device_id=ident.device_id,
        subsys_vendor_id=ident.subsystem_vendor_id, subsys_id=ident.subsystem_id,
        class_code=ident.class_code, revision=ident.revision,
        bar_sizes=sizes, bar_flags=flags,
        msix_vectors=msix.vectors if msix else 0,
        msix_table_bir=msix.table_bar if msix else 0, msix_table_offset=msix.table_offset if msix else 0,
        msix_pba_bir=msix.pba_bar if msix else 0, msix_pba_offset=msix.pba_offset if msix else 0,
        capabilities=caps, backend_hash=backend_hash, device_abi=device_abi,
    )


def pci_state(device: PciDevice) -> dict[str, Any]:
    """``pci``, ``msix`` and ``intx`` of the state dataclasses, read from the device."""
    cfg = device.config
    d = cfg.data
    u16 = lambda off: int.from_bytes(d[off : off + 2], "little")  # noqa: E731
    u32 = lambda off: int.from_bytes(d[off : off + 4], "little")  # noqa: E731
    pm = cfg.find(PowerManagement)
    pcie = cfg.find(PciExpress)
    msix = device.msix
    pci = PciConfigState(
        command=u16(COMMAND), cache_line_size=d[0x0C], latency_timer=d[0x0D],
        interrupt_line=d[INTERRUPT_LINE],
        pm_control=u16(pm.offset + 4) if pm and pm.offset else 0,
        bars=tuple(u32(0x10 + 4 * i) for i in range(6)), rom_bar=u32(ROM),
        pcie_devctl=u16(pcie.offset + 8) if pcie and pcie.offset else 0,
        pcie_devctl2=u16(pcie.offset + 0x28) if pcie and pcie.offset else 0,
        pcie_lnkctl=u16(pcie.offset + 0x10) if pcie and pcie.offset else 0,
        msix_control=u16(msix.offset + 2) if msix and msix.offset else 0,
    )
    vectors = []
    table = device.msix_table
    for i in range(msix.vectors if msix else 0):
        addr, data, ctrl = struct.unpack_from("<QII", table, i * 16)
        vectors.append(MsixVector(addr, data, ctrl))
    pba = b""
    if msix:
        bits = device.irqs.pending_bits(2)  # type: ignore[arg-type]
        pba = bytes(
            sum(1 << b for b in range(8) if i * 8 + b < len(bits) and bits[i * 8 + b])
            for i in range((msix.vectors + 7) // 8)
        )
    return {"pci": pci, "msix": MsixState(tuple(vectors), pba), "intx": IntxState(int(device.irqs.intx_asserted))}


def load_pci_state(device: PciDevice, pci: PciConfigState, msix: MsixState, intx: IntxState) -> None:
    """Apply the generic PCI part of a validated state (the destination was reset first)."""
    cfg = device.config
    d = cfg.data

    def put(off: int, size: int, value: int) -> None:
        d[off : off + size] = value.to_bytes(size, "little")

    put(COMMAND, 2, pci.command & 0x0547)
    d[0x0C], d[0x0D], d[INTERRUPT_LINE] = pci.cache_line_size, pci.latency_timer, pci.interrupt_line
    for i, bar in enumerate(pci.bars):
        mask = int.from_bytes(cfg.wmask[0x10 + 4 * i : 0x14 + 4 * i], "little")
        base = int.from_bytes(cfg.initial[0x10 + 4 * i : 0x14 + 4 * i], "little")
        put(0x10 + 4 * i, 4, (base & ~mask) | (bar & mask))
    rom_mask = int.from_bytes(cfg.wmask[ROM : ROM + 4], "little")
    put(ROM, 4, pci.rom_bar & rom_mask)
    pm = cfg.find(PowerManagement)
    if pm and pm.offset:
        put(pm.offset + 4, 2, (int.from_bytes(d[pm.offset + 4 : pm.offset + 6], "little") & ~0x0103) | (pci.pm_control & 0x0103))
    pcie = cfg.find(PciExpress)
    if pcie and pcie.offset:
        for off, value in ((8, pci.pcie_devctl), (0x28, pci.pcie_devctl2), (0x10, pci.pcie_lnkctl)):
            mask = int.from_bytes(cfg.wmask[pcie.offset + off : pcie.offset + off + 2], "little")
            old = int.from_bytes(d[pcie.offset + off : pcie.offset + off + 2], "little")
            put(pcie.offset + off, 2, (old & ~mask) | (value & mask))
    if device.msix and device.msix.offset:
        old = int.from_bytes(d[device.msix.offset + 2 : device.msix.offset + 4], "little")
        put(device.msix.offset + 2, 2, (old & 0x3FFF) | (pci.msix_control & 0xC000))
        for i, vec in enumerate(msix.vectors[: device.msix.vectors]):
            struct.pack_into("<QII", device.msix_table, i * 16, vec.addr, vec.data, vec.ctrl)
        line = device.irqs.lines[2]  # type: ignore[index]
        for i in range(device.msix.vectors):
            byte = msix.pba[i // 8] if i // 8 < len(msix.pba) else 0
            # Mask bits stay with the client: QEMU emulates the table and never writes ours,
            # so only the pending bits are device state.
            line.pending[i] = bool(byte >> (i % 8) & 1)
    device.irqs.intx_asserted = bool(intx.level)
    cfg.set_interrupt_status(bool(intx.level))


# -- migration with no migration code: devices that name their dataclass state ------------------

@functools.cache
def auto_formats(cls: type[PciDevice]) -> Any:
    """The opaque format of a device that declares ``migration_state`` and no formats: its
    state dataclasses with the generic PCI part, as schema-checked TLV (the destination refuses
    a source whose dataclasses have another shape)."""
    from ..migration.formats import FormatSet, OpaqueFormat

    fields: list[Any] = [("profile", PciProfile)]
    fields += [(n, t, dataclasses.field(default_factory=t)) for n, t in (
        ("pci", PciConfigState), ("msix", MsixState), ("intx", IntxState))]
    fields += list(state_hints(cls).items())
    state_type = dataclasses.make_dataclass(f"{cls.__name__}MigrationState", fields, frozen=True,
                                            kw_only=True)
    state_type.__module__ = cls.__module__
    family = cls.cli_name or cls.__name__.lower()
    fmt = OpaqueFormat(f"opaque/auto/{family}", state_type=state_type, profile=lambda s: s.profile,
                       description=f"{cls.__name__}'s dataclass state, saved with no device code")
    return FormatSet([fmt])


def _state_type(cls: type[PciDevice]) -> type:
    from .migration import migration_formats_of

    types_ = {f.state_type for f in migration_formats_of(cls)}
    if len(types_) != 1:
        raise TypeError(f"{cls.__name__}: its formats have different state types; "
                        "implement save_state and load_state")
    return types_.pop()


def _convert(value: Any, tp: type) -> Any:
    """A copy of dataclass ``value`` as ``tp`` (the same type, or one with the same fields): the
    saved state must not change with the device, nor the loaded one be shared with the stream."""
    if type(value) is tp:
        return copy.deepcopy(value)
    return tp(**{f.name: copy.deepcopy(getattr(value, f.name)) for f in dataclasses.fields(tp)})


def save_declared_state(device: PciDevice) -> Any:
    cls = type(device)
    state_type = _state_type(cls)
    hints = typing.get_type_hints(state_type)
    own = {name: _convert(getattr(device, name), hints[name]) for name in cls.migration_state}
    return state_type(profile=device.migration_profile(), **device.pci_state(), **own)


def load_declared_state(device: PciDevice, state: Any) -> None:
    device.load_pci_state(state)
    for name, tp in state_hints(type(device)).items():
        setattr(device, name, _convert(getattr(state, name), tp))
