"""Decoding a 64-byte submission queue entry, and where its data lives."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import Status
from .dptr import Memory, Segment, prp_segments, sgl_segments
from .errors import NvmeError

_SQE = struct.Struct("<BBHIIIQQQ6I")


@dataclass(slots=True)
class Command:
    opcode: int
    flags: int
    cid: int
    nsid: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int
    dptr: bytes
    sqid: int = 0

    @classmethod
    def decode(cls, raw: bytes | memoryview, sqid: int = 0) -> Command:
        (opc, flags, cid, nsid, _cdw2, _cdw3, mptr, prp1, prp2,
         c10, c11, c12, c13, c14, c15) = _SQE.unpack_from(raw)
        return cls(opc, flags, cid, nsid, mptr, prp1, prp2, c10, c11, c12, c13, c14, c15,
                   bytes(raw[24:40]), sqid)

    def encode(self) -> bytes:
        return _SQE.pack(self.opcode, self.flags, self.cid, self.nsid, 0, 0, self.mptr, self.prp1,
                         self.prp2, self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14,
                         self.cdw15)

    @property
    def psdt(self) -> int:
        return (self.flags >> 6) & 3

    @property
    def fuse(self) -> int:
        return self.flags & 3

    def segments(self, mem: Memory, length: int, page_size: int, *, to_host: bool) -> list[Segment]:
        """Guest memory of this command's data transfer of ``length`` bytes."""
        psdt = self.psdt
        if psdt == 0:
            return prp_segments(mem, self.prp1, self.prp2, length, page_size)
        if psdt == 3:
            raise NvmeError(Status.INVALID_FIELD, "PSDT 3 is reserved")
        if length <= 0:
            return []
        return sgl_segments(mem, self.dptr, length, to_host=to_host)
