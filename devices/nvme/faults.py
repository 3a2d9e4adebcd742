"""What NVMe fault rules can match and do (vfu_server.faults, docs/faults.md).

Ops are I/O opcodes, queues are SQ ids, LBAs are the namespace's logical blocks. Statuses are
the 15-bit status field (SCT << 8 | SC, More bit 13, DNR bit 14): a name below,
``SCT/SC`` with SCT a number or ``generic``/``command``/``media``/``path``/``vendor``, or
the raw field.
"""

from __future__ import annotations

from vfu_server.faults import FaultDomain

from .constants import DNR, IoOpcode, Status

MORE = 1 << 13
_SCT = {"generic": 0, "command": 1, "cmd": 1, "media": 2, "path": 3, "vendor": 7}


def parse_status(text: str) -> int:
    sct_text, slash, sc_text = text.partition("/")
    if not slash:
        value = int(text, 0)
        if not 0 <= value <= 0x7FFF:
            raise ValueError("the status field is 15 bits")
        return value
    sct = _SCT.get(sct_text.lower())
    if sct is None:
        sct = int(sct_text, 0)
    sc = int(sc_text, 0)
    if not 0 <= sct <= 7 or not 0 <= sc <= 0xFF:
        raise ValueError("SCT is 0..7 and SC 0..255")
    return sct << 8 | sc


NVME_FAULTS = FaultDomain(
    name="nvme",
    ops={"flush": IoOpcode.FLUSH, "write": IoOpcode.WRITE, "read": IoOpcode.READ,
         "write-uncorrectable": 0x04, "compare": IoOpcode.COMPARE, "write-zeroes": IoOpcode.WRITE_ZEROES,
         "dsm": IoOpcode.DATASET_MANAGEMENT, "verify": IoOpcode.VERIFY},
    matches=frozenset({"op", "ns", "lba", "queue"}),
    actions=frozenset({"status", "delay", "hang", "corrupt", "torn", "fatal", "reset"}),
    statuses={
        "ok": Status.SUCCESS, "success": Status.SUCCESS,
        "ure": Status.UNRECOVERED_READ_ERROR, "unrecovered-read-error": Status.UNRECOVERED_READ_ERROR,
        "write-fault": Status.WRITE_FAULT, "internal": Status.INTERNAL_ERROR,
        "data-transfer": Status.DATA_TRANSFER_ERROR, "aborted": Status.ABORTED_BY_REQUEST,
        "lba-out-of-range": Status.LBA_OUT_OF_RANGE, "compare-failure": Status.COMPARE_FAILURE,
        "namespace-not-ready": 0x082, "guard-check": 0x282, "access-denied": 0x286,
        "deallocated": 0x287,
    },
    parse_status=parse_status,
    flags={"dnr": DNR, "more": MORE},
    fast_ops=frozenset({IoOpcode.READ, IoOpcode.WRITE}),
)

#: opcodes whose CDW10-12 hold SLBA and NLB (the ones ``lba=`` can match)
LBA_OPCODES = frozenset({IoOpcode.READ, IoOpcode.WRITE, 0x04, IoOpcode.COMPARE, IoOpcode.WRITE_ZEROES,
                         IoOpcode.VERIFY})
