"""CRC-32C (Castagnoli), the checksum used by the device-state envelope.

Parameters: reflected polynomial 0x82F63B78, initial value 0xFFFFFFFF, final
XOR 0xFFFFFFFF; ``crc32c(b"123456789") == 0xE3069283``.  CRC-32C rather than
zlib's CRC-32 because it is what the design (and iSCSI, ext4, NVMe) uses and
hardware can compute it; the state streams are kilobytes, so a table-driven
pure-Python loop is fast enough.
"""

from __future__ import annotations

__all__ = ["crc32c"]


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Return the CRC-32C of ``data``; pass a previous result as ``crc`` to continue it."""
    c = crc ^ 0xFFFFFFFF
    table = _TABLE
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF
