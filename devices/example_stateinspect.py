"""``example/std/1`` and ``opaque/vfu-example`` for the independent reader, written from
docs/migration-format.md 5.2.

Registered into :mod:`vfu_server.stateinspect.reader` when the reader is imported (entry point
``vfu_server.stateinspect`` in pyproject.toml). Standard library only, like the reader.
"""

from __future__ import annotations

from vfu_server.stateinspect.reader import (
    OPAQUE_RECORDS,
    PCI_RECORDS,
    register_format,
    register_records,
)

register_records({
    0x0300: ("EXAMPLE_REGS", [("scratch", "I"), ("len", "I"), ("src", "Q"), ("dst", "Q"),
                              ("ctrl", "I"), ("status", "I"), ("irq_count", "I"),
                              ("reserved0", "I")], False),
})
# Section 5.2's table.
register_format("example/std/1", [*PCI_RECORDS, 0x0300])
register_format("opaque/vfu-example", OPAQUE_RECORDS)
