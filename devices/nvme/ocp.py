"""The OCP Datacenter NVMe SSD specification's Error Injection feature (FID C0h), mapped onto
fault rules, so that a guest can inject errors itself: ``nvme ocp set-error-injection`` /
``get-error-injection`` (nvme-cli's OCP plugin; ``-N``/``-n``: without the OCP UUID index,
which this controller does not list).

Set Features C0h: CDW11 bits 6:0 the number of entries, the data buffer that many 32-byte
entries (byte 0: bit 0 enable, bit 1 single instance; bytes 3:2 the error type; bytes 5:4
NRTDP, the number of reads to trigger a "device panic"). A Set replaces the previous set. Get
Features returns the number of entries in dword 0 and the entries in a 4 KiB buffer; an
entry's enable bit reads 0 once its single instance has fired. docs/faults.md has the table
of what each type becomes.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vfu_server.faults import FaultError

from .constants import Status
from .errors import NvmeError

if TYPE_CHECKING:
    from .command import Command
    from .controller import NvmeController

FID_ERROR_INJECTION = 0xC0
ENTRY = struct.Struct("<BxHH26x")
MAX_ENTRIES = 127
ENABLE, SINGLE = 1, 2

_MEDIA = "read|write"
#: error type -> (ops, action, whether it is a "device panic" that NRTDP reads trigger)
TYPES: dict[int, tuple[str, str, bool]] = {
    1: (_MEDIA, "reset", True),  # CPU/controller hang: I/O stops until a controller reset
    2: (_MEDIA, "hang", True),  # NAND hang: the command never completes
    4: (_MEDIA, "fatal", True),  # logical firmware error
    5: (_MEDIA, "fatal", True),  # DRAM corruption, critical
    6: ("read", "corrupt", False),  # DRAM corruption, not critical: silent bit flips
    7: ("read", "status=ure", False),  # NAND corruption: Unrecovered Read Error
    8: (_MEDIA, "fatal", True),  # SRAM corruption
    9: (_MEDIA, "fatal", True),  # hardware malfunction
    10: ("write|write-zeroes", "status=write-fault,dnr", False),  # no more NAND spares
    14: (_MEDIA, "delay=100", False),  # latency spike
    15: (_MEDIA, "status=internal", False),  # I/O command failure
    16: (_MEDIA, "hang", False),  # I/O command timeout
}


def rule_text(etype: int, single: bool, nrtdp: int) -> str:
    """The fault rule an enabled entry becomes; NvmeError for a type with no equivalent here."""
    mapped = TYPES.get(etype)
    if mapped is None:
        raise NvmeError(Status.INVALID_FIELD, f"OCP error injection type {etype} not supported")
    ops, action, panic = mapped
    if panic:
        # A panic happens once: at the NRTDP-th read from now, or at the next command.
        return f"op=read,every={nrtdp},count=1,{action}" if nrtdp else f"op={ops},count=1,{action}"
    return f"op={ops},{action}" + (",count=1" if single else "")


def set_error_injection(ctrl: NvmeController, cmd: Command, data: bytes) -> int:
    count = cmd.cdw11 & 0x7F
    entries = [bytes(data[i * ENTRY.size : (i + 1) * ENTRY.size]) for i in range(count)]
    texts = []
    for raw in entries:
        flags, etype, nrtdp = ENTRY.unpack(raw)
        texts.append(rule_text(etype, bool(flags & SINGLE), nrtdp) if flags & ENABLE else None)
    # All entries are valid: only now replace the previous set (a refused Set changes nothing).
    for _, rule_id in ctrl.ocp_injections:
        if rule_id is not None:
            try:
                ctrl.faults.remove(rule_id)
            except FaultError:
                pass  # removed meanwhile through the control socket
    ctrl.ocp_injections = []
    for raw, text in zip(entries, texts, strict=True):
        rule_id = None
        if text is not None:
            try:
                rule_id = ctrl.faults.add(text).id
            except FaultError as exc:
                raise NvmeError(Status.INTERNAL_ERROR, exc.reason) from None
        ctrl.ocp_injections.append((raw, rule_id))
    return 0


def get_error_injection(ctrl: NvmeController) -> tuple[int, bytes]:
    """(dword 0, the data buffer) of Get Features C0h."""
    live = {r.id: r for r in ctrl.faults.rules()}
    out = bytearray()
    for raw, rule_id in ctrl.ocp_injections:
        entry = bytearray(raw)
        rule = live.get(rule_id) if rule_id is not None else None
        if rule is None or rule.spent:
            entry[0] &= ~ENABLE
        out += entry
    return len(ctrl.ocp_injections), bytes(out).ljust(MAX_ENTRIES * ENTRY.size + 32, b"\0")[:4096]
