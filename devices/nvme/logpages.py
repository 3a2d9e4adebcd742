"""Log pages (NVMe Base 5.16): pure byte builders from the controller state."""

from __future__ import annotations

import struct

from .constants import AdminOpcode, IoOpcode
from .identify import COMPOSITE_TEMPERATURE, ERROR_LOG_ENTRIES
from .state import ErrorLogEntry, SmartCounters

ERROR_ENTRY_SIZE = 64
SMART_SIZE = 512
FIRMWARE_SLOT_SIZE = 512
CHANGED_NS_SIZE = 4096
EFFECTS_SIZE = 4096

EFFECT_CSUPP = 1 << 0
EFFECT_LBCC = 1 << 1
EFFECT_NCC = 1 << 2


def error_information(entries: list[ErrorLogEntry]) -> bytes:
    """Newest first, as the spec orders them."""
    out = bytearray(ERROR_ENTRY_SIZE * ERROR_LOG_ENTRIES)
    for i, e in enumerate(reversed(entries[-ERROR_LOG_ENTRIES:])):
        # status field as in the CQE, bit 0 (phase) cleared; parameter location unknown (FFFFh)
        struct.pack_into("<QHHHHQI", out, i * ERROR_ENTRY_SIZE, e.error_count, e.sqid, e.cid,
                         (e.status << 1) & 0xFFFF, 0xFFFF, e.lba, e.nsid)
    return bytes(out)


def _u128(value: int) -> bytes:
    return min(value, (1 << 128) - 1).to_bytes(16, "little")


def smart(s: SmartCounters, critical_warning: int, power_on_seconds: int) -> bytes:
    d = bytearray(SMART_SIZE)
    d[0] = critical_warning
    struct.pack_into("<H", d, 1, COMPOSITE_TEMPERATURE)
    d[3] = 100  # available spare %
    d[4] = 10  # available spare threshold %
    d[5] = 0  # percentage used
    # Data units are thousands of 512-byte units, rounded up.
    d[32:48] = _u128(-(-s.bytes_read // 512_000))
    d[48:64] = _u128(-(-s.bytes_written // 512_000))
    d[64:80] = _u128(s.host_read_commands)
    d[80:96] = _u128(s.host_write_commands)
    d[96:112] = _u128(s.busy_time_minutes)
    d[112:128] = _u128(s.power_cycles)
    d[128:144] = _u128(power_on_seconds // 3600)
    d[144:160] = _u128(s.unsafe_shutdowns)
    d[160:176] = _u128(s.media_errors)
    d[176:192] = _u128(s.error_count)
    return bytes(d)


def firmware_slot(firmware: str) -> bytes:
    d = bytearray(FIRMWARE_SLOT_SIZE)
    d[0] = 0x1  # active slot 1
    d[8:16] = firmware.encode("ascii", "replace")[:8].ljust(8, b" ")
    return bytes(d)


def changed_namespaces(nsids: list[int]) -> bytes:
    if len(nsids) > 1024:
        return struct.pack("<I", 0xFFFFFFFF).ljust(CHANGED_NS_SIZE, b"\0")
    return struct.pack(f"<{len(nsids)}I", *nsids).ljust(CHANGED_NS_SIZE, b"\0")


def commands_effects() -> bytes:
    acs = [0] * 256
    iocs = [0] * 256
    for op in AdminOpcode:
        acs[op] = EFFECT_CSUPP
    acs[AdminOpcode.FORMAT_NVM] |= EFFECT_LBCC | EFFECT_NCC
    for op in IoOpcode:
        iocs[op] = EFFECT_CSUPP
    for op in (IoOpcode.WRITE, IoOpcode.WRITE_ZEROES, IoOpcode.DATASET_MANAGEMENT):
        iocs[op] |= EFFECT_LBCC
    return struct.pack("<512I", *acs, *iocs)
