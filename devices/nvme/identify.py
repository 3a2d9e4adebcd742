"""Identify data structures (NVMe Base 5.17.2, NVM Command Set 4.1.5): pure byte builders."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .constants import NVME_VERSION_1_4

IDENTIFY_SIZE = 4096

#: LBA formats offered: index -> log2(block size)
LBA_FORMATS = (9, 12)

# OACS: Format NVM (bit 1), Doorbell Buffer Config (bit 8)
OACS = (1 << 1) | (1 << 8)
# ONCS: Compare, DSM, Write Zeroes, Save/Select in features, Timestamp, Verify
ONCS = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7)
ABORT_LIMIT = 4  # ACL + 1
AER_LIMIT = 4  # AERL + 1
ERROR_LOG_ENTRIES = 64  # ELPE + 1
WCTEMP = 343  # 70 C
CCTEMP = 353  # 80 C
COMPOSITE_TEMPERATURE = 313  # 40 C


@dataclass(frozen=True)
class ControllerInfo:
    """What Identify Controller reports; fixed for the life of the device."""

    vendor_id: int
    subsystem_vendor_id: int
    serial: str
    model: str
    firmware: str
    mdts: int
    max_queues: int
    max_queue_entries: int
    namespace_count: int
    controller_id: int = 1

    @property
    def subnqn(self) -> str:
        return f"nqn.2024-01.io.vfu-server:nvme:{self.serial}"


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


def controller(info: ControllerInfo, volatile_write_cache: bool = True) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", d, 0, info.vendor_id, info.subsystem_vendor_id)
    d[4:24] = _ascii(info.serial, 20)
    d[24:64] = _ascii(info.model, 40)
    d[64:72] = _ascii(info.firmware, 8)
    d[72] = 6  # RAB
    d[73:76] = b"\x00\x54\x52"  # IEEE OUI (locally administered style)
    d[77] = info.mdts
    struct.pack_into("<H", d, 78, info.controller_id)
    struct.pack_into("<I", d, 80, NVME_VERSION_1_4)
    struct.pack_into("<I", d, 84, 1_000_000)  # RTD3R: 1 s
    struct.pack_into("<I", d, 88, 1_000_000)  # RTD3E
    struct.pack_into("<I", d, 92, 1 << 8)  # OAES: namespace attribute notices
    d[111] = 1  # CNTRLTYPE: I/O controller
    struct.pack_into("<H", d, 256, OACS)
    d[258] = ABORT_LIMIT - 1
    d[259] = AER_LIMIT - 1
    d[260] = 0x3  # FRMW: slot 1 read-only, one slot
    d[261] = 0x7  # LPA: SMART per namespace, command effects log, extended data
    d[262] = ERROR_LOG_ENTRIES - 1
    d[263] = 0  # NPSS: one power state
    struct.pack_into("<HH", d, 266, WCTEMP, CCTEMP)
    d[512] = 0x66  # SQES: 64 bytes
    d[513] = 0x44  # CQES: 16 bytes
    struct.pack_into("<H", d, 514, info.max_queue_entries)  # MAXCMD
    struct.pack_into("<I", d, 516, info.namespace_count)
    struct.pack_into("<H", d, 520, ONCS)
    # VWC present; flush with NSID FFFFFFFFh applies to all namespaces
    d[525] = 0x7 if volatile_write_cache else 0x6
    struct.pack_into("<I", d, 536, 0x1 | 1 << 16)  # SGLS: supported, bit bucket
    d[768:1024] = info.subnqn.encode()[:256].ljust(256, b"\0")
    # Power state 0: 9 W, entry/exit latency 0
    struct.pack_into("<H", d, 2048, 900)
    return bytes(d)


def namespace_ids(serial: str, nsid: int) -> tuple[bytes, bytes]:
    """(NGUID, EUI64) unique per controller serial and namespace, stable across restarts."""
    digest = hashlib.sha256(f"vfu-nvme/{serial}/{nsid}".encode()).digest()
    return digest[:16], digest[16:24]


def namespace(nsze: int, lba_format: int, nguid: bytes, eui64: bytes) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", d, 0, nsze, nsze, nsze)
    d[24] = 0  # NSFEAT
    d[25] = len(LBA_FORMATS) - 1  # NLBAF
    d[26] = lba_format  # FLBAS
    # DLFEAT: deallocated blocks read as zeroes, Write Zeroes may deallocate
    d[33] = 0x1 | 1 << 3
    d[104:120] = nguid
    d[120:128] = eui64
    for i, shift in enumerate(LBA_FORMATS):
        # relative performance: 4 KiB is "better" (0), 512 "good" (1)
        rp = 0 if shift == 12 else 1
        struct.pack_into("<I", d, 128 + 4 * i, shift << 16 | rp << 24)
    return bytes(d)


def namespace_id_descriptors(nguid: bytes, eui64: bytes) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    pos = 0
    for nidt, value in ((1, eui64), (2, nguid), (4, b"\x00")):  # EUI64, NGUID, CSI = NVM
        d[pos] = nidt
        d[pos + 1] = len(value)
        d[pos + 4 : pos + 4 + len(value)] = value
        pos += 4 + len(value)
    return bytes(d)


def active_namespaces(nsids: list[int], after: int) -> bytes:
    chosen = [n for n in sorted(nsids) if n > after][:1024]
    return struct.pack(f"<{len(chosen)}I", *chosen).ljust(IDENTIFY_SIZE, b"\0")


def nvm_csi_namespace() -> bytes:
    """NVM Command Set specific Identify Namespace: no protection, no extended LBA formats."""
    return bytes(IDENTIFY_SIZE)


def nvm_csi_controller() -> bytes:
    """NVM Command Set specific Identify Controller: all size limits 0 (= MDTS applies)."""
    return bytes(IDENTIFY_SIZE)


def csi_independent_namespace(lba_format: int) -> bytes:
    d = bytearray(IDENTIFY_SIZE)
    d[4] = 0  # NMIC
    d[20] = 0x1  # NSTAT: namespace ready
    return bytes(d)
